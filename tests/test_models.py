"""Model structure: exact Keras parameter counts, shapes, gradients, freezing, the registry."""

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util

import mnres
from mnres.models import params as mparams

# Keras' `model.summary()` totals (params + BatchNorm moving statistics), fixed by the
# keras.applications models; the seed network's by the seed paper.
PAPER_TOTAL, PAPER_TRAINABLE, PAPER_NON_TRAINABLE = 1_635_522, 545_282, 1_090_240
PAPER_PARAMS, PAPER_BATCH_STATS = 1_619_778, 15_744
V1_TOP_TOTAL, V1_TOP_BATCH_STATS = 4_253_864, 21_888
V1_NO_TOP = {0.25: 218_544, 0.5: 829_536, 0.75: 1_832_976, 1.0: 3_228_864}
V2_TOP_PARAMS, V2_TOP_BATCH_STATS = 3_504_872, 34_112
V2_TOP_TOTAL = 3_538_984
V2_NO_TOP = {1.0: 2_257_984, 0.75: 1_382_064, 0.5: 706_224, 0.35: 410_208}


def counts(name, size=224, **overrides):
    return mparams.count_params(mnres.create_model(name, **overrides), (1, size, size, 3))


def test_seed_network_counts():
    c = counts("paper")
    assert (c.total, c.trainable, c.non_trainable) == (
        PAPER_TOTAL,
        PAPER_TRAINABLE,
        PAPER_NON_TRAINABLE,
    )
    assert (c.params, c.batch_stats) == (PAPER_PARAMS, PAPER_BATCH_STATS)


def test_seed_network_unfrozen_trains_all_but_bn_statistics():
    c = counts("paper", freeze_through=None)
    assert c.trainable == PAPER_PARAMS and c.non_trainable == PAPER_BATCH_STATS


def test_mobilenet_v1_counts():
    c = counts("mobilenet_v1")
    assert (c.total, c.batch_stats) == (V1_TOP_TOTAL, V1_TOP_BATCH_STATS)
    assert c.trainable == c.params
    for alpha, total in V1_NO_TOP.items():
        assert counts("mobilenet_v1", alpha=alpha, include_top=False).total == total, alpha


def test_mobilenet_v2_counts():
    c = counts("mobilenet_v2")
    assert (c.params, c.batch_stats, c.total) == (V2_TOP_PARAMS, V2_TOP_BATCH_STATS, V2_TOP_TOTAL)
    for alpha, total in V2_NO_TOP.items():
        assert counts("mobilenet_v2", alpha=alpha, include_top=False).total == total, alpha


def test_counts_do_not_depend_on_input_size_or_residuals():
    assert counts("paper", size=64).total == PAPER_TOTAL
    assert counts("mobilenet_v1_residual", size=97).total == V1_TOP_TOTAL


def test_summary_prints_keras_lines():
    text = mparams.summary(mnres.create_model("paper"))
    assert "Total params: 1,635,522" in text
    assert "Trainable params: 545,282" in text
    assert "Non-trainable params: 1,090,240" in text
    row = next(line for line in text.splitlines() if line.startswith("conv_dw_12_bn "))
    assert "(1, 7, 7, 512)" in row


def test_summary_command(capsys):
    from mnres.__main__ import main

    assert main(["summary", "mobilenet_v2", "--alpha", "0.35", "--no-top"]) == 0
    assert "Total params: 410,208" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["summary", "resnet50"])
    assert "unknown model 'resnet50'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2", "paper"])
def test_layer_names_are_the_keras_names_in_call_order(name):
    # layer_names() drives freezing and the summary: it must list exactly the weighted layers,
    # in the order the network calls them.
    model = mnres.create_model(name)
    called = []

    def record(next_fun, args, kwargs, context):
        if isinstance(
            context.module,
            (nn.Conv, nn.BatchNorm, nn.Dense, mnres.DepthwiseConv2D, mnres.PointwiseConv),
        ):
            if context.method_name == "__call__" and context.module.name not in called:
                called.append(context.module.name)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        variables = mparams.abstract_variables(model, (1, 64, 64, 3))
    assert called == list(model.layer_names())
    in_tree = {mparams.layer_name(k) for k in traverse_util.flatten_dict(variables["params"])}
    assert in_tree == set(called)


@pytest.mark.parametrize(
    "name, overrides, size, expected",
    [
        ("mobilenet_v2", dict(alpha=0.35, num_classes=2), 32, (2, 2)),
        ("mobilenet_v2", dict(alpha=0.5, include_top=False, pooling=None), 97, (2, 4, 4, 1280)),
        ("mobilenet_v1", dict(alpha=0.25, include_top=False), 64, (2, 256)),
        ("mobilenet_v1_residual", dict(alpha=0.25, num_classes=5), 97, (2, 5)),
        ("paper", dict(), 224, (2, 2)),
        ("mobilenet_v2", dict(alpha=1.4, include_top=False, pooling="max"), 224, (2, 1792)),
        (
            "mobilenet_v1",
            dict(depth_multiplier=2, include_top=False, pooling=None),
            128,
            (2, 4, 4, 1024),
        ),
    ],
)
def test_output_shapes(name, overrides, size, expected):
    model = mnres.create_model(name, **overrides)

    def forward():
        x = jnp.zeros((2, size, size, 3))
        variables = model.init(jax.random.key(0), x, train=False)
        return model.apply(variables, x, train=False)

    output, out = jax.eval_shape(forward)
    assert output.shape == expected
    assert out["feature_map"].ndim == 4


def test_pre_logits_are_exposed():
    model = mnres.create_model("mobilenet_v2", alpha=0.35, num_classes=2)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    variables = jax.jit(model.init)(jax.random.key(1), x)
    logits, out = jax.jit(model.apply)(variables, x)
    assert out["pre_logits"].shape == (2, 1280)
    manual = out["pre_logits"] @ variables["params"]["predictions"]["kernel"]
    np.testing.assert_allclose(
        logits, manual + variables["params"]["predictions"]["bias"], atol=1e-5
    )


def _train_loss(model, variables, x, y):
    def loss(params):
        logits, _ = model.apply(
            {**variables, "params": params},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(2)},
        )[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.jit(jax.grad(loss))(variables["params"])


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("mobilenet_v1_residual", dict(alpha=0.25, num_classes=2)),
        ("mobilenet_v2", dict(alpha=0.35, num_classes=2)),
    ],
)
def test_every_parameter_gets_a_gradient(name, overrides):
    model = mnres.create_model(name, **overrides)
    x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1, maxval=1)
    y = jnp.array([0, 1, 0, 1])
    variables = jax.jit(model.init)(jax.random.key(1), x)
    grads = traverse_util.flatten_dict(_train_loss(model, variables, x, y))
    zero = [k for k, g in grads.items() if not np.any(np.asarray(g))]
    assert not zero, f"no gradient reaches {zero}"


def test_freeze_mask_keeps_frozen_layers_bit_identical():
    # Narrow (alpha 0.25) to stay fast: the frozen layers do not depend on the width.
    model = mnres.create_model("paper", alpha=0.25)
    x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1, maxval=1)
    y = jnp.array([0, 1, 1, 0])
    variables = jax.jit(model.init)(jax.random.key(1), x)
    mask = mparams.trainable_mask(model, variables["params"])
    labels = jax.tree.map(lambda keep: "train" if keep else "frozen", mask)
    tx = optax.multi_transform({"train": optax.adamw(1e-2), "frozen": optax.set_to_zero()}, labels)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state):
        def loss(p):
            logits, new = model.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits[0], y).mean(), new

        grads, new = jax.grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new["batch_stats"], opt_state

    new_params, new_stats = params, stats
    for _ in range(3):
        new_params, new_stats, opt_state = step(new_params, new_stats, opt_state)

    frozen = set(model.frozen_layers)
    assert "conv_pw_9" in frozen and "conv_pw_9_bn" not in frozen
    for tree_before, tree_after in ((params, new_params), (stats, new_stats)):
        before = traverse_util.flatten_dict(tree_before)
        after = traverse_util.flatten_dict(tree_after)
        for k in before:
            same = np.array_equal(before[k], after[k])
            assert same == (mparams.layer_name(k) in frozen), k


def test_dropout_only_in_training():
    model = mnres.create_model("mobilenet_v1", alpha=0.25, num_classes=3, dropout=0.5)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    apply = jax.jit(model.apply, static_argnames="train")
    np.testing.assert_array_equal(apply(variables, x)[0], apply(variables, x)[0])
    with pytest.raises(Exception, match="dropout"):  # training needs a dropout rng
        jax.eval_shape(lambda: model.apply(variables, x, train=True, mutable=["batch_stats"]))


def test_bfloat16_model_keeps_float32_params_and_logits():
    model = mnres.create_model("mobilenet_v2", alpha=0.35, num_classes=2, dtype=jnp.bfloat16)
    x = jnp.ones((2, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits, out = jax.jit(model.apply)(variables, x)
    assert logits.dtype == jnp.float32 and out["feature_map"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: mnres.create_model("resnet50"), "unknown model"),
        (lambda: mnres.create_model("mobilenet_v2", width=2), "no field"),
        (lambda: counts("mobilenet_v1", residual=(2,)), "identity skips fit blocks"),
        (lambda: counts("paper", freeze_through="conv_pw_99"), "not a layer"),
        (lambda: counts("mobilenet_v2", size=16), "at least 32x32"),
        (lambda: counts("mobilenet_v1", num_blocks=14), "num_blocks"),
        (lambda: counts("mobilenet_v2", include_top=False, pooling="median"), "pooling"),
    ],
)
def test_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "name, fields, message",
    [
        ("mobilenet_v2", {"alpha": -1}, "alpha=-1: the width multiplier must be a positive"),
        ("mobilenet_v1", {"alpha": 0}, "alpha=0: "),
        ("paper", {"alpha": float("nan")}, "alpha=nan: "),
        ("mobilenet_v2", {"alpha": float("inf")}, "alpha=inf: "),
        ("mobilenet_v2", {"num_classes": 0}, "num_classes=0: a classifier needs"),
        ("mobilenet_v1", {"num_classes": 2.5}, "num_classes=2.5: "),
        ("mobilenet_v1", {"alpha": 0.01}, "stem with none: use >= 1/32"),
        ("mobilenet_v1", {"depth_multiplier": 0}, "depth_multiplier=0: "),
        ("mobilenet_v2", {"dropout": 1.0}, r"dropout=1.0: a rate in \[0, 1\)"),
    ],
)
def test_the_library_refuses_fields_no_network_can_have(name, fields, message):
    # Refused when built (once, outside any jit), by `create_model` and by the classes alike.
    with pytest.raises(ValueError, match=message):
        mnres.create_model(name, **fields)
    model = mnres.create_model(name)
    with pytest.raises(ValueError, match=message):
        model.clone(**fields)


def test_the_network_refuses_uint8_and_non_rgb_input_when_traced():
    model = mnres.create_model("mobilenet_v2", alpha=0.35, num_classes=2)
    init = lambda x: jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    variables = init(jnp.zeros((1, 32, 32, 3)))
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    apply = lambda v, x: jax.eval_shape(forward, v, x)  # traced, as a compile would
    crops = np.full((2, 32, 32, 3), 200, np.uint8)
    with pytest.raises(ValueError, match=r"float images scaled to \[-1, 1\], got uint8: scale"):
        apply(variables, crops)
    with pytest.raises(ValueError, match="got int32"):
        init(crops.astype(np.int32))
    for shape in [(1, 32, 32, 1), (1, 32, 32, 4), (32, 32, 3)]:
        with pytest.raises(
            ValueError, match=r"\[batch, height, width, 3\], got shape " + re.escape(str(shape))
        ):
            init(jnp.zeros(shape))
    # Preprocessed crops (and bfloat16 ones) pass.
    assert apply(variables, crops / 127.5 - 1.0)[0].shape == (2, 2)
    assert apply(variables, (crops / 127.5 - 1.0).astype(jnp.bfloat16))[0].shape == (2, 2)


def test_public_names():
    assert mnres.DepthwiseSeparable and mnres.InvertedResidual and mnres.make_divisible
    assert set(mnres.MODELS) >= {"mobilenet_v1", "mobilenet_v2", "paper"}


# The blocks example of docs/models.md, verbatim: it must run as printed.
README_BLOCKS_EXAMPLE = """
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

import mnres

# The blocks on their own: BatchNorm on its running statistics, as Keras' inference.
block = mnres.InvertedResidual(features=24, block_id=2, expansion=6, strides=1)
x = jnp.zeros((8, 16, 16, 24))
variables = block.init(jax.random.key(0), x)  # {'params', 'batch_stats'}
y = block.apply(variables, x)

block = mnres.DepthwiseSeparable(features=512, block_id=7, residual=True)
x = jnp.zeros((8, 14, 14, 512))
variables = block.init(jax.random.key(0), x)
y = block.apply(variables, x)

# To train a block, hand it the conv + BN unit with a batch-statistics BatchNorm, as models do.
train_bn = functools.partial(nn.BatchNorm, use_running_average=False, momentum=0.99, epsilon=1e-3)
block = block.clone(conv_bn=functools.partial(mnres.ConvBN, norm=train_bn))
y, updates = block.apply(variables, x, mutable=["batch_stats"])
"""


def test_readme_blocks_example_runs():
    scope = {}
    exec(README_BLOCKS_EXAMPLE, scope)
    variables, updates = scope["variables"], scope["updates"]
    assert set(variables) == {"params", "batch_stats"}
    assert scope["y"].shape == (8, 14, 14, 512)
    # Trained on batch statistics: the running variance moves from 1 towards the batch's (0).
    before = variables["batch_stats"]["pointwise"]["conv_pw_7_bn"]["var"]
    after = updates["batch_stats"]["pointwise"]["conv_pw_7_bn"]["var"]
    np.testing.assert_allclose(before, 1.0)
    np.testing.assert_allclose(after, 0.99)


def test_blocks_take_the_unit_as_one_field():
    # The conv and norm choices live in ConvBN; blocks take the model's partial of it.
    for block in (mnres.DepthwiseSeparable, mnres.InvertedResidual):
        fields = {f.name for f in dataclasses.fields(block)}
        assert "conv_bn" in fields
        assert not fields & {"norm", "dtype", "param_dtype", "conv_formulation"}


def test_deprecated_depthwise_implementation_sets_conv_formulation():
    with pytest.warns(DeprecationWarning, match="conv_formulation"):
        model = mnres.create_model("mobilenet_v2", depthwise_implementation="grouped")
    assert (model.conv_formulation, model.depthwise_implementation) == ("grouped", None)
    # Cleared once moved, so a clone that sets the new name is not overridden by the old one.
    assert model.clone(conv_formulation="shifted").conv_formulation == "shifted"
    with pytest.warns(DeprecationWarning):
        assert model.clone(depthwise_implementation="shifted").conv_formulation == "shifted"


def test_from_config_reads_the_old_depthwise_implementation_key():
    # A run folder written by mnres 0.1, with the formulation set under its old name.
    path = os.path.join(os.path.dirname(__file__), "testdata", "run_v0.1.0", "config.json")
    with open(path) as f:
        model_config = json.load(f)["model"]
    assert mnres.models.from_config(model_config).conv_formulation == "auto"
    with pytest.warns(DeprecationWarning, match="config.model.conv_formulation"):
        model = mnres.models.from_config({**model_config, "depthwise_implementation": "grouped"})
    assert model.conv_formulation == "grouped" and model.depthwise_implementation is None
