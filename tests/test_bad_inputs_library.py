"""Bad inputs to the library: models, pretrained weights, inference and the weights cache.

Each row is a call a user could well make (tests/bad_inputs.py: one line, the exception type,
nothing changed beyond the row's paths). The checks cost nothing at run time: model fields once
per construction, the input's dtype and shape (static) once per trace.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bad_inputs import Case, check

import mnres
from mnres import provenance
from mnres.deploy import predict
from mnres.weights import imagenet, keras

h5py = pytest.importorskip("h5py")

SMALL = functools.partial(mnres.create_model, "mobilenet_v2", alpha=0.35, num_classes=2)


@functools.cache
def _shipped():
    return mnres.load_pretrained("malaria")


def _init(images):
    """`model.init` of a small network on `images`, traced only (the checks are static)."""
    return jax.eval_shape(lambda x: SMALL().init(jax.random.key(0), x, train=False), images)


def _apply(images):
    """`model.apply` on `images` inside `jit`, as a user's own inference would call it."""
    model = SMALL()
    variables = _init(jnp.zeros((1, 32, 32, 3)))
    return jax.eval_shape(jax.jit(lambda v, x: model.apply(v, x, train=False)), variables, images)


def _crops(dtype=np.uint8, shape=(2, 64, 64, 3)):
    return np.zeros(shape, dtype)


def _keras_file(work, body: bytes, name: str = "weights.h5") -> str:
    path = os.path.join(work, name)
    with open(path, "wb") as f:
        f.write(body)
    return path


def _truncated_keras_file(work) -> str:
    """A real Keras-layout HDF5 file (two layers), cut at half its bytes."""
    path = os.path.join(work, "whole.h5")
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"conv1", b"conv1_bn"]
        for layer, weights in {"conv1": ["kernel"], "conv1_bn": ["gamma", "beta"]}.items():
            group = f.create_group(layer)
            group.attrs["weight_names"] = [f"{layer}/{w}:0".encode() for w in weights]
            for w in weights:
                group.create_dataset(f"{layer}/{w}:0", data=np.ones((64, 64), np.float32))
    with open(path, "rb") as f:
        body = f.read()
    os.remove(path)
    return _keras_file(work, body[: len(body) // 2])


def _cut_download_in_cache(work) -> None:
    """The cache as mnres 0.2.0 left it after a dropped connection: half a file, its hash."""
    folder = os.path.join(work, "cache", imagenet.WEIGHTS_SUBDIR)
    os.makedirs(folder)
    file = imagenet.choose_weights("mobilenet_v1", 0.25, 128).file
    path = _truncated_keras_file(work)
    os.replace(path, os.path.join(folder, file))
    with open(os.path.join(folder, file + ".sha256"), "w") as f:
        f.write(f"{provenance.file_sha256(os.path.join(folder, file))}  {file}\n")


def _load_into_small(path):
    model = SMALL()
    return imagenet.load_checked(model, _init(jnp.zeros((1, 32, 32, 3))), path)


CASES = [
    # Model fields: refused when the model is built, once.
    Case("create_model alpha=-1", r"^alpha=-1: the width multiplier must be a positive",
         call=lambda w: mnres.create_model("mobilenet_v2", alpha=-1)),
    Case("create_model alpha=0", r"^alpha=0: .*positive",
         call=lambda w: mnres.create_model("mobilenet_v1", alpha=0)),
    Case("create_model alpha=nan", r"^alpha=nan: .*positive",
         call=lambda w: mnres.create_model("paper", alpha=float("nan"))),
    Case("create_model num_classes=0", r"^num_classes=0: .*>= 1",
         call=lambda w: mnres.create_model("mobilenet_v2", num_classes=0)),
    Case("MobileNetV1 alpha too small for one filter", r"alpha=0.01 .*stem.*>= 1/32",
         call=lambda w: mnres.create_model("mobilenet_v1", alpha=0.01)),
    Case("depth_multiplier=0", r"^depth_multiplier=0: a whole number >= 1",
         call=lambda w: mnres.create_model("mobilenet_v1", depth_multiplier=0)),
    Case("dropout=1", r"^dropout=1.0: a rate in \[0, 1\)",
         call=lambda w: mnres.create_model("mobilenet_v1", dropout=1.0)),
    Case("load_pretrained malaria num_classes=0", r"^num_classes=0: .*>= 1",
         call=lambda w: mnres.load_pretrained("malaria", num_classes=0)),
    # The network's input: dtype and shape are static, checked when traced.
    Case("raw uint8 crops into model.apply", r"float images scaled to \[-1, 1\], got uint8: .*"
         r"x / 127.5 - 1.*Classifier", call=lambda w: _apply(_crops(shape=(2, 32, 32, 3)))),
    Case("int32 pixels into model.init", r"float images scaled to \[-1, 1\], got int32",
         call=lambda w: _init(_crops(np.int32, (1, 32, 32, 3)))),
    Case("grayscale images into the network", r"RGB images as \[batch, height, width, 3\], "
         r"got shape \(1, 32, 32, 1\)", call=lambda w: _init(_crops(np.float32, (1, 32, 32, 1)))),
    Case("one image without its batch axis", r"\[batch, height, width, 3\], got shape "
         r"\(32, 32, 3\)", call=lambda w: _init(_crops(np.float32, (32, 32, 3)))),
    # The uint8 entry points refuse floats (in [0, 1] they would read as near-black).
    Case("float [0, 1] crops into Classifier.serve", r"^Classifier.serve takes uint8 RGB crops "
         r"\(0-255\), got float32: .*np.round\(x \* 255\)",
         call=lambda w: _shipped().classifier.serve(_crops(np.float32) + 0.5)),
    Case("float crops into Classifier.logits", r"^Classifier.logits takes uint8 .*got float64",
         call=lambda w: _shipped().classifier.logits(_crops(np.float64))),
    Case("one crop without its batch axis into serve", r"\[batch, height, width, 3\], got "
         r"\(64, 64, 3\)", call=lambda w: _shipped().classifier.serve(_crops(shape=(64, 64, 3)))),
    Case("float [0, 1] crops into a predictor", r"^the predictor takes uint8 RGB crops",
         call=lambda w: predict.probabilities(
             predict.from_classifier(_shipped().classifier), _crops(np.float32) + 0.5)),
    Case("class_probabilities of no crops", r"^no images to classify",
         call=lambda w: predict.class_probabilities(
             predict.from_classifier(_shipped().classifier), _crops(shape=(0, 64, 64, 3)))),
    # Keras weight files: one line that names the file, not h5py's traceback.
    Case("pretrained=PATH of an HTML page saved as .h5", r"weights.h5: not a readable HDF5 file",
         setup=lambda w: _keras_file(w, b"<html>Not Found</html>"),
         call=lambda w: _load_into_small(os.path.join(w, "weights.h5"))),
    Case("a truncated Keras .h5", r"weights.h5: not a readable HDF5 file \(.*truncated",
         setup=_truncated_keras_file,
         call=lambda w: keras.read_keras_layers(os.path.join(w, "weights.h5"))),
    Case("an empty HDF5 file as weights", r"empty.h5: not a Keras weights file",
         setup=lambda w: h5py.File(os.path.join(w, "empty.h5"), "w").close(),
         call=lambda w: keras.read_keras_layers(os.path.join(w, "empty.h5"))),
    Case("a dropped download left in the cache", r"not a readable HDF5 file .*a download cut "
         r"short\? Removed it from the cache: run again to download it again",
         setup=_cut_download_in_cache, may_change=("cache",),
         call=lambda w: imagenet.fetch("mobilenet_v1", 0.25, 128,
                                       cache_dir=os.path.join(w, "cache"))),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input(case, tmp_path, monkeypatch):
    check(case, tmp_path, monkeypatch)
