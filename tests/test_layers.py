"""make_divisible, the two depthwise formulations, and the conv + BN + ReLU6 unit."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mnres.models import layers, shifted
from mnres.models.layers import ConvBN, DepthwiseConv2D, make_divisible


@pytest.mark.parametrize(
    "value, expected",
    [
        (32 * 0.35, 16),  # rounds to 8, but 8 < 90% of 11.2: one divisor more
        (16 * 0.35, 8),  # below the minimum
        (24 * 0.75, 24),  # 18 -> 16 is < 90%: up to 24
        (32 * 0.75, 24),
        (1280 * 1.3, 1664),
        (1280 * 1.4, 1792),
        (96 * 0.5, 48),
        (20, 24),  # ties round up (int(v + 4) // 8 * 8)
        (19.9, 24),  # 16 would lose more than 10%
        (17, 16),
        (3, 8),
        (12, 16),
    ],
)
def test_make_divisible_matches_keras(value, expected):
    assert make_divisible(value, 8) == expected


def test_make_divisible_min_value_and_divisor():
    assert make_divisible(4.4, 4) == 4
    assert make_divisible(10, 4) == 12
    assert make_divisible(5, 8, min_value=16) == 16
    for v in np.linspace(1, 2000, 500):
        r = make_divisible(v, 8)
        assert r % 8 == 0 and r >= 0.9 * v


def _naive_depthwise(x, kernel, stride, padding):
    """Loops over output pixels: an implementation too simple to be wrong."""
    kh, kw, _, out_c = kernel.shape
    mult = out_c // x.shape[-1]
    x = np.pad(np.repeat(x, mult, axis=-1), ((0, 0), *padding, (0, 0)))
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    y = np.zeros((x.shape[0], oh, ow, out_c), np.float64)
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
            y[:, i, j, :] = (patch * kernel[:, :, 0, :]).sum(axis=(1, 2))
    return y


CASES = [
    # (size, stride, padding, multiplier)
    (8, 1, "SAME", 1),
    (9, 2, "SAME", 1),
    (8, 2, "SAME", 1),
    (9, 2, layers.KERAS_V1_STRIDE2_PADDING, 1),
    (10, 2, layers.KERAS_V1_STRIDE2_PADDING, 2),
    (7, 1, "VALID", 3),
]


@pytest.mark.parametrize("implementation", ["grouped", "shifted"])
@pytest.mark.parametrize("size, stride, padding, multiplier", CASES)
def test_depthwise_matches_naive_reference(implementation, size, stride, padding, multiplier):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 4))
    conv = DepthwiseConv2D(
        strides=stride, padding=padding, depth_multiplier=multiplier, implementation=implementation
    )
    variables = conv.init(jax.random.key(1), x)
    kernel = variables["params"]["kernel"]
    assert kernel.shape == (3, 3, 1, 4 * multiplier)
    got = conv.apply(variables, x)
    pads = layers._explicit_padding(padding, (size, size), 3, stride)
    want = _naive_depthwise(np.asarray(x, np.float64), np.asarray(kernel), stride, pads)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("size, stride, padding, multiplier", CASES)
def test_depthwise_formulations_share_parameters_and_gradients(size, stride, padding, multiplier):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 4))
    make = functools.partial(
        DepthwiseConv2D, strides=stride, padding=padding, depth_multiplier=multiplier
    )
    variables = make(implementation="grouped").init(jax.random.key(1), x)

    def loss(params, impl):
        y = make(implementation=impl).apply({"params": params}, x)
        return jnp.sum(jnp.sin(y))

    grads = {impl: jax.grad(loss)(variables["params"], impl) for impl in ("grouped", "shifted")}
    chex.assert_trees_all_close(grads["grouped"], grads["shifted"], atol=1e-4)


def _conv_ops(fn, *args):
    """feature_group_count of every convolution in the jaxpr of fn(*args), sub-jaxprs included."""
    text = str(jax.make_jaxpr(fn)(*args))
    return [
        int(s.split("feature_group_count=")[1].split()[0].rstrip(",]"))
        for s in text.split("conv_general_dilated")[1:]
    ]


def test_shifted_formulation_has_no_grouped_convolution():
    # Guards the CPU fast path: the shifted formulation must not fall back to XLA's grouped
    # convolution, in the forward or the backward pass.
    x = jnp.ones((1, 8, 8, 4))
    conv = DepthwiseConv2D(implementation="shifted")
    variables = conv.init(jax.random.key(0), x)
    grad = jax.grad(lambda v: conv.apply(v, x).sum())
    assert _conv_ops(grad, variables) == []
    grouped = DepthwiseConv2D(implementation="grouped")
    assert 4 in _conv_ops(jax.grad(lambda v: grouped.apply(v, x).sum()), variables)


def _residual_sizes(fn, *args):
    """Sizes of the arrays autodiff keeps from fn's forward pass for its backward pass."""
    _, vjp = jax.vjp(fn, *args)
    return [leaf.size for leaf in jax.tree_util.tree_leaves(vjp)]


@pytest.mark.parametrize("stride, padding", [(1, ((1, 1), (1, 1))), (2, ((0, 1), (0, 1)))])
def test_shifted_backward_keeps_only_input_and_kernel(stride, padding):
    # Guards the hand-written backward pass: plain autodiff of the nine shifted windows keeps
    # all nine (XLA then writes each one out), which made the train step slower on CPU.
    x, kernel = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 1, 4))
    conv = functools.partial(shifted.shifted_depthwise_conv, strides=stride, padding=padding)
    kept = _residual_sizes(conv, x, kernel)
    assert sorted(kept) == sorted([x.size, kernel.size])
    # The detector itself: the plain formula keeps a window per tap (9 x 1/stride**2 inputs).
    plain = _residual_sizes(lambda x, k: shifted._shifted_sum(x, k, stride, padding), x, kernel)
    assert sum(plain) > 2 * x.size


@pytest.mark.parametrize("formulation, uses_dot", [("shifted", True), ("grouped", False)])
def test_pointwise_conv_is_a_matmul_only_in_the_cpu_formulation(formulation, uses_dot):
    unit = _unit(train=False, kernel_size=1, formulation=formulation)
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 4))
    variables = unit.init(jax.random.key(1), x)
    assert variables["params"]["conv"]["kernel"].shape == (1, 1, 4, 8)  # nn.Conv's layout
    jaxpr = str(jax.make_jaxpr(lambda v: unit.apply(v, x))(variables))
    assert ("dot_general" in jaxpr) == uses_dot
    assert ("conv_general_dilated" in jaxpr) != uses_dot
    # Same numbers and gradients either way (the matmul has a hand-written backward pass).
    other = unit.clone(conv_formulation="grouped" if uses_dot else "shifted")
    np.testing.assert_allclose(unit.apply(variables, x), other.apply(variables, x), atol=1e-5)

    def loss(module, variables, x):
        return jnp.sum(jnp.sin(module.apply(variables, x)))

    grads = [jax.grad(loss, argnums=(1, 2))(m, variables, x) for m in (unit, other)]
    chex.assert_trees_all_close(grads[0], grads[1], atol=1e-5)


def test_auto_picks_shifted_on_cpu_and_rejects_unknown():
    if jax.default_backend() == "cpu":  # elsewhere 'auto' picks 'grouped'
        assert layers.resolve_conv_formulation("auto") == "shifted"
    assert layers.resolve_conv_formulation("grouped") == "grouped"
    with pytest.raises(ValueError, match="grouped"):
        layers.resolve_conv_formulation("winograd")


def test_depthwise_implementation_names_still_work_for_one_release():
    with pytest.warns(DeprecationWarning, match="CONV_FORMULATIONS"):
        assert layers.DEPTHWISE_IMPLEMENTATIONS == layers.CONV_FORMULATIONS
    with pytest.warns(DeprecationWarning, match="resolve_conv_formulation"):
        assert layers.resolve_depthwise_implementation is layers.resolve_conv_formulation
    with pytest.warns(DeprecationWarning, match="conv_formulation"):
        unit = ConvBN(8, "conv", "conv_bn", depthwise_implementation="grouped")
    assert (unit.conv_formulation, unit.depthwise_implementation) == ("grouped", None)


def test_bad_padding_string_is_rejected():
    with pytest.raises(ValueError, match="padding"):
        DepthwiseConv2D(padding="CIRCULAR").init(jax.random.key(0), jnp.ones((1, 8, 8, 2)))


def _unit(frozen=False, train=True, dtype=None, kernel_size=3, formulation="auto"):
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-3, dtype=dtype
    )
    return ConvBN(
        8,
        "conv",
        "conv_bn",
        kernel_size=kernel_size,
        norm=norm,
        frozen=frozen,
        conv_formulation=formulation,
        dtype=dtype,
    )


def test_convbn_is_conv_bn_relu6_without_bias():
    x = 10 * jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
    unit = _unit(train=False)
    variables = unit.init(jax.random.key(1), x)
    assert set(variables["params"]) == {"conv", "conv_bn"}
    assert set(variables["params"]["conv"]) == {"kernel"}  # no conv bias
    y = unit.apply(variables, x)
    assert float(y.min()) >= 0 and float(y.max()) <= 6 and float(y.max()) == 6.0


def test_frozen_unit_keeps_running_statistics_in_training():
    x = 3 + jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
    variables = _unit().init(jax.random.key(1), x)
    for frozen, should_change in ((False, True), (True, False)):
        _, updates = _unit(frozen=frozen).apply(variables, x, mutable=["batch_stats"])
        changed = not np.array_equal(
            updates["batch_stats"]["conv_bn"]["mean"], variables["batch_stats"]["conv_bn"]["mean"]
        )
        assert changed == should_change


def test_convbn_defaults_to_keras_batch_norm_on_running_statistics():
    # Used on its own, the unit normalises as Keras' inference does, and needs no mutable state.
    x = 3 + jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
    unit = ConvBN(8, "conv", "conv_bn", activation=False)
    variables = unit.init(jax.random.key(1), x)
    stats = variables["batch_stats"]["conv_bn"]
    assert float(stats["mean"].sum()) == 0 and float(stats["var"].min()) == 1
    conv = layers.PointwiseConv(8).apply({"params": variables["params"]["conv"]}, x)
    got = unit.apply(variables, x)
    np.testing.assert_allclose(got, conv / np.sqrt(1 + 1e-3), rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_parameters():
    x = jnp.ones((2, 6, 6, 3))
    unit = _unit(dtype=jnp.bfloat16)
    variables = unit.init(jax.random.key(1), x)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
    y, _ = unit.apply(variables, x, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
