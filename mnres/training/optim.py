"""The optimizer chain: learning-rate schedule, clipping, weight decay and the freeze mask.

Built from `config.optimizer` (its fields and defaults: `mnres.config`). Frozen layers get no
update at all (`optax.set_to_zero`, and no optimizer state); weight decay applies to convolution
and dense kernels only, never to BatchNorm scales/offsets or biases.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from mnres.models import params as params_lib

OPTIMIZERS = ("adamw", "sgd", "rmsprop")


def check(config) -> None:
    """Raises ValueError naming the field, its value and what is allowed in `config.optimizer`."""
    if config.name not in OPTIMIZERS:
        raise ValueError(
            f"config.optimizer.name={config.name!r} is not an optimizer: use one of "
            f"{', '.join(OPTIMIZERS)}."
        )
    rate = config.learning_rate
    if not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
        raise ValueError(
            f"config.optimizer.learning_rate={rate!r} must be a number > 0, e.g. 2e-3 "
            "(a negative one climbs the loss)."
        )
    for field in ("warmup_epochs", "end_learning_rate_factor", "weight_decay", "grad_clip_norm"):
        value = config[field]
        if not (isinstance(value, int | float) and value >= 0):
            raise ValueError(f"config.optimizer.{field}={value!r} must be a number >= 0.")


def learning_rate_schedule(config, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine decay over the remaining steps."""
    total = max(1, steps_per_epoch * num_epochs)
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=total,
        end_value=config.learning_rate * config.end_learning_rate_factor,
    )


def decay_mask(params):
    """True for kernels (conv, depthwise, dense); False for BatchNorm scale/bias and biases."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def _decayed_kernels(params):
    # Inside multi_transform the frozen leaves are empty `MaskedNode`s, so the decay mask must
    # be computed from the tree it is given rather than from the full parameter tree.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def _base_optimizer(config, schedule) -> optax.GradientTransformation:
    if config.name == "adamw":
        return optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=_decayed_kernels,
        )
    decay = optax.add_decayed_weights(config.weight_decay, mask=_decayed_kernels)
    if config.name == "sgd":
        return optax.chain(
            decay, optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov)
        )
    if config.name == "rmsprop":
        eps = 1e-3 if config.eps == 1e-8 else config.eps  # 1e-8 makes RMSprop's first steps huge
        return optax.chain(
            decay,
            optax.rmsprop(
                schedule, decay=config.rmsprop_decay, eps=eps, momentum=config.momentum or None
            ),
        )
    raise ValueError(
        f"unknown config.optimizer.name={config.name!r}; use one of {', '.join(OPTIMIZERS)}"
    )


def create_optimizer(
    config, model, params, steps_per_epoch: int, num_epochs: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The full chain for `model` and its `params`; returns (optimizer, learning-rate schedule).

    Args:
      config: the `config.optimizer` block.
      model: the mnres model (its `frozen_layers` decide what is frozen).
      params: the `params` collection (arrays or shape structs) the optimizer will update.
      steps_per_epoch, num_epochs: the schedule's length.
    """
    schedule = learning_rate_schedule(config, steps_per_epoch, num_epochs)
    train = _base_optimizer(config, schedule)
    if config.grad_clip_norm:
        # Inside the trainable branch, so the norm is over the gradients that are applied.
        train = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), train)
    trainable = params_lib.trainable_mask(model, params)
    labels = jax.tree.map(lambda keep: "train" if keep else "freeze", trainable)
    tx = optax.multi_transform({"train": train, "freeze": optax.set_to_zero()}, labels)
    return tx, schedule


def cross_entropy(logits, labels, label_smoothing: float = 0.0, q: float = 0.0):
    """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels.

    `q` > 0: the generalized cross-entropy sum_k t_k (1 - p_k^q) / q of Zhang and Sabuncu
    (2018), which bounds what one confidently wrong label can cost (the mean absolute error at
    q = 1; the cross-entropy as q -> 0), so mislabelled crops pull the weights less.
    """
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    if not q:
        return optax.softmax_cross_entropy(logits, targets)
    # 1 - p^q as -expm1(q log p): finite gradients where p underflows to 0, and no
    # cancellation where p^q is near 1.
    shortfall = -jnp.expm1(q * jax.nn.log_softmax(logits, axis=-1))
    return jnp.sum(targets * shortfall, axis=-1) / q
