"""The shipped model's card, built from its training run's record: JSON and a docs page.

`build` is a pure function of the run's report and manifest, its calibration, the shipped
files' hashes and the bundled sample's names; `markdown` renders the page. Both are written by
`python -m experiments.package_model`, and a test regenerates them and compares.
"""

from __future__ import annotations

from mnres.weights import shipped

# Every shipped file but the card, which holds their hashes.
HASHED_FILES = tuple(name for name in shipped.SHIPPED_FILES if name != shipped.CARD_JSON)
# The bundled crops come from the training slides: a demo and a check of the shipped files, not
# an accuracy figure (the test slides give those, and stay unused for anything else).
SAMPLE_SPLIT = "train"
__all__ = ["HASHED_FILES", "build", "markdown"]

INTENDED_USE = (
    "Research and teaching: classifying single red-blood-cell crops from Giemsa-stained thin "
    "blood smears (the NIH malaria cell-image set's imaging) as parasitized or uninfected, and "
    "a starting point for fine-tuning on other cell crops."
)
NOT_A_DIAGNOSTIC_DEVICE = (
    "Not a diagnostic device. It has no regulatory clearance, was trained on crops from one "
    "study's slides and microscope, and must not be used to diagnose, treat or rule out malaria "
    "in a person."
)
FAILURE_MODES = (
    "Infected patients with few parasitized crops: a slide is called infected from the fraction "
    "of its crops called parasitized, so a low-parasitaemia patient can be called uninfected. The "
    "slide prior (`predict --slide-prior`) moves such a slide's crops further toward uninfected "
    "and can take that patient's decision with it (the test patients below, with and without "
    "it; results.md).",
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
    return out


REPRODUCE_ONE = (
    "python -m experiments.malaria --config=experiments/configs/default.py "
    "--config.data.source=folder --config.data.dir=PATH/cell_images{changes} --workdir=runs/{run}"
)


def _members(report) -> tuple[list[dict] | None, list[list[str]]]:
    """Each member of an ensemble run (its run name, its changes to default.py, its steps) and
    the `--config.` flags of those changes; (None, []) for a single run."""
    from experiments.configs import default
    from experiments.search import records as search

    ensemble = report["config"].get("ensemble")
    if not ensemble:
        return None, []
    baseline = default.get_config().to_dict()
    members, flags = [], []
    for member, trained in zip(ensemble["members"], report["training"]["members"], strict=True):
        config = search.recipe_config(member["config"], momentum_picked=True)
        changed = search.changed_fields(config, baseline)
        flags.append([f"--config.{key}={value}" for key, value in changed.items()])
        members.append({
            "run": member["run"],
            "changes": search.config_changes(config, baseline),
            "evaluated_step": trained["evaluated_step"],
            "steps": trained["total_steps"],
            "wall_seconds": trained["wall_seconds_this_run"],
        })  # fmt: skip
    return members, flags


def _reproduce(members, flags) -> str:
    """The commands that make the shipped files from the development slides."""
    if not members:
        runs = [REPRODUCE_ONE.format(changes="", run="shipped")]
    else:
        runs = [
            REPRODUCE_ONE.format(changes="".join(f" {f}" for f in member_flags), run=m["run"])
            for m, member_flags in zip(members, flags, strict=True)
        ]
        member_args = " ".join(f"--member=runs/{m['run']}" for m in members)
        runs.append(f"python -m experiments.ensemble_run {member_args} --workdir=runs/shipped")
    return " && ".join([*runs, "python -m experiments.package_model --workdir=runs/shipped"])


def build(*, report, manifest, calibration, file_hashes, sample, verdicts=None) -> dict:
    """The card (a JSON-ready dict) of the run that `report` and `manifest` describe.

    `verdicts`: {"rule": the shipped verdict_rule.json, "cross_validation":
    `experiments.verdict_cv.chosen_summary()`}, or None.
    """
    config, training, prov = report["config"], report["training"], report.get("provenance", {})
    members, member_flags = _members(report)
    prior = report.get("slide_prior") or {}
    splits = manifest["splits"]
    split = {
        name: {
            "slides": s["num_slides"],
            "crops": s["num_examples"],
            "slide_ids": s["slide_ids"],
        }
        for name, s in splits.items()
    }
    return {
        "name": "malaria",
        "task": "cell crop -> P(parasitized); class 0 = uninfected, 1 = parasitized",
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
            "use_of_splits": "train: fitted; validation: chose the checkpoint (best validation "
            "accuracy) and fitted the calibration; test: evaluated once, not folded back in.",
        },
        "training": {
            "config": config,
            "epochs": training["epochs"],
            "steps": training["total_steps"],
            "evaluated_checkpoint": training["evaluated_checkpoint"],
            "evaluated_step": training["evaluated_step"],
            "wall_seconds": training.get("wall_seconds_this_run"),
            "platform": training.get("platform"),
            "cpu": prov.get("cpu"),
            "versions": prov.get("versions"),
            "commit": prov.get("git"),
        },
        "evaluation": {
            "protocol": "One slide-level split of the 160 development slides (no patient in two "
            "splits). Figures on the test slides, each crop averaged over its 8 symmetries when "
            "test_time_augmentation is on, threshold 0.5; a patient is called infected when the "
            "fraction of its crops called parasitized reaches fraction_threshold, chosen on the "
            "validation slides."
            + (
                " With the slide prior (`mnres predict --slide-prior`), as here, each slide's "
                "crops are read with the slide's own fraction called parasitized in place of "
                "the training split's (Bayes' rule; slides of 20 crops or more)."
                if prior.get("applied")
                else ""
            ),
            "validation_cells": _cells(report.get("validation")),
            "test_cells": _cells(report.get("test")),
            "test_patients": _patients(report.get("test_patient")),
            # Figures with each slide's prevalence (`predict --slide-prior`), and without it.
            "slide_prior": bool(prior.get("applied")),
            "train_prevalence": prior.get("train_prevalence"),
            "without_slide_prior": {
                "test_cells": _cells(prior["without"]["test"]),
                "test_patients": _patients(prior["without"]["test_patient"]),
            }
            if prior.get("applied")
            else None,
            "warnings": report.get("warnings", []),
        },
        "calibration": {
            k: calibration.get(k)
            for k in ("temperature", "threshold_at_spec_95", "threshold_at_spec_98")
        },
        "slide_verdicts": dict(verdicts, does_not_claim=VERDICT_LIMITS) if verdicts else None,
        "intended_use": INTENDED_USE,
        "not_a_diagnostic_device": NOT_A_DIAGNOSTIC_DEVICE,
        "known_failure_modes": list(FAILURE_MODES),
        "sample_cells": {
            "count": len(sample),
            "from": f"the {SAMPLE_SPLIT} slides above: the model was fitted on them",
            "files": list(sample),
        },
        "files_sha256": dict(file_hashes),
        "reproduce": _reproduce(members, member_flags),
    }


def _model_line(model: dict) -> str:
    size = f"{model['image_size']} px, {model['total_params']:,} parameters, {model['dtype']}"
    if not model.get("members"):
        return (
            f"- {model['name']}, alpha {model['alpha']}, {size}; BatchNorm momentum "
            f"{model['bn_momentum']}."
        )
    runs = "; ".join(f"`{m['run']}`: {m['changes']}" for m in model["members"])
    return (
        f"- An ensemble of {len(model['members'])} networks, the mean of their logits "
        f"(`mnres.models.Ensemble`): {size} in all. Each is `experiments/configs/default.py`'s "
        f"network and training with one change ({runs})."
    )


def _training_line(model: dict, training: dict) -> str:
    if not model.get("members"):
        return (
            f"`experiments/configs/default.py`: {training['epochs']} epochs, "
            f"{training['steps']:,} steps; evaluated checkpoint: "
            f"{training['evaluated_checkpoint']} (step {training['evaluated_step']:,})."
        )
    steps = ", ".join(
        f"`{m['run']}` step {m['evaluated_step']:,} of {m['steps']:,}" for m in model["members"]
    )
    return (
        f"`experiments/configs/default.py` with each member's change, {training['epochs']} "
        f"epochs each on the same split, then `experiments.ensemble_run`; each member at its "
        f"best checkpoint ({steps})."
    )


def _share(s: dict) -> str:
    return (f"{100 * s['value']:.1f}% ({s['k']} of {s['n']}; 95% CI {100 * s['low']:.1f}-"
            f"{100 * s['high']:.1f}%)")  # fmt: skip


def _verdict_lines(verdicts: dict | None) -> list[str]:
    """The card's "Slide verdicts" section."""
    if not verdicts:
        return []
    from mnres.deploy import slides

    rule, cv = verdicts["rule"], verdicts["cross_validation"]
    chosen, patients = cv["chosen"], cv["patients"]
    lines = [
        "## Slide verdicts",
        "",
        f"`mnres predict` calls each slide (patient) {slides.describe(rule)}. Fitted on "
        f"{rule['fitted_on']['what']}: {rule['fitted_on']['slides']} slides "
        f"({rule['fitted_on']['infected_slides']} infected), {rule['fitted_on']['crops']:,} crops.",
        "",
        f"The rule ({chosen['candidate']}, {chosen['scores']} scores) was chosen by patient "
        "cross-validation of this recipe on the 160 development slides, before any test fold "
        "was read ([results.md](results.md#slide-verdicts)); each fold's rule was fitted on "
        "that fold's validation patients. On the five test folds, pooled (`"
        f"{cv['command']}`):",
        "",
        "| patients | sensitivity | specificity | accuracy |",
        "|---|---|---|---|",
        f"| {patients['accuracy']['n']} | {_share(patients['sensitivity'])} | "
        f"{_share(patients['specificity'])} | {_share(patients['accuracy'])} |",
        "",
        "Infected patients caught, by the parasitized share of their crops:",
        "",
        "| parasitized share | patients | caught |",
        "|---|---:|---:|",
        *[
            f"| ({d['low']:.2f}, {d['high']:.2f}] | {d['patients']} | {d['caught']} |"
            for d in cv["detection"]
        ],  # fmt: skip
        "",
        "What a verdict does not claim:",
        "",
        *[f"- {limit}" for limit in verdicts["does_not_claim"]],
        "",
    ]
    return lines


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def markdown(card: dict) -> str:
    """The card as a docs page (docs/model_card.md)."""
    model, data, training = card["model"], card["training_data"], card["training"]
    evaluation, cal = card["evaluation"], card["calibration"]
    commit = training.get("commit") or {}
    versions = training.get("versions") or {}
    cpu = training.get("cpu") or {}
    lines = [
        "# Model card: the shipped malaria model",
        "",
        "<!-- Generated by `python -m experiments.package_model` from the training run's record"
        " (experiments/results/malaria_model/); edit experiments/model_card.py, not this page."
        " -->",
        "",
        "`mnres.load_pretrained('malaria')`; `python -m mnres predict --sample`. The same facts "
        "as JSON: `mnres/weights/malaria/model_card.json`.",
        "",
        f"**{card['not_a_diagnostic_device']}**",
        "",
        "## Model",
        "",
        _model_line(model),
        f"- Input: {card['preprocessing']['resize']}; {card['preprocessing']['scale']}; "
        "test-time augmentation (8 symmetries) "
        f"{'on' if card['preprocessing']['test_time_augmentation'] else 'off'}.",
        f"- Task: {card['task']}.",
        f"- Intended use: {card['intended_use']}",
        "",
        "## Training data",
        "",
        f"{data['source']['name']} ({data['source']['citation']}). Development slides only: "
        f"{data['slides']} slides, {data['crops']:,} crops, split by {data['split_by']} with "
        f"seed {data['seed']}.",
        "",
        "| split | slides | crops |",
        "|---|---:|---:|",
    ]
    for name in ("train", "validation", "test"):
        s = data["split"][name]
        lines.append(f"| {name} | {s['slides']} | {s['crops']:,} |")
    lines += [
        "",
        f"{data['use_of_splits']} Test slides: {', '.join(data['split']['test']['slide_ids'])}.",
        "",
        f"Licence: {data['source']['licence']}",
        "",
        "## Training",
        "",
        f"{_training_line(model, training)} The whole "
        f"{'commands' if model.get('members') else 'command'} took "
        f"{(training['wall_seconds'] or 0) / 60:.1f} min on a {cpu.get('logical_cores', '?')}-core "
        f"{cpu.get('model', 'CPU')} {'CPU' if training['platform'] == 'cpu' else training['platform']}"  # noqa: E501
        f", with mnres {versions.get('mnres')}, jax {versions.get('jax')}, flax "
        f"{versions.get('flax')}, commit {str(commit.get('commit'))[:12]}"
        f"{' (with uncommitted changes in the tree when the report was written)' if commit.get('dirty') else ''}.",  # noqa: E501
        "",
        "To reproduce it from the development slides:",
        "",
        "```bash",
        card["reproduce"].replace(" && ", "\n"),
        "```",
        "",
        "On the same CPU instruction set with the same versions the weights come out bit for bit "
        "the same (`mnres/weights/malaria/model_card.json` holds their sha256); elsewhere, "
        "XLA's kernels differ in rounding and the figures move within the run-to-run spread "
        "given in [results.md](results.md).",
        "",
        "## Evaluation",
        "",
        evaluation["protocol"],
        "",
        "| slides | crops | accuracy | AUC | sensitivity | specificity |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    without = evaluation.get("without_slide_prior")
    rows = [("validation", evaluation["validation_cells"]), ("test", evaluation["test_cells"])]
    if without:
        rows.append(("test, without the slide prior", without["test_cells"]))
    for name, m in rows:
        if m:
            auc = "-" if m["auc"] is None else f"{m['auc']:.4f}"
            lines.append(
                f"| {name} | {m['n']:,} | {_pct(m['accuracy'])} | {auc} | "
                f"{_pct(m['sensitivity'])} | {_pct(m['specificity'])} |"
            )
    p = evaluation["test_patients"]
    if p:
        lines += [
            "",
            f"Test patients: {p['correct']} of {p['n_patients']} decisions right "
            f"({p['n_infected']} infected, {p['n_uninfected']} uninfected; a slide is called "
            f"infected when at least {p['fraction_threshold']:.3f} of its crops are)"
            + (
                f"; {without['test_patients']['correct']} of {p['n_patients']} without the "
                "slide prior."
                if without
                else "."
            ),
        ]
    lines += [
        "",
        "These are figures on 16 held-out development slides, one split; "
        + (
            "[results.md](results.md#the-chosen-recipe-and-its-test-folds) has this recipe's "
            "5-fold patient cross-validation, and the independent evaluation of `default.py`."
            if model.get("members")
            else "[results.md](results.md) has the cross-validated and independent figures of "
            "this recipe."
        ),
        "",
        *_verdict_lines(card.get("slide_verdicts")),
        "## Calibration",
        "",
        f"Temperature {cal['temperature']:.4f}, fitted on the validation slides. Operating points "
        f"(`--operating-point`): spec95 p >= {cal['threshold_at_spec_95']:.4f}, spec98 p >= "
        f"{cal['threshold_at_spec_98']:.4f}.",
        "",
        "## Known failure modes",
        "",
        *[f"- {mode}" for mode in card["known_failure_modes"]],
        "",
        "## Bundled sample",
        "",
        f"{card['sample_cells']['count']} crops ({card['sample_cells']['from']}), in "
        "`mnres/data/sample_cells/`: `mnres.data.sample_cells()`.",
        "",
    ]
    if evaluation["warnings"]:
        lines[lines.index("## Calibration") : lines.index("## Calibration")] = [
            "Training warnings: " + "; ".join(evaluation["warnings"]),
            "",
        ]
    return "\n".join(lines)
