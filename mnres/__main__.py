"""The `python -m mnres` command line.

python -m mnres summary MODEL [--alpha A] [--classes N] [--no-top] [--image-size S]
python -m mnres export RUN [--out DIR] [--formats stablehlo,tflite,int8,onnx] [--evaluate]
    [--quiet]
python -m mnres predict [MODEL] IMAGE|FOLDER|GLOB... [--sample] [--json] [--quiet]
    [--checkpoint best|latest] [--threshold P | --operating-point spec95|spec98]
"""

from __future__ import annotations

import argparse
import os
import sys

import mnres
from mnres import models
from mnres.deploy import slides
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
    from mnres.deploy import commands  # the export stack: not for --help or summary

    return commands.export_command(args)


def _predict(args) -> int:
    from mnres.deploy import commands

    return commands.predict_command(args)


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

    subcommands = ((_summary_args, _summary), (_export_args, _export), (_predict_args, _predict))
    for arguments, handler in subcommands:  # in this order in the help
        command = arguments(add, prog)
        command.set_defaults(handler=handler, command_parser=command)
    return parser


def _summary_args(add, prog: str) -> argparse.ArgumentParser:
    """The `summary` subcommand and its arguments."""
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
    return summary


_QUIET = "no progress bar (it is shown on stderr only when that is a terminal)"


def _export_args(add, prog: str) -> argparse.ArgumentParser:
    """The `export` subcommand and its arguments."""
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
    export.add_argument("--quiet", action="store_true", help=_QUIET)
    _compile_cache_arg(export)
    return export


def _predict_args(add, prog: str) -> argparse.ArgumentParser:
    """The `predict` subcommand and its arguments."""
    pred = add(
        "predict",
        help="classify cell images (the shipped model unless one is named); a verdict per slide",
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
    pred.add_argument(
        "--group-by",
        choices=slides.GROUP_BY,
        default="auto",
        help="what makes a slide: the NIH slide id in file names ('name'), the nearest folder "
        "above a crop that is not Parasitized/ or Uninfected/ ('folder'), the name's id else the "
        "folder ('auto', the default) or no slides ('none')",
    )
    pred.add_argument("--json", action="store_true", help="JSON instead of tables")
    pred.add_argument(
        "--report",
        metavar="PATH.html",
        help="also write one self-contained HTML page: the verdicts, each slide's most "
        "suspicious crops with their Grad-CAM overlay, the crops that could not be read",
    )
    pred.add_argument("--quiet", action="store_true", help=_QUIET)
    _compile_cache_arg(pred)
    return pred


def _compile_cache_arg(parser) -> None:
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not keep compiled programs in $MNRES_CACHE/jax-compile (default ~/.cache/mnres; "
        "MNRES_COMPILE_CACHE=0 does the same)",
    )


def main(argv=None) -> int:
    # The console script `mnres` and `python -m mnres` are the same program.
    prog = "mnres" if os.path.basename(sys.argv[0]) == "mnres" else "python -m mnres"
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command in ("predict", "export"):
        from mnres import cache

        cache.enable_compile_cache(not args.no_compile_cache)
    try:
        return args.handler(args)
    # A bad model name, field, size, model path or checkpoint: one line, no traceback.
    except (ValueError, FileNotFoundError) as e:
        from mnres.deploy import crops  # a path in the line is shown, never obeyed

        # "usage: mnres predict ..." and the line, from the subcommand's own parser.
        args.command_parser.error(crops.printable(str(e)))
        return 2


if __name__ == "__main__":
    sys.exit(main())
