"""A run that fails to learn says so: BatchNorm momentum from the step count, the report's
`warnings` (and one log line) for collapsed outputs, chance validation and 0-step runs, and
`predict` repeating them."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from conftest import make_run
from data_fixtures import MINI_CELL_IMAGES, REPO
from PIL import Image

from experiments.configs import default, paper, smoke
from mnres import __main__ as cli
from mnres import config as config_lib
from mnres import data, metrics, models, run_folder
from mnres.data import synthetic
from mnres.training import bn_momentum, final_evaluation, loop

needs_mini = pytest.mark.skipif(
    not MINI_CELL_IMAGES.is_dir(), reason="needs ../shared/data/malaria-mini"
)
# The full development set: 17,819 training crops in batches of 64.
FULL_STEPS_PER_EPOCH = 17_819 // 64


# --- BatchNorm momentum -------------------------------------------------------------------------


def test_momentum_rule_gives_0_99_on_the_full_development_set():
    assert FULL_STEPS_PER_EPOCH * default.get_config().num_epochs == 5_560
    assert bn_momentum.pick_bn_momentum(5_580) == 0.99
    assert bn_momentum.pick_bn_momentum(5_560) == 0.99


def test_momentum_rule_short_runs_follow_faster_within_the_clip():
    assert bn_momentum.pick_bn_momentum(240) == 0.9  # malaria-mini: 12 steps x 20 epochs
    assert bn_momentum.pick_bn_momentum(1_000) == pytest.approx(0.95)
    assert bn_momentum.pick_bn_momentum(0) == 0.9
    assert bn_momentum.pick_bn_momentum(10**6) == 0.99
    picks = [bn_momentum.pick_bn_momentum(n) for n in range(0, 8_000, 50)]
    assert picks == sorted(picks)
    # A picked momentum never draws the warning once the run has 50 steps.
    assert all(
        bn_momentum.bn_momentum_warning(bn_momentum.pick_bn_momentum(n), n) is None
        for n in (50, 240)
    )


def test_momentum_warning_when_the_running_averages_cannot_follow():
    warning = bn_momentum.bn_momentum_warning(0.99, 240)
    assert "0.99" in warning and "240" in warning and ">= 500" in warning
    assert "picks 0.9" in warning and "<= 0.979" in warning
    assert bn_momentum.bn_momentum_warning(0.999, 240) is not None
    assert bn_momentum.bn_momentum_warning(0.99, 500) is None
    assert bn_momentum.bn_momentum_warning(0.9, 240) is None
    assert bn_momentum.bn_momentum_warning(0.99, 0) is None  # 0 steps: its own warning


def test_shipped_configs_draw_no_momentum_warning_except_the_papers_failure():
    smoke_config = smoke.get_config()
    ds = data.load_dataset(smoke_config.data, smoke_config.seed)
    smoke_steps = data.steps_per_epoch(ds.train, smoke_config.batch_size) * smoke_config.num_epochs
    assert bn_momentum.bn_momentum_warning(smoke_config.model.bn_momentum, smoke_steps) is None
    assert default.get_config().model.bn_momentum is None  # picked from the step count
    paper_steps = FULL_STEPS_PER_EPOCH * paper.get_config().num_epochs
    assert (
        bn_momentum.bn_momentum_warning(paper.get_config().model.bn_momentum, paper_steps) is None
    )
    # keras_bn reproduces the seed paper's failure on purpose: the warning names it.
    assert bn_momentum.bn_momentum_warning(
        paper.get_config("keras_bn").model.bn_momentum, paper_steps
    )


def test_from_config_takes_the_momentum_given_and_builds_an_unset_one():
    config = default.get_config()
    assert models.from_config(config.model, bn_momentum=0.9).bn_momentum == 0.9
    # Unset outside training (load_run, inference): the full development set's pick.
    assert models.from_config(config.model).bn_momentum == bn_momentum.pick_bn_momentum(5_580)
    config.model.bn_momentum = 0.97
    assert models.from_config(config.model).bn_momentum == 0.97


def test_resolved_momentum_is_written_and_an_explicit_one_kept(caplog):
    config = default.get_config()
    with caplog.at_level(logging.INFO):
        resolved, picked, warning = bn_momentum.resolve(config, 240)
    assert (resolved.model.bn_momentum, picked, warning) == (0.9, True, None)
    assert config.model.bn_momentum is None  # the caller's config is left as it was
    assert "BatchNorm momentum 0.9 (picked from the step count)" in caplog.text
    config.model.bn_momentum = 0.99
    with caplog.at_level(logging.INFO):
        resolved, picked, warning = bn_momentum.resolve(config, 240)
    assert (resolved.model.bn_momentum, picked) == (0.99, False)
    assert warning and warning in caplog.text


# --- detectors ----------------------------------------------------------------------------------


def test_output_collapse_one_answer_for_every_crop():
    labels = np.array([0] * 48 + [1] * 33)  # malaria-mini's validation split: 81 crops
    flat = metrics.output_collapse(labels, np.full(81, 0.5215))
    assert flat["collapsed"] and flat["std"] == 0.0
    assert flat["called_class"] == 1 and flat["called_share"] == 1.0
    assert flat["prior_class"] == 0 and flat["prior"] == pytest.approx(48 / 81)
    # Spread out but always on one side of the threshold: still one answer.
    one_side = np.linspace(0.55, 0.95, 81)
    assert metrics.output_collapse(labels, one_side)["collapsed"]


def test_output_collapse_passes_a_model_that_separates_or_a_lopsided_truth():
    labels = np.array([0] * 48 + [1] * 33)
    rng = np.random.default_rng(0)
    good = np.clip(np.where(labels == 1, 0.8, 0.2) + rng.normal(0, 0.1, 81), 0, 1)
    assert not metrics.output_collapse(labels, good)["collapsed"]
    # 199 of 200 crops uninfected: calling all of them uninfected is no collapse by share.
    lopsided = np.array([0] * 199 + [1])
    probs = np.linspace(0.0, 0.4, 200)
    assert not metrics.output_collapse(lopsided, probs)["collapsed"]


def _finished_run(*, step=240, history=None, train_size=799, warnings=()):
    """The fields of a finished `loop.Run` that `training_warnings` reads."""
    config = default.get_config()
    config.model.bn_momentum = 0.99
    return types.SimpleNamespace(
        config=config, step=step, total_steps=step, warnings=list(warnings),
        ds=types.SimpleNamespace(train=range(train_size)), history=history or [],
    )  # fmt: skip


def _outputs(labels, probs):
    return {"labels": np.asarray(labels), "probs": np.asarray(probs, np.float64)}


def _evaluation(val, test=None):
    return final_evaluation.Evaluation("best", 240, True, val, test or val)


def test_collapsed_run_gets_both_warnings_with_numbers_and_fixes():
    labels = [0] * 48 + [1] * 33
    history = [{"val_accuracy": 33 / 81} for _ in range(20)]
    run = _finished_run(history=history, warnings=["momentum too slow"])
    found = final_evaluation.training_warnings(run, _evaluation(_outputs(labels, [0.5215] * 81)))
    assert found[0] == "momentum too slow"
    collapse, chance = found[1:]
    assert "one output for every validation crop" in collapse and "100.0% called parasitized" in (
        collapse
    )
    assert "best 0.4074 in 20 epochs, 0.5926 for always calling uninfected" in chance
    for sentence in (collapse, chance):
        assert "config.model.bn_momentum 0.99 over 240 steps" in sentence
        assert "config.optimizer.learning_rate" in sentence


def test_healthy_run_gets_no_warnings_and_chance_alone_is_caught():
    labels = np.array([0] * 48 + [1] * 33)
    good = np.where(labels == 1, 0.9, 0.1)
    learned = _finished_run(history=[{"val_accuracy": 0.5}, {"val_accuracy": 0.9}])
    assert final_evaluation.training_warnings(learned, _evaluation(_outputs(labels, good))) == []
    # Outputs spread out, but no epoch validated above always calling 'uninfected'.
    chance = _finished_run(history=[{"val_accuracy": 0.55}, {"val_accuracy": 48 / 81}])
    found = final_evaluation.training_warnings(chance, _evaluation(_outputs(labels, good)))
    assert len(found) == 1 and found[0].startswith("Validation accuracy never beat")


def test_zero_step_run_is_reported():
    labels = [0, 1] * 10
    run = _finished_run(step=0, train_size=40)
    found = final_evaluation.training_warnings(run, _evaluation(_outputs(labels, [0.5] * 20)))
    assert len(found) == 1 and "trained 0 steps (40 training crops, batch size 64" in found[0]


def test_warnings_are_one_log_line(caplog):
    with caplog.at_level(logging.WARNING):
        final_evaluation.log_warnings([])
        assert not caplog.records
        final_evaluation.log_warnings(["First finding.", "Second finding."])
    (record,) = caplog.records
    assert "First finding. Second finding." in record.getMessage()
    assert "\n" not in record.getMessage()


# --- whole runs ---------------------------------------------------------------------------------


def test_run_that_trains_0_steps_says_so_and_predict_repeats_it(tmp_path, capsys, monkeypatch):
    """Fewer training crops than a batch: the config checks refuse it, so they are patched out
    here to see what the loop itself does with a run that never steps."""
    monkeypatch.setattr(config_lib, "check_train_split", lambda config, ds: None)
    config = smoke.get_config()
    config.progress_bar = False
    ds = data.load_dataset(config.data, config.seed)
    few = data.Split(*(a[: config.batch_size - 1] for a in dataclasses.astuple(ds.train)))
    workdir = str(tmp_path / "run")
    result = loop.train_and_evaluate(config, workdir, dataset=dataclasses.replace(ds, train=few))
    assert result["training"]["total_steps"] == 0
    assert any("trained 0 steps" in w for w in result["warnings"])
    assert run_folder.read_report(workdir)["warnings"] == result["warnings"]
    assert result["model"]["bn_momentum"] == 0.9 and not result["model"]["bn_momentum_picked"]
    # No step, no checkpoint: predict has no model to load, but first says why.
    with pytest.raises(SystemExit):
        cli.main(["predict", workdir, str(tmp_path)])
    assert "trained 0 steps" in capsys.readouterr().err


def test_predict_repeats_the_reports_warnings_and_names_synthetic_training(tmp_path, capsys):
    workdir = make_run(tmp_path / "run")  # a run folder trained on synthetic cells
    found = "The model gives nearly one output for every validation crop (std 0.0000)."
    run_folder.write_json(os.path.join(workdir, run_folder.REPORT_JSON), {"warnings": [found]})
    image = tmp_path / "cell.png"
    Image.fromarray(synthetic.draw_cells(1, 48, 1, 0)[0][0]).save(image)
    assert cli.main(["predict", workdir, str(image)]) == 0
    captured = capsys.readouterr()
    assert f"warning: {found}" in captured.err
    assert "trained on synthetic cells" in captured.err
    assert "warning" not in captured.out  # the table stays clean for pipes
    assert run_folder.run_warnings(workdir)[0] == found


def _mini_run(workdir, *flags):
    """`default.py` on malaria-mini in a subprocess; its report and its log (stderr)."""
    command = [
        sys.executable, "-m", "experiments.malaria", "--config=experiments/configs/default.py",
        "--config.data.source=folder", f"--config.data.dir={MINI_CELL_IMAGES}",
        f"--workdir={workdir}", "--config.progress_bar=False", *flags,
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((workdir / "report.json").read_text())
    print(f"{' '.join(flags) or 'default.py'}: {time.perf_counter() - start:.0f} s wall")
    return report, proc.stderr


@pytest.mark.slow
@needs_mini
def test_default_config_learns_on_malaria_mini(tmp_path):
    """The acceptance run: default.py's own schedule (20 epochs, 240 steps; ~2 min on 2 cores)."""
    report, log = _mini_run(tmp_path / "run")
    assert report["model"]["bn_momentum"] == 0.9 and report["model"]["bn_momentum_picked"]
    assert report["test"]["auc"] >= 0.8, report["test"]
    assert report["warnings"] == []
    assert "may be unusable" not in log


@pytest.mark.slow
@needs_mini
def test_keras_momentum_on_malaria_mini_is_reported(tmp_path, capsys):
    """0.999 cannot follow malaria-mini's steps: the model collapses and the run says so. Six
    epochs (72 steps) show it as the full 20 do (validation 0.4074 in every epoch, test AUC 0.5)."""
    workdir = tmp_path / "run"
    report, log = _mini_run(workdir, "--config.model.bn_momentum=0.999", "--config.num_epochs=6")
    warnings = report["warnings"]
    assert any(w.startswith("BatchNorm momentum 0.999") for w in warnings), warnings
    assert any("one output for every validation crop" in w for w in warnings), warnings
    assert report["model"]["bn_momentum"] == 0.999 and not report["model"]["bn_momentum_picked"]
    (line,) = [row for row in log.splitlines() if "may be unusable" in row]
    assert line.startswith("W") and all(w in line for w in warnings)
    crop = next((MINI_CELL_IMAGES / "Parasitized").glob("*.png"))
    assert cli.main(["predict", str(workdir), str(crop)]) == 0
    err = capsys.readouterr().err
    assert all(f"warning: {w}" in err for w in warnings) and "synthetic" not in err
