"""Small on-disk cell-image folders for the data tests (written to pytest's tmp_path)."""

import os
import pathlib

import numpy as np
from PIL import Image

# ../shared/data/malaria-mini/cell_images beside the repository: 1,000 real NIH crops.
REPO = pathlib.Path(__file__).resolve().parents[1]
MINI_CELL_IMAGES = REPO.parent / "shared" / "data" / "malaria-mini" / "cell_images"


def cell_png(rng, parasitized: bool, size: int = 40, mode: str = "RGB") -> Image.Image:
    """A crude cell: pink disc on black, with a purple dot when parasitized."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    image = np.zeros((size, size, 3), np.uint8)
    image[r < size * 0.4] = (220, 150, 160) + rng.integers(-10, 10, 3)
    if parasitized:
        cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
        image[np.hypot(yy - cy, xx - cx) < size * 0.08] = (90, 30, 110)
    rgb = Image.fromarray(image)
    if mode == "RGBA":
        alpha = np.where(r < size * 0.4, 255, 0).astype(np.uint8)
        return Image.fromarray(np.dstack([image, alpha]), "RGBA")
    return rgb.convert(mode)


def write_cell_folder(root, slides, seed: int = 0, size: int = 40, prefix: str = "") -> dict:
    """Writes `root/<prefix>Parasitized/*.png` and `root/<prefix>Uninfected/*.png`.

    Args:
      root: directory to write into.
      slides: {slide_id: (num_parasitized, num_uninfected)}.
      seed: pixel noise seed.
      size: side of the square crops.
      prefix: sub-path inside root (e.g. 'cell_images/').

    Returns:
      {relative name: label}.
    """
    rng = np.random.default_rng(seed)
    labels = {}
    for folder, label in (("Parasitized", 1), ("Uninfected", 0)):
        directory = os.path.join(root, prefix, folder)
        os.makedirs(directory, exist_ok=True)
        for slide, counts in slides.items():
            for i in range(counts[1 - label]):
                name = f"{slide}ThinF_IMG_20150604_{i:03d}_cell_{i}.png"
                cell_png(rng, bool(label), size).save(os.path.join(directory, name))
                labels[f"{prefix}{folder}/{name}"] = label
    return labels


def write_bad_files(root, prefix: str = "") -> dict:
    """Adds a corrupt, a truncated, an RGBA, a grayscale and a non-image file.

    Returns {'corrupt': [names], 'rgba': name, 'gray': name}.
    """
    rng = np.random.default_rng(1)
    par = os.path.join(root, prefix, "Parasitized")
    uni = os.path.join(root, prefix, "Uninfected")
    with open(os.path.join(par, "C9P9ThinF_IMG_corrupt_cell_1.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not a png")
    good = os.path.join(par, "C9P9ThinF_IMG_ok_cell_2.png")
    cell_png(rng, True, 64).save(good)
    data = pathlib.Path(good).read_bytes()
    pathlib.Path(par, "C9P9ThinF_IMG_truncated_cell_3.png").write_bytes(data[: len(data) // 2])
    cell_png(rng, True, 40, "RGBA").save(os.path.join(par, "C9P9ThinF_IMG_rgba_cell_4.png"))
    cell_png(rng, False, 40, "L").save(os.path.join(uni, "C9P9ThinF_IMG_gray_cell_5.png"))
    pathlib.Path(uni, "Thumbs.db").write_bytes(b"not an image")
    return {
        "corrupt": [
            f"{prefix}Parasitized/C9P9ThinF_IMG_corrupt_cell_1.png",
            f"{prefix}Parasitized/C9P9ThinF_IMG_truncated_cell_3.png",
        ],
        "rgba": f"{prefix}Parasitized/C9P9ThinF_IMG_rgba_cell_4.png",
        "gray": f"{prefix}Uninfected/C9P9ThinF_IMG_gray_cell_5.png",
    }


# Twelve slides: eight infected patients (both classes), four uninfected-only.
SLIDES = {
    **{f"C{k}P{k + 60}": (6, 3) for k in range(1, 9)},
    **{f"C{k}N": (0, 6) for k in range(20, 24)},
}


def tiny_crossval_config():
    """The smoke config cut to a few-second fold: 480 synthetic cells on 24 slides, 1 epoch."""
    from experiments.configs import smoke

    config = smoke.get_config()
    config.data.synthetic_size = 480
    config.data.num_slides = 24
    config.num_epochs = 1
    config.progress_bar = False
    config.async_checkpointing = False
    return config
