"""Per-image augmentation and scaling in pure JAX, run inside the jitted train step.

Cells have no canonical orientation, so all 8 symmetries of the square (flips x 90-degree
rotations) are label-preserving; mild brightness/contrast/saturation/hue jitter mimics
stain and illumination differences between slides. Everything is a select or a per-image
affine colour map, cheap next to the network (~50 ms for 128 images of 128 px on 2 CPU
cores), so the host only gathers uint8 batches.
"""

import jax
import jax.numpy as jnp
import numpy as np

# RGB <-> YIQ: hue is a rotation, saturation a scaling, of the (I, Q) chroma plane. NumPy
# constants, so importing this module does not initialise a JAX backend.
_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]],
    np.float32,
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def preprocess(images_uint8) -> jnp.ndarray:
    """uint8 images -> float32 in [-1, 1]: x / 127.5 - 1, as Keras MobileNet scales inputs."""
    return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0


def dihedral_views(x) -> jnp.ndarray:
    """All 8 symmetries of the square of every image, view-major: [B, S, S, C] -> [8B, S, S, C].

    Rows v * B ... (v + 1) * B - 1 hold view v of the batch: the four rotations, then the
    four rotations mirrored. Test-time augmentation averages a model over them.
    """
    if x.shape[1] != x.shape[2]:
        raise ValueError(f"the symmetries of the square need square images, got {x.shape}")
    rotations = [jnp.rot90(x, k, axes=(1, 2)) for k in range(4)]
    return jnp.concatenate(rotations + [r[:, :, ::-1] for r in rotations], axis=0)


def augment(images_uint8, rng, data_config) -> jnp.ndarray:
    """Random per-image symmetries and colour jitter, then `preprocess`.

    Args:
      images_uint8: uint8 [B, S, S, 3] (any B; square for 90-degree rotations).
      rng: a jax PRNG key; the same key and batch give the same output.
      data_config: `config.data`; reads flip, rot90, brightness, contrast, saturation, hue
        (a field set to False/0 switches its augmentation off).

    Returns:
      float32 [B, S, S, 3] in [-1, 1].
    """
    get = lambda name, default: getattr(data_config, name, default)
    x = jnp.asarray(images_uint8)
    keys = jax.random.split(rng, 7)
    brightness = float(get("brightness", 0.0))
    contrast = float(get("contrast", 0.0))
    saturation = float(get("saturation", 0.0))
    hue = float(get("hue", 0.0))
    if brightness or contrast or saturation or hue:
        # Colour first: it commutes with the symmetries (the contrast mean is invariant), and
        # XLA fuses it badly behind the flips (measured: 6x slower on CPU).
        x = _colour_jitter(x, keys[3:], brightness, contrast, saturation, hue)
    else:
        x = preprocess(x)
    return _symmetries(x, keys[:3], bool(get("flip", True)), bool(get("rot90", True)))


def _symmetries(x, keys, flip: bool, rot90: bool):
    """Random per-image 90-degree rotations and/or flips (all 8 symmetries with both)."""
    n = x.shape[0]
    per_image = lambda b: b[:, None, None, None]
    rotate = rot90 and x.shape[1] == x.shape[2]
    if rotate:
        # np.rot90 by k: k odd transposes; k in (1, 2) flips rows; k in (2, 3) flips columns.
        k = jax.random.randint(keys[0], (n,), 0, 4)
        x = jnp.where(per_image(k % 2 == 1), jnp.swapaxes(x, 1, 2), x)
        x = jnp.where(per_image((k == 1) | (k == 2)), x[:, ::-1], x)
        x = jnp.where(per_image(k >= 2), x[:, :, ::-1], x)
    if flip:
        # With the rotations one mirror completes the 8 symmetries of the square.
        x = jnp.where(per_image(jax.random.bernoulli(keys[1], 0.5, (n,))), x[:, :, ::-1], x)
        if not rotate:
            x = jnp.where(per_image(jax.random.bernoulli(keys[2], 0.5, (n,))), x[:, ::-1], x)
    return x


def _colour_jitter(x, keys, brightness, contrast, saturation, hue):
    """uint8 -> float32 [-1, 1] with per-image hue, saturation, contrast and brightness jitter.

    All four are affine in the pixel colour, so they fold into one per-image y = A x + b:
    a few fused multiply-adds per pixel, no matmul.
    """
    k_bright, k_contrast, k_sat, k_hue = keys
    n = x.shape[0]
    s = 1.0 + jax.random.uniform(k_sat, (n,), minval=-saturation, maxval=saturation)
    angle = 2 * jnp.pi * jax.random.uniform(k_hue, (n,), minval=-hue, maxval=hue)
    cos, sin = jnp.cos(angle) * s, jnp.sin(angle) * s
    one, zero = jnp.ones_like(s), jnp.zeros_like(s)
    chroma = jnp.stack(
        [
            jnp.stack([one, zero, zero], -1),
            jnp.stack([zero, cos, -sin], -1),
            jnp.stack([zero, sin, cos], -1),
        ],
        -2,
    )  # [n, 3, 3]
    matrix = jnp.einsum("ij,njk,kl->nil", _YIQ_TO_RGB, chroma, _RGB_TO_YIQ)
    # Contrast scales around the per-channel mean of the colour-transformed image.
    factor = 1.0 + jax.random.uniform(k_contrast, (n,), minval=-contrast, maxval=contrast)
    shift = jax.random.uniform(k_bright, (n,), minval=-brightness, maxval=brightness)
    mean = jnp.mean(x, axis=(1, 2), dtype=jnp.float32) / 255.0  # [n, 3]
    a = factor[:, None, None] * matrix / 255.0  # applied to uint8 values.
    b = (1 - factor)[:, None] * jnp.einsum("ndc,nc->nd", matrix, mean) + shift[:, None]
    x = x.astype(jnp.float32)
    channels = [x[..., c] for c in range(3)]
    out = [
        sum(channels[c] * a[:, d, c, None, None] for c in range(3)) + b[:, d, None, None]
        for d in range(3)
    ]
    return jnp.clip(jnp.stack(out, -1), 0.0, 1.0) * 2.0 - 1.0


def mix(x, rng, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
    """Mixup or CutMix of a batch with its own reverse, one mixing weight per batch (as timm).

    Mixup (Zhang et al. 2018) blends whole images: lam * x + (1 - lam) * x[::-1]. CutMix (Yun
    et al. 2019) pastes a box of x[::-1] covering about (1 - lam) of the image. lam is drawn
    from Beta(alpha, alpha); with both alphas > 0 each call picks one of the two at random.
    The loss is then lam * CE(labels) + (1 - lam) * CE(labels[::-1]) (the cross-entropy is
    linear in its targets, so this equals the loss of the mixed one-hot targets).

    Args:
      x: float images [B, S, S, C] (after `augment`).
      rng: a jax PRNG key.
      mixup_alpha, cutmix_alpha: Beta parameters; 0 switches that method off.

    Returns:
      (mixed images, lam): lam is the exact weight of x in the result (for CutMix, 1 minus the
      pasted box's share of the pixels).
    """
    if mixup_alpha < 0 or cutmix_alpha < 0 or not (mixup_alpha or cutmix_alpha):
        raise ValueError(
            f"mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}: give one or both > 0"
        )
    k_pick, k_mixup, k_cutmix, k_y, k_x = jax.random.split(rng, 5)
    other = x[::-1]

    def mixup(x):
        lam = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha)
        return lam * x + (1.0 - lam) * other, lam

    def cutmix(x):
        lam = jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha)
        return _cutmix(x, other, lam, k_y, k_x)

    if not cutmix_alpha:
        return mixup(x)
    if not mixup_alpha:
        return cutmix(x)
    # One of the two per call: a cond runs only the branch taken.
    return jax.lax.cond(jax.random.bernoulli(k_pick, 0.5), cutmix, mixup, x)


def _cutmix(x, other, lam, k_y, k_x):
    """x with a box of `other` whose sides are sqrt(1 - lam) of the image's, centred anywhere
    (clipped at the edges); returns (images, the share of pixels still from x)."""
    height, width = x.shape[1], x.shape[2]
    ratio = jnp.sqrt(1.0 - lam)
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    half_h = jnp.round(ratio * height / 2).astype(jnp.int32)
    half_w = jnp.round(ratio * width / 2).astype(jnp.int32)
    y0, y1 = jnp.clip(cy - half_h, 0, height), jnp.clip(cy + half_h, 0, height)
    x0, x1 = jnp.clip(cx - half_w, 0, width), jnp.clip(cx + half_w, 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # [S, S]
    mixed = jnp.where(box[None, :, :, None], other, x)
    return mixed, 1.0 - jnp.mean(box.astype(jnp.float32))
