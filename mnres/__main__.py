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

from mnres import models, run_folder
from mnres.evaluation import calibration
from mnres.models import params


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

    classifier = run_folder.load_run(args.run, which=args.checkpoint)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    out = args.out or os.path.join(args.run, "export")
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


def _predict(args) -> int:
    from mnres.deploy import predict

    threshold = args.threshold
    if args.operating_point:
        threshold = predict.operating_threshold(args.model, args.operating_point)
    predictor = predict.load_predictor(args.model, checkpoint=args.checkpoint)
    rows = predict.predict_files(predictor, predict.find_images(args.inputs), threshold=threshold)
    slides = predict.slide_summary(rows, threshold=threshold)
    if args.json:
        out = {"model": args.model, "threshold": threshold, "images": rows, "slides": slides}
        print(json.dumps(out, indent=2))
    else:
        print(f"parasitized iff p >= {threshold:.4g}\n")
        print(predict.format_table(rows, slides))
    return 0 if any(r["error"] is None for r in rows) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnres", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="layer table and Keras-style parameter counts")
    summary.add_argument("model", help=f"one of: {', '.join(sorted(models.MODELS))}")
    summary.add_argument("--alpha", type=float, help="width multiplier")
    summary.add_argument("--classes", type=int, help="number of classes of the top")
    summary.add_argument("--no-top", action="store_true", help="without the classifier")
    summary.add_argument("--image-size", type=int, default=224)
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
    export.add_argument("--calibration-images", type=int, default=256, help="int8 calibration")
    export.add_argument(
        "--evaluate", action="store_true", help="test accuracy, parity and latency of each file"
    )
    pred = commands.add_parser("predict", help="classify cell images; per-slide summary")
    pred.add_argument("model", help="training workdir, .tflite, .stablehlo or .onnx file")
    pred.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    pred.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    cut = pred.add_mutually_exclusive_group()
    cut.add_argument("--threshold", type=float, default=0.5, help="parasitized when p >= this")
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
