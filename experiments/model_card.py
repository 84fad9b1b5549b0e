"""The shipped model's card, built from its training run's record: JSON and a docs page.

`build` is a pure function of the committed records (the run's report and manifest, its
validation outputs, the recipe's cross-validation test folds, the maintainers' independent
evaluation), the shipped files (calibration, verdict rule, int8 sidecar, hashes) and the
bundled sample's names; `markdown` (experiments.model_card_page) renders the page. Both are
written by `python -m experiments.package_model --card_only`, and a test regenerates them and
compares.
"""

from __future__ import annotations

import shlex

from experiments import model_card_figures as figures
from experiments.model_card_page import markdown
from mnres import run_folder
from mnres.weights import shipped

# Every shipped file but the card, which holds their hashes.
HASHED_FILES = tuple(name for name in shipped.SHIPPED_FILES if name != shipped.CARD_JSON)
# The bundled crops come from the training slides: a demo and a check of the shipped files, not
# an accuracy figure (the test slides give those, and stay unused for anything else).
SAMPLE_SPLIT = "train"
__all__ = ["HASHED_FILES", "build", "markdown"]

LICENSE = "apache-2.0"  # the weights ship inside mnres, under its licence
DEVELOPERS = "the mnres maintainers"
INTENDED_USE = (
    "Research and teaching: classifying single red-blood-cell crops from Giemsa-stained thin "
    "blood smears (the NIH malaria cell-image set's imaging) as parasitized or uninfected, and "
    "a starting point for fine-tuning on other cell crops."
)
OUT_OF_SCOPE = (
    "Diagnosing, screening for, treating or ruling out malaria in a person, or any other "
    "clinical decision.",
    "Whole slides or microscope fields: the model reads crops of single cells segmented "
    "upstream; it does not find cells.",
    "Thick smears, other stains, microscopes or cameras, and crops cut by another segmentation "
    "than the NIH set's: none was measured.",
    "Estimating a patient's parasitaemia: the fraction it reports is the share among the crops "
    "given, and the NIH release is a class-balanced selection of each slide's cells.",
)
NOT_A_DIAGNOSTIC_DEVICE = (
    "Not a diagnostic device. It has no regulatory clearance, was trained on crops from one "
    "study's slides and microscope, and must not be used to diagnose, treat or rule out malaria "
    "in a person."
)
FAILURE_MODES = (
    "Dark or unusual stains, debris, platelets or white cells over a red cell, and crops cut "
    "by another segmentation than the NIH set's: out of its training distribution.",
    "Label noise: some crops of the NIH set look mislabelled, which caps the agreement any "
    "model can reach with the labels.",
    "Other species, life stages or imaging (thick smears, other microscopes, phone cameras) "
    "were not in the training data.",
)
VERDICT_LIMITS = (
    "A verdict is a research aid, not a diagnosis: mnres is not a diagnostic device.",
    "It was chosen and measured on thin-smear crops of the NIH set (one study, one "
    "microscope, Giemsa stain), segmented upstream; thick smears, other stains, microscopes or "
    "segmentations were not measured.",
    "The estimated parasitized fraction is the share among the crops given, not the patient's "
    "parasitaemia: the NIH release is a class-balanced selection of each slide's cells.",
    "Its false-alarm rate assumes a healthy slide's crops are independent draws at the measured "
    "false-positive rate; a slide whose crops are unusual (debris, stain) can exceed it.",
)
DATA_SOURCE = {
    "name": "NIH malaria cell images (thin blood smears, Giemsa stain)",
    "citation": "Rajaraman S. et al., Pre-trained convolutional neural networks as feature "
    "extractors toward improved malaria parasite detection in thin blood smear images, "
    "PeerJ 6:e4568, 2018",
    "doi": "10.7717/peerj.4568",
    "tfds_name": "malaria",
    "publisher": "U.S. National Library of Medicine, Lister Hill National Center for "
    "Biomedical Communications (LHNCBC)",
    "licence": "Released by the NLM for research use with a request to cite the paper above; "
    "as a U.S. Government work it is generally treated as public domain in the U.S. Check the "
    "NLM's terms before redistributing the crops.",
}


def _cells(metrics: dict | None) -> dict | None:
    keys = ("n", "accuracy", "auc", "sensitivity", "specificity", "balanced_accuracy", "loss")
    return None if metrics is None else {k: metrics.get(k) for k in keys}


def _patients(metrics: dict | None) -> dict | None:
    if not metrics:
        return None
    keys = ("n_patients", "n_infected", "n_uninfected", "accuracy", "sensitivity", "specificity")
    out = {k: metrics.get(k) for k in keys}
    out["correct"] = sum(bool(s.get("correct")) for s in metrics.get("slides", []))
    out["fraction_threshold"] = metrics.get("fraction_threshold")
    out["errors"] = list(metrics.get("errors", []))
    (tn, _), (_, tp) = metrics["confusion_matrix"]
    out["wilson"] = {
        "accuracy": figures.wilson(out["correct"], out["n_patients"]),
        "sensitivity": figures.wilson(tp, out["n_infected"]),
        "specificity": figures.wilson(tn, out["n_uninfected"]),
    }
    return out


def _prior_failure(report: dict, verdict_scores: str | None = None) -> str:
    """The low-parasitaemia failure mode, with the test patients the slide prior changed.

    `verdict_scores`: the scores the shipped verdict rule reads ('plain' or 'prior'), if any.
    """
    text = (
        "Infected patients with few parasitized crops: a slide is called infected from the "
        "fraction of its crops called parasitized, so a low-parasitaemia patient can be called "
        "uninfected. The slide prior (`predict --slide-prior`) moves such a slide's crops "
        "further toward uninfected"
    )
    if verdict_scores == "plain":  # the verdict does not read the prior's scores
        return text + " in the crops' table; the verdict reads the crops without it."
    text += " and can take that patient's decision with it"
    prior = report.get("slide_prior") or {}
    if not (prior.get("applied") and report.get("test_patient")):
        return text + "."
    plain = {s["slide_id"]: s for s in prior["without"]["test_patient"]["slides"]}
    lost = [s for s in report["test_patient"]["slides"]
            if not s["correct"] and plain[s["slide_id"]]["correct"]]  # fmt: skip
    cases = "; ".join(
        f"{s['slide_id']}, {s['n_parasitized_true']} of its {s['n_cells']} crops labelled "
        f"parasitized: {plain[s['slide_id']]['n_parasitized_predicted']} called parasitized "
        f"without the prior, {s['n_parasitized_predicted']} with it"
        for s in lost
    )
    return text + (f" (on the test slides: {cases})." if lost else ".")


REPRODUCE_ONE = (
    "python -m experiments.malaria --config=experiments/configs/default.py "
    "--config.data.source=folder --config.data.dir=PATH/cell_images{changes} --workdir=runs/{run}"
)


def _flag(key: str, value) -> str:
    """`--config.KEY=VALUE` as a shell word (a tuple as `'(0.9, 0.1, 0.0)'`)."""
    if isinstance(value, list | tuple):
        value = f"({', '.join(map(str, value))})"
    return f"--config.{key}={shlex.quote(str(value))}"


def _flags(config: dict) -> list[str]:
    """The flags that make `config` (a run's, as its command gave it) from default.py's."""
    from experiments.configs import default
    from experiments.search import records as search

    changed = search.changed_fields(config, default.get_config().to_dict())
    return [_flag(key, value) for key, value in changed.items()]


def _members(report) -> tuple[list[dict] | None, list[list[str]]]:
    """Each member of an ensemble run (its run name, its network, its changes to default.py,
    its steps) and the `--config.` flags of those changes; (None, [the run's flags]) for a
    single run."""
    from experiments.configs import default
    from experiments.search import records as search

    ensemble = report["config"].get("ensemble")
    if not ensemble:
        return None, [_flags(search.run_recipe_config(report))]
    baseline = default.get_config().to_dict()
    members, flags = [], []
    for member, trained in zip(ensemble["members"], report["training"]["members"], strict=True):
        config = search.recipe_config(member["config"], momentum_picked=True)
        flags.append(_flags(config))
        members.append({
            "run": member["run"],
            "network": member["config"]["model"]["name"],
            "alpha": member["config"]["model"]["alpha"],
            "changes": search.config_changes(config, baseline),
            "evaluated_step": trained["evaluated_step"],
            "steps": trained["total_steps"],
            "wall_seconds": run_folder.whole_run_seconds(trained),
        })  # fmt: skip
    return members, flags


def _reproduce(members, flags) -> str:
    """The commands that make the shipped files from the development slides."""
    if not members:
        changes = "".join(f" {f}" for f in flags[0])
        runs = [REPRODUCE_ONE.format(changes=changes, run="shipped")]
    else:
        runs = [
            REPRODUCE_ONE.format(changes="".join(f" {f}" for f in member_flags), run=m["run"])
            for m, member_flags in zip(members, flags, strict=True)
        ]
        member_args = " ".join(f"--member=runs/{m['run']}" for m in members)
        runs.append(f"python -m experiments.ensemble_run {member_args} --workdir=runs/shipped")
    return " && ".join([*runs, "python -m experiments.package_model --workdir=runs/shipped"])


PROTOCOL = (
    "One slide-level split of the 160 development slides (no patient in two splits). Each crop "
    "is averaged over its 8 symmetries when test_time_augmentation is on and called parasitized "
    "at p >= 0.5; a patient is called infected when the fraction of its crops called "
    "parasitized reaches fraction_threshold, chosen on the validation slides. The validation "
    "slides also chose the checkpoint and fitted the calibration, so their figures are not held "
    "out; the test slides were evaluated once."
)
# A final run keeps no test split: every development slide but the validation ones trains it.
FINAL_PROTOCOL = (
    "A final run: every development slide but the validation split trained it, and no slide "
    "was kept for a test. Each crop is averaged over its 8 symmetries when "
    "test_time_augmentation is on and called parasitized at p >= 0.5. The validation slides "
    "chose the checkpoint and fitted the calibration and the verdict rule, so their figures "
    "below are not held out; the held-out figures are the recipe's cross-validation and the "
    "independent evaluation."
)
USE_OF_SPLITS = (
    "train: fitted; validation: chose the checkpoint (best validation accuracy) and fitted the "
    "calibration; test: evaluated once, not folded back in."
)
FINAL_USE_OF_SPLITS = (
    "train: fitted; validation: chose the checkpoint (best validation accuracy) and fitted the "
    "calibration and the verdict rule; no test split (a final run)."
)


def is_final(report: dict) -> bool:
    """Whether the run kept no test split (a final run)."""
    return not run_folder.has_test_split(report)


def _evaluation(report, calibration, validation_outputs, folds, search, record) -> dict:
    prior = report.get("slide_prior") or {}
    return {
        "protocol": FINAL_PROTOCOL if is_final(report) else PROTOCOL,
        "validation_cells": _cells(report.get("validation")),
        "test_cells": _cells(report.get("test")),
        "test_patients": _patients(report.get("test_patient")),
        # Figures with each slide's prevalence (`predict --slide-prior`), and without it.
        "slide_prior": bool(prior.get("applied")),
        "train_prevalence": prior.get("train_prevalence"),
        "without_slide_prior": {
            "validation_cells": _cells(prior["without"]["validation"]),
            "test_cells": _cells(prior["without"]["test"]),
            "test_patients": _patients(prior["without"]["test_patient"]),
        }
        if prior.get("applied")
        else None,
        "intervals": figures.intervals(report, calibration, validation_outputs),
        "cross_validation": figures.cross_validation(folds, search),
        "independent_evaluation": figures.independent(record),
        "warnings": report.get("warnings", []),
    }


def build(*, report, manifest, calibration, file_hashes, sample, verdicts=None,
          validation_outputs=None, cross_validation=None, search=None, independent=None,
          int8=None) -> dict:  # fmt: skip
    """The card (a JSON-ready dict) of the run that `report` and `manifest` describe.

    `verdicts`: {"rule": the shipped verdict_rule.json, "cross_validation":
    `experiments.verdict_tables.chosen_summary(...)`}, or None. `validation_outputs`: the run's
    per-crop validation outputs (name, slide_id, label, prob), or None. `cross_validation`:
    {fold: test record} of the recipe's search, the folder (relative to the repository) that
    `search` names. `independent`: the maintainers' record, or None
    (not evaluated). `int8`: {"bytes": the file's size, "sidecar": its .json}, or None.
    """
    config, training, prov = report["config"], report["training"], report.get("provenance", {})
    members, member_flags = _members(report)
    split = {
        name: {"slides": s["num_slides"], "crops": s["num_examples"], "slide_ids": s["slide_ids"]}
        for name, s in manifest["splits"].items()
    }
    sidecar = (int8 or {}).get("sidecar") or {}
    return {
        "name": "malaria",
        "task": "cell crop -> P(parasitized); class 0 = uninfected, 1 = parasitized",
        "license": LICENSE,
        "developers": DEVELOPERS,
        "model": {
            **{k: report["model"].get(k) for k in ("name", "alpha", "total_params", "bn_momentum")},
            "image_size": report["data"]["image_size"],
            "dtype": (config["model"].get("members") or [config["model"]])[0].get("dtype"),
            "members": members,
        },
        "preprocessing": {
            "resize": "longer side to image_size (antialiased), centred on black to a square",
            "scale": "x / 127.5 - 1 on RGB uint8",
            "test_time_augmentation": bool(training["test_time_augmentation"]),
        },
        "training_data": {
            "source": DATA_SOURCE,
            "slides": sum(s["slides"] for s in split.values()),
            "crops": sum(s["crops"] for s in split.values()),
            "split_by": manifest.get("split_by"),
            "seed": manifest.get("seed"),
            "split": split,
            "use_of_splits": FINAL_USE_OF_SPLITS if is_final(report) else USE_OF_SPLITS,
        },
        "training": {
            "config": config,
            "epochs": training["epochs"],
            "steps": training["total_steps"],
            "evaluated_checkpoint": training["evaluated_checkpoint"],
            "evaluated_step": training["evaluated_step"],
            "wall_seconds": run_folder.whole_run_seconds(training),
            "platform": training.get("platform"),
            "cpu": prov.get("cpu"),
            "versions": prov.get("versions"),
            "commit": prov.get("git"),
        },
        "evaluation": _evaluation(
            report, calibration, validation_outputs, cross_validation, search, independent
        ),
        "calibration": {
            **{
                k: calibration.get(k)
                for k in ("temperature", "threshold_at_spec_95", "threshold_at_spec_98")
            },
            **{split: calibration.get(split) for split in ("validation", "test")},
        },  # fmt: skip
        "quantization": {
            "file": shipped.INT8,
            "bytes": (int8 or {}).get("bytes"),
            **{
                k: sidecar.get(k)
                for k in ("quantization", "per_channel", "calibration_images", "input")
            },
            "agreement": (int8 or {}).get("agreement"),
        },  # fmt: skip
        "slide_verdicts": dict(verdicts, does_not_claim=VERDICT_LIMITS) if verdicts else None,
        "intended_use": INTENDED_USE,
        "out_of_scope_use": list(OUT_OF_SCOPE),
        "not_a_diagnostic_device": NOT_A_DIAGNOSTIC_DEVICE,
        "known_failure_modes": [
            _prior_failure(report, ((verdicts or {}).get("rule") or {}).get("scores")),
            *FAILURE_MODES,
        ],
        "sample_cells": {
            "count": len(sample),
            "from": f"the {SAMPLE_SPLIT} slides above: the model was fitted on them",
            "files": list(sample),
        },
        "files_sha256": dict(file_hashes),
        "reproduce": _reproduce(members, member_flags),
    }
