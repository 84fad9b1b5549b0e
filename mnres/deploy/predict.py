"""Classify cell crops with a training run or an exported model; summarise them per slide.

  predictor = load_predictor("runs/default")          # or model.tflite / model.stablehlo
  rows = predict_files(predictor, crops.find_images(["cells/", "more/*.png"]))
  print(format_table(rows))   # slides and verdicts: mnres.deploy.slides

A model of other classes than the malaria pair (a run fine-tuned on a folder of class
subfolders) labels each crop with its most probable class by name (for two classes: class 1
iff its probability reaches the threshold) and gives that probability; slides and their
verdicts (`mnres.deploy.slides`) are the malaria model's.

Crops are read by `mnres.deploy.crops` (as training decodes them when the model's size is
known). An unreadable file (or a crop under `crops.MIN_CROP_SIDE` pixels on a side) becomes a
row with an `error`, never a crash; inputs that give no file at all (an empty folder, a glob
that matches nothing, a missing path) are refused by `crops.find_images` with one line that
names them. Grayscale crops are converted to RGB with one `GrayscaleWarning` per call.
"""

from __future__ import annotations

import glob
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from mnres import inference, run_folder
from mnres.config import schema as config_lib
from mnres.data.folders import IMAGE_SUFFIXES, crop_facts
from mnres.deploy import crops, export, run_checks
from mnres.metrics import calibration, slide_prior
from mnres.metrics.verdict_fitting import with_prior
from mnres.weights import shipped

STABLEHLO_SUFFIXES = (".stablehlo", ".bin")
MODEL_SUFFIXES = (".tflite", ".onnx", *STABLEHLO_SUFFIXES)


class GrayscaleWarning(UserWarning):
    """Crops of one channel were converted to RGB: the model was trained on RGB stains."""


@dataclass
class Predictor:
    """A model as a function uint8 crops -> class probabilities."""

    name: str  # where it came from, for messages
    kind: str  # 'checkpoint', 'stablehlo', 'tflite' or 'onnx'
    image_size: int | None  # crops are decoded to S x S; None: at their own size
    run: Any  # uint8 [B, S, S, 3] (or a list of crops) -> probabilities [B, C]
    batch_size: int = 64
    class_names: tuple[str, ...] = config_lib.MALARIA_CLASSES  # the outputs' classes, in order
    classifier: Any = None  # the `inference.Classifier` run in JAX; None for an exported file

    @property
    def malaria(self) -> bool:
        """Whether the classes are the malaria pair (class 1 = parasitized)."""
        return tuple(self.class_names) == config_lib.MALARIA_CLASSES

    def parasitized(self, images) -> np.ndarray:
        """Probabilities of class 1 (parasitized), float [B]."""
        return np.asarray(self.run(images))[:, 1]


def model_class_names(path: str) -> tuple[str, ...]:
    """The classes of a model path without loading it: a run folder's config.json, an exported
    file's sidecar; the malaria pair when neither names them."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, run_folder.CONFIG_JSON)):
            return config_lib.class_names(run_folder.read_config(path).data)
        return config_lib.MALARIA_CLASSES
    return tuple(export.read_metadata(path).get("class_names") or config_lib.MALARIA_CLASSES)


def load_predictor(path: str, *, checkpoint: str = "best", batch_size: int = 64) -> Predictor:
    """A training run folder, a .tflite or .onnx file or a StableHLO export (.stablehlo/.bin).

    Raises:
      ValueError: one clear line when the path is none of these or its model does not load.
    """
    if os.path.isdir(path):
        return from_classifier(run_checks.load_run(path, which=checkpoint), path, batch_size)
    if not os.path.isfile(path):
        raise ValueError(
            f"no model at {path}: give a training run folder, a .tflite or .onnx file or a "
            f"{'/'.join(STABLEHLO_SUFFIXES)} StableHLO export"
        )
    size = export.read_metadata(path).get("image_size")
    names = model_class_names(path)
    try:
        if path.endswith(".tflite"):
            model = export.load_tflite(path)
        elif path.endswith(STABLEHLO_SUFFIXES):
            model = export.load_stablehlo(path)
        elif path.endswith(".onnx"):
            model = export.load_onnx(path)
        else:
            model = None
    except ImportError as e:
        raise ValueError(f"running {path} needs {e.name}: pip install {e.name}") from e
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: one line, not a trace
        raise ValueError(f"cannot load {path} as a model: {crops.reason(e)}") from e
    if isinstance(model, export.TFLiteModel):
        if size is not None and model.input_size not in (None, size):
            raise ValueError(
                f"the sidecar {export.metadata_path(path)} says image_size {size}, the model "
                f"takes {model.input_size} x {model.input_size}; restore it or re-export"
            )
        # An S x S model resizes other crops itself; any-size models resize in the graph.
        return Predictor(path, "tflite", size or model.input_size, model, 1, names)
    if model is not None:
        kind = "onnx" if path.endswith(".onnx") else "stablehlo"
        return Predictor(path, kind, size, model, batch_size, names)
    raise ValueError(
        f"{path}: unknown model format; expected a .tflite or .onnx file, a "
        f"{'/'.join(STABLEHLO_SUFFIXES)} StableHLO export or a training run folder"
    )


def from_classifier(classifier, name: str = "jax", batch_size: int = 64) -> Predictor:
    """The model run in JAX, in the formulation its model resolved for this backend.

    The weights are the classifier's; the depthwise formulation is the one training picked for
    the platform (`mnres.models.layers.resolve_conv_formulation`: shifted on CPU), not the
    grouped one exports carry, which XLA's CPU backend runs several times slower. The two agree
    to float rounding (tested).

    Args:
      classifier: a `mnres.inference.Classifier` (e.g. `mnres.run_folder.load_run(workdir)`).
      name: where it came from, for messages.
      batch_size: crops per call; a shorter batch is padded, so each crop size compiles once.

    Returns:
      A Predictor classifying as the run was evaluated (`Classifier.serve`, test-time
      augmentation included when the run used it).
    """

    def run(images):
        images = np.asarray(images)
        inference.check_crops(images, "the predictor")  # floats would be cast to near-black
        n = len(images)
        if 0 < n < batch_size:
            images = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]),
                                                      images.dtype)])  # fmt: skip
        return np.asarray(classifier.serve(images))[:n]

    return Predictor(name, "checkpoint", classifier.image_size, run, batch_size,
                     classifier.class_names, classifier)  # fmt: skip


def looks_like_model(item: str) -> bool:
    """Whether predict's first argument names a model rather than images.

    A run folder, a file that is not an image, or a missing path without an image suffix
    (`runs/typo`, `model.tflite`) is a model, so that a mistyped model is an error that names
    it, never replaced by the shipped model; an image, a glob, a folder of images or a missing
    image path is an input.
    """
    if glob.has_magic(item):
        return False
    if os.path.isdir(item):
        if any(os.path.exists(os.path.join(item, f)) for f in run_folder.RUN_MARKERS):
            return True
        return not crops.files_of(item)
    if os.path.isfile(item):
        return not item.lower().endswith(IMAGE_SUFFIXES)
    return not item.lower().endswith(IMAGE_SUFFIXES)


def _run_folders(model_path: str) -> list[str]:
    """Where a model's run files lie: a run folder itself; for an exported file, its folder and
    the one above (`export` writes to RUN/export/)."""
    if os.path.isdir(model_path):
        return [model_path]
    folder = os.path.dirname(os.path.abspath(model_path))
    return [folder, os.path.dirname(folder)]


def operating_threshold(model_path: str, point: str) -> float:
    """The threshold on P(parasitized) that gave `point` ('spec95': 95% specificity) on the
    validation split of the model's training run, from its calibration.json.

    A run folder holds calibration.json; for an exported file it is looked up beside the file
    and one folder up (`export` writes to RUN/export/).

    Raises:
      ValueError: no calibration.json, or the run's validation split could not give the point.
    """
    folders = _run_folders(model_path)
    for folder in folders:
        record = run_folder.read_calibration(folder)
        if record is not None:
            break
    else:
        raise ValueError(
            f"no {run_folder.CALIBRATION_JSON} for {model_path} (looked in "
            f"{' and '.join(folders)}): operating points come from a training run with a "
            "validation split; copy its calibration.json beside the model or give --threshold"
        )
    threshold = calibration.threshold_for(record, point)
    if threshold is None:
        raise ValueError(
            f"{os.path.join(folder, run_folder.CALIBRATION_JSON)} has no {point} threshold "
            "(its validation split lacked a class); give --threshold"
        )
    return float(threshold)


def predict_files(
    predictor: Predictor, paths, *, threshold: float = 0.5, progress: bool = False
) -> list[dict]:
    """One row per file: file, slide_id, label, prob_parasitized, error (None when read).

    A model of other classes than the malaria pair gives rows of file, slide_id, label (the
    class called), prob (its probability), probs ({class: probability}) and error.

    Args:
      predictor: from `load_predictor`.
      paths: image files; a file's slide id is read from its name (`crop_facts`).
      threshold: two classes: a crop is called class 1 (parasitized) when its probability is
        >= threshold. More classes: unused, a crop is called its most probable class.
      progress: a progress bar on stderr (`crops.progress`: when it is a terminal).

    Warns:
      GrayscaleWarning: once, with their number, when some crops were grayscale.
    """
    malaria = predictor.malaria
    scores = {"prob_parasitized": None} if malaria else {"prob": None, "probs": None}
    rows = [
        {"file": p, "slide_id": crop_facts(p).slide_id, "label": None, **scores, "error": None}
        for p in paths
    ]
    # Same-size crops batch together (all of them when the predictor has a fixed size).
    pending: list[tuple[int, np.ndarray]] = []

    def flush():
        if pending and malaria:
            probs = predictor.parasitized([image for _, image in pending])
            for (i, _), p in zip(pending, probs, strict=True):
                rows[i]["prob_parasitized"] = float(p)
                rows[i]["label"] = config_lib.MALARIA_CLASSES[int(p >= threshold)]
        elif pending:
            probs = np.asarray(predictor.run([image for _, image in pending]), np.float64)
            for (i, _), p in zip(pending, probs, strict=True):
                rows[i].update(_called(p, predictor.class_names, threshold))
        pending.clear()

    gray, bar = 0, crops.progress(len(rows), "predict", progress)
    for i, row in enumerate(rows):
        bar.update()
        if not os.path.isfile(row["file"]):  # an input `find_images` found nothing for
            row["error"] = crops.nothing_found(row["file"])
            continue
        try:
            image, was_gray = crops.read_crop(row["file"], predictor.image_size)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not fatal
            row["error"] = f"unreadable image ({crops.reason(e)})"
            continue
        gray += was_gray
        if pending and (image.shape != pending[0][1].shape or len(pending) >= predictor.batch_size):
            flush()
        pending.append((i, image))
    flush()
    bar.close()
    if gray:  # once per call, not once per crop
        warnings.warn(GrayscaleWarning(_GRAYSCALE.format(gray)), stacklevel=2)
    return rows


_GRAYSCALE = (
    "{} crop(s) were grayscale, converted to RGB; the model was trained on RGB stains, its "
    "answers on them may be wrong"
)


def _called(probs, class_names, threshold: float) -> dict:
    """The row fields of one crop of a model of other classes: label, prob, probs."""
    if len(probs) == 2:
        label = int(probs[1] >= threshold)
    else:
        label = int(np.argmax(probs))
    return {
        "label": class_names[label],
        "prob": float(probs[label]),
        "probs": {name: float(p) for name, p in zip(class_names, probs, strict=True)},
    }


def training_prevalence(model_path: str) -> float | None:
    """The fraction of parasitized crops in the training split of the model's run.

    Read from the run's manifest.json: in a run folder, or for an exported file beside it or
    one folder up (`export` writes to RUN/export/); for a shipped model, from its card. None
    when there is none (a file copied on its own, a card without it).
    """
    folders = _run_folders(model_path)
    for folder in folders:
        card = os.path.join(folder, shipped.CARD_JSON)  # a shipped model's folder
        if os.path.isfile(card):
            return run_folder.read_json(card)["evaluation"].get("train_prevalence")
        if os.path.isfile(os.path.join(folder, run_folder.MANIFEST_JSON)):
            counts = run_folder.read_manifest(folder)["splits"]["train"].get("counts") or {}
            total = sum(counts.values())
            if total and "parasitized" in counts:
                return counts["parasitized"] / total
    return None


def apply_slide_prior(rows, train_prevalence: float, *, threshold: float = 0.5) -> list[str]:
    """Each slide's prevalence in place of the training split's (`slide_prior.adjust`).

    The P(parasitized) of every read crop with a slide id is moved by its slide's fraction of
    crops called parasitized (P >= 0.5) and called again at `threshold`; crops without a slide
    id, and slides of fewer than `slide_prior.MIN_CROPS` crops, keep theirs.

    Returns:
      The ids of the slides adjusted.
    """
    scored = [r for r in rows if r["error"] is None and r.get("prob_parasitized") is not None]
    if not scored:
        return []
    slide_ids = np.array([r["slide_id"] or "" for r in scored])
    probs = [r["prob_parasitized"] for r in scored]
    for row, p in zip(scored, with_prior(probs, slide_ids, train_prevalence), strict=True):
        p = float(p)
        row["prob_parasitized"] = p
        row["label"] = config_lib.MALARIA_CLASSES[int(p >= threshold)]
    ids, counts = np.unique(slide_ids[slide_ids != ""], return_counts=True)
    return [str(s) for s, n in zip(ids, counts, strict=True) if n >= slide_prior.MIN_CROPS]


def shown_path(path: str) -> str:
    """A crop's path as the table shows it: a bundled sample crop relative to the sample folder
    (`sample/Parasitized/...`), any other as found from what the user typed."""
    from mnres.data import sample

    try:
        folder = str(sample.sample_folder())
    except FileNotFoundError:
        return path
    if os.path.commonpath([os.path.abspath(path), folder]) == folder:
        return "sample/" + os.path.relpath(os.path.abspath(path), folder).replace(os.sep, "/")
    return path


def format_table(rows, slide_lines=()) -> str:
    """Plain-text table of the rows, an accuracy line when crops sit in class folders, then the
    per-slide lines (`slides.format_slides`).

    The truth column is the class folder a crop sits in (`Parasitized/`, `Uninfected/`, any
    case; '-' elsewhere).
    """
    files = [crops.printable(shown_path(r["file"])) for r in rows]  # a name cannot drive the tty
    width = max([len("file")] + [len(f) for f in files])
    malaria = all("prob_parasitized" in r for r in rows)
    # "p": P(parasitized), as the line above the table says ("parasitized iff p >= ...").
    key, title = ("prob_parasitized", "p") if malaria else ("prob", "p(prediction)")
    p_width = max(6, len(title))
    label_width = max([12] + [len(r["label"]) + 1 for r in rows if r["label"]])
    slide_width = max([5] + [len(crops.printable(r["slide_id"] or "-")) for r in rows])
    truths = [crop_facts(r["file"]).label for r in rows] if malaria else [None] * len(rows)
    truth_names = [config_lib.MALARIA_CLASSES[t] if t is not None else "-" for t in truths]
    lines = [f"{'file':<{width}} {'slide':<{slide_width}} {'prediction':<{label_width}} "
             f"{title:>{p_width}}  truth"]  # fmt: skip
    for file, r, truth in zip(files, rows, truth_names, strict=True):
        slide = crops.printable(r["slide_id"] or "-")
        if r["error"]:
            lines.append(f"{file:<{width}} {slide:<{slide_width}} error: "
                         f"{crops.printable(r['error'])}")  # fmt: skip
        else:
            lines.append(f"{file:<{width}} {slide:<{slide_width}} {r['label']:<{label_width}} "
                         f"{r[key]:>{p_width}.4f}  {truth}")  # fmt: skip
    known = [(r, t) for r, t in zip(rows, truths, strict=True) if t is not None and not r["error"]]
    if known:
        right = sum(config_lib.MALARIA_CLASSES.index(r["label"]) == t for r, t in known)
        lines += ["", f"accuracy on the {len(known)} crop(s) in class folders: "
                      f"{100 * right / len(known):.1f}% ({right} right)"]  # fmt: skip
        if all(shown_path(r["file"]).startswith("sample/") for r, _ in known):
            lines.append("(the bundled sample comes from the model's training slides: a demo, "
                         "not a test)")  # fmt: skip
    if slide_lines:
        lines += ["", *slide_lines]
    errors = sum(r["error"] is not None for r in rows)
    lines += ["", f"{len(rows) - errors} image(s) predicted, {errors} unreadable"]
    return "\n".join(lines)


def probabilities(predictor: Predictor, images) -> np.ndarray:
    """Parasitized probabilities of uint8 crops [N, H, W, 3], in predictor-sized batches."""
    n, step = len(images), predictor.batch_size
    return np.concatenate(
        [predictor.parasitized(images[i : i + step]) for i in range(0, n, step)] or [[]]
    )


def class_probabilities(predictor: Predictor, images) -> np.ndarray:
    """Probabilities [N, C] of uint8 crops [N, H, W, 3], in predictor-sized batches."""
    n, step = len(images), predictor.batch_size
    if n == 0:  # no batch to learn C from
        raise ValueError("no images to classify: give uint8 crops [N, H, W, 3] with N >= 1")
    return np.concatenate(
        [np.asarray(predictor.run(images[i : i + step])) for i in range(0, n, step)]
    )
