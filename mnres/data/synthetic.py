"""Procedurally drawn blood cells: a stand-in for the NIH crops that runs offline in seconds.

Each image is one pale, round-ish red cell (random size, shape, colour, stain mottling and
central pallor) on a dark background. Parasitized cells carry 1-3 dark purple chromatin dots
or rings (ring-form trophozoites), some faint; uninfected cells may carry pale, small stain
specks, so the task is learnable but not a colour threshold. Slides have their own stain
tint and size, two thirds are infected patients (about 75% parasitized cells), the rest
uninfected-only, mimicking the NIH slide structure so slide-level splits mean something.
"""

import numpy as np

_CHUNK = 256
_PURPLE = np.array([0.33, 0.09, 0.42], np.float32)
_SPECK = np.array([0.80, 0.55, 0.75], np.float32)


def slide_table(num_slides: int, seed: int):
    """Fake slide ids and per-slide properties; ids end in P (infected) or N (uninfected)."""
    rng = np.random.default_rng([seed, 0x511DE5])
    num_infected = max(1, round(num_slides * 2 / 3))
    infected = np.zeros(num_slides, bool)
    infected[rng.permutation(num_slides)[:num_infected]] = True
    ids = np.array([f"SYN{k:03d}{'P' if inf else 'N'}" for k, inf in enumerate(infected)])
    tint = np.stack(
        [
            rng.uniform(0.78, 0.92, num_slides),  # red
            rng.uniform(0.45, 0.62, num_slides),  # green
            rng.uniform(0.50, 0.70, num_slides),
        ],
        -1,
    ).astype(np.float32)  # blue
    size = rng.uniform(0.72, 0.86, num_slides).astype(np.float32)
    weight = rng.gamma(2.0, 1.0, num_slides)
    return ids, infected, tint, size, weight / weight.sum()


def draw_cells(
    num_examples: int, image_size: int, num_slides: int, seed: int, return_masks: bool = False
):
    """Draws the synthetic data set, deterministic from `seed`.

    Returns:
      images uint8 [N, S, S, 3], labels int32 [N] (1 = parasitized), slide_ids str [N]; with
      `return_masks`, also float32 [N, S, S] in [0, 1]: the coverage of the parasite marks
      (chromatin dots and rings), zero on uninfected cells (the ground truth for Grad-CAM).
    """
    if num_examples < 1 or num_slides < 1:
        raise ValueError("config.data.synthetic_size and config.data.num_slides must be >= 1.")
    ids, infected, tint, size, weight = slide_table(num_slides, seed)
    rng = np.random.default_rng([seed, 0xCE11])
    # Every slide gets at least one cell when there are enough cells.
    slide = rng.choice(num_slides, size=num_examples, p=weight)
    slide[: min(num_slides, num_examples)] = np.arange(min(num_slides, num_examples))
    slide = slide[rng.permutation(num_examples)]
    labels = (infected[slide] & (rng.random(num_examples) < 0.75)).astype(np.int32)
    images = np.empty((num_examples, image_size, image_size, 3), np.uint8)
    masks = np.empty((num_examples, image_size, image_size), np.float32) if return_masks else None
    for start in range(0, num_examples, _CHUNK):
        stop = min(num_examples, start + _CHUNK)
        chunk_rng = np.random.default_rng([seed, 0xCE11, start])
        images[start:stop], marks = _draw(
            chunk_rng,
            labels[start:stop],
            tint[slide[start:stop]],
            size[slide[start:stop]],
            image_size,
        )
        if return_masks:
            masks[start:stop] = marks
    if return_masks:
        return images, labels, ids[slide], masks
    return images, labels, ids[slide]


def _draw(rng, labels, tint, size, s):
    """Draws one chunk of cells: uint8 images [n, s, s, 3] and their parasite coverage."""
    n = len(labels)
    u = _uniform(rng, n)
    y, x, px = _grid(s)

    # The cell: a rotated, slightly irregular ellipse.
    cy, cx = _col(u(-0.08, 0.08)), _col(u(-0.08, 0.08))
    radius = size * u(0.85, 1.12)
    a, b = _col(radius * u(0.9, 1.0)), _col(radius * u(0.85, 1.0))
    theta = _col(u(0, np.pi))
    dy, dx = y - cy, x - cx
    ry = dy * np.cos(theta) - dx * np.sin(theta)
    rx = dy * np.sin(theta) + dx * np.cos(theta)
    phi = np.arctan2(ry, rx)
    wobble = 1 + _col(u(0, 0.05)) * np.sin(_col(rng.integers(2, 6, n)) * phi + _col(u(0, 6.3)))
    r = np.sqrt((rx / a) ** 2 + (ry / b) ** 2) / wobble
    cell = np.clip((1 - r) * _col(np.minimum(a, b)[:, 0, 0]) / px + 0.5, 0, 1)

    # Colour: slide tint x per-cell jitter, darker rim, lighter central pallor, stain mottle.
    colour = tint[:, None, None, :] * u(0.9, 1.08, 1, 1, 3)
    shade = 1 - _col(u(0.1, 0.3)) * np.exp(-(((1 - r) / 0.15) ** 2))
    shade = shade + _col(u(0.0, 0.12)) * np.exp(-((r / 0.4) ** 2))
    for _ in range(2):
        freq = _col(u(1.5, 5.0))
        angle = _col(u(0, 6.3))
        shade = shade + _col(u(0, 0.05)) * np.sin(
            freq * (np.cos(angle) * x + np.sin(angle) * y) + _col(u(0, 6.3))
        )
    image, marks = _paint_marks(rng, colour * shade[..., None], labels, cell, (cy, cx), radius)

    background = _col(u(0.0, 0.06))[..., None] * np.ones(3, np.float32)
    image = image * cell[..., None] + background * (1 - cell[..., None])
    image = image + rng.normal(0, 0.015, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), marks


def _paint_marks(rng, image, labels, cell, centre, radius):
    """Paints up to three marks into each cell of `image`; returns it and the parasite coverage.

    Parasites (label 1): dark purple dots or rings, alpha 0.45-0.95. Specks (label 0, half of
    the cells): small, pale, alpha 0.15-0.35.
    """
    n = len(labels)
    u = _uniform(rng, n)
    y, x, px = _grid(image.shape[1])
    cy, cx = centre
    parasitized = labels.astype(bool)
    marks = np.zeros(image.shape[:3], np.float32)  # parasite coverage, returned for Grad-CAM tests.
    specks = rng.integers(0, 3, n) * (rng.random(n) < 0.5)
    count = np.where(parasitized, rng.integers(1, 4, n), specks)
    for k in range(3):
        active = k < count
        dist = np.sqrt(u(0, 1)) * radius * 0.62
        ang = u(0, 2 * np.pi)
        my, mx = _col(cy[:, 0, 0] + dist * np.sin(ang)), _col(cx[:, 0, 0] + dist * np.cos(ang))
        d = np.sqrt((y - my) ** 2 + (x - mx) ** 2)
        ring = parasitized & (rng.random(n) < 0.4)
        mark_r = np.where(parasitized, np.where(ring, u(0.13, 0.2), u(0.07, 0.13)), u(0.04, 0.08))
        thick = _col(u(0.04, 0.06))
        dot_mask = np.clip((_col(mark_r) - d) / px + 0.5, 0, 1)
        ring_mask = np.clip((thick / 2 - np.abs(d - _col(mark_r))) / px + 0.5, 0, 1)
        ring_mask = np.maximum(
            ring_mask,
            np.clip(
                (0.6 * thick - np.sqrt((y - my - _col(mark_r)) ** 2 + (x - mx) ** 2)) / px + 0.5,
                0,
                1,
            ),
        )  # the ring's knob.
        mask = np.where(_col(ring), ring_mask, dot_mask)
        alpha = np.where(parasitized, u(0.45, 0.95), u(0.15, 0.35)) * active
        colour_k = np.where(parasitized[:, None], _PURPLE * u(0.8, 1.2, 3), _SPECK * u(0.9, 1.1, 3))
        blend = (mask * _col(alpha) * cell)[..., None]
        marks = np.maximum(marks, mask * cell * _col(active & parasitized))
        image = image * (1 - blend) + colour_k[:, None, None, :] * blend
    return image, marks


def _uniform(rng, n):
    """`u(lo, hi, *shape)`: float32 uniform draws of shape [n, *shape] from `rng`."""
    return lambda lo, hi, *shape: rng.uniform(lo, hi, (n, *shape)).astype(np.float32)


def _grid(s):
    """Pixel centres in [-1, 1] as y [1, s, 1] and x [1, 1, s], and one pixel's width."""
    grid = (np.arange(s, dtype=np.float32) + 0.5) / s * 2 - 1
    return grid[None, :, None], grid[None, None, :], 2.0 / s


def _col(v):
    """[n] -> [n, 1, 1], to broadcast one value per cell over its pixels."""
    return v[:, None, None]
