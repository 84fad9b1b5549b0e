"""A run's report: report.json built once (`build_report`, for training and ensemble runs
alike) and report.md beside it. The metrics are computed in `mnres.metrics` and
`mnres.metrics.multiclass`; the plots are drawn by `mnres.reporting.plots`; the file names are
`mnres.run_folder`'s.
"""

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from mnres import metrics, provenance, run_folder
from mnres.config.schema import MALARIA_CLASSES
from mnres.data.splits import class_names_of
from mnres.metrics import calibration, multiclass
from mnres.reporting.plots import plot_reliability

_CELL_ROWS = [
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("precision", "Precision"),
    ("recall", "Recall (sensitivity)"),
    ("specificity", "Specificity"),
    ("f1", "F1"),
    ("mcc", "MCC"),
    ("auc", "ROC AUC"),
    ("ece", "ECE"),
    ("loss", "Loss"),
    ("n", "Cells"),
]
_PATIENT_ROWS = [
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("auc", "ROC AUC (fraction as score)"),
    ("n_patients", "Patients"),
    ("n_infected", "Infected patients"),
    ("fraction_threshold", "Fraction threshold (from validation)"),
]


def _fmt(value):
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _metric_table(sections, rows):
    """A metric x split table over the sections present (e.g. validation, test)."""
    names = [name for name in sections if sections[name]]
    body = [
        [label] + [sections[name].get(key) for name in names]
        for key, label in rows
        if any(key in sections[name] for name in names)
    ]
    return _table(["Metric"] + names, body)


_CLASS_ROWS = [
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy (mean recall)"),
    ("macro_precision", "Macro precision"),
    ("macro_recall", "Macro recall"),
    ("macro_f1", "Macro F1"),
    ("auc", "ROC AUC (macro, one vs rest)"),
    ("loss", "Loss"),
    ("n", "Images"),
]


def _confusion_table(cm, unit, class_names=MALARIA_CLASSES):
    return _table(
        [f"{unit}: true / predicted", *class_names],
        [[name, *row] for name, row in zip(class_names, cm, strict=True)],
    )


def class_names(report) -> tuple[str, ...]:
    """The classes of a report, in label order: `data.class_names`, else the malaria pair."""
    names = (report.get("data") or {}).get("class_names")
    return tuple(names) if names else MALARIA_CLASSES


def _markdown(report, pngs):
    """report.md: the sections of `report` present, then links to the plots `pngs`."""
    lines = ["# Report", ""]
    config = report.get("config") or {}
    model = config.get("model") if isinstance(config, dict) else None
    if isinstance(model, dict) and model.get("name"):
        lines += [
            f"Model: `{model['name']}`" + (f", alpha {model['alpha']}" if "alpha" in model else ""),
            "",
        ]
    # A model that did not learn says so first, before any figure is read.
    lines += [f"> **Warning:** {w}\n" for w in report.get("warnings") or []]
    if not run_folder.has_test_split(report):
        lines += [
            "No test split: every slide but the validation slides trained the model, and the "
            "validation slides chose its checkpoint and fitted its calibration, so no figure "
            "here is held out. A final run's held-out figures come from cross-validation of "
            "its recipe.",
            "",
        ]
    lines += _cell_section(report) + _patient_section(report) + _calibration_section(report)
    for section in ("data", "training", "timing"):
        # Flat key/value sections only; nested ones stay in report.json.
        items = report.get(section)
        if isinstance(items, dict) and items:
            rows = [
                [k, f"{v:g}" if isinstance(v, float) else v]
                for k, v in items.items()
                if not isinstance(v, dict | list)
            ]
            lines += [f"## {section.capitalize()}", ""] + _table(["", "value"], rows) + [""]
    lines += _provenance_section(report.get("provenance"))
    if pngs:
        lines += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})\n" for p in pngs] + [""]
    return "\n".join(lines)


def _provenance_section(provenance):
    """What produced the figures: versions, commit, devices, CPU (the rest is in report.json)."""
    if not isinstance(provenance, dict):
        return []
    versions = provenance.get("versions") or {}
    git = provenance.get("git") or {}
    devices = provenance.get("devices") or {}
    cpu = provenance.get("cpu") or {}
    commit = git.get("commit")
    rows = [
        ["versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)],
        ["commit", f"{commit}{' (uncommitted changes)' if git.get('dirty') else ''}" if commit
         else "not a git checkout"],
        ["devices", f"{devices.get('count')} x {devices.get('kind')} ({devices.get('platform')})"],
        ["CPU", f"{cpu.get('model')}; {' '.join(cpu.get('vector_flags') or [])}"],
        ["XLA_FLAGS", provenance.get("xla_flags") or "(none)"],
        ["manifest sha256", provenance.get("manifest_sha256")],
    ]  # fmt: skip
    return ["## Provenance", ""] + _table(["", "value"], rows) + [""]


def _cell_section(report):
    test = report.get("test") or {}
    cells = {"validation": report.get("validation"), "test": test}
    if not any(cells.values()):
        return []
    names = class_names(report)
    if len(names) > 2:
        return _class_section(cells, names)
    malaria = names == MALARIA_CLASSES
    unit = "cells" if malaria else "images"
    threshold = test.get("threshold", (report.get("validation") or {}).get("threshold"))
    lines = ["## Cell level" if malaria else "## Image level", ""]
    if threshold is not None:
        called = "A cell is called" if malaria else "An image is called"
        lines += [f"{called} {names[1]} iff P({names[1]}) >= {threshold}.", ""]
    rows = _CELL_ROWS if malaria else [*_CELL_ROWS[:-1], ("n", "Images")]
    lines += _metric_table(cells, rows) + [""]
    if test.get("confusion_matrix"):
        lines += [f"Test confusion matrix ({unit}):", ""]
        lines += _confusion_table(test["confusion_matrix"], unit, names) + [""]
    return lines


def _class_section(cells, names):
    """The image-level section of a run of more than two classes."""
    test = cells["test"]
    lines = ["## Image level", "", "Each image is called its most probable class.", ""]
    lines += _metric_table(cells, _CLASS_ROWS) + [""]
    if test.get("per_class"):
        lines += ["Test, per class:", ""]
        lines += _table(
            ["Class", "Images", "Called", "Precision", "Recall", "F1", "ROC AUC (one vs rest)"],
            [[c["class"], c["n"], c["n_predicted"], c["precision"], c["recall"], c["f1"],
              c["auc"]] for c in test["per_class"]],
        )  # fmt: skip
        lines += [""]
    if test.get("confusion_matrix"):
        lines += ["Test confusion matrix (images):", ""]
        lines += _confusion_table(test["confusion_matrix"], "images", names) + [""]
    return lines


def _patient_section(report):
    patients = {"validation": report.get("validation_patient"), "test": report.get("test_patient")}
    if not any(patients.values()):
        return []
    test_patient = patients["test"] or {}
    lines = ["## Patient level", ""]
    lines += [
        "Each slide is one patient, infected iff it holds a parasitized cell; a patient is "
        "called infected iff the fraction of its cells called parasitized exceeds the "
        "fraction threshold, chosen on the validation split.",
        "",
    ]
    lines += _metric_table(patients, _PATIENT_ROWS) + [""]
    if test_patient.get("confusion_matrix"):
        lines += _confusion_table(test_patient["confusion_matrix"], "patients") + [""]
    if test_patient.get("per_slide_accuracy"):
        acc = test_patient["per_slide_accuracy"]
        lines += [
            f"Per-slide cell accuracy (test): min {_fmt(acc['min'])}, median "
            f"{_fmt(acc['median'])}, max {_fmt(acc['max'])}.",
            "",
        ]
    if test_patient.get("errors") is not None:
        errors = ", ".join(f"`{e}`" for e in test_patient["errors"]) or "none"
        lines += [f"Misclassified patients (test): {errors}.", ""]
    if test_patient.get("slides"):
        lines += ["### Test slides", ""]
        lines += _table(
            ["Slide", "Cells", "True fraction", "Predicted fraction", "Accuracy", "Infected",
             "Called infected"],
            [
                [s["slide_id"], s["n_cells"], s["true_fraction"], s["predicted_fraction"],
                 s["accuracy"], s["infected"], s.get("predicted_infected")]
                for s in test_patient["slides"]
            ],
        )  # fmt: skip
        lines += [""]
    return lines


def _calibration_section(report):
    calibrated = report.get("calibration")
    if not calibrated:
        return []
    fitted = f"Temperature {_fmt(calibrated['temperature'])} (fitted on validation)"
    tested = "ece_before" in calibrated  # a run without a test split has no test figures
    ece = (
        f"{_fmt(calibrated['ece_before'])} before scaling, {_fmt(calibrated['ece_after'])} after"
        if tested
        else ""
    )
    if "threshold_at_spec_95" not in calibrated:  # more than two classes: no operating points
        on_test = f"; test top-label ECE {ece}" if tested else ""
        return ["## Calibration", "", f"{fitted}{on_test} (`calibration.json`).", ""]
    positive = class_names(report)[1]
    lines = ["## Calibration and operating points", ""]
    if not tested:
        lines += [
            f"{fitted}. Thresholds on P({positive}) chosen for 95% and 98% validation "
            "specificity (`calibration.json`; `python -m mnres predict RUN ... "
            "--operating-point spec95`): spec 95% "
            f"{_fmt(calibrated['threshold_at_spec_95'])}, spec 98% "
            f"{_fmt(calibrated['threshold_at_spec_98'])}.",
            "",
        ]
        return lines
    lines += [
        f"{fitted}; test ECE {ece}. Thresholds on P({positive}) chosen for 95% and 98% "
        "validation specificity, and what they reach on test (`calibration.json`; "
        "`python -m mnres predict RUN ... --operating-point spec95`):",
        "",
    ]
    lines += _table(
        ["Operating point", "Threshold", "Test sensitivity", "Test specificity"],
        [
            [f"spec {p}%", calibrated[f"threshold_at_spec_{p}"],
             calibrated[f"sensitivity_at_spec_{p}"], calibrated[f"specificity_at_spec_{p}"]]
            for p in (95, 98)
        ],
    )  # fmt: skip
    return lines + [""]


def build_report(config, ds, figures: Mapping, calibrated: dict | None, sections: Mapping) -> dict:
    """The report of a run (report.json), a training run's or an ensemble's.

    Args:
      config: the run's resolved config (config.json).
      ds: the run's `mnres.data.Dataset`: sizes, classes and manifest.
      figures: `figures` of the evaluated outputs (validation, test, test_patient).
      calibrated: the `mnres.metrics.calibration.calibrate` record; None without validation.
      sections: what only the caller knows: model, training, history, warnings (and an
        ensemble's slide_prior and members).

    Returns:
      The config, data, figures, calibration summary and provenance, with `sections`.
    """
    result = {
        "config": config.to_dict(),
        "data": data_section(config, ds),
        **figures,
        **sections,
    }
    if calibrated:
        result["calibration"] = calibration.report_summary(calibrated)
    # Versions, commit, device, CPU instruction sets, XLA flags, manifest hash: mnres.provenance.
    result["provenance"] = provenance.collect(manifest=ds.manifest)
    return result


def data_section(config, ds) -> dict:
    """report.json's "data": source, image size, the split rule and the split sizes."""
    section = {
        "source": config.data.source,
        "image_size": int(config.data.image_size),
        # 'auto' is reported as the rule it chose (the manifest's).
        "split_by": ds.manifest.get("split_by")
        if config.data.split_by == "auto"
        else config.data.split_by,
        "num_train": len(ds.train),
        "num_validation": len(ds.validation),
        "num_test": len(ds.test),
    }
    names = class_names_of(ds)
    if tuple(names) != MALARIA_CLASSES:  # the malaria pair is implied, as in the manifest
        section["class_names"] = list(names)
    return section


def figures(ds, val: dict | None, test: dict | None) -> dict:
    """The cell figures of validation and test (None without the split), and the test patients
    (two classes; None otherwise), from a split's outputs {labels, probs or logits, loss}."""
    names = class_names_of(ds)
    return {
        "validation": cell_metrics(val, names) if val else None,
        "test": cell_metrics(test, names) if test else None,
        "test_patient": test_patient_metrics(ds, val, test) if len(names) == 2 else None,
    }


def cell_metrics(outputs: dict, class_names) -> dict:
    """`metrics.binary_metrics` of a split's outputs (`multiclass.classification_metrics` for
    more than two classes), with its mean loss."""
    if "probs" in outputs:
        found = metrics.binary_metrics(outputs["labels"], outputs["probs"])
    else:
        probs = multiclass.softmax(outputs["logits"])
        found = multiclass.classification_metrics(outputs["labels"], probs, class_names)
    return {**found, "loss": outputs["loss"]}


def test_patient_metrics(ds, val: dict | None, test: dict | None) -> dict | None:
    """Patient-level test metrics, the fraction threshold chosen on validation; None when the
    slide ids are unknown (tfds) or there is no validation or no test split."""
    known = lambda split: len(split) and all(s for s in split.slide_ids)
    if not (val and test and known(ds.validation) and known(ds.test)):
        return None
    fraction = metrics.choose_fraction_threshold(
        val["labels"], val["probs"], ds.validation.slide_ids
    )
    return metrics.patient_metrics(test["labels"], test["probs"], ds.test.slide_ids, fraction)


def write_report(workdir: str | os.PathLike[str], report: Mapping[str, Any]) -> None:
    """Writes ``report.json`` (the dict, as plain JSON) and a readable ``report.md`` to workdir.

    Args:
      workdir: the run directory; created if missing.
      report: nested dict, e.g. {'test': metrics.binary_metrics(...), 'test_patient':
        metrics.patient_metrics(...), 'validation': ..., 'validation_patient': ..., 'config':
        ..., 'timing': {...}}; every key is optional. Numpy values and ConfigDicts are
        converted; non-finite floats become null. report.md links the PNGs already in workdir,
        so write the plots first.
    """
    os.makedirs(workdir, exist_ok=True)
    report = run_folder.to_json_types(report)
    run_folder.write_report(workdir, report, _markdown(report, run_folder.plot_files(workdir)))


def write_run_calibration(workdir: str, record: dict, test_labels, test_logits) -> str:
    """Writes a run's ``calibration.json`` and reliability diagrams of its test split.

    Args:
      workdir: the run folder.
      record: from `mnres.metrics.calibration.calibrate`.
      test_labels, test_logits: the test split's labels and logits [N, K] (or log-odds [N]).

    Returns:
      The path of calibration.json.
    """
    path = run_folder.write_calibration(workdir, record)
    binary = np.ndim(test_logits) == 1 or np.shape(test_logits)[1] == 2
    for temperature, name in (
        (1.0, run_folder.RELIABILITY_UNCALIBRATED_PNG),
        (record["temperature"], run_folder.RELIABILITY_CALIBRATED_PNG),
    ):
        # Two classes: P(class 1), as before; K classes: the softmax rows [N, K].
        scale = calibration.calibrated_probs if binary else calibration.calibrated_class_probs
        probs = scale(test_logits, temperature)
        plot_reliability(test_labels, probs, os.path.join(workdir, name))
    return path
