"""The two MobileNet blocks: depthwise-separable (V1) and inverted residual (V2).

As in Flax's ImageNet example, a block takes its conv + BN unit as one field, `conv_bn`: the
model builds `functools.partial(ConvBN, norm=..., conv_formulation=..., dtype=...)` once and
every block uses it. On its own a block defaults to `ConvBN`, whose BatchNorm runs on its
running statistics (Keras' inference); to train one, hand it a unit whose BatchNorm uses batch
statistics:

    import functools

    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    import mnres

    block = mnres.DepthwiseSeparable(features=512, block_id=7, residual=True)
    x = jnp.zeros((8, 14, 14, 512))
    variables = block.init(jax.random.key(0), x)  # {'params', 'batch_stats'}
    y = block.apply(variables, x)

    train_bn = functools.partial(
        nn.BatchNorm, use_running_average=False, momentum=0.99, epsilon=1e-3
    )
    block = block.clone(conv_bn=functools.partial(mnres.ConvBN, norm=train_bn))
    y, updates = block.apply(variables, x, mutable=["batch_stats"])
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import linen as nn

from mnres.models.layers import KERAS_V1_STRIDE2_PADDING, ConvBN, ModuleDef, Padding


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
    frozen_layers: Sequence[str] = ()  # Keras names whose BatchNorm runs on running averages
    conv_bn: ModuleDef = ConvBN  # the model's partial(ConvBN, norm=..., conv_formulation=...)

    @nn.compact
    def __call__(self, x):
        inputs = x
        if self.residual and (self.strides != 1 or x.shape[-1] != self.features):
            raise ValueError(
                f"block {self.block_id}: an identity residual needs stride 1 and equal channels, "
                f"got stride {self.strides} and {x.shape[-1]} -> {self.features} channels"
            )
        dw, pw = f"conv_dw_{self.block_id}", f"conv_pw_{self.block_id}"
        x = self.conv_bn(
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
        )(x)
        x = self.conv_bn(
            self.features,
            conv_name=pw,
            bn_name=f"{pw}_bn",
            frozen=f"{pw}_bn" in self.frozen_layers,
            name="pointwise",
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
    frozen_layers: Sequence[str] = ()
    conv_bn: ModuleDef = ConvBN  # the model's partial(ConvBN, norm=..., conv_formulation=...)

    @nn.compact
    def __call__(self, x):
        inputs = x
        prefix = f"block_{self.block_id}_" if self.block_id else "expanded_conv_"

        def names(layer, bn_suffix="_BN"):
            conv = prefix + layer
            return dict(
                conv_name=conv,
                bn_name=conv + bn_suffix,
                frozen=conv + bn_suffix in self.frozen_layers,
            )

        if self.expansion != 1:
            x = self.conv_bn(x.shape[-1] * self.expansion, name="expand", **names("expand"))(x)
        # For a 3x3 kernel, Keras' correct_pad + 'valid' is exactly 'SAME'.
        x = self.conv_bn(
            None,
            kernel_size=3,
            strides=self.strides,
            padding="SAME",
            depthwise=True,
            name="depthwise",
            **names("depthwise"),
        )(x)
        x = self.conv_bn(self.features, activation=False, name="project", **names("project"))(x)
        if self.strides == 1 and inputs.shape[-1] == self.features:
            x = x + inputs
        return x
