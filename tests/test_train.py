"""The optimizer chain, the train state and the compiled train/eval steps (one CPU device)."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from mnres import config as config_lib
from mnres import data, models
from mnres.data.splits import Split
from mnres.models import params as params_lib
from mnres.training import optim, steps

SIZE = 32
BATCH = 8


def _model(**fields):
    config = ml_collections.ConfigDict(
        dict(name="mobilenet_v1", alpha=0.25, num_blocks=1, bn_momentum=0.9, **fields)
    )
    return models.from_config(config)


def _setup(model, **optimizer_fields):
    config = config_lib.default_config().optimizer
    config.update(optimizer_fields)
    shapes = params_lib.abstract_variables(model, (1, SIZE, SIZE, 3))
    tx, schedule = optim.create_optimizer(config, model, shapes["params"], 10, 2)
    mesh = steps.make_mesh()
    state = steps.init_state(model, tx, SIZE, 0, mesh)
    return state, tx, schedule, mesh


def _batch(seed=0, n=BATCH):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8),
        "label": rng.integers(0, 2, n).astype(np.int32),
    }


def _split(images, labels=None) -> Split:
    """An evaluation split of `images` without slide ids (labels: all 0 unless given)."""
    n = len(images)
    return Split(
        images=images,
        labels=np.zeros(n, np.int32) if labels is None else labels,
        slide_ids=np.array([""] * n),
        names=np.array([f"x{i}" for i in range(n)]),
    )


def _data_config():
    return config_lib.default_config().data


def test_schedule_warms_up_then_decays_to_the_end_value():
    config = config_lib.default_config().optimizer
    config.learning_rate, config.warmup_epochs, config.end_learning_rate_factor = 1e-2, 1, 0.1
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=10, num_epochs=5)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1e-2)
    assert float(schedule(30)) < 1e-2
    assert float(schedule(50)) == pytest.approx(1e-3)


def test_weight_decay_only_on_kernels():
    model = _model()
    shapes = params_lib.abstract_variables(model, (1, SIZE, SIZE, 3))
    flat = traverse_util.flatten_dict(optim.decay_mask(shapes["params"]))
    assert flat[("stem", "conv1", "kernel")] and flat[("conv_preds", "kernel")]
    assert not flat[("stem", "conv1_bn", "scale")] and not flat[("stem", "conv1_bn", "bias")]
    assert not flat[("conv_preds", "bias")]


def test_bn_momentum_must_be_chosen():
    config = ml_collections.ConfigDict(dict(name="mobilenet_v2", alpha=0.35))
    with pytest.raises(ValueError, match="bn_momentum"):
        models.from_config(config)


def test_batch_size_must_divide_over_devices(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    config_lib.check_batch_size(64)
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        config_lib.check_batch_size(76)


def test_frozen_parameters_and_their_batchnorm_do_not_change():
    model = _model(freeze_through="conv_dw_1_bn")
    state, tx, _, mesh = _setup(model, learning_rate=1e-1, warmup_epochs=0.0)
    before = jax.device_get((state.params, state.batch_stats))
    train_step = steps.make_train_step(model, tx, _data_config(), mesh)
    for k in range(3):
        state, metrics = train_step(state, steps.shard_batch(_batch(k), mesh))
    after = jax.device_get((state.params, state.batch_stats))
    frozen = set(model.frozen_layers)
    assert frozen == {"conv1", "conv1_bn", "conv_dw_1", "conv_dw_1_bn"}
    for collection in range(2):
        flat_before = traverse_util.flatten_dict(before[collection])
        flat_after = traverse_util.flatten_dict(after[collection])
        for path, value in flat_before.items():
            same = np.array_equal(value, flat_after[path])
            assert same == (params_lib.layer_name(path) in frozen), path
    assert int(state.step) == 3 and np.isfinite(float(metrics["loss_sum"]))


@pytest.mark.parametrize("name", ["adamw", "sgd", "rmsprop"])
def test_each_optimizer_descends_and_skips_frozen_layers(name):
    # The chain alone on 0.5 * |params|^2 (gradient = params): compiles in a blink.
    model = _model(freeze_through="conv1_bn")
    shapes = params_lib.abstract_variables(model, (1, SIZE, SIZE, 3))
    config = config_lib.default_config().optimizer
    config.name, config.learning_rate, config.warmup_epochs = name, 1e-2, 0.0
    tx, _ = optim.create_optimizer(config, model, shapes["params"], 10, 1)
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes["params"])
    state = tx.init(params)

    @jax.jit
    def update(params, state):
        updates, state = tx.update(params, state, params)
        return optax.apply_updates(params, updates), state

    start = params
    for _ in range(5):
        params, state = update(params, state)
    flat_start = traverse_util.flatten_dict(start)
    for path, value in traverse_util.flatten_dict(params).items():
        if params_lib.layer_name(path) in model.frozen_layers:
            assert np.array_equal(value, flat_start[path]), path
        else:
            assert float(jnp.sum(value**2)) < float(jnp.sum(flat_start[path] ** 2)), path


def test_unknown_optimizer_is_named():
    config = config_lib.default_config().optimizer
    config.name = "lamb"
    with pytest.raises(ValueError, match="adamw, sgd, rmsprop"):
        optim.create_optimizer(config, _model(), {}, 10, 1)


@pytest.fixture(scope="module")
def with_dropout():
    model = _model(dropout=0.2)
    state, tx, _, mesh = _setup(model)
    return model, state, tx, mesh


def test_train_step_is_a_function_of_state_and_batch(with_dropout):
    model, state, tx, mesh = with_dropout
    train_step = steps.make_train_step(model, tx, _data_config(), mesh, label_smoothing=0.1)
    batch = _batch()
    # The step donates its input state: give it copies, keep the fixture's.
    a, ma = train_step(jax.tree.map(jnp.copy, state), steps.shard_batch(batch, mesh))
    b, mb = train_step(jax.tree.map(jnp.copy, state), steps.shard_batch(batch, mesh))
    assert jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(x, y), a.params, b.params))
    assert float(ma["loss_sum"]) == float(mb["loss_sum"])


def test_bfloat16_compute_keeps_float32_parameters():
    model = _model(dtype="bfloat16")
    state, tx, _, mesh = _setup(model)
    train_step = steps.make_train_step(model, tx, _data_config(), mesh)
    state, metrics = train_step(state, steps.shard_batch(_batch(), mesh))
    assert {x.dtype for x in jax.tree.leaves((state.params, state.batch_stats))} == {
        jnp.dtype("float32")
    }
    assert np.isfinite(float(metrics["loss_sum"]))


def test_mixing_weights_the_two_losses_and_leaves_a_plain_batch_alone(with_dropout):
    model, state, tx, mesh = with_dropout
    batch = _batch()
    same = {  # one image and one label throughout: mixed with its reverse, it is unchanged
        "image": np.repeat(batch["image"][:1], len(batch["label"]), axis=0),
        "label": np.zeros_like(batch["label"]),
    }
    unaugmented = _data_config()  # augmentation would make the copies differ
    unaugmented.update(flip=False, rot90=False, brightness=0, contrast=0, saturation=0, hue=0)
    losses = {}
    for name, mixing in (("plain", {}), ("mixup", {"mixup_alpha": 0.4, "cutmix_alpha": 1.0})):
        train_step = steps.make_train_step(model, tx, unaugmented, mesh, **mixing)
        for what, b in (("same", same), ("varied", batch)):
            _, m = train_step(jax.tree.map(jnp.copy, state), steps.shard_batch(b, mesh))
            losses[name, what] = float(m["loss_sum"])
    assert losses["mixup", "same"] == pytest.approx(losses["plain", "same"], rel=1e-5)
    assert abs(losses["mixup", "varied"] - losses["plain", "varied"]) > 1e-3
    assert np.isfinite(losses["mixup", "varied"])


def test_generalized_cross_entropy_spans_cross_entropy_to_absolute_error():
    logits = jnp.array([[2.0, -1.0], [0.3, 0.1], [-4.0, 3.0]])
    labels = jnp.array([0, 1, 0])
    p_true = jax.nn.softmax(logits)[jnp.arange(3), labels]
    ce = optim.cross_entropy(logits, labels)
    np.testing.assert_allclose(optim.cross_entropy(logits, labels, q=1e-4), ce, rtol=1e-3)
    np.testing.assert_allclose(optim.cross_entropy(logits, labels, q=1.0), 1 - p_true, rtol=1e-6)
    assert (optim.cross_entropy(logits, labels, q=0.7) < ce).all()  # (1 - p^q)/q < -log p


def test_generalized_cross_entropy_lets_a_confidently_wrong_label_pull_less():
    def gradient(logit, q):
        loss = lambda z: optim.cross_entropy(jnp.array([[z, -z]]), jnp.array([1]), q=q)[0]
        return float(jax.grad(loss)(logit))

    # Label 1 against logits that say class 0, more and more confidently (p_1 down to e^-200).
    for q, expected in ((0.0, "grows"), (0.7, "fades")):
        pulls = [abs(gradient(z, q)) for z in (0.5, 3.0, 100.0)]
        assert all(np.isfinite(pulls)), pulls
        if expected == "grows":
            assert pulls[0] < pulls[1] < pulls[2]
        else:
            assert pulls[1] < pulls[0] and pulls[2] < 1e-6, pulls


def test_train_step_trains_on_the_generalized_cross_entropy(with_dropout):
    model, state, tx, mesh = with_dropout
    batch = steps.shard_batch(_batch(), mesh)
    losses = {}
    for q in (0.0, 0.7):
        train_step = steps.make_train_step(model, tx, _data_config(), mesh, generalized_ce_q=q)
        _, m = train_step(jax.tree.map(jnp.copy, state), batch)
        losses[q] = float(m["loss_sum"])
    assert np.isfinite(losses[0.7]) and losses[0.7] < losses[0.0]


def test_label_smoothing_moves_the_target_off_one_hot():
    logits = jnp.array([[10.0, -10.0]])
    plain = optim.cross_entropy(logits, jnp.array([0]))
    smoothed = optim.cross_entropy(logits, jnp.array([0]), label_smoothing=0.2)
    assert float(plain[0]) < 1e-6 and float(smoothed[0]) > 1.0


def test_evaluation_counts_every_example_once_in_order(with_dropout):
    model, state, _, mesh = with_dropout
    n = 37  # two full batches of 16 and a padded one of 5
    rng = np.random.default_rng(1)
    split = _split(
        rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8),
        rng.integers(0, 2, n).astype(np.int32),
    )
    result = steps.evaluate(steps.make_eval_step(model, mesh), state, split, 16, mesh)
    assert result["labels"].tolist() == split.labels.tolist()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits, _ = model.apply(variables, split.images / 127.5 - 1.0, train=False)
    expected = jax.nn.softmax(logits)[:, 1]
    np.testing.assert_allclose(result["probs"], expected, atol=1e-5)
    assert result["accuracy"] == pytest.approx(np.mean((expected >= 0.5) == split.labels))


def test_evaluation_fetches_each_batch_before_it_runs_the_next(with_dropout, monkeypatch):
    # With every batch queued, a fold's 8-view evaluation reached 24 GB on the kept heap and
    # was killed (docs/performance.md). One batch on the device at a time.
    model, state, _, mesh = with_dropout
    eval_step = steps.make_eval_step(model, mesh)
    unfetched, most = [0], [0]

    def counting_step(state, batch):
        unfetched[0] += 1
        most[0] = max(most[0], unfetched[0])
        return eval_step(state, batch)

    real_get = jax.device_get

    def counting_get(x):
        unfetched[0] = 0
        return real_get(x)

    monkeypatch.setattr(jax, "device_get", counting_get)
    n = 37
    split = _split(np.zeros((n, SIZE, SIZE, 3), np.uint8), np.zeros(n, np.int32))
    assert len(steps.evaluate(counting_step, state, split, 16, mesh)["labels"]) == n
    assert most[0] == 1


def test_test_time_augmentation_averages_the_8_views_and_ignores_orientation(with_dropout):
    model, state, _, mesh = with_dropout
    n = 5
    images = np.random.default_rng(2).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    split = _split(images)
    evaluate = lambda split, tta: steps.evaluate(
        steps.make_eval_step(model, mesh, tta=tta), state, split, 8, mesh
    )
    single, averaged = evaluate(split, False), evaluate(split, True)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    x = images / 127.5 - 1.0
    views = [np.rot90(x, k, axes=(1, 2)) for k in range(4)]
    views += [v[:, :, ::-1] for v in views]
    logits = np.mean([model.apply(variables, v, train=False)[0] for v in views], axis=0)
    np.testing.assert_allclose(averaged["log_odds"], logits[:, 1] - logits[:, 0], atol=1e-4)
    assert np.max(np.abs(single["log_odds"] - averaged["log_odds"])) > 1e-3  # not one view
    # The average over a group's orbit is invariant under the group: a rotated, mirrored
    # batch gets the same answer, which no single view does.
    turned = dataclasses.replace(
        split, images=np.ascontiguousarray(np.rot90(images, 1, (1, 2))[:, ::-1])
    )
    np.testing.assert_allclose(evaluate(turned, True)["log_odds"], averaged["log_odds"], atol=1e-4)
    assert np.max(np.abs(evaluate(turned, False)["log_odds"] - single["log_odds"])) > 1e-3


def test_weight_moving_average_follows_the_recurrence_and_is_what_evaluation_uses():
    model = _model()
    config = config_lib.default_config().optimizer
    shapes = params_lib.abstract_variables(model, (1, SIZE, SIZE, 3))
    tx, _ = optim.create_optimizer(config, model, shapes["params"], 10, 2)
    mesh = steps.make_mesh()
    state = steps.init_state(model, tx, SIZE, 0, mesh, ema=True)
    plain = steps.init_state(model, tx, SIZE, 0, mesh)
    assert plain.ema_params == {} and plain.eval_params is plain.params
    decay = 0.5
    train_step = steps.make_train_step(model, tx, _data_config(), mesh, ema_decay=decay)
    expected = jax.tree.map(np.asarray, state.params)
    for t in range(3):
        state, _ = train_step(state, steps.shard_batch(_batch(seed=t), mesh))
        d = min(decay, (1 + t) / (10 + t))
        expected = jax.tree.map(
            lambda e, p, d=d: e + (1 - d) * (np.asarray(p) - e), expected, state.params
        )
    jax.tree.map(
        lambda e, a: np.testing.assert_allclose(a, e, atol=1e-6), expected, state.ema_params
    )
    assert not jax.tree.all(jax.tree.map(np.allclose, state.params, state.ema_params))
    # Evaluation (and so checkpoint choice and the report) sees the average, not the raw weights.
    split = _split(_batch(seed=9)["image"])
    result = steps.evaluate(steps.make_eval_step(model, mesh), state, split, BATCH, mesh)
    logits, _ = model.apply(
        {"params": state.ema_params, "batch_stats": state.batch_stats},
        split.images / 127.5 - 1.0,
        train=False,
    )
    np.testing.assert_allclose(result["log_odds"], logits[:, 1] - logits[:, 0], atol=1e-5)
    with pytest.raises(ValueError, match="ema_decay=1.5 must be in"):
        steps.make_train_step(model, tx, _data_config(), mesh, ema_decay=1.5)
    restored = steps.TrainState.from_dict(state.to_dict())
    assert restored.ema_params is state.ema_params
    assert "ema_params" not in plain.to_dict()  # checkpoints without an average: as before
    assert steps.TrainState.from_dict(plain.to_dict()).ema_params == {}


class _RecordedCheckpoints:
    """Stands in for `checkpoint.Checkpoints`: records what the loop saves."""

    directory = "/run/checkpoints"

    def __init__(self):
        self.saved = []

    def save(self, step, state, *, latest=True, best=False):
        self.saved.append((step, latest, best))


def test_checkpoint_policy_latest_every_k_epochs_and_at_the_end_best_on_improvement():
    from mnres.training import loop

    state = steps.TrainState(step=0, params={}, batch_stats={}, opt_state=(), rng=None)
    config = ml_collections.ConfigDict(dict(batch_size=4, num_epochs=5, checkpoint_every_epochs=2))
    train = _split(np.zeros((8, SIZE, SIZE, 3), np.uint8))  # 2 steps per epoch
    run = loop.Run(
        config, "/run", data.Dataset(train, train, train, {}), None, None, None, None,
        _RecordedCheckpoints(), state,
    )  # fmt: skip
    error = run.non_finite("the loss is nan", 3)
    assert "step 3" in str(error) and "no checkpoint had been written yet" in str(error)
    for epoch, accuracy in enumerate([0.6, 0.5, 0.7, 0.7, 0.4]):
        run.step = 2 * (epoch + 1)
        loop._checkpoint(run, epoch, {"accuracy": accuracy})
    # (step, latest, best): epochs 2 and 4 and the last are periodic; 1 and 3 improved.
    assert run.ckpts.saved == [(2, False, True), (4, True, False), (6, False, True),
                               (8, True, False), (10, True, False)]  # fmt: skip
    assert run.last_good_step == 10 and run.best_val_accuracy == 0.7
    assert "the last good checkpoint (step 10) in /run/checkpoints" in str(
        run.non_finite("the loss is nan", 11)
    )
    run.ckpts.saved, run.step = [], 2
    loop._checkpoint(run, 0, None)  # without a validation split: no best, only periodic saves
    assert run.ckpts.saved == []
