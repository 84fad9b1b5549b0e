"""Decode once: file or bytes -> RGB uint8 [S, S, 3], in parallel, with an optional disk cache.

Aspect ratio: each image is resized so its longer side is S (bilinear, antialiased), keeping
its aspect ratio, and centred on a black S x S square. NIH crops are near-square cells on a
black background, so the padding matches the background and no cell is squashed.
"""

import concurrent.futures
import hashlib
import io
import json
import logging
import os
import tempfile
import time

import numpy as np
from PIL import Image, ImageOps

CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused.
_LOG_FIRST_SKIPS = 20

log = logging.getLogger(__name__)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparent pixels become black, as the crops' background."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(source, image_size: int) -> np.ndarray:
    """Decodes a path, bytes or uint8 array to RGB uint8 [image_size, image_size, 3].

    Raises whatever Pillow raises for an unreadable or truncated file.
    """
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        image = to_rgb(Image.fromarray(array.astype(np.uint8)))
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(bytes(source))
        with Image.open(source) as opened:
            opened.load()  # decode fully here: a truncated file fails inside the caller's try.
            image = to_rgb(opened)
            image = image.copy() if image is opened else image
    if image.size != (image_size, image_size):
        image = ImageOps.pad(
            image, (image_size, image_size), method=Image.Resampling.BILINEAR, color=(0, 0, 0)
        )
    return np.asarray(image, np.uint8)


def decode_files(paths, image_size: int) -> np.ndarray:
    """uint8 [N, S, S, 3] of `paths`, in order; an unreadable file raises (unlike `decode_all`).

    For a handful of crops a user named (predict, calibration, golden files), where skipping
    one silently would misalign images and names.
    """
    if not len(paths):
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    return np.stack([decode_image(p, image_size) for p in paths])


def decode_all(
    sources, names, image_size: int, *, num_workers: int = 0, desc: str = "decoding"
) -> tuple[np.ndarray, np.ndarray, list]:
    """Decodes many images in a thread pool (Pillow releases the GIL while decoding).

    Args:
      sources: sequence of paths, bytes or arrays (or a callable i -> one of those).
      names: example ids, for warnings.
      image_size: output side S.
      num_workers: threads; 0 = one per CPU core.
      desc: progress-bar label.

    Returns:
      (images uint8 [M, S, S, 3], kept indices int64 [M], skipped [{'name', 'reason'}]).
      An unreadable image is skipped with a warning, never a crash.
    """
    n = len(names)
    workers = num_workers or os.cpu_count() or 1
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    ok = np.zeros(n, bool)
    errors = {}
    fetch = sources if callable(sources) else sources.__getitem__

    def work(i):
        try:
            images[i] = decode_image(fetch(i), image_size)
            ok[i] = True
        except Exception as e:  # noqa: BLE001 - any unreadable image is skipped, not fatal.
            errors[i] = f"{type(e).__name__}: {e}"

    progress = _progress(n, desc)
    started = time.perf_counter()
    chunk = 64
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for start in range(0, n, chunk * workers):
            stop = min(n, start + chunk * workers)
            list(pool.map(work, range(start, stop)))
            if progress is not None:
                progress.update(stop - start)
    if progress is not None:
        progress.close()
    log.info(
        "%s: %d images in %.1f s (%d threads)", desc, n, time.perf_counter() - started, workers
    )
    skipped = [{"name": str(names[i]), "reason": errors[i]} for i in sorted(errors)]
    for s in skipped[:_LOG_FIRST_SKIPS]:
        log.warning("Skipping unreadable image %s (%s)", s["name"], s["reason"])
    if skipped:
        log.warning(
            "Skipped %d unreadable image(s) of %d; they are listed in the split manifest.",
            len(skipped),
            n,
        )
    kept = np.flatnonzero(ok)
    return (images if len(kept) == n else images[kept]), kept, skipped


def _progress(total: int, desc: str):
    if total < 2000:
        return None
    try:
        import tqdm
    except ImportError:
        return None
    # disable=None: the bar switches itself off when stderr is not a terminal (logs, CI).
    return tqdm.tqdm(total=total, desc=desc, unit="img", mininterval=2.0, disable=None)


def cache_key(names, fingerprints, image_size: int) -> str:
    """Hash of (ordered names, file sizes/mtimes or other fingerprints, image size, version)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{image_size}\n".encode())
    for name, fp in zip(names, fingerprints, strict=True):
        h.update(f"{name}\t{fp}\n".encode())
    return h.hexdigest()[:24]


def decode_cached(
    sources,
    names,
    image_size: int,
    *,
    cache_dir=None,
    fingerprints=None,
    num_workers: int = 0,
    desc: str = "decoding",
):
    """`decode_all`, read from / written to `cache_dir` when given (a second run skips decoding).

    The cache file is `cache_dir/decoded-<key>.npy` (+ `.json` with kept indices and skips),
    keyed by `cache_key`; it is written atomically, so a killed run leaves no half file.
    """
    if not cache_dir:
        return decode_all(sources, names, image_size, num_workers=num_workers, desc=desc)
    fingerprints = fingerprints if fingerprints is not None else [""] * len(names)
    key = cache_key(names, fingerprints, image_size)
    array_path = os.path.join(cache_dir, f"decoded-{key}.npy")
    meta_path = os.path.join(cache_dir, f"decoded-{key}.json")
    if os.path.exists(array_path) and os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            images = np.load(array_path)
            kept = np.asarray(meta["kept"], np.int64)
            if images.shape == (len(kept), image_size, image_size, 3):
                log.info("Loaded %d decoded images from %s", len(kept), array_path)
                return images, kept, meta["skipped"]
        except (OSError, ValueError, KeyError) as e:
            log.warning("Ignoring unreadable cache %s (%s); decoding again.", array_path, e)
    images, kept, skipped = decode_all(
        sources, names, image_size, num_workers=num_workers, desc=desc
    )
    os.makedirs(cache_dir, exist_ok=True)
    _atomic_write(array_path, lambda f: np.save(f, images), binary=True, directory=cache_dir)
    _atomic_write(
        meta_path,
        lambda f: json.dump({"kept": kept.tolist(), "skipped": skipped}, f),
        binary=False,
        directory=cache_dir,
    )
    return images, kept, skipped


def _atomic_write(path, write, *, binary: bool, directory):
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
