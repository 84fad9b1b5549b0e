r"""How the shipped int8 TFLite file agrees with the shipped float model, on unseen slides.

  python -m experiments.int8_agreement --data_dir=PATH/cell_images \
      --out=experiments/results/malaria_model/int8_agreement.json

Reads the shipped model's test slides (listed in experiments/results/malaria_model/
manifest.json; the training split never saw them), or its validation slides when it kept no test
split (a final run), from the development folder, runs both files on the same decoded crops,
and records: crops, the share called the same at p >= 0.5, the largest and the median
probability gap, each file's accuracy, their sizes, and where it ran.
The model card quotes the record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = os.path.join(REPO, "experiments", "results", "malaria_model", "manifest.json")


def unseen_crops(data_dir: str, manifest: str = MANIFEST) -> tuple[str, list[str], np.ndarray]:
    """The split no training saw ('test', or 'validation' without one) and the paths and labels
    of its crops, checked against the manifest's count."""
    from mnres.data import folders

    with open(manifest) as f:
        splits = json.load(f)["splits"]
    which = "test" if splits["test"]["num_examples"] else "validation"
    split = splits[which]
    slides = set(split["slide_ids"])
    paths, labels = [], []
    for folder in sorted(os.listdir(data_dir)):
        for name in sorted(os.listdir(os.path.join(data_dir, folder))):
            facts = folders.crop_facts(os.path.join(data_dir, folder, name))
            if facts.slide_id in slides and facts.label is not None and name.endswith(".png"):
                paths.append(os.path.join(data_dir, folder, name))
                labels.append(facts.label)
    if len(paths) != split["num_examples"]:
        raise SystemExit(
            f"{data_dir}: {len(paths)} crops of the {which} slides, the manifest lists "
            f"{split['num_examples']}: not the development folder it split"
        )
    return which, paths, np.array(labels)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True, help="PATH/cell_images (development)")
    parser.add_argument("--out", help="write the record here")
    args = parser.parse_args(argv)

    import jax

    import mnres
    from mnres import run_folder
    from mnres.data import folders
    from mnres.deploy import crops, export
    from mnres.provenance import file_sha256
    from mnres.weights import loader, shipped

    split, paths, labels = unseen_crops(args.data_dir)
    classifier = loader.load_pretrained("malaria").classifier
    images = np.stack([crops.read_crop(p, classifier.image_size)[0] for p in paths])
    float_p = np.asarray(jax.nn.softmax(classifier.logits(images), -1))[:, 1]
    int8_path = shipped.shipped_folder() / shipped.INT8
    int8 = export.load_tflite(str(int8_path))
    int8_p = np.array([int8.predict_one(image)[1] for image in images])
    gap = np.abs(float_p - int8_p)
    record = {
        "crops": len(images),
        "slides": f"the shipped model's {len({folders.crop_facts(p).slide_id for p in paths})} "
        f"{split} slides",
        "same_call": float(np.mean((float_p >= 0.5) == (int8_p >= 0.5))),
        "max_abs_diff": float(gap.max()),
        "median_abs_diff": float(np.median(gap)),
        "float_accuracy": float(np.mean((float_p >= 0.5) == (labels == 1))),
        "int8_accuracy": float(np.mean((int8_p >= 0.5) == (labels == 1))),
        "int8_bytes": os.path.getsize(int8_path),
        # Which files it measured: the card quotes the record only while these ship.
        "int8_sha256": file_sha256(int8_path),
        "float_bytes": os.path.getsize(shipped.shipped_folder() / shipped.WEIGHTS),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "mnres": mnres.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(run_folder.json_text(record), end="")
    if args.out:
        run_folder.write_json(args.out, record)


if __name__ == "__main__":
    main()
