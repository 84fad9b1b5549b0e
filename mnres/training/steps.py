"""The train state, the mesh and shardings, and the compiled train and eval steps.

One code path for every machine: a 1-D `('data',)` mesh over all devices (of all processes),
the batch sharded along it, the state replicated, `jax.jit` with donated state buffers; no
pmap. BatchNorm statistics are means over the global batch because the model sees the whole,
sharded batch. Each process feeds only its own slice of the global batch
(`jax.make_array_from_process_local_data`). The loop that drives them is `mnres.training.loop`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mnres import data
from mnres.data.augment import augment, mix, preprocess
from mnres.inference import classify
from mnres.training import distill as distill_lib
from mnres.training.optim import cross_entropy


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; a checkpoint is `state.to_dict()`."""

    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: the number of steps taken
    rng: jax.Array  # uint32 key data; step k uses fold_in(rng, k)
    # Exponential moving average of `params` (config.ema_decay); {} when it is not kept.
    ema_params: Any = flax.struct.field(default_factory=dict)

    @property
    def eval_params(self):
        """The weights to evaluate and export: the moving average when one is kept."""
        return self.ema_params or self.params

    def to_dict(self) -> dict:
        d = {name: getattr(self, name) for name in _STATE_FIELDS}
        if not self.ema_params:  # without an average, checkpoints keep their original layout
            del d["ema_params"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(**{k: d.get(k, {}) if k == "ema_params" else d[k] for k in _STATE_FIELDS})


# The mixing key is fold_in(step key, _MIX_STREAM), apart from the augmentation and dropout
# keys split from the step key: a run without mixing draws exactly as before.
_MIX_STREAM = 2

_STATE_FIELDS = ("params", "batch_stats", "opt_state", "step", "rng", "ema_params")


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh named 'data' over every device of every process."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def shard_batch(local_batch: dict, mesh) -> dict:
    """This process's slice of a global batch -> global arrays sharded over 'data'."""
    sharding = NamedSharding(mesh, P("data"))
    n = jax.process_count()
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n, *v.shape[1:]))
        for k, v in local_batch.items()
    }


def init_state(model, tx, image_size: int, seed: int, mesh, *, ema: bool = False) -> TrainState:
    """Initialises parameters, optimizer state and rng, replicated over `mesh`.

    `ema`: also keep a moving average of the parameters (starting from them).
    """

    def init():
        init_rng, train_rng = jax.random.split(jax.random.key(seed))
        x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        variables = model.init(init_rng, x, train=False)
        params = variables["params"]
        return TrainState(
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.key_data(train_rng),
            ema_params=jax.tree.map(jnp.copy, params) if ema else {},
        )

    return jax.jit(init, out_shardings=NamedSharding(mesh, P()))()


def _train_step(
    state: TrainState,
    batch,
    teacher_variables=None,
    *,
    model,
    tx,
    data_config,
    label_smoothing,
    generalized_ce_q,
    ema_decay,
    mixing,
    teacher,
):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    aug_rng, dropout_rng = jax.random.split(rng)
    images = augment(batch["image"], aug_rng, data_config)
    labels = batch["label"]
    lam = 1.0
    if mixing:  # a key of its own, so the other draws stay as they are without mixing
        images, lam = mix(images, jax.random.fold_in(rng, _MIX_STREAM), *mixing)
    if teacher is not None:  # it sees the very views the student sees, mixed ones included
        teacher_logits = teacher.logits(teacher_variables, images)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        (logits, _), updates = model.apply(
            variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng}
        )

        def mean_loss(targets):
            return jnp.mean(cross_entropy(logits, targets, label_smoothing, generalized_ce_q))

        loss = mean_loss(labels)
        if mixing:  # the loss of the mixed targets, by linearity in the targets
            loss = lam * loss + (1.0 - lam) * mean_loss(labels[::-1])
        if teacher is not None:
            soft = jnp.mean(distill_lib.soft_loss(logits, teacher_logits, teacher.temperature))
            loss = (1.0 - teacher.weight) * loss + teacher.weight * soft
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        step=state.step + 1,
        ema_params=_update_ema(state.ema_params, params, state.step, ema_decay),
    )
    count = labels.shape[0]
    metrics = {
        "loss_sum": loss * count,
        "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
        "count": jnp.asarray(count, jnp.int32),
        "grad_norm": optax.tree.norm(grads),
    }
    return new_state, metrics


def _update_ema(ema_params, params, step, ema_decay):
    """The weight average after the step that gave `params` (None/empty: none is kept)."""
    if not ema_params:
        return ema_params
    if ema_decay is None:
        raise ValueError("this state keeps a weight average: give make_train_step ema_decay")
    # The decay ramps up as in tf.train.ExponentialMovingAverage(num_updates): early on the
    # average follows the fast-moving weights instead of remembering the random start.
    t = step.astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)


def make_train_step(
    model,
    tx,
    data_config,
    mesh,
    *,
    label_smoothing: float = 0.0,
    generalized_ce_q: float = 0.0,
    ema_decay: float | None = None,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    teacher: distill_lib.Teacher | None = None,
):
    """`train_step(state, batch) -> (state, metrics)`, compiled once; donates `state`.

    A state made with `init_state(..., ema=True)` also updates its weights' moving average
    with `ema_decay` (in (0, 1), e.g. 0.999), which it then needs. `mixup_alpha` and
    `cutmix_alpha` > 0 mix each batch with its reverse (`mnres.data.augment.mix`); the
    metrics' `correct` then still counts against the unmixed labels. `generalized_ce_q` in
    (0, 1] trains on the generalized cross-entropy instead (`optim.cross_entropy`).

    Augmentation and dropout use `fold_in(state.rng, state.step)`, so a step's randomness
    depends only on the seed and the step number and a resumed run repeats it exactly.

    `teacher` (`mnres.training.distill.Teacher`): the loss becomes (1 - its weight) times the
    labels' loss plus its weight times its soft loss at its temperature; the metrics'
    `loss_sum` is then that loss.
    """
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise ValueError(
            f"config.ema_decay={ema_decay} must be in (0, 1), e.g. 0.999 (an average over ~1000 "
            "steps); leave it unset to evaluate the weights themselves."
        )
    step = functools.partial(
        _train_step,
        model=model,
        tx=tx,
        data_config=data_config,
        label_smoothing=label_smoothing,
        generalized_ce_q=generalized_ce_q,
        ema_decay=ema_decay,
        mixing=(mixup_alpha, cutmix_alpha) if (mixup_alpha or cutmix_alpha) else None,
        teacher=teacher,
    )
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    compiled = jax.jit(
        step,
        in_shardings=(replicated, sharded) + ((replicated,) if teacher is not None else ()),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    if teacher is None:
        return compiled
    teacher_variables = jax.device_put(teacher.variables, replicated)
    return lambda state, batch: compiled(state, batch, teacher_variables)


def _eval_step(state: TrainState, batch, *, model, tta):
    variables = {"params": state.eval_params, "batch_stats": state.batch_stats}
    logits = classify(model, variables, preprocess(batch["image"]), tta=tta)
    out = {
        "logits": logits,  # [B, K]
        "loss": cross_entropy(logits, batch["label"]),
        "label": batch["label"],
        "mask": batch["mask"],
    }
    if logits.shape[-1] == 2:
        # P(class 1), and the binary log-odds log p1/p0: exact where the float32 probability
        # saturates, so that temperature scaling can be fitted on them.
        out["prob"] = jax.nn.softmax(logits)[:, 1]
        out["log_odds"] = logits[:, 1] - logits[:, 0]
    return out


def make_eval_step(model, mesh, *, tta: bool = False):
    """`eval_step(state, batch) -> per-example outputs`, gathered (replicated) on every host.

    `tta`: average the logits over the 8 symmetries of each crop. The forward pass is
    `mnres.inference.classify`, the one that exports, `predict`, calibration and Grad-CAM use.
    """
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(
        functools.partial(_eval_step, model=model, tta=tta),
        in_shardings=(replicated, sharded),
        out_shardings=replicated,
    )


def evaluate(eval_step, state: TrainState, split, batch_size: int, mesh) -> dict:
    """Logits, probabilities and losses for every example of `split`, exactly once.

    Returns:
      {'labels': int32 [N], 'logits': float32 [N, K], 'loss': mean cross-entropy, 'accuracy'};
      for two classes also 'probs': float32 [N] P(class 1) (P(parasitized)) and 'log_odds':
      float32 [N] log P(class 1)/P(class 0), with 'accuracy' at threshold 0.5 on 'probs'; for
      more, 'accuracy' is of the most probable class. Arrays in the split's order.
    """
    # One batch at a time: with freed memory kept (mnres.host_memory), a fold's final 8-view
    # evaluation (96 px, alpha 0.75) with every batch queued grew to 24 GB and was killed.
    host = [
        jax.device_get(eval_step(state, shard_batch(batch, mesh)))
        for batch in data.eval_batches(split, batch_size, jax.process_index(), jax.process_count())
    ]
    if not host:
        raise ValueError("cannot evaluate an empty split")
    mask = np.concatenate([o["mask"] for o in host])
    labels = np.concatenate([o["label"] for o in host])[mask]
    logits = np.concatenate([o["logits"] for o in host])[mask].astype(np.float32)
    loss = np.concatenate([o["loss"] for o in host])[mask]
    if len(labels) != len(split) or not np.array_equal(labels, split.labels):
        raise AssertionError(
            f"evaluation saw {len(labels)} examples of a split of {len(split)}; "
            "eval batches must cover every example exactly once"
        )
    result = {"labels": labels, "logits": logits, "loss": float(np.mean(loss, dtype=np.float64))}
    if logits.shape[1] != 2:
        return {**result, "accuracy": float(np.mean(np.argmax(logits, -1) == labels))}
    probs = np.concatenate([o["prob"] for o in host])[mask].astype(np.float32)
    log_odds = np.concatenate([o["log_odds"] for o in host])[mask].astype(np.float32)
    return {
        **result,
        "probs": probs,
        "log_odds": log_odds,
        "accuracy": float(np.mean((probs >= 0.5) == (labels == 1))),
    }
