"""experiments.verdict_cv on synthetic fold outputs: choose reads validation rows only, test
reads once, and the docs' tables come from the records."""

import json
import os

import numpy as np
import pytest

from experiments import verdict_cv, verdict_tables


def _fake_outputs(folder, rng):
    """Five folds of fake member outputs: every patient in one test fold, some in validation."""
    patients = [f"P{i:02d}" for i in range(30)]
    infected = {p: i % 3 != 0 for i, p in enumerate(patients)}
    crops = {}
    for p in patients:
        n = int(rng.integers(25, 40))
        share = rng.uniform(0.05, 0.8) if infected[p] else 0.0
        labels = (rng.random(n) < share).astype(np.int32)
        labels[0] = int(infected[p])  # an infected patient has a parasitized crop
        crops[p] = labels
    tests = [patients[k::5] for k in range(5)]
    for k in range(5):
        others = [p for p in patients if p not in tests[k]]
        val = [p for p in others if infected[p]][:4] + [p for p in others if not infected[p]][:2]
        for recipe in verdict_cv.RECIPES:
            rows = {c: [] for c in ("split", "name", "slide_id", "label", "log_odds")}
            for split, chosen in (("validation", val), ("test", tests[k])):
                for p in chosen:
                    labels = crops[p]
                    rows["split"] += [split] * len(labels)
                    rows["name"] += [f"{p}_cell_{i}.png" for i in range(len(labels))]
                    rows["slide_id"] += [p] * len(labels)
                    rows["label"] += list(labels)
                    rows["log_odds"] += list(
                        np.where(labels == 1, 5.0, -4.0) + rng.normal(0, 1.0, len(labels))
                    )
            np.savez_compressed(
                os.path.join(folder, f"{recipe}_fold_{k}.npz"),
                split=np.array(rows["split"]),
                name=np.array(rows["name"]),
                slide_id=np.array(rows["slide_id"]),
                label=np.array(rows["label"], np.int32),
                log_odds=np.array(rows["log_odds"], np.float32),
                prob=1 / (1 + np.exp(-np.array(rows["log_odds"], np.float32))),
            )


def test_choose_test_table(tmp_path, monkeypatch, capsys):
    outputs, results = tmp_path / "outputs", tmp_path / "results"
    outputs.mkdir()
    _fake_outputs(outputs, np.random.default_rng(0))
    args = [f"--outputs={outputs}", f"--results={results}"]

    seen = []
    load = verdict_cv.load_fold
    monkeypatch.setattr(
        verdict_cv, "load_fold", lambda k, split, *a: seen.append(split) or load(k, split, *a)
    )
    verdict_cv.main(["choose", *args])
    assert set(seen) == {"validation"}  # choose never loads a test output
    choice = json.loads((results / "choice.json").read_text())
    assert (choice["chosen"]["candidate"], choice["chosen"]["scores"]) in verdict_cv.PREFERENCE
    assert len(choice["leave_one_patient_out"]) == len(verdict_cv.PREFERENCE)

    with pytest.raises(SystemExit, match="another protocol"):  # a choice of other members
        verdict_cv.main(["test", *args, "--recipes=mixup"])
    verdict_cv.main(["test", *args])
    record = json.loads((results / "test_folds.json").read_text())
    pooled = record["pairs"]["fraction/plain"]["pooled"]
    assert pooled["accuracy"]["n"] == 30  # every patient once, pooled over the five test folds
    assert pooled["sensitivity"]["n"] == 20
    with pytest.raises(SystemExit, match="read once"):
        verdict_cv.main(["test", *args])

    capsys.readouterr()
    verdict_cv.main(["table", *args])
    table = capsys.readouterr().out
    assert "(chosen)" in table and "5,000 crops" in table


def test_members_must_hold_the_same_crops(tmp_path):
    _fake_outputs(tmp_path, np.random.default_rng(1))
    path = tmp_path / f"{verdict_cv.RECIPES[1]}_fold_0.npz"
    d = dict(np.load(path))
    d["name"] = d["name"][::-1]
    np.savez_compressed(path, **d)
    with pytest.raises(ValueError, match="name columns differ"):
        verdict_cv.load_fold(0, "validation", str(tmp_path))


def test_the_committed_records_are_what_the_commands_give(tmp_path):
    """choose and test recomputed from the committed fold outputs equal the committed records."""
    committed = verdict_cv.RESULTS
    verdict_cv.main(["choose", f"--results={tmp_path}"])
    for name in ("choice.json", "test_folds.json"):
        if name == "test_folds.json":
            verdict_cv.main(["test", f"--results={tmp_path}"])
        ours = json.loads((tmp_path / name).read_text())
        with open(os.path.join(committed, name)) as f:
            theirs = json.load(f)
        assert ours == theirs, name


def test_the_shipped_rule_is_the_chosen_one_fitted_on_its_validation_slides():
    from mnres.metrics import verdict_fitting
    from mnres.weights import shipped

    with open(os.path.join(verdict_tables.shipped_origin()["verdicts"], "choice.json")) as f:
        chosen = json.load(f)["chosen"]
    record = json.loads((shipped.shipped_folder() / "verdict_rule.json").read_text())
    assert (record["candidate"], record["scores"]) == (chosen["candidate"], chosen["scores"])
    assert chosen["candidate"] == verdict_fitting.DEFAULT_CANDIDATE
    assert chosen["scores"] == verdict_fitting.DEFAULT_SCORES
    with np.load(verdict_cv.SHIPPED_OUTPUTS) as d:
        refit = verdict_fitting.rule_record(
            d["prob"], d["label"], d["slide_id"], candidate=chosen["candidate"],
            scores=chosen["scores"], train_prevalence=record["train_prevalence"],
            fitted_on=record["fitted_on"]["what"],
        )  # fmt: skip
    assert json.loads(json.dumps(refit)) == record


def test_ship_fits_the_pair_chosen_in_the_records_origin_names(tmp_path, monkeypatch):
    """Without --results, ship reads the choice of the records origin.json names, not the first
    search's default."""
    from mnres.weights import shipped

    record_dir, folder = tmp_path / "malaria_model", tmp_path / "shipped"
    record_dir.mkdir()
    folder.mkdir()
    results = tmp_path / "experiments" / "results" / "verdicts" / "later"
    results.mkdir(parents=True)
    (record_dir / "origin.json").write_text(
        json.dumps({"search": "unused", "verdicts": "experiments/results/verdicts/later"})
    )
    chosen = {"candidate": "count", "scores": "plain"}  # not the first search's pair
    (results / "choice.json").write_text(json.dumps({"chosen": chosen}))
    rng = np.random.default_rng(2)
    labels = np.repeat([1, 0, 1, 0], 30).astype(np.int32)
    outputs = {
        "slide_id": np.repeat(["A", "B", "C", "D"], 30),
        "label": labels,
        "prob": np.clip(labels * 0.9 + rng.normal(0.05, 0.05, labels.size), 0, 1),
    }
    monkeypatch.setattr(verdict_tables, "ORIGIN_JSON", str(record_dir / "origin.json"))
    monkeypatch.setattr(verdict_tables, "_REPO", str(tmp_path))
    monkeypatch.setattr(verdict_cv, "shipped_validation_outputs", lambda data_dir: outputs)
    monkeypatch.setattr(shipped, "shipped_card", lambda: {"evaluation": {"train_prevalence": 0.5}})
    monkeypatch.setattr(shipped, "shipped_folder", lambda: folder)
    verdict_cv.main(["ship", "--data_dir=unused"])
    record = json.loads((folder / "verdict_rule.json").read_text())
    assert (record["candidate"], record["scores"]) == ("count", "plain")
