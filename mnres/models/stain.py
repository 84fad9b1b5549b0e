"""Per-crop colour normalisation at a model's input, for stains that differ between slides.

Giemsa-stained thin smears vary in hue and intensity from slide to slide (stain batch, staining
time, the microscope's lamp); a classifier trained on some slides then meets colours it has not
seen. Each method here is computed per crop from the crop's own pixels, inside the model, so
training, evaluation, export and `predict` all see the same pixels. The NIH crops sit on a black
background, which would dominate every statistic: only the cell's pixels (any channel above
`FOREGROUND_LEVEL`) are counted, and the background stays black.

- 'none': the input as given.
- 'gray_world': each channel scaled so that the cell's three channel means are equal (to their
  average): the stain's colour cast goes, its intensity stays.
- 'per_image': each channel standardised over the cell (zero mean, unit standard deviation):
  colour cast and intensity both go.

Both statistics are invariant to flips and rotations, so test-time augmentation is unaffected.
"""

from __future__ import annotations

import jax.numpy as jnp

METHODS = ("none", "gray_world", "per_image")

# A pixel belongs to the cell when any channel is above this level (of 1.0 for white): the
# crops' black background is exactly 0 after PNG decoding, JPEG-compressed copies a few levels
# above it.
FOREGROUND_LEVEL = 16 / 255
_EPS = 1e-3


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"input_normalization={method!r}; use one of {', '.join(METHODS)}")


def normalize(x, method: str):
    """Normalises images scaled to [-1, 1] ([B, H, W, 3]); returns them in the same scale.

    'gray_world' keeps the result in [-1, 1]; 'per_image' gives standardised values (about
    [-3, 3] on the cell, 0 on the background).
    """
    check_method(method)
    if method == "none":
        return x
    unit = (x.astype(jnp.float32) + 1.0) / 2.0  # [0, 1]
    mask = (jnp.max(unit, axis=-1, keepdims=True) > FOREGROUND_LEVEL).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask, axis=(1, 2), keepdims=True), 1.0)
    mean = jnp.sum(unit * mask, axis=(1, 2), keepdims=True) / count  # [B, 1, 1, 3]
    if method == "gray_world":
        gray = jnp.mean(mean, axis=-1, keepdims=True)
        scaled = jnp.clip(unit * gray / jnp.maximum(mean, _EPS), 0.0, 1.0)
        out = (scaled * 2.0 - 1.0) * mask + (unit * 2.0 - 1.0) * (1.0 - mask)
    else:  # per_image
        var = jnp.sum(jnp.square(unit - mean) * mask, axis=(1, 2), keepdims=True) / count
        out = (unit - mean) / jnp.sqrt(var + _EPS**2) * mask
    return out.astype(x.dtype)
