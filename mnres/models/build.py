"""A model by name (`create_model`) or from a config's `config.model` (`from_config`).

The names are those of `mnres.models.mobilenet.MODELS`; `from_config` also builds an
`mnres.models.ensemble.Ensemble` of member configs.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax.numpy as jnp

from mnres.models.layers import resolve_conv_formulation
from mnres.models.mobilenet import MODELS, MobileNetV1, MobileNetV2


def create_model(name: str, **overrides) -> MobileNetV1 | MobileNetV2:
    """Builds a registered model, e.g. `create_model('mobilenet_v2', alpha=0.35, num_classes=2)`.

    Args:
      name: a key of `MODELS`.
      **overrides: model fields (`depthwise_implementation`, deprecated, still sets
        `conv_formulation`).

    Returns:
      The model (an unbound Flax module).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    ctor = MODELS[name]
    cls = ctor.func if isinstance(ctor, functools.partial) else ctor
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"model {name!r} has no field(s) {unknown}; its fields are {', '.join(sorted(fields))}"
        )
    return ctor(**overrides)


def model_fields(name: str, **overrides) -> tuple[type, dict]:
    """The class and every field `create_model(name, **overrides)` would have, without building
    the model (config checks: `mnres.config.validate`). `name` must be a key of `MODELS`."""
    ctor = MODELS[name]
    cls = ctor.func if isinstance(ctor, functools.partial) else ctor
    keywords = ctor.keywords if isinstance(ctor, functools.partial) else {}
    defaults = {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }
    return cls, {**defaults, **keywords, **overrides}


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# The momentum of a model built from a config that leaves it unset, outside training: the
# training loop's pick for the full development set (5,560 steps).
BN_MOMENTUM_UNSET = 0.99


def from_config(
    model_config,
    num_classes: int = 2,
    *,
    bn_momentum: float | None = None,
    platform: str | None = None,
):
    """The mnres model described by `config.model` (every field but `name`/`pretrained`).

    Args:
      model_config: `config.model` (a ConfigDict or a mapping, e.g. from a run's config.json);
        the 0.1 key `depthwise_implementation` is read as `conv_formulation`. Name 'ensemble'
        builds an `mnres.models.ensemble.Ensemble` of its `members` (one config.model each).
      num_classes: classifier outputs. `config.model` does not hold them: a run's config has
        `len(mnres.config.class_names(config.data))` (2 for the malaria pair).
      bn_momentum: replaces `model_config.bn_momentum`. None there means unset: the training
        loop picks it from the run's step count (`mnres.training.bn_momentum.pick_bn_momentum`),
        elsewhere it is `BN_MOMENTUM_UNSET`.
      platform: the platform to build for ('cpu', 'gpu', 'tpu', or 'cuda'/'rocm' as lowering
        names, e.g. `config.platform`): the model's conv formulation 'auto' is resolved for it
        (`layers.resolve_conv_formulation`). None: 'auto' is resolved, when the model is
        traced, for the JAX backend of the machine that traces it.

    Returns:
      The model (an unbound Flax module).
    """
    fields = dict(model_config)
    name = fields.pop("name")
    fields.pop("pretrained", None)
    if name == "ensemble":  # {'name': 'ensemble', 'members': [each member's config.model]}
        from mnres.models.ensemble import Ensemble

        return Ensemble(tuple(
            from_config(member, num_classes, bn_momentum=bn_momentum, platform=platform)
            for member in fields["members"]
        ))  # fmt: skip
    if fields.get("depthwise_implementation") is not None:
        warnings.warn(
            "config.model.depthwise_implementation is deprecated; use "
            "config.model.conv_formulation (same values)",
            DeprecationWarning,
            stacklevel=2,
        )
        fields["conv_formulation"] = fields.pop("depthwise_implementation")
    if platform is not None:
        fields["conv_formulation"] = resolve_conv_formulation(
            fields.get("conv_formulation") or "auto", platform
        )
    fields["bn_momentum"] = _bn_momentum(fields, bn_momentum)
    dtype = fields.pop("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={dtype!r}; use one of {', '.join(DTYPES)}")
    if DTYPES[dtype] != jnp.float32:
        fields["dtype"] = DTYPES[dtype]  # compute dtype; parameters and BatchNorm stay float32
    return create_model(name, num_classes=num_classes, **fields)


def _bn_momentum(fields: dict, bn_momentum: float | None) -> float:
    """The momentum to build with: `bn_momentum`, else the config's, else `BN_MOMENTUM_UNSET`."""
    if "bn_momentum" not in fields:
        raise ValueError(
            "config.model.bn_momentum is not set. It is a choice, not a default: Keras' 0.999 "
            "needs thousands of steps before its running statistics are usable (short runs then "
            "validate at chance), 0.99 suits a few hundred steps per epoch. Set it to None to "
            "have the training loop pick it from the number of training steps."
        )
    if bn_momentum is not None:
        return bn_momentum
    if fields["bn_momentum"] is None:
        # Unset: the training loop picks it (and writes it to config.json); a model built here
        # for inference never uses it, since it only moves the running averages in training.
        return BN_MOMENTUM_UNSET
    return fields["bn_momentum"]
