"""The shipped model's card as a page (docs/model_card.md), in Hugging Face model-card form.

`markdown(card)` renders the dict `experiments.model_card.build` returns: a YAML metadata
header, then the sections the field's cards have. Every figure comes from the card; nothing
here is typed in but words.
"""

from __future__ import annotations

from experiments.model_card_sections import (
    calibration_lines,
    limitations_lines,
    pct,
    prior_lines,
    quantization_lines,
    share,
    usage_lines,
    verdict_lines,
    with_ci,
)
from mnres.weights.shipped import WEIGHTS

TAGS = ("image-classification", "malaria", "jax", "flax", "mobilenet")
METRICS = ("accuracy", "roc_auc", "recall", "specificity")
NETWORKS = {"mobilenet_v2": "MobileNetV2", "mobilenet_v1": "MobileNetV1"}
__all__ = ["front_matter", "markdown"]


def _model_index(independent: dict) -> list[str]:
    """The independent evaluation as a Hugging Face `model-index` entry."""
    lines = [
        "model-index:",
        "- name: mnres-malaria",
        "  results:",
        "  - task:",
        "      type: image-classification",
        "      name: Cell crop classification, parasitized vs uninfected",
        "    dataset:",
        "      type: malaria",
        f"      name: NIH malaria cell images, {independent['patients']['n']} patients unseen in "
        "development",
        f"      split: independent evaluation, {independent['cells']['n']} crops",
        "    metrics:",
    ]
    for run in independent["runs"]:
        for kind, key, what in (("accuracy", "accuracy", "cell accuracy"),
                                ("roc_auc", "auc", "cell AUC"),
                                ("recall", "sensitivity", "cell sensitivity"),
                                ("specificity", "specificity", "cell specificity")):  # fmt: skip
            lines += [f"    - type: {kind}", f"      value: {run[key]}",
                      f"      name: {what}, mnres {run['name']}"]  # fmt: skip
        lines += ["    - type: accuracy",
                  f"      value: {run['patients_right_wilson']['value']}",
                  f"      name: patients right, mnres {run['name']}"]  # fmt: skip
    return lines


def front_matter(card: dict) -> list[str]:
    """The YAML metadata header (plain key lines and lists, no anchors or flow style)."""
    independent = card["evaluation"].get("independent_evaluation")
    return [
        "---",
        f"license: {card['license']}",
        "library_name: mnres",
        "tags:",
        *[f"- {tag}" for tag in TAGS],
        "datasets:",
        f"- {card['training_data']['source']['tfds_name']}",
        "metrics:",
        *[f"- {metric}" for metric in METRICS],
        "pipeline_tag: image-classification",
        *(_model_index(independent) if independent else []),
        "---",
    ]


def _details(card: dict) -> list[str]:
    model, training = card["model"], card["training"]
    commit, versions = training.get("commit") or {}, training.get("versions") or {}
    size = f"{model['image_size']} px input, {model['total_params']:,} parameters, {model['dtype']}"
    members = model.get("members") or []
    if len(members) == 1:  # one network, scored with the slide prior by experiments.ensemble_run
        (m,) = members
        architecture = (
            f"{NETWORKS.get(m['network'], m['network'])} alpha {m['alpha']}, {size}: "
            f"`experiments/configs/default.py`'s network and training with {m['changes']}."
        )
    elif members:
        nets = {(NETWORKS.get(m["network"], m["network"]), m["alpha"]) for m in model["members"]}
        kinds = " and ".join(f"{name} alpha {alpha}" for name, alpha in sorted(nets))
        runs = "; ".join(f"`{m['run']}`: {m['changes']}" for m in model["members"])
        architecture = (
            f"an ensemble of {len(model['members'])} {kinds} networks, the mean of their logits "
            f"(`mnres.models.Ensemble`): {size} in all. Each is `experiments/configs/default.py`'s "
            f"network and training with one change ({runs})."
        )
    else:
        architecture = (f"{NETWORKS.get(model['name'], model['name'])} alpha {model['alpha']}, "
                        f"{size}; BatchNorm momentum {model['bn_momentum']}.")  # fmt: skip
    independent = card["evaluation"].get("independent_evaluation")
    evaluated = (f", the file evaluated independently at commit {independent['weights_commit']}"
                 if independent else "")  # fmt: skip
    return [
        "## Model details",
        "",
        f"- Architecture: {architecture}",
        f"- Input: {card['preprocessing']['resize']}; {card['preprocessing']['scale']}; "
        "test-time augmentation (8 symmetries) "
        f"{'on' if card['preprocessing']['test_time_augmentation'] else 'off'}.",
        f"- Task: {card['task']}.",
        f"- Developed by {card['developers']}. Version: trained with mnres "
        f"{versions.get('mnres')} at commit {str(commit.get('commit'))[:12]}; weights sha256 "
        f"{card['files_sha256'][WEIGHTS][:16]}...{evaluated} (every shipped file's "
        "sha256: `mnres/weights/malaria/model_card.json`).",
        f"- Licence: {card['license'].capitalize()} (mnres's; the weights ship inside the "
        "package). The training data have their own terms (below).",
        f"- **{card['not_a_diagnostic_device']}**",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        "## Out-of-scope use",
        "",
        *[f"- {use}" for use in card["out_of_scope_use"]],
        "",
    ]


def _data(card: dict) -> list[str]:
    data = card["training_data"]
    lines = [
        "## Training data",
        "",
        f"{data['source']['name']} ({data['source']['citation']}; "
        f"doi:{data['source']['doi']}). Development slides only: {data['slides']} slides (one "
        f"slide a patient), {data['crops']:,} crops, split by {data['split_by']} with seed "
        f"{data['seed']}.",
        "",
        "| split | slides | crops |",
        "|---|---:|---:|",
    ]
    for name in ("train", "validation", "test"):
        s = data["split"][name]
        if s["slides"]:  # a final run has no test split
            lines.append(f"| {name} | {s['slides']} | {s['crops']:,} |")
    test_ids = data["split"]["test"]["slide_ids"]
    return lines + [
        "",
        data["use_of_splits"] + (f" Test slides: {', '.join(test_ids)}." if test_ids else ""),
        "",
        f"Licence of the data: {data['source']['licence']}",
        "",
    ]


def _procedure(card: dict) -> list[str]:
    model, training = card["model"], card["training"]
    commit, versions = training.get("commit") or {}, training.get("versions") or {}
    cpu = training.get("cpu") or {}
    members = model.get("members") or []
    if len(members) == 1:
        (m,) = members
        how = (
            f"`experiments/configs/default.py` with {m['changes']}: {training['epochs']} epochs, "
            f"evaluated at its best checkpoint (step {m['evaluated_step']:,} of {m['steps']:,}); "
            "then `experiments.ensemble_run` with it alone, which trains nothing and scores its "
            "validation slides with each slide's prior."
        )
    elif members:
        steps = ", ".join(f"`{m['run']}` step {m['evaluated_step']:,} of {m['steps']:,}"
                          for m in model["members"])  # fmt: skip
        how = (
            f"`experiments/configs/default.py` with each member's change, {training['epochs']} "
            "epochs each on the same split, then `experiments.ensemble_run`; each member at its "
            f"best checkpoint ({steps})."
        )
    else:
        how = (
            f"`experiments/configs/default.py`: {training['epochs']} epochs, "
            f"{training['steps']:,} steps; evaluated checkpoint: "
            f"{training['evaluated_checkpoint']} (step {training['evaluated_step']:,})."
        )
    platform = "CPU" if training["platform"] == "cpu" else training["platform"]
    dirty = " (with uncommitted changes in the tree when the report was written)"
    return [
        "## Training procedure",
        "",
        f"{how} The whole {'commands' if model.get('members') else 'command'} took "
        f"{(training['wall_seconds'] or 0) / 60:.1f} min on a {cpu.get('logical_cores', '?')}-core "
        f"{cpu.get('model', 'CPU')} {platform}, with mnres {versions.get('mnres')}, jax "
        f"{versions.get('jax')}, flax {versions.get('flax')}, commit "
        f"{str(commit.get('commit'))[:12]}{dirty if commit.get('dirty') else ''}.",
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
        "given in [results.md](results.md). The card itself is regenerated from the committed "
        "records and the shipped files alone, without the run folder:",
        "",
        "```bash",
        "python -m experiments.package_model --card_only",
        "```",
        "",
    ]


def _cell_rows(rows) -> list[str]:
    lines = ["| slides | slide prior | crops | accuracy | AUC | sensitivity | specificity |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, prior, m, ci in rows:
        if m:
            ci = ci or {}
            lines.append(
                f"| {name} | {prior} | {m['n']:,} | {with_ci(m['accuracy'], ci.get('accuracy'))}"
                f" | {with_ci(m['auc'], ci.get('auc'), auc=True)} | "
                f"{with_ci(m['sensitivity'], ci.get('sensitivity'))} | "
                f"{with_ci(m['specificity'], ci.get('specificity'))} |"
            )
    return lines


VALIDATION_CI = (
    "Validation intervals: bootstrap over its slides' committed per-crop outputs "
    "(experiments/results/malaria_model/validation_outputs.npz)."
)
PATIENT_HEADER = (
    "| test patients | slide prior | right | infected called infected | uninfected called "
    "uninfected | fraction threshold | wrong |"
)


def _own_slides(evaluation: dict) -> list[str]:
    without, ci = evaluation.get("without_slide_prior") or {}, evaluation["intervals"]
    val_ci, test_ci = ci.get("validation") or {}, ci.get("test") or {}
    on, key = ("on", "prior") if evaluation["slide_prior"] else ("off", "plain")
    tested = evaluation["test_cells"] is not None  # a final run has no test split
    heading = "### Validation and test slides" if tested else "### Validation slides"
    lines = [heading, "", evaluation["protocol"], ""]
    lines += _cell_rows([
        ("validation", on, evaluation["validation_cells"], val_ci.get(key)),
        ("validation", "off", without.get("validation_cells"), val_ci.get("plain")),
        ("test", on, evaluation["test_cells"], test_ci.get(key)),
        ("test", "off", without.get("test_cells"), test_ci.get("plain")),
    ])  # fmt: skip
    no_val = "No validation interval: no per-crop outputs were kept."
    test_note = f" Test intervals: bootstrap over its slides' counts. {ci['test_auc']}"
    lines += ["", f"{VALIDATION_CI if val_ci else no_val}{test_note if tested else ''}", ""]
    if not tested:
        return lines
    patients = [(on, evaluation["test_patients"])]
    if without:
        patients.append(("off", without["test_patients"]))
    lines += [PATIENT_HEADER, "|---|---|---|---|---|---:|---|"]
    for prior, p in patients:
        if p:
            w, wrong = p["wilson"], ", ".join(p["errors"]) or "-"
            lines.append(
                f"| {p['n_patients']} | {prior} | {share(w['accuracy'])} | "
                f"{share(w['sensitivity'])} | {share(w['specificity'])} | "
                f"{p['fraction_threshold']:.3f} | {wrong} |"
            )
    return lines + [""]


def _cross_validation(cv: dict | None) -> list[str]:
    lines = ["### Cross-validation of the recipe", ""]
    if not cv:
        return lines + ["No cross-validation record of this recipe.", ""]
    lines += [
        f"The recipe (`{cv['recipe']}`) on {cv['folds']} patient-level folds of the 160 "
        "development slides: on each fold the recipe was trained without the fold's test "
        "patients, so these are figures of the recipe, not of the shipped "
        f"weights. Test folds ({', '.join(map(str, cv['test_patients']))} patients, "
        f"{', '.join(f'{n:,}' for n in cv['test_crops'])} crops), read once (`{cv['command']}`):",
        "",
        f"| cell figure | mean +/- SD over {cv['folds']} folds | "
        + " / ".join(f"fold {k}" for k in range(cv["folds"]))
        + " |",
        "|---|---|---|",
    ]
    for key, name in (("accuracy", "accuracy"), ("auc", "AUC"), ("sensitivity", "sensitivity"),
                      ("specificity", "specificity")):  # fmt: skip
        f = cv[key]
        if key == "auc":
            spread, folds = (
                f"{f['mean']:.4f} +/- {f['sd']:.4f}",
                [f"{v:.4f}" for v in f["per_fold"]],
            )
        else:
            spread = f"{100 * f['mean']:.2f} +/- {100 * f['sd']:.2f}%"
            folds = [f"{100 * v:.2f}" for v in f["per_fold"]]
        lines.append(f"| {name} | {spread} | {' / '.join(folds)} |")
    return lines + ["", "Its patient figures, with the verdict rule the cross-validation chose: "
                    "[Patient verdicts](#patient-verdicts).", ""]  # fmt: skip


def _independent_rows(ind: dict) -> list[str]:
    lines = ["| run | slide prior | crops | accuracy | AUC | sensitivity | specificity | patients "
             "right |", "|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for run in ind["runs"]:
        lines.append(
            f"| `mnres {run['name']}` | {'on' if run['slide_prior'] else 'off'} | "
            f"{ind['cells']['n']:,} | {pct(run['accuracy'])} | {run['auc']:.4f} | "
            f"{pct(run['sensitivity'])} | {pct(run['specificity'])} | "
            f"{share(run['patients_right_wilson'])} |"
        )
    return lines


def _independent(ind: dict | None) -> list[str]:
    lines = ["### Independent evaluation", ""]
    if not ind:
        return lines + [
            "Not evaluated yet: the maintainers' evaluation on patients unseen in development "
            "(experiments/results/independent_evaluation/) is of other weights than these.",
            "",
        ]
    return lines + [
        f"{ind['what']} Run by {ind['evaluated_by']}; reported {ind['reported']}, with "
        f"`{ind['command']}` (mnres {ind['versions']['mnres']}, jax {ind['versions']['jax']}, "
        f"{ind['hardware']}) on the weights of commit {ind['weights_commit']} (sha256 "
        f"{ind['weights_sha256'][:16]}..., the shipped file's). {ind['patients']['n']} patients "
        f"({ind['patients']['infected']} infected, {ind['patients']['uninfected']} uninfected), "
        f"{ind['cells']['n']:,} crops ({ind['cells']['parasitized']:,} parasitized, "
        f"{ind['cells']['uninfected']:,} uninfected); a patient is called by "
        f"{ind['patient_rule']}.",
        "",
        *_independent_rows(ind),
        "",
        f"{ind['cell_intervals']} {ind['counts_note']}",
        "",
    ]


def _evaluation(card: dict) -> list[str]:
    evaluation = card["evaluation"]
    lines = ["## Evaluation", "", evaluation["intervals"]["conventions"], ""]
    lines += _own_slides(evaluation)
    lines += _cross_validation(evaluation.get("cross_validation"))
    lines += _independent(evaluation.get("independent_evaluation"))
    if evaluation["warnings"]:
        lines += ["Training warnings: " + "; ".join(evaluation["warnings"]), ""]
    return lines


def markdown(card: dict) -> str:
    """The card as a docs page (docs/model_card.md)."""
    lines = [
        *front_matter(card),
        "",
        "# Model card: the shipped malaria model",
        "",
        "<!-- Generated by `python -m experiments.package_model --card_only` from the committed "
        "records (experiments/results/) and the shipped files (mnres/weights/malaria/); edit "
        "experiments/model_card*.py, not this page. -->",
        "",
        "`mnres.load_pretrained('malaria')`; `python -m mnres predict --sample`. The same facts "
        "as JSON: `mnres/weights/malaria/model_card.json`.",
        "",
        *_details(card),
        *_data(card),
        *_procedure(card),
        *_evaluation(card),
        *verdict_lines(card),
        *calibration_lines(card),
        *prior_lines(card),
        *quantization_lines(card),
        *limitations_lines(card),
        *usage_lines(card),
    ]
    return "\n".join(lines)
