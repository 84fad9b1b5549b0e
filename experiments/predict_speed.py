r"""How fast `mnres predict` reads crops, against the model it runs, in one invocation.

  python -m experiments.predict_speed --data_dir=PATH/cell_images --crops=5000 \
      --out=experiments/results/predict_speed.json

Copies `--crops` PNG crops (evenly spaced in the development folder's name order, in their
class folders with their names, or synthetic cells without `--data_dir`) into a temporary
folder, then times, each from process start to the written output:
- `python -m mnres predict DIR --json --quiet > out.json` with the shipped float model
  (8-view test-time augmentation, as shipped), again with `--report` (the seconds it adds and
  the page's size), and with its int8 TFLite file;
- `python -m mnres predict --sample` twice with an empty compilation cache (the first call
  fills it, the second reads it);
(each predict rate of a second call: the first fills the compilation cache) and in this
process, the shipped model's own rate: `jax.jit` of its forward pass with the same
8 views, batch 256, on the same crops decoded once, timed after a warm-up pass.
Then the batch-1 latency of the shipped float model (jitted, 8 views) and of its int8 file
(LiteRT, one thread). Prints crops/s and the ratio of predict to the model. Run it with
nothing else busy. The record names the sha256 of the weights and of the int8 file it timed, so
the docs' tables quote no rate of other weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return f"{len(names)} x {names[0]}" if names else platform.processor()
    except OSError:
        return platform.processor() or "unknown CPU"


def write_crops(folder: str, data_dir: str | None, count: int) -> list[str]:
    """`count` PNG crops in `folder`: the development set's first, or synthetic cells."""
    os.makedirs(folder)
    if data_dir:
        from mnres.data import folders

        listing = folders.list_folder(data_dir)
        if len(listing["paths"]) < count:
            sys.exit(f"{data_dir} holds {len(listing['paths'])} crops, fewer than --crops={count}")
        # Every count-th crop of the name order: both classes, whole slides' worth of crops;
        # names and class folders kept, so slides and the truth column are a user's.
        chosen = np.linspace(0, len(listing["paths"]) - 1, count).astype(int)
        out = []
        for i in chosen:
            out.append(os.path.join(folder, str(listing["names"][i])))
            os.makedirs(os.path.dirname(out[-1]), exist_ok=True)
            shutil.copyfile(listing["paths"][i], out[-1])
        return out
    from PIL import Image

    from mnres.data import synthetic

    images = synthetic.draw_cells(count, 100, 2, 0)[0]
    out = []
    for i, image in enumerate(images):
        out.append(os.path.join(folder, f"crop_{i:05d}.png"))
        Image.fromarray(image).save(out[-1])
    return out


def timed(command: list[str], env: dict, stdout_path: str) -> float:
    """Wall seconds of `command` from process start to exit, stdout written to a file."""
    start = time.perf_counter()
    with open(stdout_path, "w") as out:
        proc = subprocess.run(command, env=env, stdout=out, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def model_rate(paths: list[str], batch_size: int = 256) -> float:
    """Crops/s of the shipped model's jitted forward pass (8 views), decoded crops, steady."""
    from mnres.deploy import crops
    from mnres.weights import loader

    classifier = loader.load_pretrained("malaria").classifier
    images = np.stack([crops.read_crop(p, classifier.image_size)[0] for p in paths])
    assert classifier.test_time_augmentation
    classifier.logits(images[:batch_size], batch_size=batch_size)  # compile
    start = time.perf_counter()
    classifier.logits(images, batch_size=batch_size)
    return len(images) / (time.perf_counter() - start)


def batch1_latency_ms(paths: list[str], calls: int = 200) -> dict:
    """Median ms to classify one crop: the float model (jit, 8 views) and its int8 file."""
    import statistics

    from mnres.deploy import crops, export
    from mnres.weights import loader, shipped

    classifier = loader.load_pretrained("malaria").classifier
    images = [crops.read_crop(p, classifier.image_size)[0] for p in paths[:calls]]
    int8 = export.load_tflite(str(shipped.shipped_folder() / shipped.INT8), num_threads=1)
    out = {}
    for name, one in (("float", lambda x: np.asarray(classifier.serve(x[None]))),
                      ("int8", int8.predict_one)):  # fmt: skip
        one(images[0])  # compile / plan
        times = []
        for image in images:
            start = time.perf_counter()
            one(image)
            times.append(1000 * (time.perf_counter() - start))
        out[f"batch1_{name}_ms"] = statistics.median(times)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", help="PATH/cell_images; default: synthetic cells")
    parser.add_argument("--crops", type=int, default=5000)
    parser.add_argument("--out", help="also write the figures to this JSON file (a record)")
    args = parser.parse_args(argv)

    import jax

    import mnres
    from mnres.provenance import file_sha256
    from mnres.weights import shipped

    results = {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
               "jax": jax.__version__, "mnres": mnres.__version__, "crops": args.crops,
               "data": "development crops" if args.data_dir else "synthetic cells",
               "weights_sha256": file_sha256(shipped.shipped_folder() / shipped.WEIGHTS),
               "int8_sha256": file_sha256(shipped.shipped_folder() / shipped.INT8)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_crops(os.path.join(tmp, "crops"), args.data_dir, args.crops)
        # Its own compilation cache, on whatever the caller's environment says.
        env = {k: v for k, v in os.environ.items() if k != "MNRES_COMPILE_CACHE"}
        env["MNRES_CACHE"] = os.path.join(tmp, "cache")
        predict = [sys.executable, "-m", "mnres", "predict"]
        out = os.path.join(tmp, "out.json")
        int8 = str(shipped.shipped_folder() / shipped.INT8)
        # The first call fills the compilation cache; the rates are of a second call.
        first = timed([*predict, os.path.join(tmp, "crops"), "--json", "--quiet"], env, out)
        results["predict_float_first_call_crops_per_s"] = args.crops / first
        seconds = timed([*predict, os.path.join(tmp, "crops"), "--json", "--quiet"], env, out)
        results["predict_float_crops_per_s"] = args.crops / seconds
        with open(out) as f:
            assert len(json.load(f)["images"]) == args.crops
        report = os.path.join(tmp, "report.html")
        with_report = timed([*predict, os.path.join(tmp, "crops"), "--json", "--quiet",
                             "--report", report], env, out)  # fmt: skip
        results["report_adds_s"] = with_report - seconds
        results["report_mb"] = os.path.getsize(report) / 1e6
        timed([*predict, int8, os.path.join(tmp, "crops"), "--json", "--quiet"], env, out)
        seconds = timed([*predict, int8, os.path.join(tmp, "crops"), "--json", "--quiet"],
                        env, out)  # fmt: skip
        results["predict_int8_crops_per_s"] = args.crops / seconds
        shutil.rmtree(env["MNRES_CACHE"], ignore_errors=True)
        sample = [*predict, "--sample", "--quiet"]
        results["sample_first_s"] = timed(sample, env, out)
        results["sample_second_s"] = timed(sample, env, out)
        results["model_crops_per_s"] = model_rate(paths)
        results.update(batch1_latency_ms(paths))
    results["predict_over_model"] = results["predict_float_crops_per_s"] / results[
        "model_crops_per_s"]  # fmt: skip
    results["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
