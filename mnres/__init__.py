"""mnres: MobileNet-style classifiers with residual connections, in JAX/Flax."""

from mnres import _moved
from mnres.models import (
    MODELS,
    ConvBN,
    DepthwiseConv2D,
    DepthwiseSeparable,
    InvertedResidual,
    MobileNetV1,
    MobileNetV2,
    PointwiseConv,
    SeedNetwork,
    create_model,
    make_divisible,
)
from mnres.weights.keras import LoadReport, load_keras_weights

__version__ = "0.2.0"

_moved.install()


def __getattr__(name: str):
    # `load_pretrained` and `list_pretrained` import the run-folder code on first use.
    if name in ("load_pretrained", "list_pretrained"):
        from mnres import weights

        return getattr(weights, name)
    # The 0.1 top-level module names, which warn (mnres._moved).
    if f"mnres.{name}" in _moved.MOVED:
        return _moved.module(name)
    raise AttributeError(f"module 'mnres' has no attribute {name!r}")


__all__ = [
    "MODELS",
    "ConvBN",
    "DepthwiseConv2D",
    "DepthwiseSeparable",
    "InvertedResidual",
    "LoadReport",
    "MobileNetV1",
    "MobileNetV2",
    "PointwiseConv",
    "SeedNetwork",
    "create_model",
    "list_pretrained",
    "load_keras_weights",
    "load_pretrained",
    "make_divisible",
]
