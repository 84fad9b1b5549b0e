"""Parameter accounting in Keras' convention, freeze masks, multiply-adds, and a Keras-like summary
table.

Keras counts BatchNorm moving mean/variance as non-trainable parameters, and so do we:
total = params + batch_stats; non-trainable = batch_stats + frozen params.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

# Model fields that change no parameter and not what the weights compute on a given input
# (numerics, training-only behaviour): two models that differ only in these share weights.
# `input_normalization` is not among them: it changes the pixels the weights were fitted to.
PARAMETER_FREE_FIELDS = frozenset({
    "parent", "name", "conv_formulation", "depthwise_implementation", "dtype", "bn_momentum",
    "dropout", "freeze_through",
})  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int
    non_trainable: int
    params: int  # the `params` collection (trainable and frozen)
    batch_stats: int  # BatchNorm moving statistics


def layer_name(path: Sequence[str]) -> str:
    """The Keras layer name of a variable: its innermost module (path ends with 'kernel' etc.)."""
    return path[-2]


def trainable_mask(model, params):
    """A pytree like `params`: True where the optimizer may update, False for frozen layers."""
    frozen = set(model.frozen_layers)
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: layer_name(k) not in frozen for k in flat})


def abstract_variables(model, input_shape: Sequence[int] = (1, 224, 224, 3)):
    """Variable shapes via `jax.eval_shape`: nothing is allocated, full-size models are instant."""
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32), train=False)
    )


def _size(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def count_params(model, input_shape: Sequence[int] = (1, 224, 224, 3), variables=None):
    """Total / trainable / non-trainable counts as Keras' `model.summary()` prints them."""
    variables = variables if variables is not None else abstract_variables(model, input_shape)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    mask = trainable_mask(model, params)
    trainable = sum(
        int(x.size)
        for x, keep in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True)
        if keep
    )
    n_params, n_stats = _size(params), _size(batch_stats)
    return ParamCounts(
        total=n_params + n_stats,
        trainable=trainable,
        non_trainable=n_params + n_stats - trainable,
        params=n_params,
        batch_stats=n_stats,
    )


def multiply_adds(model, input_shape: Sequence[int] = (1, 224, 224, 3)) -> int:
    """Multiply-adds of a forward pass: convolutions and dense layers, as papers count them.

    Traced (nothing is computed) with the grouped depthwise formulation, so that every
    depthwise conv is one convolution whose cost is its output size x kh x kw.
    MobileNetV2 alpha 1.0 gives 300.8 M at (1, 224, 224, 3) with 1000 classes (the paper's
    300 M) and 97.8 M at (1, 128, 128, 3) with 2 classes.

    Args:
      model: an mnres model.
      input_shape: [B, S, S, 3]; B = 1 counts one image's.
    """
    if hasattr(model, "conv_formulation"):
        model = model.clone(conv_formulation="grouped")
    variables = abstract_variables(model, input_shape)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
        variables, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    )
    return _count_multiply_adds(jaxpr.jaxpr)


def _count_multiply_adds(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            kernel = eqn.invars[1].aval
            out_features = kernel.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
            # Each output element is a dot product over kh * kw * (input channels / groups).
            per_output = math.prod(kernel.shape) // out_features
            total += math.prod(eqn.outvars[0].aval.shape) * per_output
        elif eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(
                lhs.shape[d] for d in contracting
            )
        for sub in _sub_jaxprs(eqn):
            total += _count_multiply_adds(sub)
    return total


def _sub_jaxprs(eqn):
    """The jaxprs nested in an equation (jit, scan, remat, custom_vjp calls)."""
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(getattr(item, "jaxpr", None), "eqns"):
                yield item.jaxpr


def _layer_rows(model, input_shape):
    """(name, type, output shape, params incl. BN stats, frozen) per weighted layer, in order."""

    def run():
        x = jnp.zeros(input_shape, jnp.float32)
        variables = model.init(jax.random.key(0), x, train=False)
        _, state = model.apply(
            variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
        return variables, state["intermediates"]

    variables, intermediates = jax.eval_shape(run)
    # Flax stores each module's outputs as a tuple (one entry per call) under '__call__'.
    shapes = {
        layer_name(k): v[0].shape
        for k, v in traverse_util.flatten_dict(intermediates).items()
        if k[-1] == "__call__" and len(k) > 1
    }
    sizes, kinds = {}, {}
    for collection in ("params", "batch_stats"):
        for k, v in traverse_util.flatten_dict(variables.get(collection, {})).items():
            name = layer_name(k)
            sizes[name] = sizes.get(name, 0) + int(v.size)
            if k[-1] == "kernel":
                kinds[name] = "Dense" if v.ndim == 2 else "Conv2D"
                if v.ndim == 4 and v.shape[2] == 1 and ("dw" in name or "depthwise" in name):
                    kinds[name] = "DepthwiseConv2D"
            elif k[-1] in ("scale", "mean"):
                kinds[name] = "BatchNorm"
    frozen = set(model.frozen_layers)
    return [
        (name, kinds[name], shapes.get(name), sizes[name], name in frozen)
        for name in model.layer_names()
    ], variables


def summary(
    model, input_shape: Sequence[int] = (1, 224, 224, 3), *, name: str | None = None
) -> str:
    """A Keras-like summary: one row per weighted layer, then the three count lines.

    Args:
      model: an mnres model.
      input_shape: [B, S, S, 3] the output shapes are computed for.
      name: the model's name in the heading, e.g. the `mnres.models.MODELS` key it was built
        from; default its class name. A registered variant such as 'paper' (`SeedNetwork`) is
        a `MobileNetV1` with other fields, so its class does not name it.

    Returns:
      The table as one string.
    """
    rows, variables = _layer_rows(model, input_shape)
    counts = count_params(model, input_shape, variables)
    header = f"{'Layer':<28}{'Type':<18}{'Output shape':<24}{'Params':>12}"
    lines = [f"Model: {name or type(model).__name__}", header, "-" * len(header)]
    for name, kind, shape, size, frozen in rows:
        shape_text = str(tuple(shape)) if shape is not None else "?"
        lines.append(
            f"{name:<28}{kind:<18}{shape_text:<24}{size:>12,}" + ("  frozen" if frozen else "")
        )
    lines += [
        "-" * len(header),
        f"Total params: {counts.total:,}",
        f"Trainable params: {counts.trainable:,}",
        f"Non-trainable params: {counts.non_trainable:,}",
    ]
    return "\n".join(lines)
