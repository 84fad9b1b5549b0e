"""What `python -m mnres predict` and `python -m mnres export` do with their parsed arguments.

`mnres.__main__` parses the command line and calls `predict_command` or `export_command`; each
prints what its user reads and returns the exit status. A bad input raises ValueError (or
FileNotFoundError) with one line, which the command line prints as a usage error.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import textwrap
import warnings

import numpy as np

from mnres import run_folder
from mnres.config.schema import MALARIA_CLASSES
from mnres.deploy import crops, export, parity, predict, run_checks, slides
from mnres.metrics import slide_prior
from mnres.weights import loader, shipped


def predict_command(args) -> int:
    """`predict`: classify crops, print a table (or JSON); 1 when not one input is an image or
    an input does not exist (after answering the rest, as `cat` does)."""
    if args.report:  # before the crops are read: a long run must not end in a lost page
        folder = os.path.dirname(os.path.abspath(args.report))
        _check_writable(
            folder,
            f"--report {args.report}",
            "give --report a path in a folder that can be written",
            create=False,
        )
    model, images = _model_and_images(args)
    from_package = model is None or model in shipped.SHIPPED
    model = model or shipped.SHIPPED[0]
    folder = str(shipped.shipped_folder(model)) if from_package else model
    names = predict.model_class_names(folder)
    threshold = _threshold(args, model, folder, names)
    if from_package:
        loaded = loader.load_pretrained(model)
        predictor = predict.from_classifier(loaded.classifier, f"{model} (shipped with mnres)")
    else:
        if os.path.isdir(model):  # a run folder: what its training found, before its answers
            for warning in run_folder.run_warnings(model):
                _warn(warning)
        predictor = predict.load_predictor(model, checkpoint=args.checkpoint)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", predict.GrayscaleWarning)
        rows = predict.predict_files(
            predictor, images, threshold=threshold, progress=not args.quiet
        )
    slides.group(rows, args.group_by)
    out = _predictions(args, predictor, model, folder, names, threshold, rows)
    print(json.dumps(out, indent=2) if args.json else _text(out, names))
    if args.report:
        _write_report(args.report, predictor, out)
    for warning in caught:
        _warn(str(warning.message))
    if all(r["error"] is not None for r in rows):
        print(f"error: not one of the {len(rows)} input(s) could be read as an image (each "
              "row says why)", file=sys.stderr)  # fmt: skip
        return 1
    missing = [r["file"] for r in rows if not (glob.has_magic(r["file"]) or
                                               os.path.lexists(r["file"]))]  # fmt: skip
    if missing:
        print(f"error: {len(missing)} input(s) do not exist: "
              f"{', '.join(crops.printable(m) for m in missing)}", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _write_report(path: str, predictor, out: dict) -> None:
    """The HTML slide report (`mnres.deploy.slide_report`), written atomically to `path`."""
    import mnres
    from mnres import atomic_file
    from mnres.data.folders import crop_facts
    from mnres.deploy import slide_report

    classifier, explain, why, maps_of = predictor.classifier, None, None, ""
    if classifier is not None:
        if hasattr(classifier.model, "members"):  # an Ensemble: gradcam averages its members
            maps_of = "the mean of the ensemble members' maps"
        from mnres.reporting import gradcam

        explain = lambda images: gradcam.gradcam(classifier.model, classifier.variables,
                                                 images)[0]  # noqa: E731  # fmt: skip
    else:
        why = (f"a {predictor.kind} file holds no feature maps to explain; Grad-CAM needs the "
               "model's layers (a run folder or the shipped model)")  # fmt: skip
    page = slide_report.render(
        out, version=mnres.__version__, explain=explain, why_no_maps=why, maps_of=maps_of,
        read_crop=lambda p: crops.read_crop(p, predictor.image_size)[0],
        truths=[crop_facts(r["file"]).label for r in out["images"]],
    )  # fmt: skip
    atomic_file.write_bytes(path, page.encode("utf-8"))
    print(f"report: {crops.printable(path)}", file=sys.stderr)


def _warn(text: str) -> None:
    print(f"warning: {crops.printable(text)}", file=sys.stderr)


def _predictions(args, predictor, model, folder, names, threshold, rows) -> dict:
    """What predict prints (as JSON with --json): the model, the rows, the slides' verdicts."""
    # The verdict reads the scores its rule was fitted on (plain, or with the slide prior),
    # whatever the crops are shown with: taken before --slide-prior moves them.
    record = slides.load_rule(folder) if predictor.malaria else None
    verdict_slides = slides.slide_rows(rows, record, threshold=threshold)
    prior = None
    if args.slide_prior:
        if not predictor.malaria:
            raise ValueError(f"--slide-prior needs the malaria pair of classes; {model} has "
                             f"{', '.join(names)}")  # fmt: skip
        # A shipped model's card holds it; a run's manifest, or 0.5 (the NIH set's, about).
        prevalence = predict.training_prevalence(folder) or 0.5
        adjusted = predict.apply_slide_prior(rows, prevalence, threshold=threshold)
        prior = {"train_prevalence": prevalence, "slides_adjusted": adjusted}
    if len(names) > 2:
        threshold = None  # the most probable class is called
    out = {"model": predictor.name, "threshold": threshold, "images": rows,
           "slides": verdict_slides, "verdict_rule": record}  # fmt: skip
    if prior is not None:
        out["slide_prior"] = prior
    if not predictor.malaria:
        out["class_names"] = list(names)
    return out


def _model_and_images(args) -> tuple[str | None, list[str]]:
    """The model named (None: the shipped one) and the image files of the inputs.

    Without --model, a first input that names a model (`predict.looks_like_model`) is the model.
    """
    inputs, model = list(args.inputs), args.model
    first_may_be_model = len(inputs) > (0 if args.sample else 1)
    if model is None and first_may_be_model and predict.looks_like_model(inputs[0]):
        model = inputs.pop(0)
    if args.sample:
        from mnres.data import sample

        inputs += sample.sample_cells()
    if not inputs:
        raise ValueError("no images given: name image files, folders or glob patterns, or --sample")
    return model, crops.find_images(inputs)  # before the model: a wrong path needs none


def _threshold(args, model: str, folder: str, names) -> float:
    """The threshold on p(class 1): --threshold, --operating-point's, or 0.5."""
    if len(names) > 2 and (args.operating_point or args.threshold is not None):
        flag = "--operating-point" if args.operating_point else "--threshold"
        raise ValueError(
            f"{flag} needs a model of two classes; {model} has {len(names)} "
            f"({', '.join(names)}) and calls each image its most probable class"
        )
    if args.operating_point:
        return predict.operating_threshold(folder, args.operating_point)
    return 0.5 if args.threshold is None else args.threshold


def _text(out: dict, names) -> str:
    """The tables predict prints, under the model and how it calls a crop (`out`: its JSON)."""
    lines = [f"model: {crops.printable(out['model'])}", _rule(names, out["threshold"])]
    prior = out.get("slide_prior")
    if prior is not None:
        lines.append(
            f"slide prior: {len(prior['slides_adjusted'])} slide(s) of {slide_prior.MIN_CROPS}+ "
            f"crops adjusted to their own prevalence (training split: "
            f"{prior['train_prevalence']:.3f})"
        )
    if out["verdict_rule"] is not None:
        rule = f"slide verdict: {slides.describe(out['verdict_rule'])}"
        lines += textwrap.wrap(rule, width=110, subsequent_indent="  ")
    table = predict.format_table(out["images"], slides.format_slides(out["slides"]))
    return "\n".join([*lines, "", table])


def _rule(names, threshold) -> str:
    """How predict calls a crop, in one line."""
    if tuple(names) == MALARIA_CLASSES:
        return f"parasitized iff p >= {threshold:.4g}"
    if len(names) == 2:
        return f"{names[1]} iff p({names[1]}) >= {threshold:.4g}, else {names[0]}"
    return f"label: the most probable of {len(names)} classes ({', '.join(names)})"


def export_command(args) -> int:
    """`export`: write the run's files, list them, and with --evaluate compare them."""
    formats = _export_formats(args.formats, export.FORMATS)
    classifier = run_checks.load_run(args.run, which=args.checkpoint)
    out = args.out or _default_out(args.run)
    # Before any crop is decoded.
    _check_writable(out, "the export", "give --out a folder that can be written", create=True)
    calibration = _calibration_crops(args, classifier) if "int8" in formats else None
    evaluation = _evaluation_crops(args, classifier) if args.evaluate else None
    paths = export.export_run(
        classifier, out, formats, per_channel=not args.per_tensor,
        representative_images=calibration, progress=not args.quiet,
    )  # fmt: skip
    for fmt, path in paths.items():
        print(f"{fmt:<10} {os.path.getsize(path) / 1e6:8.3f} MB  {path}")
    if evaluation is not None:
        what, images, labels = evaluation
        predictors = {"jax": predict.from_classifier(classifier)}
        predictors |= {fmt: predict.load_predictor(path) for fmt, path in paths.items()}
        print(f"\n{what}: {len(images)} images; batch-1 latency on this CPU")
        print(f"{'model':<10} {'accuracy':>9} {'max |dp|':>9} {'latency ms':>11}")
        for row in parity.compare(predictors, images, labels):
            print(
                f"{row['model']:<10} {row['accuracy']:>9.4f} {row['max_abs_diff']:>9.2e} "
                f"{row['latency_ms']:>11.3f}"
            )
    return 0


def _calibration_crops(args, classifier):
    """int8 calibration crops: --calibration-dir, else the run's stored sample, else its data."""
    from mnres.data import sample

    size, count = classifier.image_size, args.calibration_images
    if args.calibration_dir:
        paths = crops.find_images([args.calibration_dir])
        chosen = np.random.default_rng(0).permutation(len(paths))[:count]
        what = f"--calibration-dir {args.calibration_dir}"
        return crops.read_crops([paths[i] for i in sorted(chosen)], size, what)
    stored = run_folder.read_calibration_sample(args.run)
    if stored is not None:
        return stored[:count]
    train = _run_split(classifier, "train", "int8 calibration needs cell crops",
                       "give --calibration-dir DIR (any cell crops of this kind)")  # fmt: skip
    return sample.calibration_images(train, count)


def _evaluation_crops(args, classifier):
    """(what, uint8 crops, labels) for --evaluate: a labelled folder, else the run's test split."""
    from mnres.data import folders

    if args.evaluate is not True:
        names = classifier.class_names
        # Parasitized/ + Uninfected/, or the run's class folders, in the model's order.
        listing = folders.list_folder(args.evaluate, None if names == MALARIA_CLASSES else names)
        if listing["class_names"] != names:
            raise ValueError(
                f"--evaluate {args.evaluate}: its classes are {listing['class_names']}, the "
                f"model's {names}"
            )
        what = f"--evaluate {args.evaluate}"
        images = crops.read_crops(listing["paths"], classifier.image_size, what)
        return args.evaluate, images, listing["labels"]
    fix = "give --evaluate DIR (a folder holding Parasitized/ and Uninfected/, or the run's "
    fix += "class folders)"
    test = _run_split(classifier, "test", "--evaluate needs labelled crops", fix)
    return "test split", test.images, test.labels


def _run_split(classifier, name: str, need: str, fix: str):
    """The run's `name` split, reloaded from its config; ValueError (one line) if it cannot be."""
    config = classifier.config
    try:
        return getattr(export.run_dataset(config), name)
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


def _default_out(run: str) -> str:
    """RUN/export; ValueError (one line) when it leads out of the run folder (a link: a run
    folder is anyone's, and export must not write over what its link points to)."""
    out = os.path.join(run, "export")
    inside = os.path.realpath(run)
    if os.path.commonpath([os.path.realpath(out), inside]) != inside or os.path.islink(out):
        target = os.readlink(out) if os.path.islink(out) else os.path.realpath(out)
        raise ValueError(
            f"{out} is a link to {target}: export writes into the run folder only; remove "
            "the link or give --out DIR"
        )
    return out


def _check_writable(folder: str, what: str, fix: str, *, create: bool) -> None:
    """One line (FileNotFoundError, ValueError) unless `what` can be written into `folder`;
    `fix` tells the user which flag to change.

    `create`: make a missing folder (export's --out) rather than refuse it (a report's folder,
    where a missing one is more likely a typo than a wish)."""
    if not create and not os.path.isdir(folder):
        raise FileNotFoundError(f"{what}: no folder {folder} to write it in")
    try:
        if create:
            os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"cannot write {what} to {folder} ({e.strerror or e}): {fix}") from e
