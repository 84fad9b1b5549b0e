"""The networks: layers, the MobileNet blocks, the models as tables, parameters, Keras weights."""

from mnres.models.blocks import DepthwiseSeparable, InvertedResidual
from mnres.models.build import create_model, from_config
from mnres.models.ensemble import Ensemble
from mnres.models.layers import ConvBN, DepthwiseConv2D, PointwiseConv, make_divisible
from mnres.models.mobilenet import (
    MOBILENET_V1_BLOCKS,
    MOBILENET_V2_STAGES,
    MODELS,
    MobileNetV1,
    MobileNetV2,
    SeedNetwork,
)

__all__ = [
    "MODELS",
    "MOBILENET_V1_BLOCKS",
    "MOBILENET_V2_STAGES",
    "ConvBN",
    "DepthwiseConv2D",
    "DepthwiseSeparable",
    "Ensemble",
    "InvertedResidual",
    "MobileNetV1",
    "MobileNetV2",
    "PointwiseConv",
    "SeedNetwork",
    "create_model",
    "from_config",
    "make_divisible",
]
