"""mnres: MobileNet-style classifiers with residual connections, in JAX/Flax."""

from mnres.blocks import DepthwiseSeparable, InvertedResidual
from mnres.keras_weights import LoadReport, load_keras_weights
from mnres.layers import ConvBN, DepthwiseConv2D, PointwiseConv, make_divisible
from mnres.models import MODELS, MobileNetV1, MobileNetV2, SeedNetwork, create_model

__version__ = "0.1.0"

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
    "load_keras_weights",
    "make_divisible",
]
