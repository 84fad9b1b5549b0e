"""Keras -> mnres weight import: logits parity with keras.applications, files, the seed network.

Parity is the proof that our blocks compute Keras' network, padding included: at 97 px the
stride-2 layers see odd sizes, where Keras' paddings differ from each other and from a naive
'SAME'. It runs for both depthwise formulations. BatchNorm statistics are randomised,
or BN would be the identity and untested. The Keras tests skip where Keras is not installed.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # TensorFlow may be installed too

import jax
import numpy as np
import pytest

import mnres
from mnres.models.params import abstract_variables
from mnres.weights.keras import LoadReport, load_keras_weights

h5py = pytest.importorskip("h5py")  # Keras depends on it; the legacy-file test needs only it

TOLERANCE = 1e-4  # max abs difference of logits and feature maps
NUM_CLASSES = 10
KERAS_MODELS = {"mobilenet_v1": "MobileNet", "mobilenet_v2": "MobileNetV2"}
FEATURES = {"mobilenet_v1": "conv_pw_13_relu", "mobilenet_v2": "out_relu"}  # before pooling
# The seed network (V1, alpha 1.0) keeps Keras' layers up to block 12's depthwise unit.
SEED_SKIPPED = {"conv_pw_12", "conv_pw_12_bn", "conv_dw_13", "conv_dw_13_bn", "conv_pw_13",
                "conv_pw_13_bn", "conv_preds"}  # fmt: skip


@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras")


def _randomise(model, rng):
    """Random BatchNorm statistics and affine parameters, random classifier bias."""
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            c = layer.get_weights()[0].shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c),
                               rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c)])  # fmt: skip
        elif layer.name in ("conv_preds", "predictions") and layer.weights:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.2, bias.shape)])


@pytest.fixture(scope="module")
def keras_model(keras):
    """`build(arch, alpha, size)` -> (Keras model, images, [Keras logits, feature map]), built
    once per module."""
    cache = {}

    def build(arch, alpha, size):
        key = (arch, alpha, size)
        if key not in cache:
            rng = np.random.default_rng(len(cache))
            model = getattr(keras.applications, KERAS_MODELS[arch])(
                alpha=alpha,
                weights=None,
                input_shape=(size, size, 3),
                classes=NUM_CLASSES,
                classifier_activation=None,
            )
            _randomise(model, rng)
            images = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
            # The feature map too: global pooling dilutes a one-pixel padding error 10-fold.
            both = keras.Model(model.input, [model.output, model.get_layer(FEATURES[arch]).output])
            cache[key] = model, images, [np.asarray(y) for y in both.predict(images, verbose=0)]
        return cache[key]

    return build


@pytest.mark.parametrize("formulation", ["grouped", "shifted"])
@pytest.mark.parametrize("size", [97, pytest.param(224, marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    "arch, alpha",
    [("mobilenet_v1", 0.25), ("mobilenet_v1", 0.5), ("mobilenet_v2", 0.35), ("mobilenet_v2", 0.5)],
)
def test_logits_match_keras(keras_model, arch, alpha, size, formulation):
    keras_net, images, (logits, features) = keras_model(arch, alpha, size)
    model = mnres.create_model(
        arch, alpha=alpha, num_classes=NUM_CLASSES, conv_formulation=formulation
    )
    variables, report = load_keras_weights(
        model, abstract_variables(model, (1, size, size, 3)), keras_net, strict=True
    )
    assert report.loaded == model.layer_names()
    assert not report.left_at_init and not report.skipped
    assert logits.std() > 0.05  # logits that carry signal, not a collapsed network

    ours, out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    np.testing.assert_allclose(out["feature_map"], features, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(ours, logits, rtol=0, atol=TOLERANCE)


@pytest.fixture(scope="module")
def seed_keras(keras):
    """Full Keras MobileNet (alpha 1, ImageNet top), its block-12 features at 97 px, and the
    initial variables of the seed network."""
    rng = np.random.default_rng(1)
    net = keras.applications.MobileNet(alpha=1.0, weights=None, input_shape=(97, 97, 3))
    _randomise(net, rng)
    images = rng.uniform(-1, 1, (2, 97, 97, 3)).astype(np.float32)
    features = keras.Model(net.input, net.get_layer("conv_dw_12_relu").output)
    model = mnres.create_model("paper", conv_formulation="grouped")
    init = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images[:1])
    return net, images, np.asarray(features.predict(images, verbose=0)), init


@pytest.mark.parametrize("formulation", ["grouped", "shifted"])
def test_seed_network_from_full_keras_mobilenet(seed_keras, formulation):
    keras_net, images, expected, init = seed_keras
    # Skips off: with them the seed network computes a different function than Keras' trunk.
    model = mnres.create_model("paper", residual=False, conv_formulation=formulation)
    variables, report = load_keras_weights(model, init, keras_net)

    assert report.loaded == model.layer_names()[:-1]
    assert list(report.left_at_init) == ["predictions"]  # the new two-class head
    assert set(report.skipped) == SEED_SKIPPED
    np.testing.assert_array_equal(
        variables["params"]["predictions"]["kernel"], init["params"]["predictions"]["kernel"]
    )
    text = str(report)
    assert "predictions: not in the Keras source" in text and "conv_pw_12_bn" in text

    _, out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    assert out["feature_map"].shape == expected.shape == (2, 3, 3, 512)
    np.testing.assert_allclose(out["feature_map"], expected, rtol=0, atol=TOLERANCE)

    with pytest.raises(ValueError, match="'predictions' is not in the Keras source"):
        load_keras_weights(model, init, keras_net, strict=True)


# ---------------------------------------------------------------------------------------------
# Files.


def _keras2_weights(model):
    """{layer: [(tf.keras 2 weight name, array)]}, as in the files keras.applications ships."""
    layers = {}
    for layer in model.layers:
        names = [w.name for w in layer.weights]
        if type(layer).__name__ == "DepthwiseConv2D":
            names = ["depthwise_kernel" if n == "kernel" else n for n in names]
        if names:
            values = layer.get_weights()
            layers[layer.name] = [
                (f"{layer.name}/{n}:0", v) for n, v in zip(names, values, strict=True)
            ]
    return layers


def _write_legacy_h5(path, layers):
    """The Keras 2 weights-only HDF5 layout, e.g. `mobilenet_1_0_224_tf.h5`."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [name.encode() for name in layers]
        f.attrs["backend"] = b"tensorflow"
        for name, weights in layers.items():
            group = f.create_group(name)
            group.attrs["weight_names"] = [w.encode() for w, _ in weights]
            for weight, value in weights:
                group.create_dataset(weight, data=value)


def _save(keras_net, path, fmt):
    if fmt == "legacy_weights_h5":
        _write_legacy_h5(path, _keras2_weights(keras_net))
    elif fmt == "legacy_model_h5":
        keras_net.save(path)  # Keras 3 still writes the legacy full-model HDF5 for '.h5'
    else:
        keras_net.save_weights(path) if fmt == "weights_h5" else keras_net.save(path)


@pytest.mark.parametrize(
    "fmt, suffix",
    [("legacy_weights_h5", ".h5"), ("legacy_model_h5", ".h5"), ("weights_h5", ".weights.h5"),
     ("keras", ".keras")],
)  # fmt: skip
@pytest.mark.parametrize("arch, alpha", [("mobilenet_v1", 0.25), ("mobilenet_v2", 0.35)])
def test_files_load_like_the_model(keras_model, tmp_path, arch, alpha, fmt, suffix):
    keras_net, _, _ = keras_model(arch, alpha, 97)
    model = mnres.create_model(arch, alpha=alpha, num_classes=NUM_CLASSES)
    shapes = abstract_variables(model, (1, 97, 97, 3))
    expected, expected_report = load_keras_weights(model, shapes, keras_net, strict=True)
    path = tmp_path / f"model{suffix}"
    _save(keras_net, path, fmt)

    variables, report = load_keras_weights(model, shapes, path, strict=True)
    assert report.loaded == expected_report.loaded
    jax.tree.map(np.testing.assert_array_equal, variables, expected)


@pytest.mark.parametrize("suffix", ["", ".h5", ".keras", ".weights.h5"])
def test_nested_keras_model(keras, keras_model, tmp_path, suffix):
    """A keras.applications base inside the user's own model (the transfer-learning setup)."""
    base, _, _ = keras_model("mobilenet_v2", 0.35, 97)
    wrapper = keras.Sequential([keras.Input((97, 97, 3)), base], name="transfer")
    model = mnres.create_model("mobilenet_v2", alpha=0.35, num_classes=NUM_CLASSES)
    shapes = abstract_variables(model, (1, 97, 97, 3))
    expected, _ = load_keras_weights(model, shapes, base, strict=True)
    source = wrapper
    if suffix:
        source = tmp_path / f"transfer{suffix}"
        wrapper.save_weights(source) if suffix == ".weights.h5" else wrapper.save(source)
    variables, report = load_keras_weights(model, shapes, source, strict=True)
    assert report.loaded == model.layer_names()
    jax.tree.map(np.testing.assert_array_equal, variables, expected)


def test_legacy_h5_without_keras(tmp_path):
    """A Keras-2-layout file written from random mnres-shaped weights loads back (h5py only)."""
    model = mnres.create_model("mobilenet_v1", alpha=0.25, num_classes=3, num_blocks=4)
    shapes = abstract_variables(model, (1, 32, 32, 3))
    rng = np.random.default_rng(0)
    source = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), shapes)
    layers = {}
    for name in model.layer_names():
        if name.endswith("_bn"):
            bn, stats = _find(source["params"], name), _find(source["batch_stats"], name)
            values = [bn["scale"], bn["bias"], stats["mean"], stats["var"]]
            weights = list(
                zip(("gamma", "beta", "moving_mean", "moving_variance"), values, strict=True)
            )
        elif name.startswith("conv_dw_"):  # (3, 3, 1, C) -> Keras (3, 3, C, 1)
            kernel = _find(source["params"], name)["kernel"]
            weights = [("depthwise_kernel", np.moveaxis(kernel, 2, 3))]
        elif name == "conv_preds":  # Keras V1's classifier is a 1x1 conv
            dense = _find(source["params"], name)
            weights = [("kernel", dense["kernel"][None, None]), ("bias", dense["bias"])]
        else:
            weights = [("kernel", _find(source["params"], name)["kernel"])]
        layers[name] = [(f"{name}/{w}:0", v) for w, v in weights]
    layers["conv_pw_5"] = [("conv_pw_5/kernel:0", np.zeros((1, 1, 64, 64), np.float32))]
    _write_legacy_h5(tmp_path / "weights.h5", layers)

    variables, report = load_keras_weights(model, shapes, tmp_path / "weights.h5", strict=True)
    jax.tree.map(np.testing.assert_array_equal, variables, source)
    assert report.loaded == model.layer_names()
    assert report.skipped == ("conv_pw_5",)


def _find(tree, name):
    """The subtree of the module called `name`, wherever it sits."""
    for key, value in tree.items():
        if key == name:
            return value
        if isinstance(value, dict) and (found := _find(value, name)) is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------
# Mismatches.


def test_alpha_mismatch_names_layer_and_shapes(keras_model):
    keras_net, _, _ = keras_model("mobilenet_v1", 0.25, 97)
    model = mnres.create_model("mobilenet_v1", alpha=0.5, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r"'conv1'.*\(3, 3, 3, 8\).*\(3, 3, 3, 16\)"):
        load_keras_weights(model, abstract_variables(model, (1, 97, 97, 3)), keras_net)


def test_other_number_of_classes_leaves_the_classifier(keras_model):
    keras_net, _, _ = keras_model("mobilenet_v2", 0.35, 97)
    model = mnres.create_model("mobilenet_v2", alpha=0.35, num_classes=2)
    shapes = abstract_variables(model, (1, 97, 97, 3))
    _, report = load_keras_weights(model, shapes, keras_net)
    assert isinstance(report, LoadReport)
    assert list(report.left_at_init) == ["predictions"]
    assert "(1280, 10)" in report.left_at_init["predictions"]
    with pytest.raises(ValueError, match="'predictions'"):
        load_keras_weights(model, shapes, keras_net, strict=True)


def test_other_architecture_is_refused(keras_model):
    keras_net, _, _ = keras_model("mobilenet_v2", 0.35, 97)
    model = mnres.create_model("mobilenet_v1", alpha=0.25, num_classes=NUM_CLASSES)
    shapes = abstract_variables(model, (1, 97, 97, 3))
    with pytest.raises(ValueError, match="'conv1' is not in the Keras source"):
        load_keras_weights(model, shapes, keras_net)
    _, report = load_keras_weights(model, shapes, keras_net, strict=False)
    assert not report.loaded and "Conv1" in report.skipped
