"""mnres: MobileNet-style classifiers with residual connections, in JAX/Flax."""

from mnres.blocks import DepthwiseSeparable, InvertedResidual
from mnres.layers import ConvBN, DepthwiseConv2D, make_divisible
from mnres.models import MODELS, MobileNetV1, MobileNetV2, SeedNetwork, create_model

__version__ = "0.1.0"

__all__ = [
    "MODELS",
    "ConvBN",
    "DepthwiseConv2D",
    "DepthwiseSeparable",
    "InvertedResidual",
    "MobileNetV1",
    "MobileNetV2",
    "SeedNetwork",
    "create_model",
    "make_divisible",
]
