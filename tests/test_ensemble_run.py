"""Ensemble runs: finished runs combined into one run folder that every consumer loads."""

import jax
import numpy as np
import pytest
from data_fixtures import tiny_crossval_config

from mnres import metrics, run_folder
from mnres.metrics import calibration, slide_prior
from mnres.models import ensemble, from_config
from mnres.training import ensemble as ensemble_run
from mnres.training import loop


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two tiny trained runs of the same split that differ in their recipe."""
    root = tmp_path_factory.mktemp("members")
    dirs = []
    for name, normalization in (("plain", "none"), ("gray", "gray_world")):
        config = tiny_crossval_config()
        config.model.input_normalization = normalization
        loop.train_and_evaluate(config, str(root / name))
        dirs.append(str(root / name))
    return dirs


@pytest.fixture(scope="module")
def combined(members, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ensemble") / "run")
    return workdir, ensemble_run.combine(members, workdir)


def test_ensemble_logits_are_the_mean_of_its_members():
    config = tiny_crossval_config()
    plain = config.model.to_dict()
    gray = {**plain, "input_normalization": "gray_world"}
    model = from_config({"name": "ensemble", "members": [plain, gray]})
    x = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3), minval=-1, maxval=1)
    variables = model.init(jax.random.key(0), x)
    logits, _ = model.apply(variables, x)
    each = [
        m.apply(ensemble.member_variables(variables, i), x)[0] for i, m in enumerate(model.members)
    ]
    np.testing.assert_allclose(logits, (each[0] + each[1]) / 2, rtol=1e-6, atol=1e-6)
    assert not np.allclose(each[0], each[1])  # the members really differ
    with pytest.raises(ValueError, match="not trained as one"):
        model.apply(variables, x, train=True)


@pytest.mark.slow
def test_combined_run_scores_the_mean_log_odds_with_each_slides_prior(members, combined):
    workdir, report = combined
    outputs = [run_folder.read_test_outputs(d) for d in members]
    mean = np.mean([o["log_odds"] for o in outputs], axis=0)
    # The members' own test outputs, from their training runs' evaluation.
    np.testing.assert_allclose(run_folder.read_test_outputs(workdir)["log_odds"], mean, atol=1e-4)
    prevalence = report["slide_prior"]["train_prevalence"]
    adjusted = slide_prior.adjust(mean, outputs[0]["slide_ids"], prevalence)
    found = metrics.binary_metrics(outputs[0]["labels"], calibration.calibrated_probs(adjusted, 1))
    assert report["test"]["accuracy"] == pytest.approx(found["accuracy"], abs=1e-9)
    assert report["test"]["auc"] == pytest.approx(found["auc"], abs=1e-4)
    plain = metrics.binary_metrics(outputs[0]["labels"], calibration.calibrated_probs(mean, 1))
    assert report["slide_prior"]["without"]["test"]["auc"] == pytest.approx(plain["auc"], abs=1e-4)
    assert report["test_patient"]["n_patients"] == len(set(outputs[0]["slide_ids"]))
    # What a member run leaves of its test split, the ensemble leaves too (it trained nothing:
    # no training history).
    left = set(run_folder.plot_files(members[0])) - {run_folder.HISTORY_PNG}
    assert left <= set(run_folder.plot_files(workdir))


@pytest.mark.slow
def test_combined_run_loads_as_one_model(members, combined):
    workdir, _ = combined
    classifier = run_folder.load_run(workdir)
    assert isinstance(classifier.model, ensemble.Ensemble)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    each = [run_folder.load_run(d).logits(images) for d in members]
    np.testing.assert_allclose(classifier.logits(images), np.mean(each, axis=0), atol=1e-5)
    # The export's model: the same weights, every member with grouped convs.
    exported = classifier.for_export()
    assert all(m.conv_formulation == "grouped" for m in exported.model.members)
    np.testing.assert_allclose(
        np.asarray(exported.serve(images)),
        np.asarray(jax.nn.softmax(classifier.logits(images), axis=-1)),
        atol=1e-4,
    )
    config = run_folder.read_config(workdir)
    assert [m["run"] for m in config.ensemble.members] == ["plain", "gray"]
    assert run_folder.read_calibration(workdir)["temperature"] > 0


@pytest.mark.slow  # trains two tiny runs (three here)
def test_combine_refuses_what_is_not_one_ensemble(members, combined, tmp_path):
    with pytest.raises(ValueError, match="one finished run or more"):
        ensemble_run.combine([], str(tmp_path / "none"))
    with pytest.raises(ValueError, match="already holds a run"):
        ensemble_run.combine(members, combined[0])
    other = tiny_crossval_config()
    other.seed = 1  # another slide split
    loop.train_and_evaluate(other, str(tmp_path / "other"))
    with pytest.raises(ValueError, match="not trained on the same train crops"):
        ensemble_run.combine([members[0], str(tmp_path / "other")], str(tmp_path / "mixed"))


@pytest.mark.slow
def test_one_run_is_its_own_network_scored_with_each_slides_prior(members, tmp_path):
    workdir = str(tmp_path / "one")
    report = ensemble_run.combine(members[:1], workdir)
    classifier, member = run_folder.load_run(workdir), run_folder.load_run(members[0])
    assert not isinstance(classifier.model, ensemble.Ensemble)
    assert report["model"]["name"] == member.config.model.name
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(classifier.logits(images), member.logits(images), atol=1e-6)
    stored = run_folder.read_test_outputs(members[0])
    prevalence = report["slide_prior"]["train_prevalence"]
    adjusted = slide_prior.adjust(stored["log_odds"], stored["slide_ids"], prevalence)
    found = metrics.binary_metrics(stored["labels"], calibration.calibrated_probs(adjusted, 1))
    assert report["test"]["accuracy"] == pytest.approx(found["accuracy"], abs=1e-9)
    assert [m["run"] for m in run_folder.read_config(workdir).ensemble.members] == ["plain"]
