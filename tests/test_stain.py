"""Per-crop colour normalisation at the model's input (mnres.models.stain)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnres
from mnres.data.augment import dihedral_views, preprocess
from mnres.models import stain


def _cells(seed=0, n=4, size=32):
    """Round tinted 'cells' on a black background, uint8, like the NIH crops."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    # A different colour cast per cell, mild enough that no channel clips after scaling.
    tint = np.stack([rng.permutation([0.5, 0.65, 0.8]) for _ in range(n)])[:, None, None]
    texture = rng.uniform(0.6, 1.0, (n, size, size, 1))
    images = np.where(inside[None, :, :, None], 255 * tint * texture, 0.0)
    return images.astype(np.uint8), inside


def _foreground_means(x, inside):
    unit = (np.asarray(x) + 1.0) / 2.0
    return unit[:, inside].mean(axis=1)  # [B, 3]


def test_gray_world_equalises_the_cells_channel_means_and_keeps_the_background():
    images, inside = _cells()
    x = preprocess(images)
    before = _foreground_means(x, inside)
    assert np.ptp(before, axis=1).min() > 0.05  # the test cells are tinted
    out = np.asarray(stain.normalize(x, "gray_world"))
    after = _foreground_means(out, inside)
    np.testing.assert_allclose(after - after.mean(axis=1, keepdims=True), 0.0, atol=5e-3)
    np.testing.assert_allclose(after.mean(axis=1), before.mean(axis=1), atol=5e-3)
    np.testing.assert_array_equal(out[:, ~inside], -1.0)
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_per_image_standardises_each_channel_over_the_cell():
    images, inside = _cells(seed=1)
    out = np.asarray(stain.normalize(preprocess(images), "per_image"))
    cell = out[:, inside]  # [B, pixels, 3]
    np.testing.assert_allclose(cell.mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(cell.std(axis=1), 1.0, atol=1e-2)
    np.testing.assert_array_equal(out[:, ~inside], 0.0)


def test_a_colour_cast_is_removed():
    images, inside = _cells(seed=2, n=1)
    cast = np.clip(images * np.array([1.0, 0.7, 0.9]), 0, 255).astype(np.uint8)
    x, y = preprocess(images), preprocess(cast)
    # per_image: the same cell under a per-channel gain gives the same input.
    a, b = (np.asarray(stain.normalize(v, "per_image")) for v in (x, y))
    assert np.abs(np.asarray(x) - np.asarray(y))[:, inside].mean() > 0.1
    assert np.abs(a - b)[:, inside].mean() < 0.02  # on a unit-variance scale: rounding to uint8
    # gray_world: the same colour (chromaticity) on every pixel of the cell; intensity may differ.
    a, b = ((np.asarray(stain.normalize(v, "gray_world"))[:, inside] + 1) / 2 for v in (x, y))
    chroma = lambda u: u / u.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(chroma(a), chroma(b), atol=0.02)


def test_the_statistics_ignore_flips_and_rotations():
    images, _ = _cells(seed=3, n=2)
    x = preprocess(images)
    for method in ("gray_world", "per_image"):
        normalised_views = stain.normalize(dihedral_views(x), method)
        views_of_normalised = dihedral_views(stain.normalize(x, method))
        # A flipped image's statistics are summed in another order: float32 rounding, 1.5e-6
        # at most on jax 0.12.1 (a unit-variance scale); a statistic that saw orientation
        # would be 1e-2 or more apart.
        np.testing.assert_allclose(normalised_views, views_of_normalised, atol=1e-5)


def test_the_model_applies_it_to_its_input_inside_jit():
    images, _ = _cells(seed=4)
    x = preprocess(images)
    plain = mnres.create_model(
        "mobilenet_v1", alpha=0.25, num_blocks=2, num_classes=2, bn_momentum=0.9
    )
    normed = plain.clone(input_normalization="gray_world")
    variables = plain.init(jax.random.key(0), x)
    features = lambda model, x: model.apply(variables, x)[1]["pre_logits"]
    got = jax.jit(features, static_argnums=0)(normed, x)
    want = jax.jit(features, static_argnums=0)(plain, stain.normalize(x, "gray_world"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, jax.jit(features, static_argnums=0)(plain, x), rtol=1e-2)


def test_an_unknown_method_is_refused_when_the_model_is_built():
    with pytest.raises(ValueError, match="input_normalization='white'.*gray_world"):
        mnres.create_model("mobilenet_v2", num_classes=2, input_normalization="white")


def test_black_images_stay_finite():
    x = jnp.full((1, 32, 32, 3), -1.0)
    for method in stain.METHODS:
        assert np.isfinite(np.asarray(stain.normalize(x, method))).all()
