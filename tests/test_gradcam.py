"""Grad-CAM: the gradient through model.apply, layer choice, the grid, and synthetic truth."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import mnres
from mnres.data import synthetic
from mnres.data.augment import preprocess
from mnres.reporting import gradcam


def _tiny(num_blocks=3):
    return mnres.create_model(
        "mobilenet_v1_residual", alpha=0.25, num_blocks=num_blocks, num_classes=2,
        bn_momentum=0.9, dropout=0.0,
    )  # fmt: skip


def _init(model, seed, *shape):
    # Jitted: eager flax init runs op by op (~15 s on a busy CPU); compiling it takes ~8 s.
    return jax.jit(lambda: model.init(jax.random.key(seed), jnp.zeros(shape), train=False))()


def _random_variables(model, size, seed=0):
    """Variables of the right shapes drawn in numpy: no init to compile, distinct BN stats."""
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "var" in name or "scale" in name:
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        return rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape).astype(np.float32)

    return jax.tree.map_with_path(draw, shapes)


def test_default_layer_is_the_deepest_map_of_at_least_7x7():
    v2 = mnres.create_model("mobilenet_v2", alpha=0.35, num_classes=2)
    assert gradcam.default_layer(v2, 224) == "head"  # 7x7: the canonical Grad-CAM layer
    assert gradcam.default_layer(v2, 64) == "block_5"  # 8x8; the head is 2x2 at 64 px
    assert gradcam.layer_shapes(v2, 64)["head"] == (1, 2, 2, 1280)
    assert gradcam.default_layer(_tiny(5), 64) == "block_5"
    assert gradcam.default_layer(_tiny(3), 32) == "block_3"


def test_gradcam_of_the_last_feature_map_is_cam():
    # At the feature map before global pooling and the dense layer, d(z1 - z0)/dA_k is
    # (W[k, 1] - W[k, 0]) / (h w) everywhere: Grad-CAM reduces to CAM (Zhou et al. 2016).
    model = _tiny()
    images = synthetic.draw_cells(4, 32, 2, 0)[0]
    variables = _random_variables(model, 32, seed=1)
    heat, probs = gradcam.gradcam(model, variables, images, layer="block_3", normalize="none")
    logits, out = jax.jit(lambda v, x: model.apply(v, preprocess(x), train=False))(
        variables, images
    )
    w = variables["params"]["conv_preds"]["kernel"]
    fmap = out["feature_map"]
    cam = jax.nn.relu(jnp.einsum("bhwk,k->bhw", fmap, w[:, 1] - w[:, 0]) / 64.0)
    expected = jax.nn.relu(jax.image.resize(cam, (4, 32, 32), "bilinear"))
    np.testing.assert_allclose(heat, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probs, jax.nn.softmax(logits)[:, 1], rtol=1e-5)
    assert heat.max() > 0


def test_gradcam_shapes_normalization_and_errors():
    model = _tiny()
    variables = _random_variables(model, 32)
    images = synthetic.draw_cells(5, 32, 2, 0)[0]
    heat, probs = gradcam.gradcam(model, variables, images, batch_size=2)  # padded last batch
    assert heat.shape == (5, 32, 32) and probs.shape == (5,)
    assert heat.min() >= 0 and heat.max() <= 1
    peaks = heat.max(axis=(1, 2))
    assert np.all((np.abs(peaks - 1) < 1e-6) | (peaks == 0))
    shared, _ = gradcam.gradcam(model, variables, images, normalize="shared")
    assert shared.min() >= 0 and shared.max() <= 1
    with pytest.raises(ValueError, match="not a module"):
        gradcam.gradcam(model, variables, images, layer="block_99")
    with pytest.raises(ValueError, match="normalize"):
        gradcam.gradcam(model, variables, images, normalize="max")


def test_select_examples():
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    probs = np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.95, 0.45, 0.6])
    correct, wrong = gradcam.select_examples(labels, probs, num=4)
    assert sorted(correct) == [0, 1, 3, 4]
    assert labels[correct[0]] == 1 and labels[correct[1]] == 0  # alternating classes
    # Most confident false negative (2), most confident false positive (5), then the rest.
    assert wrong == [2, 5, 6, 7]
    assert gradcam.select_examples(labels, probs, num=1) == ([correct[0]], [2])


def test_plot_gradcam_grid(tmp_path):
    images = synthetic.draw_cells(6, 32, 2, 0)[0]
    heat = np.random.default_rng(0).random((6, 32, 32)).astype(np.float32)
    labels, probs = np.array([1, 0, 1, 0, 1, 0]), np.array([0.9, 0.1, 0.2, 0.7, 0.8, 0.3])
    path = tmp_path / "grid.png"
    gradcam.plot_gradcam_grid(images, heat, labels, probs, [0, 1, 4], [2, 3], str(path),
                              title="test")  # fmt: skip
    with Image.open(path) as image:
        assert image.size[0] > 400 and image.size[1] > 100
    gradcam.plot_gradcam_grid(images, heat, labels, probs, [0], [], str(path))  # no mistakes


@pytest.mark.slow
def test_heat_sits_on_the_drawn_chromatin_dots():
    """Trained on synthetic cells, the parasitized heat lies on the parasite marks (~45 s)."""
    size, n_train = 64, 1200
    images, labels, _, masks = synthetic.draw_cells(1500, size, 20, 0, return_masks=True)
    model = _tiny(5)  # the 8x8 map of block_5 at 64 px, as MobileNetV2's block_5
    variables = _init(model, 0, 1, size, size, 3)
    tx = optax.adam(3e-3)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(variables, opt_state, x, y):
        def loss_fn(params):
            (logits, _), updates = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, preprocess(x),
                train=True, mutable=["batch_stats"],
            )  # fmt: skip
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates["batch_stats"]

        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return {"params": params, "batch_stats": stats}, opt_state

    rng = np.random.default_rng(0)
    for _ in range(250):
        idx = rng.integers(0, n_train, 32)
        variables, opt_state = step(variables, opt_state, images[idx], labels[idx])
    test_images, test_labels, test_masks = images[n_train:], labels[n_train:], masks[n_train:]
    heat, probs = gradcam.gradcam(model, variables, test_images)  # default layer: block_5
    assert np.mean((probs >= 0.5) == (test_labels == 1)) > 0.9
    chosen = (test_labels == 1) & (probs >= 0.5)
    ratios = []
    for h, mask in zip(heat[chosen], test_masks[chosen], strict=True):
        inside = mask > 0.5
        ratios.append(h[inside].mean() / max(h[~inside].mean(), 1e-6))
    ratios = np.array(ratios)
    # The marks cover ~2% of a crop; the heat inside them is several times that outside.
    assert np.mean(ratios > 2.0) > 0.8, np.percentile(ratios, [10, 50, 90])
    assert np.median(ratios) > 3.0


def test_an_ensembles_map_is_its_members_mean_and_its_p_the_ensembles():
    from data_fixtures import tiny_crossval_config

    from mnres.models.ensemble import member_variables

    plain = tiny_crossval_config().model.to_dict()
    members = [plain, {**plain, "input_normalization": "gray_world"}]
    model = mnres.models.from_config({"name": "ensemble", "members": members})
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    variables = model.init(jax.random.key(0), preprocess(images))
    heat, prob = gradcam.gradcam(model, variables, images)
    raw = [
        gradcam.gradcam(m, member_variables(variables, i), images, normalize="none")[0]
        for i, m in enumerate(model.members)
    ]
    mean = np.mean(raw, axis=0)
    assert np.all(mean.max(axis=(1, 2)) > 0)  # a map to compare, not zeros
    np.testing.assert_allclose(heat, mean / mean.max(axis=(1, 2), keepdims=True), atol=1e-6)
    logits, _ = model.apply(variables, preprocess(images), train=False)
    np.testing.assert_allclose(prob, np.asarray(jax.nn.softmax(logits))[:, 1], atol=1e-5)
    assert heat.shape == images.shape[:3]  # at the crop's resolution


def test_the_grid_of_the_shipped_model(tmp_path):
    from mnres.data import sample
    from mnres.data.splits import Split
    from mnres.deploy import crops

    classifier = mnres.load_pretrained("malaria").classifier
    paths = sorted(sample.sample_cells())[::25]
    images = np.stack([crops.read_crop(p, classifier.image_size)[0] for p in paths])
    labels = np.array(sample.sample_labels(paths), np.int32)
    split = Split(images, labels, np.array([""] * len(paths)), np.array(paths))
    out = gradcam.explain_split(classifier, split, str(tmp_path / "grid.png"), num=2)
    assert (tmp_path / "grid.png").stat().st_size > 0 and out["layer"].startswith("block")
