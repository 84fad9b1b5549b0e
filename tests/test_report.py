"""report.json / report.md writing, metrics.jsonl reading and the plots (valid PNGs)."""

import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mnres import metrics, run_folder
from mnres.reporting import plots, report


def _predictions(seed=0, n=300):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    probs = np.clip(0.6 * labels + rng.normal(0.2, 0.2, n), 0.0, 1.0)
    slides = np.array([f"C{i % 7}P{i % 7}" if i % 7 < 4 else f"C{i % 7}NP" for i in range(n)])
    labels[np.char.endswith(slides, "NP")] = 0  # Uninfected patients have no parasitized cell.
    return labels, probs, slides


def _history(n_epochs=5):
    return [
        {
            "epoch": e,
            "train_loss": 0.7 / e,
            "train_accuracy": 1 - 0.3 / e,
            "val_loss": 0.75 / e,
            "val_accuracy": 1 - 0.35 / e,
            "learning_rate": 1e-3,
            "images_per_sec": 100.0,
        }
        for e in range(1, n_epochs + 1)
    ]


def _assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 200 and image.size[1] > 200
        image.verify()


def test_write_report_json_and_markdown(tmp_path):
    labels, probs, slides = _predictions()
    t = metrics.choose_fraction_threshold(labels, probs, slides)
    test = metrics.binary_metrics(labels, probs)
    test["ece"] = metrics.expected_calibration_error(labels, probs)
    config = ml_collections.ConfigDict({"model": {"name": "mobilenet_v2", "alpha": 0.35}})
    cm_png = tmp_path / run_folder.CONFUSION_MATRIX_PNG
    plots.plot_confusion_matrix(test["confusion_matrix"], cm_png)
    report.write_report(
        tmp_path,
        {
            "test": test,
            "test_patient": metrics.patient_metrics(labels, probs, slides, t),
            "validation": metrics.binary_metrics(labels[:100], probs[:100]),
            "config": config,
            "timing": {"train_seconds": np.float32(12.5), "steps": np.int64(40)},
            "training": {"platform": "cpu", "devices": 1},
            "history": _history(2),
            "nan": float("nan"),
        },
    )
    written = json.loads((tmp_path / "report.json").read_text())
    for key in ("accuracy", "precision", "recall", "specificity", "f1", "auc", "mcc"):
        assert written["test"][key] == pytest.approx(test[key])
    assert written["test"]["confusion_matrix"] == test["confusion_matrix"]
    assert written["test_patient"]["n_patients"] == 7
    assert written["config"]["model"]["name"] == "mobilenet_v2"
    assert written["timing"] == {"train_seconds": 12.5, "steps": 40}
    assert written["nan"] is None
    md = (tmp_path / "report.md").read_text()
    assert "| Accuracy |" in md and "| ROC AUC |" in md and "| MCC |" in md
    assert "| Metric | validation | test |" in md
    assert "## Patient level" in md and "C0P0" in md and "C6NP" in md
    assert "![confusion_matrix](confusion_matrix.png)" in md
    assert "Model: `mobilenet_v2`, alpha 0.35" in md
    assert "## Training" in md and "| platform | cpu |" in md and "| train_seconds | 12.5 |" in md
    assert written["history"][1]["epoch"] == 2


def test_write_report_minimal_and_undefined(tmp_path):
    # No patients, no validation, an undefined AUC: still a readable report.
    report.write_report(tmp_path / "new", {"test": metrics.binary_metrics([0, 0], [0.2, 0.7])})
    written = json.loads((tmp_path / "new" / "report.json").read_text())
    assert written["test"]["auc"] is None
    md = (tmp_path / "new" / "report.md").read_text()
    assert "| ROC AUC | n/a |" in md and "Patient level" not in md


def test_read_history(tmp_path):
    rows = _history(3)
    lines = [json.dumps(r) for r in rows]
    # A resumed run repeats epoch 3, then dies mid-line.
    lines += [json.dumps({**rows[2], "val_accuracy": 0.99}), '{"epoch": 4, "train_lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    history = run_folder.read_history(tmp_path)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[2]["val_accuracy"] == 0.99
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(json.JSONDecodeError):
        run_folder.read_history(tmp_path)


def test_plots_are_valid_pngs(tmp_path):
    labels, probs, _ = _predictions()
    cm = metrics.binary_metrics(labels, probs)["confusion_matrix"]
    plots.plot_history(_history(), tmp_path / "history.png")
    plots.plot_confusion_matrix(cm, tmp_path / "confusion_matrix.png")
    plots.plot_roc(labels, probs, tmp_path / "roc.png")
    plots.plot_reliability(labels, probs, tmp_path / "sub" / "reliability.png")
    for name in ("history.png", "confusion_matrix.png", "roc.png", "sub/reliability.png"):
        _assert_png(tmp_path / name)


def test_plots_survive_edge_cases(tmp_path):
    # One class absent, a single epoch without validation, an empty class row.
    plots.plot_roc([1, 1, 1], [0.2, 0.6, 0.9], tmp_path / "roc.png")
    plots.plot_reliability([1, 1, 1], [0.5, 0.5, 0.5], tmp_path / "reliability.png")
    plots.plot_history([{"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.8}], tmp_path / "h.png")
    plots.plot_history([], tmp_path / "empty.png")
    plots.plot_confusion_matrix([[0, 0], [3, 5]], tmp_path / "cm.png")
    for name in ("roc.png", "reliability.png", "h.png", "empty.png", "cm.png"):
        _assert_png(tmp_path / name)


def test_report_md_leads_with_warnings_and_names_its_provenance(tmp_path):
    from mnres import provenance

    warning = "The model gave one output for every validation crop (p = 0.5215)."
    record = provenance.collect(manifest={"num_train": 3})
    report.write_report(
        tmp_path,
        {
            "test": metrics.binary_metrics([0, 1], [0.2, 0.7]),
            "warnings": [warning],
            "provenance": record,
        },
    )
    text = (tmp_path / "report.md").read_text()
    assert text.index(warning) < text.index("## Cell level")  # read before any figure
    assert f"jax {record['versions']['jax']}" in text
    assert record["manifest_sha256"] in text
    assert f"{record['devices']['count']} x {record['devices']['kind']}" in text
