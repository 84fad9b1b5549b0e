"""The later sections of the shipped model's card page, and the figures' formats.

Patient verdicts, calibration, the slide prior, quantization, limitations, use and citation;
`experiments.model_card_page` puts them after the evaluation. Each takes the card dict that
`experiments.model_card.build` returns.
"""

from __future__ import annotations

from mnres.metrics import slide_prior
from mnres.weights.shipped import WEIGHTS

SOFTWARE_TITLE = (
    "mnres: MobileNet-style image classifiers in JAX/Flax, with the shipped malaria model"
)
DATA_AUTHORS = ("Rajaraman, Sivaramakrishnan and Antani, Sameer K. and Poostchi, Mahdieh and "
                "Silamut, Kamolrat and Hossain, Md. A. and Maude, Richard J. and Jaeger, Stefan "
                "and Thoma, George R.")  # fmt: skip


def pct(value, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def with_ci(value, ci, auc: bool = False) -> str:
    """'96.13% (95.1-97.0)', or the value alone when there is no interval."""
    if value is None:
        return "-"
    text = f"{value:.4f}" if auc else pct(value)
    if not ci:
        return text
    low, high = ci
    return text + (f" ({low:.3f}-{high:.3f})" if auc else f" ({100 * low:.1f}-{100 * high:.1f})")


def share(s: dict) -> str:
    return (f"{100 * s['value']:.1f}% ({s['k']} of {s['n']}; 95% CI {100 * s['low']:.1f}-"
            f"{100 * s['high']:.1f}%)")  # fmt: skip


def verdict_lines(card: dict) -> list[str]:
    """ "Patient verdicts": the shipped rule and the cross-validation that chose it."""
    verdicts = card.get("slide_verdicts")
    lines = ["## Patient verdicts", ""]
    if not verdicts:
        return lines + ["No verdict rule ships with this model.", ""]
    from mnres.deploy import slides

    rule, cv = verdicts["rule"], verdicts["cross_validation"]
    chosen, patients = cv["chosen"], cv["patients"]
    fitted = rule["fitted_on"]
    reads = "The verdict reads the crops' P as shown."
    if rule["scores"] == "prior":
        reads = (
            "The verdict reads the scores its rule was fitted on, moved by the slide prior, "
            "whether or not `--slide-prior` is given (that flag moves the crops' P shown)."
        )
    return lines + [
        "In the NIH set each slide is one patient. `mnres predict` gives each slide a verdict "
        "(infected, not infected or insufficient) by the rule stored with the model "
        "(`mnres/weights/malaria/verdict_rule.json`): each slide is called "
        f"{slides.describe(rule)}. "
        f"Fitted on {fitted['what']}: {fitted['slides']} slides ({fitted['infected_slides']} "
        f"infected), {fitted['crops']:,} crops. {reads}",
        "",
        "### Slide verdicts",
        "",
        f"The rule ({chosen['candidate']}, {chosen['scores']} scores) was chosen by patient "
        "cross-validation on the 160 development slides, on the fold outputs of "
        f"{' and '.join(f'`{r}`' for r in cv['recipes'])}"
        f"{' (their mean log-odds)' if len(cv['recipes']) > 1 else ''}, before any test fold "
        "was read ([results.md](results.md#slide-verdicts)); each fold's rule was fitted on "
        "that fold's validation patients. On the five test folds, pooled (`"
        f"{cv['command']}`), with Wilson intervals:",
        *(
            []
            if cv.get("of_recipe", True)
            else [
                "",
                "Those are other networks than this model's recipe "
                f"(`{card['evaluation']['cross_validation']['recipe']}`): the rule's pair is "
                "theirs until the recipe's own fold outputs choose again, and the figures below "
                "are theirs, not this model's.",
            ]
        ),  # fmt: skip
        "",
        "| patients | sensitivity | specificity | accuracy |",
        "|---|---|---|---|",
        f"| {patients['accuracy']['n']} | {share(patients['sensitivity'])} | "
        f"{share(patients['specificity'])} | {share(patients['accuracy'])} |",
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


def calibration_lines(card: dict) -> list[str]:
    cal = card["calibration"]
    val_ci = card["evaluation"]["intervals"].get("validation") or {}
    lines = [
        "## Calibration",
        "",
        f"Temperature scaling: T = {cal['temperature']:.4f}, fitted on the validation crops; "
        "softmax(logits / T) moves the probabilities, not their order, so accuracy and AUC are "
        "unchanged. Expected calibration error (ECE) and negative log-likelihood (NLL), as "
        "calibration.json records them:",
        "",
        "| crops | ECE before | ECE after | NLL before | NLL after |",
        "|---|---:|---:|---:|---:|",
    ]
    for split, note in (("validation", "; T fitted here"), ("test", "")):
        c = cal.get(split)
        if c:
            lines.append(
                f"| {split} ({c['n']:,}{note}) | {pct(c['ece_before'])} | "
                f"{pct(c['ece_after'])} | {c['nll_before']:.4f} | {c['nll_after']:.4f} |"
            )
    tested = bool(cal.get("test"))  # a final run has no test split
    lines += [
        "",
        "Operating points (`--operating-point`): the most sensitive thresholds on the plain P "
        "(the one predict and the exports output) whose validation specificity reaches the "
        "target. Validation intervals: bootstrap over its slides"
        + ("; test: no per-crop scores were kept, so no interval." if tested else "."),
        "",
        "| operating point | p >= | validation sensitivity | validation specificity |"
        + (" test sensitivity | test specificity |" if tested else ""),
        "|---|---:|---:|---:|" + ("---:|---:|" if tested else ""),
    ]
    for name, key in (("spec95", "95"), ("spec98", "98")):
        ci = val_ci.get(f"threshold_at_spec_{key}") or {}
        val = (cal.get("validation") or {}).get(f"at_spec_{key}") or {}
        test = (cal.get("test") or {}).get(f"at_spec_{key}") or {}
        row = (
            f"| {name} | {cal[f'threshold_at_spec_{key}']:.4f} | "
            f"{with_ci(val.get('sensitivity'), ci.get('sensitivity'))} | "
            f"{with_ci(val.get('specificity'), ci.get('specificity'))} |"
        )
        if tested:
            row += f" {pct(test.get('sensitivity'))} | {pct(test.get('specificity'))} |"
        lines.append(row)
    return lines + [""]


def _change(before, after, fmt) -> str:
    return "-" if before is None or after is None else f"{fmt(before)} -> {fmt(after)}"


FIGURES = (("accuracy", "accuracy"), ("auc", "AUC"), ("sensitivity", "sensitivity"),
           ("specificity", "specificity"))  # fmt: skip


def _prior_sets(ev: dict) -> list[tuple]:
    """(name, cell figures without the prior, with it, (patients right without, with, of n))."""
    plain, p, p_plain = ev["without_slide_prior"], ev["test_patients"], None
    if p and plain["test_patients"]:
        p_plain = (plain["test_patients"]["correct"], p["correct"], p["n_patients"])
    sets = [("validation", plain["validation_cells"], ev["validation_cells"], None),
            ("test", plain["test_cells"], ev["test_cells"], p_plain)]  # fmt: skip
    ind = ev.get("independent_evaluation")
    runs = {run["slide_prior"]: run for run in (ind or {}).get("runs", [])}
    if {False, True} <= set(runs):
        n, right = ind["cells"]["n"], (runs[False]["patients_right"], runs[True]["patients_right"])
        sets.append(("independent", {**runs[False], "n": n}, {**runs[True], "n": n},
                     (*right, ind["patients"]["n"])))  # fmt: skip
    return sets


def _prior_rows(card: dict) -> tuple[list[str], list[str]]:
    """The table rows (without -> with the prior) and the figures the prior lowered."""
    rows, lowered = [], []
    for name, off, on, patients in _prior_sets(card["evaluation"]):
        if not off or not on:
            continue
        cells = []
        for key, label in FIGURES:
            fmt = (lambda v: f"{v:.4f}") if key == "auc" else pct
            cells.append(_change(off[key], on[key], fmt))
            if off[key] is not None and on[key] is not None and on[key] < off[key]:
                lowered.append(f"{name} {label} {cells[-1]}")
        right = "-"
        if patients:
            right = f"{patients[0]} -> {patients[1]} of {patients[2]}"
            if patients[1] < patients[0]:
                lowered.append(f"{name} patients right {right}")
        rows.append(f"| {name} ({off['n']:,} crops) | {' | '.join(cells)} | {right} |")
    return rows, lowered


def prior_lines(card: dict) -> list[str]:
    ev = card["evaluation"]
    lines = [
        "## The slide prior",
        "",
        "`mnres predict --slide-prior` reads each slide (patient) with its own prevalence in "
        "place of the training split's: it moves every crop's log-odds by logit(slide share) - "
        f"logit({ev['train_prevalence']:.4f}), the slide share being the fraction of its crops "
        f"called parasitized, clipped to [{slide_prior.CLIP}, {1 - slide_prior.CLIP}] (Bayes' "
        "rule; Saerens et al. 2002). Slides of fewer than "
        f"{slide_prior.MIN_CROPS} crops keep their log-odds. Nothing is fitted; it needs only "
        "the crops' slide ids. `mnres predict` leaves it off by default: the P it shows is the "
        "model's own.",
        "",
    ]
    if not ev.get("without_slide_prior"):
        return lines + ["The card's figures are without it; its effect was not measured.", ""]
    rows, lowered = _prior_rows(card)
    where = f"Where it lowered the figures: {'; '.join(lowered)}." if lowered else (
        "It lowered no figure above.")  # fmt: skip
    return lines + [
        "The shipped run's report applies it, so the card's headline figures are with it. Its "
        "measured effect, without -> with:",
        "",
        "| slides | accuracy | AUC | sensitivity | specificity | patients right |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"{where} See [Limitations and failure modes](#limitations-and-failure-modes) for the "
        "patient it can cost.",
        "",
    ]


NO_AGREEMENT = (
    "Its agreement with the float model was not measured when the file was written (its "
    "sidecar records none), so the card gives no figure; tests/test_pretrained.py checks that it "
    "calls the bundled sample crops as the float model does, a check rather than a measurement."
)


def quantization_lines(card: dict) -> list[str]:
    q = card["quantization"]
    lines = ["## Quantization", ""]
    if not q.get("bytes"):
        return lines + ["No int8 file was measured.", ""]
    weights = "per-channel" if q.get("per_channel") else "per-tensor"
    agreement = q.get("agreement")
    return lines + [
        f"`mnres/weights/malaria/{q['file']}`: {q['bytes']:,} bytes ({q['bytes'] / 1e6:.2f} MB, "
        f"{q['bytes'] / 2**20:.2f} MiB), {q['quantization']} post-training quantization with "
        f"{weights} weights, calibrated on {q['calibration_images']} crops of the training "
        f"slides. Input: {q['input']}.",
        "",
        _agreement(agreement) if agreement else NO_AGREEMENT,
        "",
    ]


def _agreement(a: dict) -> str:
    return (
        f"Agreement with the float model on {a['slides']} ({a['crops']:,} crops, which no "
        f"training saw): the same call at p >= 0.5 for {pct(a['same_call'])} of crops, a "
        f"largest probability gap of {a['max_abs_diff']:.4f} (median {a['median_abs_diff']:.4f}); "
        f"accuracy {pct(a['float_accuracy'])} float, {pct(a['int8_accuracy'])} int8 "
        f"(`python -m experiments.int8_agreement`, Python {a['python']}, jax {a['jax']}, "
        f"{a['date']})."
    )


def limitations_lines(card: dict) -> list[str]:
    lines = ["## Limitations and failure modes", ""]
    lines += [f"- {mode}" for mode in card["known_failure_modes"]]
    test = card["calibration"].get("test") or {}
    if test and test["ece_after"] > test["ece_before"]:
        lines.append(f"- Calibration fitted on the validation slides did not carry to the test "
                     f"slides: their ECE rose from {pct(test['ece_before'])} to "
                     f"{pct(test['ece_after'])} with the temperature.")  # fmt: skip
    p = card["evaluation"]["test_patients"]
    if p:
        w = p["wilson"]["accuracy"]
        lines.append(f"- Its own test split is {p['n_patients']} patients, so a patient figure "
                     f"from it is wide: {w['k']} of {w['n']} right has a 95% interval of "
                     f"{100 * w['low']:.1f}-{100 * w['high']:.1f}%.")  # fmt: skip
    lines.append(
        "- A slide verdict is not a diagnosis: [Patient verdicts](#patient-verdicts) "
        "says what it does not claim."
    )
    return lines + [""]


def _bibtex(card: dict) -> list[str]:
    commit = str((card["training"].get("commit") or {}).get("commit"))[:12]
    source = card["training_data"]["source"]
    return [
        "```bibtex",
        "@software{mnres,",
        f"  title = {{{SOFTWARE_TITLE}}},",
        "  author = {{The mnres maintainers}},",
        f"  license = {{{card['license'].capitalize()}}},",
        f"  note = {{Shipped malaria model trained at commit {commit}, {WEIGHTS} sha256 "
        f"{card['files_sha256'][WEIGHTS]}}}",
        "}",
        "",
        "@article{rajaraman2018malaria,",
        f"  author = {{{DATA_AUTHORS}}},",
        "  title = {Pre-trained convolutional neural networks as feature extractors toward "
        "improved malaria parasite detection in thin blood smear images},",
        "  journal = {PeerJ},",
        "  volume = {6},",
        "  pages = {e4568},",
        "  year = {2018},",
        f"  doi = {{{source['doi']}}}",
        "}",
        "```",
    ]


def usage_lines(card: dict) -> list[str]:
    sample = card["sample_cells"]
    return [
        "## How to use",
        "",
        "```python",
        "import numpy as np",
        "",
        "import mnres",
        "from mnres.data import decode, sample_cells",
        "",
        'pretrained = mnres.load_pretrained("malaria")  # offline: package data',
        "paths = sample_cells()[:4]",
        "crops = np.stack([decode.decode_image(p, pretrained.image_size) for p in paths])  # uint8",
        "probs = pretrained.classifier.serve(crops)  # [4, 2] softmax; class 1 = parasitized",
        "card = pretrained.card  # this card's facts, as model_card.json holds them",
        "```",
        "",
        "```bash",
        "python -m mnres predict --sample                 # the bundled crops, a verdict a slide",
        "python -m mnres predict PATH/crops --json        # your crops; NIH names give slide ids",
        "python -m mnres predict PATH/crops --slide-prior --operating-point spec95",
        "```",
        "",
        f"Bundled sample: {sample['count']} crops ({sample['from']}), in "
        "`mnres/data/sample_cells/`: `mnres.data.sample_cells()`. A demo and a check of the "
        "shipped files, not an accuracy figure.",
        "",
        "## How to cite",
        "",
        "This software and the shipped model, and the paper of the data it was trained on:",
        "",
        *_bibtex(card),
        "",
    ]
