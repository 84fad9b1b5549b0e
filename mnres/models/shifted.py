"""The 'shifted' conv formulation, for CPU (`mnres.models.layers.CONV_FORMULATIONS`).

Each depthwise conv is kh*kw shifted multiply-adds with a hand-written backward pass, each 1x1
conv a matrix multiply over the channel axis with its own backward pass: XLA on CPU runs both
several times faster than its grouped convolutions. The layers (`DepthwiseConv2D`,
`PointwiseConv`) keep the parameters of the grouped formulation, so weights are shared.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp


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


def _channel_matmul(x, w):
    """[..., C_in] @ [C_in, C_out] over the last axis."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def pointwise_matmul(x, w):
    """x @ w over the channel axis ([..., C_in] @ [C_in, C_out]), with the backward pass below."""
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


pointwise_matmul.defvjp(_pointwise_matmul_fwd, _pointwise_matmul_bwd)
