"""Layers of every MobileNet block: channel rounding, the depthwise conv, conv + BN + ReLU6."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any
# ((top, bottom), (left, right)) or 'SAME' / 'VALID', as lax.conv_general_dilated takes them.
Padding = str | Sequence[tuple[int, int]]

# Keras' MobileNet pads stride-2 depthwise convs by one pixel at the bottom and right only
# (ZeroPadding2D(((0, 1), (0, 1))) + 'valid'); weights carry over only with the same padding.
KERAS_V1_STRIDE2_PADDING = ((0, 1), (0, 1))

DEPTHWISE_IMPLEMENTATIONS = ("auto", "grouped", "shifted")

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


def resolve_depthwise_implementation(implementation: str) -> str:
    """Picks the depthwise formulation: 'auto' means shifted on CPU, grouped elsewhere."""
    if implementation not in DEPTHWISE_IMPLEMENTATIONS:
        raise ValueError(
            f"depthwise implementation must be one of {DEPTHWISE_IMPLEMENTATIONS}, "
            f"got {implementation!r}"
        )
    if implementation == "auto":
        # XLA's grouped convolution is slow on CPU (its backward pass especially);
        # GPUs and TPUs have fast kernels for it, and exporters recognise it.
        return "shifted" if jax.default_backend() == "cpu" else "grouped"
    return implementation


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


def _taps(x, kh: int, kw: int, out_hw: Sequence[int], strides: int):
    """The kh*kw strided windows of the padded `x` that a depthwise conv multiplies by one tap."""
    out_h, out_w = out_hw
    for i in range(kh):
        for j in range(kw):
            end = (x.shape[0], i + (out_h - 1) * strides + 1, j + (out_w - 1) * strides + 1)
            yield (
                i,
                j,
                jax.lax.slice(x, (0, i, j, 0), (*end, x.shape[3]), (1, strides, strides, 1)),
            )


def _shifted_sum(x, kernel, strides: int, padding):
    """sum over taps of window(pad(x)) * kernel[tap]: the forward formula."""
    kh, kw = kernel.shape[:2]
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    out_hw = ((x.shape[1] - kh) // strides + 1, (x.shape[2] - kw) // strides + 1)
    y = None
    for i, j, tap in _taps(x, kh, kw, out_hw, strides):
        term = tap * kernel[i, j, 0]
        y = term if y is None else y + term
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shifted_sum_stride1(x, kernel, padding):
    return _shifted_sum(x, kernel, 1, padding)


def _shifted_sum_stride1_fwd(x, kernel, padding):
    return _shifted_sum(x, kernel, 1, padding), (x, kernel)


def _shifted_sum_stride1_bwd(padding, residuals, g):
    # Autodiff of the forward formula keeps all kh*kw windows of x alive for the kernel
    # gradient (XLA writes each one out: 9x the input's memory traffic, a quarter of the
    # MobileNetV2 train step on CPU). Here only x is kept; the input gradient is the same
    # shifted sum over g with the flipped kernel, and the windows are re-sliced for the kernel
    # gradient. Measured on a 64x64x96 layer, batch 64, stride 1: forward+backward 1.6x faster.
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    (top, bottom), (left, right) = padding
    flipped = kernel[::-1, ::-1]
    dx = _shifted_sum(
        g, flipped, 1, ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right))
    )
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    dk = jnp.stack(
        [jnp.sum(tap * g, axis=(0, 1, 2)) for _, _, tap in _taps(x, kh, kw, g.shape[1:3], 1)]
    )
    return dx, dk.reshape(kernel.shape)


_shifted_sum_stride1.defvjp(_shifted_sum_stride1_fwd, _shifted_sum_stride1_bwd)


def shifted_depthwise_conv(x, kernel, strides: int, padding):
    """Depthwise conv as kh*kw shifted multiply-adds.

    Args:
      x: [N, H, W, C] input.
      kernel: [kh, kw, 1, C * multiplier], the layout of a grouped `nn.Conv` kernel.
      strides: spatial stride (same for both axes).
      padding: explicit ((top, bottom), (left, right)).
    """
    multiplier = kernel.shape[-1] // x.shape[-1]
    if multiplier > 1:
        # Grouped-conv channel order: output channel c * multiplier + m reads input channel c.
        x = jnp.repeat(x, multiplier, axis=-1)
    kh, kw = kernel.shape[:2]
    if strides == 1 and all(
        p <= k - 1 for pair, k in zip(padding, (kh, kw), strict=True) for p in pair
    ):
        return _shifted_sum_stride1(x, kernel, padding)
    # At stride 2 the windows are a quarter of the input: plain autodiff was as fast.
    return _shifted_sum(x, kernel, strides, padding)


class DepthwiseConv2D(nn.Module):
    """Depthwise convolution with one parameter tree and two formulations (grouped / shifted)."""

    kernel_size: int = 3
    strides: int = 1
    padding: Padding = "SAME"
    depth_multiplier: int = 1
    implementation: str = "auto"
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
        if resolve_depthwise_implementation(self.implementation) == "shifted":
            return shifted_depthwise_conv(x, kernel, self.strides, padding)
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(self.strides, self.strides),
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=channels,
        )


def _channel_matmul(x, w):
    """[..., C_in] @ [C_in, C_out] over the last axis."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def _pointwise_matmul(x, w):
    return _channel_matmul(x, w)


def _pointwise_matmul_fwd(x, w):
    return _channel_matmul(x, w), (x, w)


def _pointwise_matmul_bwd(residuals, g):
    # The kernel gradient contracts the pixels of x and g. Left to itself, XLA on CPU
    # transposes the wider of the two (fused into the BatchNorm backward, on one thread:
    # 165 ms of a 1.5 s MobileNetV2 step); transposing the narrower one explicitly lets it run
    # as a plain matrix multiply (measured 2x faster for a 16 -> 96 channel layer at 64x64).
    x, w = residuals
    dx = _channel_matmul(g, w.T)
    x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    if x.shape[1] <= g.shape[1]:
        dw = x.T @ g
    else:
        dw = (g.T @ x).T
    return dx, dw


_pointwise_matmul.defvjp(_pointwise_matmul_fwd, _pointwise_matmul_bwd)


class PointwiseConv(nn.Module):
    """1x1 convolution (no bias) as a matrix multiply over the channel axis.

    Same parameter as `nn.Conv(features, (1, 1), use_bias=False)` ('kernel', [1, 1, in, out]), so
    weights and checkpoints are interchangeable. Why: XLA on CPU computes the kernel gradient of
    a 1x1 convolution as a convolution with the whole image as its window, after transposing
    both operands, at a few GFLOP/s; as a matrix multiply (with the backward pass above) it
    runs several times faster.
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
        return _pointwise_matmul(x, kernel[0, 0])


class ConvBN(nn.Module):
    """Conv (regular or depthwise, no bias) + BatchNorm + optional ReLU6: the MobileNet unit.

    The children carry Keras' layer names (`conv_name`, `bn_name`), so every leaf layer of a
    mnres model is named as in `keras.applications`.
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
    norm: Any = nn.BatchNorm  # partial(nn.BatchNorm, use_running_average=..., ...) from the model
    depthwise_implementation: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.depthwise:
            x = DepthwiseConv2D(
                kernel_size=self.kernel_size,
                strides=self.strides,
                padding=self.padding,
                depth_multiplier=self.depth_multiplier,
                implementation=self.depthwise_implementation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=self.conv_name,
            )(x)
        elif (
            self.kernel_size == 1
            and self.strides == 1
            and resolve_depthwise_implementation(self.depthwise_implementation) == "shifted"
        ):
            # The CPU formulation computes 1x1 convs as matmuls; 'grouped' keeps XLA's conv,
            # which GPUs, TPUs and exporters (TFLite CONV_2D) handle best.
            x = PointwiseConv(
                self.features, dtype=self.dtype, param_dtype=self.param_dtype, name=self.conv_name
            )(x)
        else:
            x = nn.Conv(
                self.features,
                (self.kernel_size, self.kernel_size),
                strides=self.strides,
                padding=self.padding,
                use_bias=False,
                kernel_init=default_kernel_init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=self.conv_name,
            )(x)
        frozen = {"use_running_average": True} if self.frozen else {}
        x = self.norm(name=self.bn_name, **frozen)(x)
        return relu6(x) if self.activation else x


def relu6(x):
    return jnp.clip(x, 0, 6)
