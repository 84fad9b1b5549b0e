"""The `python -m mnres` command line.

python -m mnres summary MODEL [--alpha A] [--classes N] [--no-top] [--image-size S]
python -m mnres export RUN [--out DIR] [--formats stablehlo,tflite,int8,onnx] [--evaluate]
python -m mnres predict [MODEL] IMAGE|FOLDER|GLOB... [--sample] [--json]
    [--checkpoint best|latest] [--threshold P | --operating-point spec95|spec98]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile

import numpy as np

import mnres
from mnres import models, run_folder
from mnres.config import MALARIA_CLASSES
from mnres.metrics import calibration, slide_prior
from mnres.models import params


def _positive(kind):
    """An argparse type: a `kind` (int or float) > 0; anything else is a one-line usage error."""

    def parse(text: str):
        value = kind(text)  # a ValueError here: argparse's "invalid int value: 'x'"
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be > 0")
        return value

    parse.__name__ = kind.__name__
    return parse


def _probability(text: str) -> float:
    """An argparse type: a threshold on p(parasitized) (p(class 1)), in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be a probability in [0, 1]")
    return value


def _summary(args) -> int:
    overrides = {}
    if args.alpha is not None:
        overrides["alpha"] = args.alpha
    if args.classes is not None:
        overrides["num_classes"] = args.classes
    if args.no_top:
        overrides["include_top"] = False
    model = models.create_model(args.model, **overrides)
    print(params.summary(model, (1, args.image_size, args.image_size, 3), name=args.model))
    return 0


def _export(args) -> int:
    from mnres.deploy import export, predict

    formats = _export_formats(args.formats, export.FORMATS)
    classifier = run_folder.load_run(args.run, which=args.checkpoint)
    out = args.out or os.path.join(args.run, "export")
    _check_writable(out)  # before any crop is decoded and the converters run
    crops = _calibration_crops(args, classifier) if "int8" in formats else None
    evaluation = _evaluation_crops(args, classifier) if args.evaluate else None
    paths = export.export_run(
        classifier, out, formats, per_channel=not args.per_tensor, representative_images=crops
    )
    for fmt, path in paths.items():
        print(f"{fmt:<10} {os.path.getsize(path) / 1e6:8.3f} MB  {path}")
    if evaluation is not None:
        what, images, labels = evaluation
        predictors = {"jax": predict.from_classifier(classifier)}
        predictors |= {fmt: predict.load_predictor(path) for fmt, path in paths.items()}
        print(f"\n{what}: {len(images)} images; batch-1 latency on this CPU")
        print(f"{'model':<10} {'accuracy':>9} {'max |dp|':>9} {'latency ms':>11}")
        for row in predict.compare(predictors, images, labels):
            print(
                f"{row['model']:<10} {row['accuracy']:>9.4f} {row['max_abs_diff']:>9.2e} "
                f"{row['latency_ms']:>11.3f}"
            )
    return 0


def _calibration_crops(args, classifier):
    """int8 calibration crops: --calibration-dir, else the run's stored sample, else its data."""
    from mnres.data import decode
    from mnres.deploy import export, predict

    size, count = classifier.image_size, args.calibration_images
    if args.calibration_dir:
        paths = predict.find_images([args.calibration_dir])
        chosen = np.random.default_rng(0).permutation(len(paths))[:count]
        return decode.decode_files([paths[i] for i in sorted(chosen)], size)
    stored = run_folder.read_calibration_sample(args.run)
    if stored is not None:
        return stored[:count]
    train = _run_split(classifier, "train", "int8 calibration needs cell crops",
                       "give --calibration-dir DIR (any cell crops of this kind)")  # fmt: skip
    return export.calibration_images(train, count)


def _evaluation_crops(args, classifier):
    """(what, uint8 crops, labels) for --evaluate: a labelled folder, else the run's test split."""
    from mnres.data import decode, sources

    if args.evaluate is not True:
        names = classifier.class_names
        # Parasitized/ + Uninfected/, or the run's class folders, in the model's order.
        listing = sources.list_folder(args.evaluate, None if names == MALARIA_CLASSES else names)
        if listing["class_names"] != names:
            raise ValueError(
                f"--evaluate {args.evaluate}: its classes are {listing['class_names']}, the "
                f"model's {names}"
            )
        images = decode.decode_files(listing["paths"], classifier.image_size)
        return args.evaluate, images, listing["labels"]
    fix = "give --evaluate DIR (a folder holding Parasitized/ and Uninfected/, or the run's "
    fix += "class folders)"
    test = _run_split(classifier, "test", "--evaluate needs labelled crops", fix)
    return "test split", test.images, test.labels


def _run_split(classifier, name: str, need: str, fix: str):
    """The run's `name` split, reloaded from its config; ValueError (one line) if it cannot be."""
    from mnres import data

    config = classifier.config
    try:
        return getattr(data.load_dataset(config.data, config.seed), name)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"{need}: the run stored none and its data ({config.data.source}"
            f"{' ' + config.data.dir if config.data.dir else ''}) cannot be loaded "
            f"({first}); {fix}"
        ) from e


def _export_formats(text: str, known) -> list[str]:
    """--formats as a list; ValueError (one line) when it is empty or names unknown formats."""
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in known]
    if unknown or not formats:
        said = f"unknown format(s) {', '.join(unknown)}" if unknown else "no format"
        raise ValueError(f"--formats {text!r}: {said}; use some of {','.join(known)}")
    return formats


def _check_writable(folder: str) -> None:
    """ValueError (one line) unless `folder` can be created and written to."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(
            f"cannot write the export to {folder} ({e.strerror or e}): give --out a folder "
            "that can be written"
        ) from e


def _looks_like_model(item: str) -> bool:
    """Whether predict's first argument names a model rather than images.

    A run folder, a file that is not an image, or a missing path with a model file's suffix is
    a model; an image, a glob, a folder of images or a missing image path is an input.
    """
    from mnres.data.sources import IMAGE_SUFFIXES
    from mnres.deploy import predict

    if glob.has_magic(item):
        return False
    if os.path.isdir(item):
        if any(os.path.exists(os.path.join(item, f)) for f in run_folder.RUN_MARKERS):
            return True
        return not predict.files_of(item)
    if os.path.isfile(item):
        return not item.lower().endswith(IMAGE_SUFFIXES)
    return item.lower().endswith(predict.MODEL_SUFFIXES)


def _predict(args) -> int:
    from mnres.deploy import predict
    from mnres.weights import shipped as pretrained

    inputs, model = list(args.inputs), args.model
    if model is None and len(inputs) > (0 if args.sample else 1) and _looks_like_model(inputs[0]):
        model = inputs.pop(0)
    if args.sample:
        from mnres.data import sample

        inputs += sample.sample_cells()
    if not inputs:
        raise ValueError("no images given: name image files, folders or glob patterns, or --sample")
    images = predict.find_images(inputs)  # first: a wrong path needs no model to say so
    shipped = model is None or model in pretrained.SHIPPED
    model = model or pretrained.SHIPPED[0]
    folder = str(pretrained.shipped_folder(model)) if shipped else model
    names = predict.model_class_names(folder)
    if len(names) > 2 and (args.operating_point or args.threshold is not None):
        flag = "--operating-point" if args.operating_point else "--threshold"
        raise ValueError(
            f"{flag} needs a model of two classes; {model} has {len(names)} "
            f"({', '.join(names)}) and calls each image its most probable class"
        )
    threshold = 0.5 if args.threshold is None else args.threshold
    if args.operating_point:
        threshold = predict.operating_threshold(folder, args.operating_point)
    if shipped:
        loaded = pretrained.load_pretrained(model)
        predictor = predict.from_classifier(loaded.classifier, f"{model} (shipped with mnres)")
    else:
        if os.path.isdir(model):  # a run folder: what its training found, before its answers
            for warning in run_folder.run_warnings(model):
                print(f"warning: {warning}", file=sys.stderr)
        predictor = predict.load_predictor(model, checkpoint=args.checkpoint)
    rows = predict.predict_files(predictor, images, threshold=threshold)
    prior = None
    if args.slide_prior:
        if not predictor.malaria:
            raise ValueError(f"--slide-prior needs the malaria pair of classes; {model} has "
                             f"{', '.join(names)}")  # fmt: skip
        # A shipped model's card holds it; a run's manifest, or 0.5 (the NIH set's, about).
        prevalence = predict.training_prevalence(folder) or 0.5
        adjusted = predict.apply_slide_prior(rows, prevalence, threshold=threshold)
        prior = {"train_prevalence": prevalence, "slides_adjusted": adjusted}
    slides = predict.slide_summary(rows, threshold=threshold)
    if len(names) > 2:
        threshold = None  # the most probable class is called
    if args.json:
        out = {"model": predictor.name, "threshold": threshold, "images": rows, "slides": slides}
        if prior is not None:
            out["slide_prior"] = prior
        if not predictor.malaria:
            out["class_names"] = list(names)
        print(json.dumps(out, indent=2))
    else:
        print(f"model: {predictor.name}\n{_rule(names, threshold)}")
        if prior is not None:
            print(f"slide prior: {len(prior['slides_adjusted'])} slide(s) of "
                  f"{slide_prior.MIN_CROPS}+ crops adjusted to their own prevalence (training "
                  f"split: {prior['train_prevalence']:.3f})")  # fmt: skip
        print()
        print(predict.format_table(rows, slides))
    if all(r["error"] is not None for r in rows):
        print(f"error: not one of the {len(rows)} input(s) could be read as an image (each "
              "row says why)", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _rule(names, threshold) -> str:
    """How predict calls a crop, in one line."""
    if tuple(names) == MALARIA_CLASSES:
        return f"parasitized iff p >= {threshold:.4g}"
    if len(names) == 2:
        return f"{names[1]} iff p({names[1]}) >= {threshold:.4g}, else {names[0]}"
    return f"label: the most probable of {len(names)} classes ({', '.join(names)})"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples kept as written; every default that is a value shown."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "(default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser(prog: str = "python -m mnres") -> argparse.ArgumentParser:
    """The command line: summary, export and predict."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"mnres {mnres.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add = lambda name, **kwargs: commands.add_parser(name, formatter_class=_HelpFormatter, **kwargs)

    summary = add(
        "summary",
        help="layer table and Keras-style parameter counts",
        description="The layer table and parameter counts of a model (needs only the core).",
        epilog=f"example:\n  {prog} summary paper --classes 2 --image-size 224",
    )
    summary.add_argument("model", help=f"one of: {', '.join(sorted(models.MODELS))}")
    summary.add_argument(
        "--alpha", type=_positive(float), help="width multiplier (default: the model's)"
    )
    summary.add_argument(
        "--classes", type=_positive(int), help="number of classes of the top (default: the model's)"
    )
    summary.add_argument("--no-top", action="store_true", help="without the classifier")
    summary.add_argument(
        "--image-size", type=_positive(int), default=224, help="input side, in pixels"
    )

    export = add(
        "export",
        help="a training run -> StableHLO and TFLite (float32, int8) files",
        description="Export a training run. StableHLO needs only the core; TFLite and int8 need\n"
        "pip install 'mnres[export]'. int8 calibrates on --calibration-dir, else on the crops\n"
        "the run stored, else on its training split.",
        epilog=f"examples:\n  {prog} export runs/default\n  {prog} export runs/default "
        "--formats int8 --calibration-dir cells/ --evaluate held_out/",
    )
    export.add_argument("run", help="training workdir (config.json + checkpoints/)")
    export.add_argument("--out", help="output folder (default: RUN/export)")
    export.add_argument(
        "--checkpoint", choices=("best", "latest"), default="best", help="which checkpoint"
    )
    export.add_argument(
        "--formats",
        default="stablehlo,tflite,int8",
        help="comma-separated: stablehlo,tflite,int8,onnx (onnx needs jax2onnx, onnxruntime)",
    )
    export.add_argument("--per-tensor", action="store_true", help="int8 weights per tensor")
    export.add_argument(
        "--calibration-dir", metavar="DIR", help="int8: calibrate on crops from this folder"
    )
    export.add_argument(
        "--calibration-images", type=_positive(int), default=256, help="int8: calibration crops"
    )
    export.add_argument(
        "--evaluate",
        nargs="?",
        const=True,
        metavar="DIR",
        help="accuracy, parity and latency of each file on DIR (Parasitized/ + "
        "Uninfected/, or the run's class folders), or without DIR on the run's test split",
    )

    pred = add(
        "predict",
        help="classify cell images (the shipped model unless one is named); per-slide summary",
        description="Classify cell crops. Without a model the malaria model shipped with mnres\n"
        "is used: no download, no training, only the core install.",
        epilog="examples:\n"
        f"  {prog} predict --sample                     the shipped model on the bundled crops\n"
        f"  {prog} predict cells/ 'more/*.png'          the shipped model on your crops\n"
        f"  {prog} predict runs/default cells/ --json   a training run of yours\n"
        f"  {prog} predict runs/default/export/model_int8.tflite cells/",
    )
    pred.add_argument(
        "inputs",
        nargs="*",
        metavar="[MODEL] INPUT",
        help="optional MODEL (a training run folder, .tflite, .stablehlo/.bin or "
        ".onnx file; default: the shipped malaria model), then image files, "
        "folders or glob patterns",
    )
    pred.add_argument("--model", help="the model, named explicitly ('malaria': the shipped one)")
    pred.add_argument("--sample", action="store_true", help="add the ~250 crops bundled with mnres")
    pred.add_argument(
        "--checkpoint",
        choices=("best", "latest"),
        default="best",
        help="which checkpoint of a run folder",
    )
    cut = pred.add_mutually_exclusive_group()
    cut.add_argument(
        "--threshold",
        type=_probability,
        help="parasitized (class 1 of a two-class model) when p >= this (default: 0.5)",
    )
    cut.add_argument(
        "--operating-point",
        choices=calibration.OPERATING_POINTS,
        help="the threshold that gave 95%%/98%% specificity on the model's "
        "validation split (its calibration.json); two-class models only",
    )
    pred.add_argument(
        "--slide-prior",
        action="store_true",
        help="move each crop's p by its slide's fraction of crops called parasitized, in place "
        f"of the training split's (slides of {slide_prior.MIN_CROPS}+ crops; slide ids from "
        "NIH file names)",
    )
    pred.add_argument("--json", action="store_true", help="JSON instead of tables")
    for command, handler in ((summary, _summary), (export, _export), (pred, _predict)):
        command.set_defaults(handler=handler, command_parser=command)
    return parser


def main(argv=None) -> int:
    # The console script `mnres` and `python -m mnres` are the same program.
    prog = "mnres" if os.path.basename(sys.argv[0]) == "mnres" else "python -m mnres"
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    # A bad model name, field, size, model path or checkpoint: one line, no traceback.
    except (ValueError, FileNotFoundError) as e:
        # "usage: mnres predict ..." and the line, from the subcommand's own parser.
        args.command_parser.error(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
