"""ImageNet weights for MobileNet v1/v2: Keras' published `.h5` files, downloaded into a cache.

`keras.applications` publishes ImageNet weights for MobileNet v1 (alpha 0.25-1.0) and v2 (alpha
0.35-1.4) at a few input sizes, with and without the 1000-class classifier. This module names
the file an mnres model takes (`choose_weights`), downloads it once into a cache (`fetch`) and
loads it (`load_imagenet`, through `mnres.weights.keras.load_keras_weights`):

    model = mnres.create_model('paper')
    variables = model.init(rng, jnp.zeros((1, 128, 128, 3)), train=False)
    variables, report = load_imagenet(model, variables, image_size=128)

The cache is `$MNRES_CACHE/keras-weights/`, else `~/.cache/mnres/keras-weights/`. A download
enters it only whole (its Content-Length) and readable (h5py lists and reads its layers); a
file found there that h5py cannot read (cached by an older mnres) is removed, with one line.
Keras publishes no checksums: the sha256 of each file is recorded beside it on its first
download (`FILE.sha256`, in `sha256sum` format) and checked whenever the cached file is
reused; pass `sha256=` to pin a hash of your own. Without network access, download the file
elsewhere (the URL is in every error) and pass its path: `config.model.pretrained=PATH`, or
`load_keras_weights(model, variables, PATH)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import math
import os
import tempfile
import urllib.error
import urllib.request

from absl import logging

from mnres.cache import CACHE_ENV, default_cache_dir
from mnres.models import mobilenet
from mnres.provenance import file_sha256
from mnres.weights.keras import read_h5_file

# Where Keras downloads from (keras/src/applications/mobilenet.py, mobilenet_v2.py). A module
# variable read on every call, so a mirror (or a test server) can stand in for it.
BASE_URLS = {
    "mobilenet_v1": "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/",
    "mobilenet_v2": "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/",
}
# What Keras' code asks for: (alphas, input sizes) per family. Unverified: copied from Keras 3.15
# source, not checked against the bucket (Keras publishes no list and no hashes). TF-slim trained
# v2 alpha 1.3 and 1.4 at 224 px only, so their smaller sizes may be missing.
PUBLISHED = {
    "mobilenet_v1": ((0.25, 0.5, 0.75, 1.0), (128, 160, 192, 224)),
    "mobilenet_v2": ((0.35, 0.5, 0.75, 1.0, 1.3, 1.4), (96, 128, 160, 192, 224)),
}
DEFAULT_SIZE = 224  # Keras' file for any size it does not publish
WEIGHTS_SUBDIR = "keras-weights"
_V1_ALPHA_TEXT = {0.25: "2_5", 0.5: "5_0", 0.75: "7_5", 1.0: "1_0"}  # Keras' spelling


class DownloadError(ConnectionError):
    """A weights file could not be downloaded; the message names the URL and the manual route."""


@dataclasses.dataclass(frozen=True)
class WeightsChoice:
    """The published file a model, alpha and input size take, and why that one."""

    family: str  # 'mobilenet_v1' or 'mobilenet_v2': the Keras network the file is for
    alpha: float
    image_size: int  # the size asked for
    file_size: int  # the size of the file chosen (224 when Keras publishes none for image_size)
    include_top: bool
    file: str
    url: str
    why: str


def family(model_name: str) -> str:
    """'mobilenet_v1' or 'mobilenet_v2': which Keras network a registered mnres model is."""
    if model_name not in mobilenet.MODELS:
        raise ValueError(
            f"unknown model {model_name!r}; available: {', '.join(sorted(mobilenet.MODELS))}"
        )
    ctor = mobilenet.MODELS[model_name]
    cls = getattr(ctor, "func", ctor)
    return "mobilenet_v2" if issubclass(cls, mobilenet.MobileNetV2) else "mobilenet_v1"


def _file_name(family_name: str, alpha: float, rows: int, include_top: bool) -> str:
    top = "" if include_top else "_no_top"
    if family_name == "mobilenet_v1":
        return f"mobilenet_{_V1_ALPHA_TEXT[alpha]}_{rows}_tf{top}.h5"
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}{top}.h5"


def choose_weights(
    model_name: str, alpha: float, image_size: int = DEFAULT_SIZE, *, include_top: bool = False
) -> WeightsChoice:
    """The published file for a model, alpha and input size.

    Args:
      model_name: a registered mnres model ('mobilenet_v1', 'mobilenet_v2', 'paper', ...) or a
        family name.
      alpha: the width multiplier; Keras publishes only the alphas of `PUBLISHED`.
      image_size: the input side. Without a file for it, the 224 px file (as Keras does: the
        weights of a network without its classifier do not depend on the input size).
      include_top: the file with the 1000-class classifier.

    Returns:
      A `WeightsChoice` (file name, URL, and why that file).

    Raises:
      ValueError: an unknown model, or an alpha Keras publishes no weights for.
    """
    name = family(model_name)
    alphas, sizes = PUBLISHED[name]
    match = [a for a in alphas if math.isclose(float(alpha), a, abs_tol=1e-6)]
    if not match:
        raise ValueError(
            f"Keras publishes ImageNet weights for {name} at alpha "
            f"{', '.join(str(a) for a in alphas)} only, not alpha={alpha}"
        )
    alpha = match[0]
    image_size = int(image_size)
    rows = image_size if image_size in sizes else DEFAULT_SIZE
    if rows == image_size:
        why = f"Keras publishes {name} alpha {alpha} weights for {rows} px"
    else:
        why = (
            f"Keras publishes {name} alpha {alpha} weights for {', '.join(map(str, sizes))} px, "
            f"not {image_size}: the {rows} px file, as Keras picks (without the classifier the "
            "weights do not depend on the input size)"
        )
    file = _file_name(name, alpha, rows, include_top)
    return WeightsChoice(
        name, alpha, image_size, rows, include_top, file, BASE_URLS[name] + file, why
    )


def available() -> list[dict]:
    """Every published file: dicts with model, alpha, image_size, include_top, url, file."""
    choices = [
        choose_weights(name, alpha, size, include_top=top)
        for name, (alphas, sizes) in PUBLISHED.items()
        for alpha in alphas
        for size in sizes
        for top in (False, True)
    ]
    return [
        {"model": c.family, "alpha": c.alpha, "image_size": c.image_size,
         "include_top": c.include_top, "url": c.url, "file": c.file}
        for c in choices
    ]  # fmt: skip


def weights_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The folder the weight files are kept in: `<cache_dir>/keras-weights`."""
    root = default_cache_dir() if cache_dir is None else os.fspath(cache_dir)
    return os.path.join(os.path.expanduser(root), WEIGHTS_SUBDIR)


def recorded_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 recorded for a cached file on its download (`PATH.sha256`), or None."""
    try:
        with open(f"{os.fspath(path)}.sha256") as f:
            return f.read().split()[0].lower()
    except (FileNotFoundError, IndexError):
        return None


def fetch(
    model_name: str,
    alpha: float,
    image_size: int = DEFAULT_SIZE,
    *,
    include_top: bool = False,
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
    url: str | None = None,
    timeout: float = 10.0,
) -> str:
    """The path of the published weights file (`choose_weights`), downloaded once into the cache.

    A cached file is reused without network access once it matches the sha256 recorded on its
    download (and `sha256`, when given) and h5py reads it. Otherwise the file is downloaded to
    a temporary file beside it, checked (its Content-Length, HDF5 that h5py reads, `sha256`)
    and only then renamed into place, so a download cut short leaves nothing behind.

    Args:
      model_name, alpha, image_size, include_top: pick the file, as `choose_weights`.
      cache_dir: the mnres cache; None: `default_cache_dir()` (`$MNRES_CACHE`, ~/.cache/mnres).
        The file goes into its `keras-weights/` folder.
      sha256: the expected hash (hex); None: whatever the first download gave, recorded.
      url: download from here instead of Keras' address (a mirror); the file keeps its name.
      timeout: seconds to wait for the server to connect or answer.

    Returns:
      The path of the cached `.h5` file.

    Raises:
      DownloadError: the download failed (offline, host unreachable, HTTP error, fewer bytes
        than its Content-Length); one line that names the URL and how to pass a file
        downloaded elsewhere.
      ValueError: the file does not match `sha256` or its recorded hash, or h5py cannot read
        it as Keras weights (a cached one is then removed: the next call downloads it again).
    """
    choice = choose_weights(model_name, alpha, image_size, include_top=include_top)
    folder = weights_dir(cache_dir)
    path = os.path.join(folder, choice.file)
    expected = sha256.strip().lower() if sha256 else None
    if os.path.isfile(path):
        _check_cached(path, expected)
        return path
    source = url or choice.url
    os.makedirs(folder, exist_ok=True)
    logging.info("Downloading %s to %s (%s)", source, path, choice.why)
    handle, partial = tempfile.mkstemp(prefix=f".{choice.file}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out:
            got = _download(source, out, choice, timeout)
        _check_download(partial, source, got, expected)
        _write_atomically(f"{path}.sha256", f"{got}  {choice.file}\n")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    logging.info("Cached %s (sha256 %s)", path, got)
    return path


def _download(source: str, out, choice: WeightsChoice, timeout: float) -> str:
    """Streams `source` into `out`; returns its sha256. Any failure is one `DownloadError`."""
    digest, size = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(source, timeout=timeout) as response:
            length = response.headers.get("Content-Length", "")
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
    except urllib.error.HTTPError as e:
        hint = ""
        if e.code == 404 and choice.file_size != DEFAULT_SIZE:
            hint = f" (Keras may not publish this size; image_size={DEFAULT_SIZE} always is)"
        raise _download_error(source, f"HTTP {e.code} {e.reason}{hint}", choice) from None
    except urllib.error.URLError as e:
        raise _download_error(source, str(e.reason), choice) from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, short reads
        raise _download_error(source, f"{type(e).__name__}: {e}", choice) from None
    # urllib returns a body cut short by a closed connection as if it were whole.
    if length.isdigit() and size != int(length):
        reason = f"the connection closed after {size:,} of its {int(length):,} bytes"
        raise _download_error(source, reason, choice)
    return digest.hexdigest()


def _check_download(partial: str, source: str, got: str, expected: str | None) -> None:
    """Refuses a downloaded file that h5py cannot read as Keras weights, or of another sha256."""
    unreadable = _unreadable(partial)
    if unreadable:
        raise ValueError(f"{source}: {unreadable}; nothing was cached")
    if expected and got != expected:
        raise ValueError(
            f"{source} has sha256 {got}, not the {expected} asked for; nothing was cached"
        )


def _download_error(source: str, reason: str, choice: WeightsChoice) -> DownloadError:
    return DownloadError(
        f"could not download {source} ({reason}). Offline? Download {choice.file} elsewhere and "
        f"pass its path: config.model.pretrained=PATH/{choice.file}, or "
        f"load_keras_weights(model, variables, 'PATH/{choice.file}')."
    )


def _unreadable(path: str) -> str | None:
    """Why h5py cannot read `path` as Keras weights (every layer listed and read), or None."""
    try:
        read_h5_file(path)
    except ValueError as e:
        return str(e).removeprefix(f"{path}: ")
    return None


def _check_cached(path: str, expected: str | None) -> None:
    actual = file_sha256(path)
    recorded = recorded_sha256(path)
    if recorded is not None and actual != recorded:
        raise ValueError(
            f"the cached {path} has sha256 {actual}, not the {recorded} recorded when it was "
            f"downloaded (damaged or replaced?): delete it and {path}.sha256 to download it again"
        )
    # A download cut short, cached (with its hash) before downloads were checked.
    unreadable = _unreadable(path)
    if unreadable:
        for bad in (path, f"{path}.sha256"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(bad)
        raise ValueError(
            f"{path}: {unreadable}, a download cut short? Removed it from the cache: run again "
            "to download it again"
        )
    if recorded is None:  # put there by hand: its hash is recorded from now on
        _write_atomically(f"{path}.sha256", f"{actual}  {os.path.basename(path)}\n")
        logging.info("Recorded sha256 %s for %s, found in the cache", actual, path)
    if expected and actual != expected:
        raise ValueError(f"the cached {path} has sha256 {actual}, not the {expected} asked for")


def _write_atomically(path: str, text: str) -> None:
    handle, partial = tempfile.mkstemp(prefix=".sha256.", suffix=".part", dir=os.path.dirname(path))
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def resolve(
    pretrained: str,
    model_name: str,
    alpha: float,
    image_size: int = DEFAULT_SIZE,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[str, str]:
    """A `pretrained` setting as a file: 'imagenet' (fetched) or a path; `(path, sha256)`."""
    if pretrained == "imagenet":
        path = fetch(model_name, alpha, image_size, cache_dir=cache_dir)
        return path, recorded_sha256(path) or file_sha256(path)
    if not os.path.isfile(pretrained):
        raise FileNotFoundError(
            f"pretrained weights {pretrained!r}: give 'imagenet' or the path of a Keras weights "
            "file (.h5)"
        )
    return os.fspath(pretrained), file_sha256(pretrained)


def load_imagenet(
    model,
    variables,
    *,
    image_size: int = DEFAULT_SIZE,
    include_top: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
    url: str | None = None,
    timeout: float = 10.0,
):
    """Loads Keras' ImageNet weights into an mnres MobileNet v1/v2 (or the seed network).

    The file is picked from the model's type and alpha and `image_size` (`choose_weights`),
    fetched into the cache (`fetch`), and loaded by `load_keras_weights`: every layer but the
    classifier must be in the file with the same shape; Keras layers the model lacks (the seed
    network stops after block 12) are skipped and listed in the report.

    Args:
      model: an mnres `MobileNetV1` or `MobileNetV2` (`create_model('paper', ...)` included).
      variables: `{'params', 'batch_stats'}` from `model.init`; not modified.
      image_size: the input side the model will see; picks among Keras' files.
      include_top: load the 1000-class classifier too; None: when the model has a 1000-class
        top. Otherwise the classifier stays at its initial values.
      cache_dir, sha256, url, timeout: as `fetch`.

    Returns:
      `(variables, report)`, as `load_keras_weights`.
    """
    if not isinstance(model, mobilenet.MobileNetV1 | mobilenet.MobileNetV2):
        raise TypeError(f"expected an mnres MobileNetV1 or MobileNetV2, got {type(model).__name__}")
    name = "mobilenet_v2" if isinstance(model, mobilenet.MobileNetV2) else "mobilenet_v1"
    if getattr(model, "depth_multiplier", 1) != 1:
        raise ValueError(
            f"Keras publishes MobileNet v1 ImageNet weights for depth_multiplier 1 only, "
            f"not {model.depth_multiplier}"
        )
    if include_top is None:
        include_top = bool(model.include_top and model.num_classes == 1000)
    path = fetch(
        name,
        model.alpha,
        image_size,
        include_top=include_top,
        cache_dir=cache_dir,
        sha256=sha256,
        url=url,
        timeout=timeout,
    )
    return load_checked(model, variables, path)


def load_checked(model, variables, path: str | os.PathLike):
    """`load_keras_weights`, then a check that every layer but the classifier was loaded."""
    from mnres.weights.keras import load_keras_weights

    variables, report = load_keras_weights(model, variables, path)
    classifier = model.classifier_name if model.include_top else None
    missing = [n for n in model.layer_names() if n != classifier and n not in report.loaded]
    if missing:
        raise ValueError(f"{path}: layers {missing} were not loaded")
    return variables, report


__all__ = [
    "BASE_URLS",
    "CACHE_ENV",
    "PUBLISHED",
    "DownloadError",
    "WeightsChoice",
    "available",
    "choose_weights",
    "default_cache_dir",
    "family",
    "fetch",
    "file_sha256",  # mnres.provenance.file_sha256, here since 0.1
    "load_checked",
    "load_imagenet",
    "recorded_sha256",
    "resolve",
    "weights_dir",
]
