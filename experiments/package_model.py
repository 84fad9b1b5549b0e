"""Package a training run as the model shipped inside mnres, with its card and sample crops.

  # after `python -m experiments.malaria --config=experiments/configs/default.py
  #   --config.data.source=folder --config.data.dir=PATH/cell_images --workdir=runs/shipped`:
  python -m experiments.package_model --workdir=runs/shipped
  # regenerate the card (JSON and docs page) from the committed records and the shipped files
  # alone (no run folder, no data), e.g. after a docs edit or a new record:
  python -m experiments.package_model --card_only

Writes
- mnres/weights/malaria/: weights.msgpack (float32, the evaluated checkpoint), config.json,
  calibration.json, model_int8.tflite (+ its .json sidecar), sample_logits.json (the golden
  log-odds of the bundled crops) and model_card.json;
- mnres/data/sample_cells/: about 250 crops from the run's training slides, losslessly
  recompressed (a demo and a check of the shipped files; accuracy figures come from the test
  slides);
- experiments/results/malaria_model/: the run's report.json and manifest.json, machine paths
  removed: what the card is generated from (a test regenerates it and compares);
- docs/model_card.md: the card as a page.

The card also reads committed records the run does not write: the validation outputs
(experiments/results/malaria_model/validation_outputs.npz, `verdict_cv ship`), the recipe's
cross-validation test folds (experiments/results/search/), the verdict cross-validation
(experiments/results/verdicts/) and the maintainers' independent evaluation, which counts only
while the weights it evaluated ship.

Needs the run's data folder (config.data.dir, or --data_dir) for the sample crops and the int8
calibration crops, and the export extra (pip install 'mnres[export]') for the TFLite file.
"""

from __future__ import annotations

import io
import os
import pathlib
import shutil
import sys

import numpy as np
from absl import app, flags, logging

import experiments
from experiments import _cli, independent_evaluation, model_card, verdict_cv, verdict_tables
from experiments.search import records
from mnres import run_folder
from mnres.provenance import file_sha256
from mnres.weights import shipped

REPO = pathlib.Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "mnres" / "weights" / "malaria"  # the shipped files (mnres.weights.shipped)
SAMPLE_DIR = REPO / "mnres" / "data" / "sample_cells"
RECORD_DIR = REPO / "experiments" / "results" / "malaria_model"
CARD_PAGE = REPO / "docs" / "model_card.md"

flags.DEFINE_string("workdir", None, "The training run to package (config.json, checkpoints/).")
flags.DEFINE_string("data_dir", None, "The run's cell_images folder; default its config.data.dir.")
flags.DEFINE_integer("sample_per_class", 125, "Bundled crops per class.")
flags.DEFINE_bool(
    "card_only",
    False,
    "Only regenerate the card from the committed records and the shipped files (no run folder).",
)
FLAGS = flags.FLAGS


def _without_machine_paths(obj, data_dir: str):
    """The record with the data folder's absolute path replaced by 'PATH/cell_images'."""
    if isinstance(obj, dict):
        return {k: _without_machine_paths(v, data_dir) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_without_machine_paths(v, data_dir) for v in obj]
    if isinstance(obj, str) and data_dir and obj.startswith(data_dir):
        return "PATH/cell_images" + obj[len(data_dir) :]
    return obj


def select_sample(data_dir: str, slides, per_class: int, seed: int = 0) -> list[str]:
    """`per_class` crops a class drawn uniformly from the crops of `slides` (sorted by name)."""
    from mnres.data import folders

    listing = folders.list_folder(data_dir)
    rng = np.random.default_rng(seed)
    in_slides = np.isin(listing["slide_ids"], sorted(slides))
    chosen = []
    for label in (1, 0):
        rows = np.flatnonzero(in_slides & (listing["labels"] == label))
        chosen += [listing["paths"][i] for i in sorted(rng.choice(rows, per_class, replace=False))]
    return chosen


def write_sample(paths, out: pathlib.Path) -> None:
    """Copies the crops into out/Parasitized and out/Uninfected, recompressed losslessly."""
    from PIL import Image

    for sub in ("Parasitized", "Uninfected"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    for path in paths:
        dest = out / pathlib.Path(path).parent.name.capitalize() / pathlib.Path(path).name
        with Image.open(path) as image:
            pixels = np.asarray(image)
            buffer = io.BytesIO()
            image.save(buffer, "PNG", optimize=True)
        with Image.open(io.BytesIO(buffer.getvalue())) as again:
            if not np.array_equal(np.asarray(again), pixels):
                raise RuntimeError(f"recompressing {path} changed its pixels")
        dest.write_bytes(buffer.getvalue())


def golden_logits(classifier, paths) -> dict:
    """{crop file name: [logit uninfected, logit parasitized]}, as `predict` decodes crops."""
    from mnres.data import decode

    images = decode.decode_files(paths, classifier.image_size)
    logits = classifier.logits(images)
    return {pathlib.Path(p).name: [round(float(v), 6) for v in row] for p, row in zip(
        paths, logits, strict=True)}  # fmt: skip


def package(workdir: str, data_dir: str | None, per_class: int) -> None:
    import flax.serialization
    import jax

    from mnres import data
    from mnres.data.sample import calibration_images
    from mnres.deploy import export

    classifier = run_folder.load_run(workdir, which="best")
    config = classifier.config
    data_dir = os.path.abspath(data_dir or config.data.dir)
    report = run_folder.read_report(workdir)
    manifest = run_folder.read_manifest(workdir)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    RECORD_DIR.mkdir(parents=True, exist_ok=True)

    config_dict = _without_machine_paths(config.to_dict(), os.path.abspath(config.data.dir))
    run_folder.write_json(MODEL_DIR / run_folder.CONFIG_JSON, config_dict)
    shutil.copyfile(
        os.path.join(workdir, run_folder.CALIBRATION_JSON), MODEL_DIR / run_folder.CALIBRATION_JSON
    )
    variables = jax.device_get(classifier.variables)
    (MODEL_DIR / shipped.WEIGHTS).write_bytes(flax.serialization.msgpack_serialize(variables))

    slides = set(manifest["splits"][model_card.SAMPLE_SPLIT]["slide_ids"])
    sample = select_sample(data_dir, slides, per_class)
    write_sample(sample, SAMPLE_DIR)
    bundled = sorted(str(p) for p in SAMPLE_DIR.glob("*/*.png"))
    run_folder.write_json(MODEL_DIR / shipped.GOLDEN, golden_logits(classifier, bundled))

    # int8 calibrates on crops of the run's training split, as `mnres export` does.
    with config.unlocked():
        config.data.dir = data_dir
    train = data.load_dataset(config.data, config.seed).train
    tflite = str(MODEL_DIR / shipped.INT8)
    export.export_tflite(
        classifier,
        tflite,
        quantize="int8",
        representative_images=calibration_images(train),
    )
    sidecar = run_folder.read_json(export.metadata_path(tflite))
    sidecar["run"] = "runs/" + os.path.basename(os.path.normpath(workdir))
    run_folder.write_json(export.metadata_path(tflite), sidecar)

    strip = lambda record: _without_machine_paths(record, os.path.abspath(config.data.dir))
    run_folder.write_json(RECORD_DIR / run_folder.REPORT_JSON, strip(report))
    run_folder.write_json(RECORD_DIR / run_folder.MANIFEST_JSON, strip(manifest))
    # The committed validation outputs are the previous weights': `verdict_cv ship` remakes them
    # (and the verdict rule) for these; until then the card gives no validation interval.
    (RECORD_DIR / os.path.basename(verdict_cv.SHIPPED_OUTPUTS)).unlink(missing_ok=True)
    write_card()
    logging.info("packaged %s -> %s; %d sample crops", workdir, MODEL_DIR, len(bundled))


def _validation_outputs() -> dict | None:
    path = RECORD_DIR / os.path.basename(verdict_cv.SHIPPED_OUTPUTS)
    if not path.is_file():
        return None
    with np.load(path) as outputs:
        return {k: outputs[k] for k in outputs.files}


def origin() -> dict:
    """The shipped model's recipe search folder (`search_folder`: as origin.json names it,
    relative to the repository), the recipe it chose, that recipe's networks (`members`, the
    search's names) and the verdict records.

    The chosen recipe's test folds are the card's cross-validation (`records.read_test` refuses
    any other recipe); the verdict records' chosen rule is the card's patient-level figure.
    """
    source = verdict_tables.shipped_origin()
    search = source["search"]
    choice = records.read_choice(search)
    if choice is None:
        raise ValueError(
            f"{verdict_tables.ORIGIN_JSON}: {source['search_folder']} has chosen no recipe"
        )
    # The networks behind the recipe's folds: the verdict records are of this recipe only when
    # their fold outputs are of the same networks.
    folds = records.read_recipe(os.path.join(search, choice["recipe"]))
    members = sorted(next(iter(folds.values())).get("members") or [choice["recipe"]])
    return {**source, "recipe": choice["recipe"], "members": members}


def verdict_summary(source: dict) -> dict:
    """The verdict records' chosen pair and pooled test figures (`verdict_tables.chosen_summary`),
    with `of_recipe`: whether their fold outputs are of the shipped recipe's networks."""
    summary = verdict_tables.chosen_summary(source["verdicts"])
    return {**summary, "of_recipe": sorted(summary["recipes"]) == source["members"]}


def build_card() -> dict:
    """The card, from the committed records, the shipped files and the verdict records."""
    return model_card.build(**card_inputs())


def card_inputs() -> dict:
    """`model_card.build`'s arguments, read from the committed records and shipped files."""
    int8 = MODEL_DIR / shipped.INT8
    source = origin()
    return dict(
        report=run_folder.read_json(RECORD_DIR / run_folder.REPORT_JSON),
        manifest=run_folder.read_json(RECORD_DIR / run_folder.MANIFEST_JSON),
        calibration=run_folder.read_json(MODEL_DIR / run_folder.CALIBRATION_JSON),
        file_hashes={name: file_sha256(MODEL_DIR / name) for name in model_card.HASHED_FILES},
        sample=sorted(p.relative_to(SAMPLE_DIR).as_posix() for p in SAMPLE_DIR.glob("*/*.png")),
        verdicts={
            "rule": run_folder.read_json(MODEL_DIR / run_folder.VERDICT_RULE_JSON),
            "cross_validation": verdict_summary(source),
        },
        validation_outputs=_validation_outputs(),
        cross_validation=records.read_test(source["search"], source["recipe"]),
        search=source["search_folder"],
        independent=independent_evaluation.shipped(),
        int8={
            "bytes": int8.stat().st_size,
            "sidecar": run_folder.read_json(f"{int8}.json"),
            "agreement": _int8_agreement(file_sha256(int8)),
        },  # fmt: skip
    )


def _int8_agreement(int8_sha256: str) -> dict | None:
    """`python -m experiments.int8_agreement`'s record, when it measured the shipped int8 file."""
    path = RECORD_DIR / "int8_agreement.json"
    if not path.is_file():
        return None
    record = run_folder.read_json(path)
    return record if record.get("int8_sha256") == int8_sha256 else None


def write_card() -> None:
    """model_card.json and docs/model_card.md from the committed records and shipped files."""
    card = build_card()
    run_folder.write_json(MODEL_DIR / shipped.CARD_JSON, card)
    CARD_PAGE.write_text(model_card.markdown(card))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    experiments.quiet_expected_info_logs()
    try:
        if FLAGS.card_only:
            write_card()
        elif not FLAGS.workdir:
            raise ValueError("give --workdir=RUN (or --card_only)")
        else:
            package(FLAGS.workdir, FLAGS.data_dir, FLAGS.sample_per_class)
    except (RuntimeError, ImportError, FileNotFoundError, ValueError) as e:
        if logging.vlog_is_on(1):
            raise
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=_cli.parse_command_line)
