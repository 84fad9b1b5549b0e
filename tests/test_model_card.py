"""The shipped model's card: the sections of a Hugging Face model card, every figure generated
from the committed records (tests/test_pretrained.py checks the files equal the generator's).
"""

import copy
import json
import os
import re

import numpy as np
import pytest

import mnres
from experiments import (
    independent_evaluation,
    model_card,
    model_card_figures,
    package_model,
    verdict_tables,
)
from experiments.model_card_sections import pct
from experiments.search import records as search
from mnres import run_folder
from mnres.metrics import cells, verdict_fitting
from mnres.provenance import file_sha256
from mnres.weights import shipped

SECTIONS = (
    "Model details",
    "Intended use",
    "Out-of-scope use",
    "Training data",
    "Training procedure",
    "Evaluation",
    "Patient verdicts",
    "Calibration",
    "The slide prior",
    "Quantization",
    "Limitations and failure modes",
    "How to use",
    "How to cite",
)
SUBSECTIONS = (
    "Cross-validation of the recipe",
    "Independent evaluation",
    "Slide verdicts",  # docs/results.md links to #slide-verdicts
)
KEY_LINE = re.compile(r"[a-z][\w-]*:( \S.*)?")
NESTED_LINE = re.compile(r"((  )*)(- )?[a-z][\w-]*:( \S.*)?|- \S.*")


@pytest.fixture(scope="module")
def card():
    return package_model.build_card()


@pytest.fixture(scope="module")
def page(card):
    return model_card.markdown(card)


@pytest.fixture(scope="module")
def report():
    return run_folder.read_json(package_model.RECORD_DIR / run_folder.REPORT_JSON)


@pytest.fixture(scope="module")
def final(report):
    """Whether the shipped model is a final run: no test split of its own, its held-out
    figures the recipe's cross-validation and the independent evaluation."""
    return model_card.is_final(report)


def front_matter(page: str) -> dict:
    """{key: value string, or the list of lines under it}, by plain line parsing (no PyYAML)."""
    lines = page.splitlines()
    assert lines[0] == "---", "the card must open with its metadata header"
    end = lines.index("---", 1)
    keys, current = {}, None
    for line in lines[1:end]:
        assert "\t" not in line and line == line.rstrip(), repr(line)
        if KEY_LINE.fullmatch(line):
            current, _, value = line.partition(":")
            keys[current] = value.strip() or []
            continue
        assert current is not None and isinstance(keys[current], list), line
        assert NESTED_LINE.fullmatch(line), f"not a plain YAML line: {line!r}"
        value = line.split(": ", 1)[-1]
        assert ": " not in value and not value.startswith(("{", "[", "&", "*", "'")), line
        keys[current].append(line)
    return keys


def test_the_page_has_every_section_of_a_model_card(page, final):
    headings = re.findall(r"^## (.+)$", page, re.M)
    assert headings == list(SECTIONS)
    own = "Validation slides" if final else "Validation and test slides"
    assert {own, *SUBSECTIONS} <= set(re.findall(r"^### (.+)$", page, re.M))
    assert page.index("# Model card:") > page.index("\n---\n")  # the header comes first


def test_the_metadata_header_is_plain_yaml_key_lines(page, card):
    meta = front_matter(page)
    assert meta["license"] == "apache-2.0" == card["license"]
    assert meta["library_name"] == "mnres"
    assert meta["pipeline_tag"] == "image-classification"
    tags = ("image-classification", "malaria", "jax", "flax", "mobilenet")
    assert meta["tags"] == [f"- {t}" for t in tags]
    assert meta["datasets"] and meta["metrics"]
    # The model-index holds the independent evaluation's figures, as its record has them;
    # weights not evaluated yet have none.
    independent = card["evaluation"]["independent_evaluation"]
    if independent is None:
        assert "model-index" not in meta
        return
    values = [float(line.split(": ")[1]) for line in meta["model-index"] if "value:" in line]
    expected = [v for run in independent["runs"] for v in (
        run["accuracy"], run["auc"], run["sensitivity"], run["specificity"],
        run["patients_right_wilson"]["value"])]  # fmt: skip
    assert values == expected


def test_each_weights_evaluation_is_read_for_those_weights_only(tmp_path):
    folder = tmp_path / "records"
    folder.mkdir()
    (old := tmp_path / "old.msgpack").write_bytes(b"old weights")
    (new := tmp_path / "new.msgpack").write_bytes(b"new weights")
    base = json.loads((independent_evaluation.RECORDS / "572ebb4.json").read_text())
    for name, weights, date in (("a", old, "2026-01-01"), ("b", new, "2026-02-01")):
        record = {**base, "weights_sha256": file_sha256(weights), "reported": date}
        (folder / f"{name}.json").write_text(json.dumps(record))
    assert independent_evaluation.shipped(folder, new)["reported"] == "2026-02-01"
    assert [r["reported"] for r in independent_evaluation.earlier(folder, new)] == ["2026-01-01"]
    (other := tmp_path / "other.msgpack").write_bytes(b"never evaluated")
    assert independent_evaluation.shipped(folder, other) is None
    assert len(independent_evaluation.earlier(folder, other)) == 2
    broken = {**base, "runs": [{**base["runs"][0], "accuracy": 0.5}]}
    (folder / "c.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"c\.json, predict: accuracy"):
        independent_evaluation.records(folder)


def test_the_independent_evaluation_is_carried_into_the_card_json(card):
    record = independent_evaluation.shipped()
    carried = card["evaluation"]["independent_evaluation"]
    if record is None:  # the record is of other weights: nothing of it reaches the card
        assert carried is None
        return
    assert carried["weights_sha256"] == card["files_sha256"][shipped.WEIGHTS]
    for run, got in zip(record["runs"], carried["runs"], strict=True):
        assert {k: got[k] for k in run} == run
        w = got["patients_right_wilson"]
        assert (w["k"], w["n"]) == (run["patients_right"], record["patients"]["n"])
        assert w["low"] < w["value"] < w["high"]


def test_list_pretrained_advertises_the_independent_evaluation_never_the_16_test_slides(card):
    entry = next(e for e in mnres.list_pretrained() if e["name"] == "malaria")
    if card["evaluation"]["independent_evaluation"] is None:
        assert "not yet evaluated independently" in entry["description"]
        return
    run = next(
        r for r in card["evaluation"]["independent_evaluation"]["runs"] if not r["slide_prior"]
    )
    assert f"{100 * run['accuracy']:.2f}%" in entry["description"]
    assert "independent evaluation" in entry["description"]
    own_test = card["evaluation"]["test_cells"]  # none for a final run
    assert not own_test or f"{100 * own_test['accuracy']:.2f}%" not in entry["description"]


def test_without_an_independent_evaluation_the_card_says_so(card, monkeypatch):
    from mnres.weights import registry

    other = copy.deepcopy(card)
    other["evaluation"]["independent_evaluation"] = None
    page = model_card.markdown(other)
    assert "model-index" not in front_matter(page)
    section = page.split("### Independent evaluation", 1)[1].split("\n## ", 1)[0]
    assert "Not evaluated yet" in section
    # The library then advertises the recipe's cross-validation, labelled as such.
    monkeypatch.setattr(shipped, "shipped_card", lambda name="malaria": other)
    description = registry.get("malaria").description
    cv = card["evaluation"]["cross_validation"]["accuracy"]
    assert "not yet evaluated independently" in description and "cross-validation" in description
    assert f"{100 * cv['mean']:.2f}% +/- {100 * cv['sd']:.2f} (SD)" in description


def test_the_cross_validation_is_mean_and_sd_over_the_recipes_test_folds(card, page):
    cv = card["evaluation"]["cross_validation"]
    source = package_model.origin()  # origin.json: the search and the recipe it chose
    assert cv["recipe"] == source["recipe"] == search.read_choice(source["search"])["recipe"]
    assert f"--search={os.path.relpath(source['search'], package_model.REPO)} " in cv["command"]
    folds = [
        run_folder.read_json(os.path.join(source["search"], cv["recipe"], f"fold_{k}_test.json"))
        for k in range(5)
    ]
    assert cv["folds"] == 5
    for key in model_card_figures.CELL_KEYS:
        values = [f["cell"][key] for f in folds]
        assert cv[key]["mean"] == pytest.approx(np.mean(values), abs=1e-6)
        assert cv[key]["sd"] == pytest.approx(np.std(values, ddof=1), abs=1e-6)
    acc = cv["accuracy"]
    assert f"| accuracy | {100 * acc['mean']:.2f} +/- {100 * acc['sd']:.2f}% |" in page


def test_the_intervals_are_bootstraps_around_the_reports_own_figures(card, report, final):
    outputs = package_model._validation_outputs()
    prior = report["slide_prior"]
    moved = verdict_fitting.with_prior(
        outputs["prob"], outputs["slide_id"], prior["train_prevalence"]
    )
    intervals = card["evaluation"]["intervals"]
    # The committed per-crop outputs give back the report's validation figures.
    for probs, figures, key in ((outputs["prob"], prior["without"]["validation"], "plain"),
                                (moved, report["validation"], "prior")):  # fmt: skip
        got = cells.binary_metrics(outputs["label"], probs)
        for name in model_card_figures.CELL_KEYS:
            assert got[name] == pytest.approx(figures[name], abs=1e-6)
            low, high = intervals["validation"][key][name]
            assert low <= figures[name] <= high
    if final:  # no test slides of its own
        assert not intervals["test"]
        return
    # The test slides' counts give back the report's test figures exactly.
    for patients, figures, key in ((report["test_patient"], report["test"], "prior"),
                                   (prior["without"]["test_patient"], prior["without"]["test"],
                                    "plain")):  # fmt: skip
        c = model_card_figures.slide_counts(patients)
        tn = c["correct"] - c["tp"]
        assert c["tp"].sum() / c["pos"].sum() == pytest.approx(figures["sensitivity"])
        assert tn.sum() / (c["n"] - c["pos"]).sum() == pytest.approx(figures["specificity"])
        ci = intervals["test"][key]
        assert ci["auc"] is None  # no per-crop test scores
        for name in ("accuracy", "sensitivity", "specificity"):
            assert ci[name][0] <= figures[name] <= ci[name][1]


def test_the_slide_prior_section_says_where_it_lowered_the_figures(page, card, report, final):
    section = page.split("## The slide prior", 1)[1].split("\n## ", 1)[0]
    plain, applied = report["slide_prior"]["without"], report
    assert "leaves it off by default" in section
    for name in ("validation",) if final else ("validation", "test"):
        before, after = plain[name]["accuracy"], applied[name]["accuracy"]
        row = f"{pct(before)} -> {pct(after)}"
        assert row in section
        assert (f"{name} accuracy {row}" in section) == (after < before)
    if not final:
        right = lambda p: sum(s["correct"] for s in p["slides"])
        before, after = right(plain["test_patient"]), right(report["test_patient"])
        n = report["test_patient"]["n_patients"]
        assert f"test patients right {before} -> {after} of {n}" in section
    # The maintainers' two runs, with and without it, once they evaluated these weights.
    evaluated = card["evaluation"]["independent_evaluation"] is not None
    assert ("| independent (" in section) == evaluated


def test_quantization_reports_the_files_size_and_what_was_measured(card, page):
    size = (shipped.shipped_folder() / shipped.INT8).stat().st_size
    assert card["quantization"]["bytes"] == size
    assert f"{size:,} bytes ({size / 1e6:.2f} MB" in page
    sidecar = run_folder.read_json(shipped.shipped_folder() / f"{shipped.INT8}.json")
    assert card["quantization"]["calibration_images"] == sidecar["calibration_images"]
    section = page.split("## Quantization", 1)[1].split("\n## ", 1)[0]
    record = package_model._int8_agreement(file_sha256(shipped.shipped_folder() / shipped.INT8))
    if record is None:  # none, or one of another int8 file: not quoted
        assert "not measured" in section and card["quantization"]["agreement"] is None
    else:
        assert card["quantization"]["agreement"] == record
        assert f"{100 * record['same_call']:.2f}% of crops" in section
        # The record measured the float model as the card's held-out row without the slide
        # prior: the test split's, or a final run's validation split (it has no test split).
        plain = card["evaluation"]["without_slide_prior"]["test_cells"]
        if plain is None:
            plain = card["evaluation"]["without_slide_prior"]["validation_cells"]
        assert record["crops"] == plain["n"]
        assert record["float_accuracy"] == pytest.approx(plain["accuracy"], abs=1e-9)


def test_the_limitations_point_to_no_figure_by_position(card, page, final):
    section = page.split("## Limitations and failure modes", 1)[1].split("\n## ", 1)[0]
    assert not re.search(r"\b(below|above)\b", " ".join(card["known_failure_modes"]))
    if not final:
        assert "C55P16" in section  # the patient the slide prior cost on the test slides
    assert "10.7717/peerj.4568" in page and "@software{mnres" in page


def final_run_inputs() -> dict:
    """The card's inputs as a final run of the same model would give them: no test split (its
    slides in the training split), no test figures or test calibration, no int8 agreement."""
    inputs = copy.deepcopy(package_model.card_inputs())
    report, manifest = inputs["report"], inputs["manifest"]
    report["data"]["num_test"] = 0
    report["test"] = report["test_patient"] = None
    for figures in ("with", "without"):
        report["slide_prior"][figures]["test"] = None
        report["slide_prior"][figures]["test_patient"] = None
    for member in report.get("members") or []:
        member["test"] = None
    keep = ("temperature", "threshold_at_spec_95", "threshold_at_spec_98")
    report["calibration"] = {k: report["calibration"][k] for k in keep}
    inputs["calibration"].pop("test", None)
    train, test = manifest["splits"]["train"], manifest["splits"]["test"]
    train["num_slides"] += test["num_slides"]
    train["num_examples"] += test["num_examples"]
    train["slide_ids"] = sorted(train["slide_ids"] + test["slide_ids"])
    manifest["splits"]["test"] = {**test, "num_slides": 0, "num_examples": 0, "slide_ids": []}
    inputs["int8"]["agreement"] = None
    for member in report["config"]["ensemble"]["members"]:
        member["config"]["data"]["split_fractions"] = [0.9, 0.1, 0.0]
    return inputs


def test_a_final_runs_card_gives_its_validation_slides_and_no_test_of_its_own():
    card = model_card.build(**final_run_inputs())
    page = model_card.markdown(card)
    assert card["evaluation"]["test_cells"] is None and card["evaluation"]["test_patients"] is None
    assert "A final run" in card["evaluation"]["protocol"]
    assert "no test split" in card["training_data"]["use_of_splits"]
    assert "### Validation slides" in page and "### Validation and test slides" not in page
    for section in ("Cross-validation of the recipe", "Independent evaluation"):
        assert f"### {section}" in page
    assert "| test |" not in page and "Test slides:" not in page and "| test patients |" not in page
    assert "| operating point | p >= | validation sensitivity | validation specificity |\n" in page
    assert card["training_data"]["slides"] == 160
    runs = card["reproduce"].split(" && ")
    for member in card["model"]["members"]:
        (line,) = [r for r in runs if r.endswith(f"--workdir=runs/{member['run']}")]
        assert "--config.data.split_fractions='(0.9, 0.1, 0.0)'" in line


def test_a_single_runs_reproduce_command_carries_its_changes():
    from experiments.configs import default

    config = default.get_config()
    config.data.image_size = 128
    config.model.input_normalization = "gray_world"
    config.data.split_fractions = (0.9, 0.1, 0.0)
    config.data.dir = "/somewhere/cell_images"
    report = {"config": config.to_dict(), "model": {"bn_momentum_picked": True}}
    members, flags = model_card._members(report)
    command = model_card._reproduce(members, flags).split(" && ")[0]
    assert members is None
    assert command.endswith(
        "--config.data.dir=PATH/cell_images --config.data.image_size=128 "
        "--config.data.split_fractions='(0.9, 0.1, 0.0)' "
        "--config.model.input_normalization=gray_world --workdir=runs/shipped"
    ), command


def test_the_origin_refuses_a_search_that_chose_no_recipe(tmp_path, monkeypatch):
    origin = tmp_path / "origin.json"
    origin.write_text(json.dumps({"search": str(tmp_path), "verdicts": str(tmp_path)}))
    monkeypatch.setattr(verdict_tables, "ORIGIN_JSON", str(origin))
    with pytest.raises(ValueError, match="has chosen no recipe"):
        package_model.origin()


def test_a_verdict_rule_chosen_on_other_networks_says_so():
    inputs = copy.deepcopy(package_model.card_inputs())
    verdicts = inputs["verdicts"]["cross_validation"]
    assert verdicts["of_recipe"] == (
        sorted(verdicts["recipes"]) == package_model.origin()["members"]
    )
    verdicts.update(recipes=["other_net"], of_recipe=False)
    page = model_card.markdown(model_card.build(**inputs))
    section = page.split("### Slide verdicts", 1)[1].split("\n## ", 1)[0]
    assert "fold outputs of `other_net`," in section and "Those are other networks" in section


def test_the_low_parasitaemia_failure_says_whether_the_verdict_reads_the_prior():
    inputs = copy.deepcopy(package_model.card_inputs())
    for scores, says in (
        ("plain", "in the crops' table; the verdict reads the crops without it."),
        ("prior", "can take that patient's decision with it"),
    ):
        inputs["verdicts"]["rule"]["scores"] = scores
        assert says in model_card.build(**inputs)["known_failure_modes"][0], scores
