"""experiments.recipe_cost: a recipe's cost figures from its record's config."""

import json
import math

import pytest
from conftest import needs_tflite

from experiments import recipe_cost
from experiments.search import records, tables
from mnres import config as config_lib


def _tiny(size):
    config = config_lib.default_config()
    config.data.image_size = size
    config.num_epochs = 1
    config.batch_size = 8
    config.eval_batch_size = 16
    return config


def test_a_records_config_reads_back_as_the_recipe_it_ran():
    found = records.read_search(recipe_cost.SEARCH)
    baseline = config_lib.default_config().to_dict()
    trained = recipe_cost.trained_recipes(found)
    assert "gray_world" in trained and "gray_world_slide_prior" in found
    assert "gray_world_slide_prior" not in trained  # a scoring of gray_world's runs
    for name in trained:
        record = found[name][min(found[name])]
        config = recipe_cost.recipe_config(record)
        config_lib.validate(config)
        assert tables.changes(config.to_dict(), baseline) == record["changes"], name


def test_costs_scale_with_the_input_and_estimate_a_fold_from_measured_rates(monkeypatch):
    monkeypatch.setattr(recipe_cost, "_int8_latency", lambda *a: 0.0)
    small, large = (recipe_cost.measure(_tiny(s), train_steps=2) for s in (32, 64))
    assert small["parameters"] == large["parameters"]  # the convolutions do not grow with it
    # Multiply-adds grow with the pixels (4x), but for the classifier's.
    assert large["multiply_adds"] / small["multiply_adds"] == pytest.approx(4, rel=0.01)
    for c in (small, large):
        train_min = c["train_step_ms"] * recipe_cost.STEPS_PER_EPOCH / 60e3
        assert train_min < c["fold_minutes"] < train_min + 1  # plus the evaluations
        assert c["views"] == 8 and c["epochs"] == 1 and c["eval_images_per_s"] > 0


def test_a_distilled_recipe_is_timed_with_its_teachers_networks(monkeypatch):
    monkeypatch.setattr(recipe_cost, "_int8_latency", lambda *a: 0.0)
    student = _tiny(32)
    student.distill.teacher = (
        "runs/r2/gray_world_96/fold_{fold}, runs/r2/gray_world_96_seed1/fold_{fold}"
    )
    assert recipe_cost.teacher_recipes(student) == ["gray_world_96", "gray_world_96_seed1"]
    assert recipe_cost.teacher_recipes(_tiny(32)) == []
    made = []
    real = recipe_cost.steps.make_train_step

    def capture(*args, **kwargs):
        made.append(kwargs["teacher"])
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe_cost.steps, "make_train_step", capture)
    cost = recipe_cost.measure(student, teacher_configs=[_tiny(48), _tiny(32)], train_steps=1)
    assert math.isfinite(cost["train_step_ms"]) and cost["train_step_ms"] > 0
    (teacher,) = made
    assert [m.image_size for m in teacher.members] == [48, 32]
    assert (teacher.weight, teacher.temperature) == (0.5, 1.0)


def test_the_record_names_the_command_that_measured_it(tmp_path, monkeypatch):
    """Its table prints `command`: the flags that chose the search and recipes are in it."""
    monkeypatch.setattr(recipe_cost, "measure", lambda config, **kwargs: {"epochs": 1})
    out = tmp_path / "costs.json"
    argv = [f"--search={recipe_cost.SEARCH}", "--recipes=gray_world_96", f"--out={out}"]
    recipe_cost.main(argv)
    record = json.loads(out.read_text())
    assert record["command"] == "python -m experiments.recipe_cost " + " ".join(argv)
    assert list(record["recipes"]) == ["gray_world_96"]


@pytest.mark.slow
@needs_tflite
def test_the_int8_latency_is_measured_on_the_recipes_export():
    ms = recipe_cost.measure(_tiny(32), train_steps=1, int8_calls=5)["int8_batch1_ms"]
    assert math.isfinite(ms) and ms > 0
