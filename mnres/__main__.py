"""The `python -m mnres` command line.

python -m mnres summary MODEL [--alpha A] [--classes N] [--no-top] [--image-size S]
python -m mnres export RUN [--out DIR] [--formats stablehlo,tflite,int8,onnx] [--evaluate]
python -m mnres predict MODEL IMAGE|FOLDER|GLOB... [--json] [--checkpoint best|latest]
    [--threshold P | --operating-point spec95|spec98]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import mnres
from mnres import models, run_folder
from mnres.evaluation import calibration
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
    """An argparse type: a threshold on p(parasitized), in [0, 1]."""
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
    _check_writable(out)  # before the data set loads and the converters run
    ds = None
    if "int8" in formats or args.evaluate:
        from mnres import data

        ds = data.load_dataset(classifier.config.data, classifier.config.seed)
    paths = export.export_run(
        classifier,
        out,
        formats,
        per_channel=not args.per_tensor,
        representative_images=(
            export.calibration_images(ds.train, args.calibration_images) if ds else None
        ),
    )
    for fmt, path in paths.items():
        print(f"{fmt:<10} {os.path.getsize(path) / 1e6:8.3f} MB  {path}")
    if args.evaluate:
        predictors = {"jax": predict.from_classifier(classifier)}
        predictors |= {fmt: predict.load_predictor(path) for fmt, path in paths.items()}
        print(f"\ntest split: {len(ds.test)} images; batch-1 latency on this CPU")
        print(f"{'model':<10} {'accuracy':>9} {'max |dp|':>9} {'latency ms':>11}")
        for row in predict.compare(predictors, ds.test.images, ds.test.labels):
            print(
                f"{row['model']:<10} {row['accuracy']:>9.4f} {row['max_abs_diff']:>9.2e} "
                f"{row['latency_ms']:>11.3f}"
            )
    return 0


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


def _predict(args) -> int:
    from mnres.deploy import predict

    images = predict.find_images(args.inputs)  # first: a wrong path needs no model to say so
    threshold = args.threshold
    if args.operating_point:
        threshold = predict.operating_threshold(args.model, args.operating_point)
    if os.path.isdir(args.model):  # a run folder: what its training found, before its answers
        for warning in run_folder.run_warnings(args.model):
            print(f"warning: {warning}", file=sys.stderr)
    predictor = predict.load_predictor(args.model, checkpoint=args.checkpoint)
    rows = predict.predict_files(predictor, images, threshold=threshold)
    slides = predict.slide_summary(rows, threshold=threshold)
    if args.json:
        out = {"model": args.model, "threshold": threshold, "images": rows, "slides": slides}
        print(json.dumps(out, indent=2))
    else:
        print(f"parasitized iff p >= {threshold:.4g}\n")
        print(predict.format_table(rows, slides))
    if all(r["error"] is not None for r in rows):
        print(f"error: not one of the {len(rows)} input(s) could be read as an image (each "
              "row says why)", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def main(argv=None) -> int:
    # The console script `mnres` and `python -m mnres` are the same program.
    prog = "mnres" if os.path.basename(sys.argv[0]) == "mnres" else "python -m mnres"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--version", action="version", version=f"mnres {mnres.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="layer table and Keras-style parameter counts")
    summary.add_argument("model", help=f"one of: {', '.join(sorted(models.MODELS))}")
    summary.add_argument("--alpha", type=_positive(float), help="width multiplier")
    summary.add_argument("--classes", type=_positive(int), help="number of classes of the top")
    summary.add_argument("--no-top", action="store_true", help="without the classifier")
    summary.add_argument("--image-size", type=_positive(int), default=224)
    export = commands.add_parser(
        "export", help="a training run -> StableHLO and TFLite (float32, int8) files"
    )
    export.add_argument("run", help="training workdir (config.json + checkpoints/)")
    export.add_argument("--out", help="output folder; default RUN/export")
    export.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    export.add_argument(
        "--formats",
        default="stablehlo,tflite,int8",
        help="comma-separated: stablehlo,tflite,int8,onnx (onnx needs jax2onnx, onnxruntime)",
    )
    export.add_argument("--per-tensor", action="store_true", help="int8 weights per tensor")
    export.add_argument(
        "--calibration-images", type=_positive(int), default=256, help="int8 calibration"
    )
    export.add_argument(
        "--evaluate", action="store_true", help="test accuracy, parity and latency of each file"
    )
    pred = commands.add_parser("predict", help="classify cell images; per-slide summary")
    pred.add_argument("model", help="training workdir, .tflite, .stablehlo or .onnx file")
    pred.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    pred.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    cut = pred.add_mutually_exclusive_group()
    cut.add_argument(
        "--threshold", type=_probability, default=0.5, help="parasitized when p >= this"
    )
    cut.add_argument(
        "--operating-point",
        choices=calibration.OPERATING_POINTS,
        help="the threshold that gave 95%%/98%% specificity on the run's validation split "
        "(its calibration.json)",
    )
    pred.add_argument("--json", action="store_true", help="JSON instead of tables")
    args = parser.parse_args(argv)
    try:
        return {"summary": _summary, "export": _export, "predict": _predict}[args.command](args)
    # A bad model name, field, size, model path or checkpoint: one line, no traceback.
    except ValueError as e:
        parser.error(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
