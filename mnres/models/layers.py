"""Layers of every MobileNet block: channel rounding, the depthwise conv, conv + BN + ReLU6."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

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
DEPTHWISE_IMPLEMENTATIONS = CONV_FORMULATIONS  # deprecated name, kept for one release

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

    A model built for another platform than this machine's, e.g. to lower its steps for a TPU
    from a CPU, carries the resolved formulation:
    `model.clone(conv_formulation=resolve_conv_formulation(model.conv_formulation, "tpu"))`
    (or `mnres.models.from_config(..., platform="tpu")`).

    Args:
      formulation: one of `CONV_FORMULATIONS`.
      platform: one of `CONV_PLATFORMS`; None: this machine's, `jax.default_backend()`.

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


resolve_depthwise_implementation = resolve_conv_formulation  # deprecated name, for one release


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


def _channel_sums(operands):
    """Per-channel sums of same-shaped [N, H, W, C] arrays, all in one variadic reduce.

    Why: as nine separate reductions, XLA on CPU writes out each shifted window of the input and
    reads it and the gradient once per tap; one multi-operand reduce over W (then a small sum
    over N and H) is one pass over both, several times faster.
    """
    zeros = [jnp.zeros((), op.dtype) for op in operands]
    rows = jax.lax.reduce(
        operands, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)), (2,)
    )
    return [r.sum(axis=(0, 1)) for r in rows]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_depthwise(x, kernel, strides: int, padding):
    return _shifted_sum(x, kernel, strides, padding)


def _shifted_depthwise_fwd(x, kernel, strides, padding):
    return _shifted_sum(x, kernel, strides, padding), (x, kernel)


def _input_gradient(g, kernel, strides: int, padding, in_hw: Sequence[int]):
    """The transpose of `_shifted_sum` in x: shifted multiply-adds over g, one per stride phase.

    Padded-input row r = strides * p + a (phase a) gets g[p - m] * kernel[a + strides * m] for
    every tap of that phase, so each of the strides**2 phases is a small shifted sum over g and
    the phases interleave into the padded input (at stride 1: the flipped-kernel correlation).
    """
    kh, kw = kernel.shape[:2]
    (top, bottom), (left, right) = padding
    rows, cols = -(-(in_hw[0] + top + bottom) // strides), -(-(in_hw[1] + left + right) // strides)
    lead = (max(kh, kw) - 1) // strides  # taps per phase - 1: how far back g is read
    g = jnp.pad(
        g,
        (
            (0, 0),
            (lead, max(0, rows - g.shape[1])),
            (lead, max(0, cols - g.shape[2])),
            (0, 0),
        ),
    )
    phases = []
    for a in range(strides):
        row = []
        for b in range(strides):
            acc = jnp.zeros((g.shape[0], rows, cols, g.shape[3]), g.dtype)
            for i in range(a, kh, strides):
                for j in range(b, kw, strides):
                    di, dj = lead - (i - a) // strides, lead - (j - b) // strides
                    acc = acc + g[:, di : di + rows, dj : dj + cols] * kernel[i, j, 0]
            row.append(acc)
        phases.append(jnp.stack(row, axis=3))  # [N, rows, cols, b, C]
    dx = jnp.stack(phases, axis=2)  # [N, rows, a, cols, b, C]
    dx = dx.reshape(g.shape[0], rows * strides, cols * strides, g.shape[3])
    return dx[:, top : top + in_hw[0], left : left + in_hw[1]]


def _shifted_depthwise_bwd(strides, padding, residuals, g):
    # Autodiff of the forward formula keeps all kh*kw windows of x alive for the kernel
    # gradient (XLA writes each one out: at stride 1, nine times the input's memory traffic, a
    # large share of the MobileNetV2 train step on CPU). Here only x is kept; the input gradient
    # is a shifted sum over g per stride phase, and the kernel gradient one pass over x and g.
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    dx = _input_gradient(g, kernel, strides, padding, x.shape[1:3])
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    # Products in at least float32, so a bfloat16 model's kernel gradient is summed in float32.
    accumulate = jnp.promote_types(g.dtype, jnp.float32)
    x, g = x.astype(accumulate), g.astype(accumulate)
    products = [tap * g for _, _, tap in _taps(x, kh, kw, g.shape[1:3], strides)]
    dk = jnp.stack(_channel_sums(products))
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


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
    return _shifted_depthwise(x, kernel, strides, tuple(tuple(p) for p in padding))


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
    # transposes the wider of the two (fused into the BatchNorm backward, a slow fusion);
    # transposing the narrower one explicitly lets it run as a plain matrix multiply.
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
