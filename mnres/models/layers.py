"""Layers of every MobileNet block: channel rounding, the depthwise conv, conv + BN + ReLU6
(the CPU formulation of the convolutions: `mnres.models.shifted`)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mnres.models.shifted import pointwise_matmul, shifted_depthwise_conv

Dtype = Any
ModuleDef = Any  # a Module class or a functools.partial of one, as in Flax's examples
# ((top, bottom), (left, right)) or 'SAME' / 'VALID', as lax.conv_general_dilated takes them.
Padding = str | Sequence[tuple[int, int]]

# Keras' MobileNet pads stride-2 depthwise convs by one pixel at the bottom and right only
# (ZeroPadding2D(((0, 1), (0, 1))) + 'valid'); weights carry over only with the same padding.
KERAS_V1_STRIDE2_PADDING = ((0, 1), (0, 1))

# How the convolutions are written: 'grouped' is XLA's convolutions throughout (best on GPU and
# TPU, and what exporters recognise); 'shifted' is the CPU formulation: each depthwise conv as
# nine shifted multiply-adds with a hand-written backward pass, each stride-1 1x1 conv as a
# matrix multiply. 'auto' picks shifted on CPU and grouped elsewhere (resolve_conv_formulation).
CONV_FORMULATIONS = ("auto", "grouped", "shifted")

# Keras' initialisers for the conv kernels (glorot_uniform) and the classifier.
default_kernel_init = nn.initializers.glorot_uniform()


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Rounds a channel count to the nearest multiple of `divisor`, never below 90% of `value`.

    Same rule as Keras' and timm's `_make_divisible`, so widths (alpha) match their models.
    """
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:  # rounding down must not remove more than 10%
        rounded += divisor
    return rounded


# The platforms 'auto' resolves for: JAX backends (`jax.default_backend()`) and the names
# `jax.jit(...).trace(...).lower(lowering_platforms=...)` takes.
CONV_PLATFORMS = ("cpu", "gpu", "cuda", "rocm", "tpu")


def resolve_conv_formulation(formulation: str, platform: str | None = None) -> str:
    """The formulation that runs on `platform`.

    A model built for another platform than the one it runs on, e.g. to lower its steps for a TPU
    from a CPU, carries the resolved formulation:
    `model.clone(conv_formulation=resolve_conv_formulation(model.conv_formulation, "tpu"))`
    (or `mnres.models.from_config(..., platform="tpu")`).

    Args:
      formulation: one of `CONV_FORMULATIONS`.
      platform: one of `CONV_PLATFORMS`; None: the running backend's, `jax.default_backend()`.

    Returns:
      'grouped' or 'shifted': 'auto' means shifted on CPU, grouped elsewhere.
    """
    if formulation not in CONV_FORMULATIONS:
        raise ValueError(
            f"conv formulation must be one of {CONV_FORMULATIONS}, got {formulation!r}"
        )
    if platform is not None and platform not in CONV_PLATFORMS:
        raise ValueError(f"platform must be one of {CONV_PLATFORMS} or None, got {platform!r}")
    if formulation == "auto":
        # XLA's grouped convolution is slow on CPU (its backward pass especially);
        # GPUs and TPUs have fast kernels for it, and exporters recognise it.
        return "shifted" if (platform or jax.default_backend()) == "cpu" else "grouped"
    return formulation


# The names of mnres 0.1, kept for one release: each warns and gives its new name's value.
_DEPRECATED = {
    "DEPTHWISE_IMPLEMENTATIONS": "CONV_FORMULATIONS",
    "resolve_depthwise_implementation": "resolve_conv_formulation",
}


def __getattr__(name: str):
    if name in _DEPRECATED:
        warnings.warn(
            f"mnres.models.layers.{name} is deprecated and goes in mnres 0.3: use "
            f"{_DEPRECATED[name]}",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[_DEPRECATED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def adopt_depthwise_implementation(module) -> None:
    """Moves a module's deprecated `depthwise_implementation` field onto `conv_formulation`.

    Called from `__post_init__`. The old field is cleared once moved, so `clone` carries only
    `conv_formulation`; when both are given, the old name wins, as `clone(old=...)` means it.
    """
    value = module.depthwise_implementation
    if value is None:
        return
    warnings.warn(
        "`depthwise_implementation` is deprecated and will be removed; use `conv_formulation` "
        "(same values: 'auto', 'grouped', 'shifted')",
        DeprecationWarning,
        stacklevel=5,  # past __post_init__ and the dataclass __init__ Flax wraps
    )
    object.__setattr__(module, "conv_formulation", value)
    object.__setattr__(module, "depthwise_implementation", None)


def _explicit_padding(padding: Padding, in_hw: Sequence[int], kernel: int, stride: int):
    """Turns 'SAME'/'VALID' into explicit ((top, bottom), (left, right)) pads, as lax does."""
    if not isinstance(padding, str):
        return tuple(tuple(p) for p in padding)
    if padding.upper() == "VALID":
        return ((0, 0), (0, 0))
    if padding.upper() != "SAME":
        raise ValueError(f"padding must be 'SAME', 'VALID' or explicit pairs, got {padding!r}")
    pads = []
    for size in in_hw:
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads.append((total // 2, total - total // 2))  # TF/lax put the odd pixel at the end
    return tuple(pads)


class DepthwiseConv2D(nn.Module):
    """Depthwise convolution with one parameter tree and two formulations (grouped / shifted)."""

    kernel_size: int = 3
    strides: int = 1
    padding: Padding = "SAME"
    depth_multiplier: int = 1
    implementation: str = "auto"  # one of CONV_FORMULATIONS
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = default_kernel_init

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        out_channels = channels * self.depth_multiplier
        k = self.kernel_size
        # Same shape as nn.Conv(feature_group_count=channels) so checkpoints are interchangeable.
        kernel = self.param("kernel", self.kernel_init, (k, k, 1, out_channels), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        padding = _explicit_padding(self.padding, x.shape[1:3], k, self.strides)
        if resolve_conv_formulation(self.implementation) == "shifted":
            return shifted_depthwise_conv(x, kernel, self.strides, padding)
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(self.strides, self.strides),
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=channels,
        )


class PointwiseConv(nn.Module):
    """1x1 convolution (no bias) as a matrix multiply over the channel axis.

    Same parameter as `nn.Conv(features, (1, 1), use_bias=False)` ('kernel', [1, 1, in, out]), so
    weights and checkpoints are interchangeable. Why: XLA on CPU computes the kernel gradient of
    a 1x1 convolution as a convolution with the whole image as its window, after transposing
    both operands, at a few GFLOP/s; as a matrix multiply with its own backward pass
    (`mnres.models.shifted.pointwise_matmul`) it runs several times faster.
    """

    features: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = default_kernel_init

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), self.param_dtype
        )
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return pointwise_matmul(x, kernel[0, 0])


# Keras' BatchNorm (momentum 0.999, epsilon 1e-3) on its running statistics: what a unit or a
# block used on its own normalises with. The models pass their own, which trains when they do.
KERAS_INFERENCE_BATCH_NORM = functools.partial(
    nn.BatchNorm, use_running_average=True, momentum=0.999, epsilon=1e-3
)


class ConvBN(nn.Module):
    """Conv (regular or depthwise, no bias) + BatchNorm + optional ReLU6: the MobileNet unit.

    The one module that holds the conv and norm choices: a model builds
    `functools.partial(ConvBN, norm=..., conv_formulation=..., dtype=..., param_dtype=...)` once
    and hands it to its blocks (their `conv_bn` field), as Flax's ImageNet example hands down
    `conv` and `norm`. The children carry Keras' layer names (`conv_name`, `bn_name`), so every
    leaf layer of a mnres model is named as in `keras.applications`.
    """

    features: int | None  # None for a depthwise conv (channels * depth_multiplier)
    conv_name: str
    bn_name: str
    kernel_size: int = 1
    strides: int = 1
    padding: Padding = "SAME"
    depthwise: bool = False
    depth_multiplier: int = 1
    activation: bool = True  # ReLU6; False for MobileNetV2's linear projection
    frozen: bool = False  # a frozen layer's BatchNorm always uses (and keeps) its running stats
    norm: ModuleDef = KERAS_INFERENCE_BATCH_NORM  # the model's: partial(nn.BatchNorm, ...)
    conv_formulation: str = "auto"  # one of CONV_FORMULATIONS
    depthwise_implementation: str | None = None  # deprecated alias of conv_formulation
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        adopt_depthwise_implementation(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        x = self._conv()(x)
        frozen = {"use_running_average": True} if self.frozen else {}
        x = self.norm(name=self.bn_name, **frozen)(x)
        return relu6(x) if self.activation else x

    def _conv(self) -> nn.Module:
        """The conv child, in the formulation `conv_formulation` resolves to."""
        if self.depthwise:
            return DepthwiseConv2D(
                kernel_size=self.kernel_size,
                strides=self.strides,
                padding=self.padding,
                depth_multiplier=self.depth_multiplier,
                implementation=self.conv_formulation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=self.conv_name,
            )
        if (
            self.kernel_size == 1
            and self.strides == 1
            and resolve_conv_formulation(self.conv_formulation) == "shifted"
        ):
            # The CPU formulation computes 1x1 convs as matmuls; 'grouped' keeps XLA's conv,
            # which GPUs, TPUs and exporters (TFLite CONV_2D) handle best.
            return PointwiseConv(
                self.features, dtype=self.dtype, param_dtype=self.param_dtype, name=self.conv_name
            )
        return nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=self.strides,
            padding=self.padding,
            use_bias=False,
            kernel_init=default_kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=self.conv_name,
        )


def relu6(x):
    """min(max(x, 0), 6), Keras' ReLU(6.0)."""
    return jnp.clip(x, 0, 6)
