"""The two MobileNet blocks: depthwise-separable (V1) and inverted residual (V2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from mnres.models.layers import KERAS_V1_STRIDE2_PADDING, ConvBN, Dtype, Padding


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 block: 3x3 depthwise, BN, ReLU6, 1x1 pointwise, BN, ReLU6 [+ identity skip].

    Layer names follow Keras: `conv_dw_{id}`, `conv_dw_{id}_bn`, `conv_pw_{id}`, `conv_pw_{id}_bn`.
    """

    features: int
    block_id: int
    strides: int = 1
    depth_multiplier: int = 1
    residual: bool = False
    # Keras pads a stride-2 depthwise conv at the bottom/right only; 'SAME' differs on odd sizes.
    stride2_padding: Padding = KERAS_V1_STRIDE2_PADDING
    norm: Any = nn.BatchNorm
    frozen_layers: Sequence[str] = ()  # Keras names whose BatchNorm runs on running averages
    depthwise_implementation: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        inputs = x
        if self.residual and (self.strides != 1 or x.shape[-1] != self.features):
            raise ValueError(
                f"block {self.block_id}: an identity residual needs stride 1 and equal channels, "
                f"got stride {self.strides} and {x.shape[-1]} -> {self.features} channels"
            )
        unit = dict(
            norm=self.norm,
            depthwise_implementation=self.depthwise_implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        dw, pw = f"conv_dw_{self.block_id}", f"conv_pw_{self.block_id}"
        x = ConvBN(
            None,
            conv_name=dw,
            bn_name=f"{dw}_bn",
            kernel_size=3,
            strides=self.strides,
            padding="SAME" if self.strides == 1 else self.stride2_padding,
            depthwise=True,
            depth_multiplier=self.depth_multiplier,
            frozen=f"{dw}_bn" in self.frozen_layers,
            name="depthwise",
            **unit,
        )(x)
        x = ConvBN(
            self.features,
            conv_name=pw,
            bn_name=f"{pw}_bn",
            frozen=f"{pw}_bn" in self.frozen_layers,
            name="pointwise",
            **unit,
        )(x)
        return x + inputs if self.residual else x


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand, BN, ReLU6], 3x3 depthwise, BN, ReLU6, 1x1 project, BN.

    The identity skip is added when stride is 1 and input and output channels match (as Keras).
    Layer names follow Keras: `block_{id}_expand`, `block_{id}_depthwise_BN`, `block_{id}_project`,
    and `expanded_conv_*` for block 0.
    """

    features: int
    block_id: int
    expansion: int = 6
    strides: int = 1
    norm: Any = nn.BatchNorm
    frozen_layers: Sequence[str] = ()
    depthwise_implementation: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        inputs = x
        prefix = f"block_{self.block_id}_" if self.block_id else "expanded_conv_"
        unit = dict(
            norm=self.norm,
            depthwise_implementation=self.depthwise_implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

        def names(layer, bn_suffix="_BN"):
            conv = prefix + layer
            return dict(
                conv_name=conv,
                bn_name=conv + bn_suffix,
                frozen=conv + bn_suffix in self.frozen_layers,
            )

        if self.expansion != 1:
            x = ConvBN(x.shape[-1] * self.expansion, name="expand", **names("expand"), **unit)(x)
        # For a 3x3 kernel, Keras' correct_pad + 'valid' is exactly 'SAME'.
        x = ConvBN(
            None,
            kernel_size=3,
            strides=self.strides,
            padding="SAME",
            depthwise=True,
            name="depthwise",
            **names("depthwise"),
            **unit,
        )(x)
        x = ConvBN(self.features, activation=False, name="project", **names("project"), **unit)(x)
        if self.strides == 1 and inputs.shape[-1] == self.features:
            x = x + inputs
        return x
