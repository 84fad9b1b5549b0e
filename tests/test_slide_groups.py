"""Slides in predict: grouped by NIH name or by folder, each with a verdict under a stored rule."""

import collections
import json
import os
import shutil

import numpy as np
import pytest

from mnres import run_folder
from mnres.data import folders, sample
from mnres.deploy import slides
from mnres.metrics import verdict_fitting, verdicts

RULE = verdicts.VerdictRule("binomial", sensitivity=0.9, false_positive_rate=0.01, min_cells=20,
                            q=0.9, alpha=0.01)  # fmt: skip


def _record(scores="plain"):
    fpr = {"false_positive_rate": 0.01, "low": 0.005, "high": 0.02, "crops": 900, "q": 0.9,
           "confident": 9}  # fmt: skip
    return {"rule": RULE.to_dict(), "candidate": "binomial", "scores": scores,
            "train_prevalence": 0.5, "false_positive_rate": fpr}  # fmt: skip


def _rows(files, probs):
    return [{"file": f, "slide_id": "", "label": None, "prob_parasitized": float(p), "error": None}
            for f, p in zip(files, probs, strict=True)]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("smears/patient_7/Parasitized/a.png", "smears/patient_7"),
        ("smears/patient_7/UNINFECTED/a.png", "smears/patient_7"),
        ("smears/patient_7/a.png", "smears/patient_7"),
        ("Parasitized/a.png", "."),
        ("a.png", "."),
    ],
)
def test_folder_slide_is_the_nearest_folder_that_is_not_a_class_folder(path, expected):
    assert slides.folder_slide(path) == expected


def test_group_by_name_folder_auto_none():
    files = ["s/x/Parasitized/C39P4thin_original_IMG_1_cell_1.png", "s/y/Uninfected/crop_2.png"]
    for how, expected in [("name", ["C39P4", ""]), ("folder", ["s/x", "s/y"]),
                          ("auto", ["C39P4", "s/y"]), ("none", ["", ""])]:  # fmt: skip
        rows = _rows(files, [0.5, 0.5])
        slides.group(rows, how)
        assert [r["slide_id"] for r in rows] == expected, how
    with pytest.raises(ValueError, match="--group-by"):
        slides.group(rows, "patient")


def test_folder_grouping_equals_name_grouping_on_the_same_crops():
    rng = np.random.default_rng(0)
    names, folders, probs = [], [], []
    for i, slide in enumerate(["C101P62", "C13N", "C55P16"]):
        for j in range(30 + 10 * i):
            label = "Parasitized" if j < 3 * i else "Uninfected"
            names.append(f"cells/{label}/{slide}ThinF_IMG_2015_cell_{j}.png")
            folders.append(f"mine/patient_{i}/{label}/crop_{j}.png")  # anonymous names
            probs.append(rng.uniform(0.9, 1.0) if j < 3 * i else rng.uniform(0.0, 0.3))
    by_name, by_folder = _rows(names, probs), _rows(folders, probs)
    slides.group(by_name, "auto")
    slides.group(by_folder, "auto")
    a = slides.slide_rows(by_name, _record())
    b = slides.slide_rows(by_folder, _record())
    drop = lambda r: {k: v for k, v in r.items() if k != "slide_id"}
    assert [drop(r) for r in a] == [drop(r) for r in b]
    assert [r["verdict"] for r in a] == ["not infected", "infected", "infected"]


def test_a_slide_of_three_crops_is_insufficient_and_says_why():
    rows = _rows([f"C1_thinF_cell_{i}.png" for i in range(3)], [0.99, 0.99, 0.99])
    slides.group(rows)
    (row,) = slides.slide_rows(rows, _record())
    assert row["verdict"] == "insufficient" and "3 crop(s) read" in row["reason"]
    assert "insufficient" in "\n".join(slides.format_slides([row]))


def test_prior_scores_move_the_verdict_and_only_with_a_prevalence():
    probs = [0.95] * 2 + [0.2] * 38  # two confident crops of 40
    rows = _rows([f"C1_thinF_cell_{i}.png" for i in range(40)], probs)
    slides.group(rows)
    plain = slides.slide_rows(rows, _record("plain"))[0]
    prior = slides.slide_rows(rows, _record("prior"))[0]
    assert plain["confident"] == 2 and prior["confident"] < 2  # the prior lowers a light slide
    assert [r["prob_parasitized"] for r in rows] == probs  # the crops' own p are not moved
    with pytest.raises(ValueError, match="training prevalence"):
        verdict_fitting.rule_record(np.r_[probs, probs], np.r_[[1] * 40, [0] * 40],
                                    ["a"] * 40 + ["b"] * 40, scores="prior")  # fmt: skip


def test_without_a_rule_slides_have_counts_and_no_verdict():
    rows = _rows([f"C1_thinF_cell_{i}.png" for i in range(4)], [0.9, 0.1, 0.2, 0.7])
    slides.group(rows)
    (row,) = slides.slide_rows(rows, None)
    assert row["verdict"] is None and row["called"] == 2 and row["cells"] == 4
    assert "no verdict rule" in slides.format_slides([row])[-1]


def test_a_rule_is_read_beside_an_exported_file_and_a_broken_one_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    model = run / "export" / "model.tflite"
    model.write_bytes(b"")
    assert slides.load_rule(str(model)) is None
    run_folder.write_json(run / run_folder.VERDICT_RULE_JSON, _record())
    assert slides.load_rule(str(model))["rule"] == RULE.to_dict()
    broken = dict(_record(), rule=dict(RULE.to_dict(), alpha=None))
    run_folder.write_json(run / run_folder.VERDICT_RULE_JSON, broken)
    with pytest.raises(ValueError, match="needs alpha"):
        slides.load_rule(str(run))


def test_rule_record_fits_on_validation_crops_and_round_trips():
    rng = np.random.default_rng(1)
    probs, labels, ids = [], [], []
    for s in range(12):
        n, share = 60, (0.0 if s < 4 else 0.05 + 0.05 * s)
        y = (rng.random(n) < share).astype(int)
        y[0] = int(share > 0)
        probs += list(np.where(y == 1, rng.uniform(0.85, 1, n), rng.beta(1, 30, n)))
        labels += list(y)
        ids += [f"S{s}"] * n
    record = verdict_fitting.rule_record(probs, labels, ids, train_prevalence=0.5)
    rule = verdicts.VerdictRule.from_dict(json.loads(json.dumps(record))["rule"])
    assert record["candidate"] == verdict_fitting.DEFAULT_CANDIDATE
    assert record["fitted_on"]["slides"] == 12 and record["fitted_on"]["infected_slides"] == 8
    assert rule.false_positive_rate == pytest.approx(
        record["false_positive_rate"]["high"] if record["candidate"] == "binomial_upper"
        else record["false_positive_rate"]["false_positive_rate"])  # fmt: skip
    assert slides.describe(record).startswith("infected iff")


def test_predict_groups_a_users_folders_and_gives_verdicts(tmp_path, capsys):
    """The shipped model on NIH-named crops and on the same crops in anonymous slide folders."""
    from mnres.__main__ import main
    from mnres.data import sample

    cells = sorted(sample.sample_cells())[:40]
    mine = tmp_path / "mine"
    for i, path in enumerate(cells):
        slide = os.path.basename(path).split("_")[0].split("thin")[0].split("ThinF")[0]
        label = os.path.basename(os.path.dirname(path))
        (mine / slide / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, mine / slide / label / f"crop_{i}.png")
    assert main(["predict", *cells, "--json", "--quiet"]) == 0
    by_name = json.loads(capsys.readouterr().out)["slides"]
    assert main(["predict", str(mine), "--json", "--quiet"]) == 0
    by_folder = json.loads(capsys.readouterr().out)["slides"]
    assert [s["slide_id"] for s in by_name] == [os.path.basename(s["slide_id"])
                                               for s in by_folder]  # fmt: skip
    drop = lambda r: {k: v for k, v in r.items() if k != "slide_id"}
    assert [drop(s) for s in by_name] == [drop(s) for s in by_folder]


def test_a_run_writes_its_rule_only_when_its_validation_slides_can_fit_one(tmp_path, caplog):
    from types import SimpleNamespace

    from mnres.training import final_evaluation

    rng = np.random.default_rng(2)
    ids = np.repeat([f"S{i}" for i in range(6)], 30)
    labels = np.where(np.isin(ids, ["S0", "S1"]), 0, (rng.random(ids.size) < 0.3).astype(int))
    labels[np.isin(ids, ["S2", "S3", "S4", "S5"]) & (np.arange(ids.size) % 30 == 0)] = 1
    val = {"probs": np.where(labels == 1, 0.95, 0.05), "labels": labels}
    path = tmp_path / run_folder.VERDICT_RULE_JSON
    final_evaluation.write_verdict_rule(str(tmp_path), SimpleNamespace(slide_ids=ids), val, 0.5,
                                        "test")  # fmt: skip
    assert run_folder.read_json(path)["fitted_on"]["slides"] == 6
    path.unlink()
    sick = {"probs": val["probs"][60:], "labels": labels[60:]}  # no uninfected patient left
    final_evaluation.write_verdict_rule(str(tmp_path), SimpleNamespace(slide_ids=ids[60:]), sick,
                                        0.5, "test")  # fmt: skip
    assert not path.exists() and "no crop of an uninfected patient" in caplog.text
    final_evaluation.write_verdict_rule(str(tmp_path), SimpleNamespace(slide_ids=[""] * 180), val,
                                        0.5, "test")  # fmt: skip
    assert not path.exists()


def test_the_bundled_sample_slides_are_insufficient_and_predict_says_why(capsys):
    from mnres.__main__ import main

    assert main(["predict", "--sample", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict_rule"]["candidate"] == verdict_fitting.DEFAULT_CANDIDATE
    assert out["slides"] and all(s["verdict"] == "insufficient" for s in out["slides"])
    assert all("the rule needs 20 or more" in s["reason"] for s in out["slides"])
    assert main(["predict", "--sample", "--quiet"]) == 0
    text = capsys.readouterr().out
    most = max(collections.Counter(folders.slide_id(p) for p in sample.sample_cells()).values())
    assert f"slide(s) insufficient, no verdict: {most} crop(s) at most" in text
