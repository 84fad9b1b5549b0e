"""The `python -m mnres` command line.

python -m mnres summary MODEL [--alpha A] [--classes N] [--no-top] [--image-size S]
"""

from __future__ import annotations

import argparse
import sys

from mnres import models, params


def _summary(args) -> int:
    overrides = {}
    if args.alpha is not None:
        overrides["alpha"] = args.alpha
    if args.classes is not None:
        overrides["num_classes"] = args.classes
    if args.no_top:
        overrides["include_top"] = False
    model = models.create_model(args.model, **overrides)
    print(params.summary(model, (1, args.image_size, args.image_size, 3)))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnres", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="layer table and Keras-style parameter counts")
    summary.add_argument("model", help=f"one of: {', '.join(sorted(models.MODELS))}")
    summary.add_argument("--alpha", type=float, help="width multiplier")
    summary.add_argument("--classes", type=int, help="number of classes of the top")
    summary.add_argument("--no-top", action="store_true", help="without the classifier")
    summary.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args(argv)
    try:
        return {"summary": _summary}[args.command](args)
    except ValueError as e:  # a bad model name, field or size: one line, no traceback
        parser.error(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
