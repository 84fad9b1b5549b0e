"""Fine-tuning on a folder of any classes: ImageFolder layout, split rule, weights, K-class report,
export and predict."""

import csv
import json
import logging
import os

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_fixtures import write_cell_folder
from PIL import Image

import mnres
from experiments.configs import finetune, smoke
from mnres import config as config_lib
from mnres import data, metrics, run_folder
from mnres.__main__ import main
from mnres.data import splits
from mnres.deploy import predict, slides
from mnres.metrics import calibration, multiclass
from mnres.models.params import abstract_variables
from mnres.reporting import report
from mnres.training import loop
from mnres.training.steps import TrainState
from mnres.weights import shipped, transfer

COLOURS = {"bird": (200, 40, 40), "cat": (40, 200, 40), "dog": (40, 40, 200)}


def write_class_folder(root, counts: dict, *, slides=None, size: int = 16, seed: int = 0):
    """`root/<class>/<name>.png` for each class of `counts` ({class: images}), each class its
    own colour; file names carry NIH slide ids when `slides` gives them (cycled)."""
    rng = np.random.default_rng(seed)
    for k, (name, count) in enumerate(counts.items()):
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        colour = np.array(COLOURS.get(name, (60 * k % 255, 120, 200 - 40 * k)))
        for i in range(count):
            noise = rng.integers(-25, 25, (size, size, 3))
            image = np.clip(colour + noise, 0, 255).astype(np.uint8)
            stem = f"{slides[i % len(slides)]}ThinF_IMG_{i:03d}_cell_{i}" if slides else f"{i:03d}"
            Image.fromarray(image).save(os.path.join(folder, f"{stem}.png"))
    return str(root)


def folder_config(directory, **overrides):
    config = config_lib.default_config().data
    config.source, config.dir, config.image_size = "folder", str(directory), 16
    config.split_by = "auto"
    config.update(overrides)
    return config


# -- the data: layouts and split rules ---------------------------------------------------------


def test_classes_are_sorted_by_name_as_imagefolder_does(tmp_path):
    write_class_folder(tmp_path, {"dog": 10, "Zebra": 10, "cat": 10})  # written out of order
    dataset = data.load_dataset(folder_config(tmp_path), seed=0)
    assert dataset.class_names == ("Zebra", "cat", "dog")  # Python's sort: capitals first
    label_of = {}
    for split in (dataset.train, dataset.validation, dataset.test):
        for name, label in zip(split.names, split.labels, strict=True):
            label_of[name.split("/")[0]] = int(label)
    assert label_of == {"Zebra": 0, "cat": 1, "dog": 2}
    assert dataset.manifest["class_names"] == ["Zebra", "cat", "dog"]
    two = data.load_dataset(folder_config(tmp_path, class_names=("dog", "cat", "Zebra")), 0)
    assert two.class_names == ("dog", "cat", "Zebra") and set(two.test.labels) == {0, 1, 2}
    (tmp_path / "Zebra").rename(tmp_path / ".ipynb_checkpoints")  # hidden: no class
    pair = data.load_dataset(folder_config(tmp_path), seed=0)
    assert pair.class_names == ("cat", "dog")
    assert pair.train.names[pair.train.labels == 1][0].startswith("dog/")


def test_names_without_slide_ids_split_by_image_and_the_manifest_says_so(tmp_path, caplog):
    write_class_folder(tmp_path, {"bird": 10, "cat": 10, "dog": 10})
    with caplog.at_level(logging.INFO):
        dataset = data.load_dataset(folder_config(tmp_path, split_fractions=(0.6, 0.2, 0.2)), 0)
    manifest = dataset.manifest
    assert manifest["split_by"] == "image" and manifest["split_by_requested"] == "auto"
    assert "split is by image" in caplog.text
    for name, count in (("train", 6), ("validation", 2), ("test", 2)):  # per class
        assert manifest["splits"][name]["counts"] == {"bird": count, "cat": count, "dog": count}
    with pytest.raises(ValueError, match="'slide' or 'image'"):  # auto is resolved by the source
        splits.split_indices(dataset.train.labels, dataset.train.slide_ids, (1.0,), "auto", 0)


def test_nih_slide_ids_in_file_names_still_split_by_slide(tmp_path):
    slides = [f"C{i}P{i}" for i in range(1, 13)]
    write_class_folder(tmp_path, {"bird": 36, "cat": 36, "dog": 36}, slides=slides)
    dataset = data.load_dataset(folder_config(tmp_path), seed=0)
    assert dataset.manifest["split_by"] == "slide"
    parts = [set(s.slide_ids) for s in (dataset.train, dataset.validation, dataset.test)]
    assert parts[0] and parts[1] and parts[2] and not (parts[0] & parts[1] | parts[0] & parts[2])
    assert dataset.manifest["slides_in_several_splits"] == []
    for split in (dataset.train, dataset.validation, dataset.test):
        assert set(split.labels.tolist()) == {0, 1, 2}  # stratified: every class everywhere


def test_slides_of_k_classes_are_stratified_by_their_majority_class():
    # 9 slides, 3 of each majority class; each slide holds 8 cells of its class, 1 of another.
    labels, slide_ids = [], []
    for s in range(9):
        major = s % 3
        labels += [major] * 8 + [(major + 1) % 3]
        slide_ids += [f"S{s}"] * 9
    parts = splits.split_by_slide(np.array(labels), np.array(slide_ids), (1 / 3, 1 / 3, 1 / 3), 0)
    for idx in parts:  # one slide of each majority class in each split
        majors = {int(np.argmax(np.bincount(np.array(labels)[idx][np.array(slide_ids)[idx] == s],
                                            minlength=3)))
                  for s in set(np.array(slide_ids)[idx])}  # fmt: skip
        assert majors == {0, 1, 2}


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"cat": 5}, "one class folder (cat/)"),
        ({}, "no class folder"),
        ({"cat": 5, "dog": 0}, "dog/ holds no images"),
    ],
)
def test_a_folder_without_two_classes_is_refused_in_one_line(tmp_path, layout, message):
    write_class_folder(tmp_path, layout)
    Image.new("RGB", (8, 8)).save(tmp_path / "stray.png")  # directly in dir: no class
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.load_dataset(folder_config(tmp_path), seed=0)


def test_malaria_folders_keep_their_labels_and_manifest(tmp_path):
    write_cell_folder(tmp_path, {"C1P1": (6, 6), "C2P2": (6, 6), "C3P3": (6, 6), "C4P4": (0, 8)})
    config = folder_config(tmp_path, split_by="slide", split_fractions=(0.5, 0.25, 0.25))
    dataset = data.load_dataset(config, seed=0)
    assert dataset.class_names == ("uninfected", "parasitized")
    assert "class_names" not in dataset.manifest and "split_by_requested" not in dataset.manifest
    assert all(n.startswith("Parasitized/") == bool(label) for n, label in
               zip(dataset.train.names, dataset.train.labels, strict=True))  # fmt: skip
    # A third class folder beside them: the ImageFolder layout, sorted by name.
    write_class_folder(tmp_path, {"gametocyte": 6})
    three = data.load_dataset(
        folder_config(tmp_path, split_by="image", split_fractions=(0.5, 0.25, 0.25)), seed=0
    )
    assert three.class_names == ("Parasitized", "Uninfected", "gametocyte")
    with pytest.raises(ValueError, match="data names 2 classes"):  # binary-only callers
        splits.checked_dataset(
            {"train": three.train, "validation": three.validation, "test": three.test},
            (0.8, 0.1, 0.1), "split by image", source="t", seed=0, image_size=16,
            split_by="image", skipped=[],
        )  # fmt: skip


# -- weights -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored():
    """The shipped malaria model's variables, as stored (an ensemble's: every member's)."""
    path = shipped.shipped_folder("malaria") / shipped.WEIGHTS
    return flax.serialization.msgpack_restore(path.read_bytes())


def stored_for(stored, model):
    """The stored weights a single network loads: those of the shipped member it is."""
    member = transfer.shipped_member("malaria", model)
    return stored if member is None else mnres.models.ensemble.member_variables(stored, member)


def test_load_pretrained_malaria_with_other_classes_gives_a_new_head(stored):
    three = mnres.load_pretrained("malaria", num_classes=3)
    stored_head = stored_for(stored, three.model)
    assert three.model.num_classes == 3 and three.calibration is None
    head = three.variables["params"]["predictions"]
    assert head["kernel"].shape == (1280, 3) and not np.any(head["bias"])
    assert np.std(head["kernel"]) > 0.01  # initial values, not zeros
    for collection in ("params", "batch_stats"):
        for layer, value in stored_head[collection].items():
            if layer != "predictions":
                jax.tree.map(np.testing.assert_array_equal, three.variables[collection][layer],
                             value)  # fmt: skip
    alpha = shipped.shipped_network()["alpha"]
    other_alpha = 0.5 if alpha != 0.5 else 1.0
    other = mnres.create_model("mobilenet_v2", alpha=other_alpha, num_classes=3)
    with pytest.raises(ValueError, match=rf"alpha={alpha} \(this model has {other_alpha}\)"):
        mnres.load_pretrained("malaria", model=other)


def _state(model, size=32):
    shapes = abstract_variables(model, (1, size, size, 3))
    rng = np.random.default_rng(0)
    values = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), dict(shapes))
    return TrainState(values["params"], values["batch_stats"], {}, jnp.int32(0), jnp.zeros(2))


@pytest.mark.parametrize("classes", [("bird", "cat", "dog"), ("cat", "dog"), None])
def test_training_starts_from_the_malaria_backbone(classes, stored, caplog):
    config = finetune.get_config()
    k = len(classes) if classes else 2
    model = mnres.models.from_config(config.model, num_classes=k)
    member = stored_for(stored, model)
    state = _state(model)
    with caplog.at_level(logging.INFO):
        loaded = transfer.warm_start(config.model, model, state, 32, classes)
    layer = lambda params: params["block_5"]["project"]["block_5_project"]["kernel"]
    np.testing.assert_array_equal(layer(loaded.params), layer(member["params"]))
    new_head = classes is not None  # None: the class count decides (2: the shipped head)
    np.testing.assert_array_equal(
        loaded.params["predictions"]["kernel"],
        state.params["predictions"]["kernel"]
        if new_head
        else member["params"]["predictions"]["kernel"],
    )
    assert ("starts from its initialisation" in caplog.text) == new_head


# -- K-class metrics and calibration -----------------------------------------------------------


def test_classification_metrics_of_three_classes():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.3, .6, .1], [.1, .1, .8],
                      [.5, .1, .4]])  # fmt: skip
    got = multiclass.classification_metrics(labels, probs, ("a", "b", "c"))
    assert got["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert got["accuracy"] == pytest.approx(4 / 6)
    rows = {r["class"]: r for r in got["per_class"]}
    assert rows["b"]["precision"] == pytest.approx(2 / 3) and rows["b"]["recall"] == 1.0
    assert rows["c"]["precision"] == 1.0 and rows["c"]["recall"] == 0.5
    # One vs rest for 'a': scores .8 .2 | .1 .3 .1 .5 -> 6 of 8 pairs ranked right.
    assert rows["a"]["auc"] == pytest.approx(6 / 8)
    assert got["auc"] == pytest.approx(np.mean([r["auc"] for r in got["per_class"]]))
    collapsed = multiclass.output_collapse(labels, np.tile([[0.2, 0.5, 0.3]], (6, 1)))
    assert collapsed["collapsed"] and collapsed["called_class"] == 1
    assert not multiclass.output_collapse(labels, probs)["collapsed"]


def test_three_class_calibration_has_a_temperature_and_no_operating_points():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, (2000, 3))  # calibrated logits: labels drawn from softmax(z)
    labels = np.array([rng.choice(3, p=p) for p in multiclass.softmax(z)])
    logits = 3.0 * z  # three times too confident
    record = calibration.calibrate(logits[:1000], labels[:1000], logits[1000:], labels[1000:])
    assert record["num_classes"] == 3 and 2.5 < record["temperature"] < 3.5
    assert record["test"]["nll_after"] < record["test"]["nll_before"]
    assert record["test"]["ece_after"] < record["test"]["ece_before"]
    assert not any(k.startswith("threshold") for k in record)
    assert set(calibration.report_summary(record)) == {"temperature", "ece_before", "ece_after"}
    assert calibration.threshold_for(record, "spec95") is None


def test_two_other_classes_are_reported_and_predicted_by_name(tmp_path):
    labels, probs = np.array([0, 0, 1, 1]), np.array([0.2, 0.6, 0.9, 0.7])
    report.write_report(tmp_path, {"data": {"class_names": ["cat", "dog"]},
                                   "test": metrics.binary_metrics(labels, probs)})  # fmt: skip
    text = (tmp_path / "report.md").read_text()
    assert "An image is called dog iff P(dog) >= 0.5" in text
    assert "| images: true / predicted | cat | dog |" in text and "parasitized" not in text
    write_class_folder(tmp_path / "new", {"x": 2})
    images = sorted(str(p) for p in (tmp_path / "new" / "x").iterdir())
    fixed = lambda crops: np.tile([[0.3, 0.7]], (len(crops), 1))
    predictor = predict.Predictor("m", "checkpoint", 32, fixed, 4, ("cat", "dog"))
    rows = predict.predict_files(predictor, images)
    assert [(r["label"], r["prob"]) for r in rows] == [("dog", 0.7), ("dog", 0.7)]
    rows = predict.predict_files(predictor, images, threshold=0.8)
    assert rows[0]["label"] == "cat" and rows[0]["prob"] == pytest.approx(0.3)
    assert slides.slide_rows(rows, None) == []
    assert "p(prediction)" in predict.format_table(rows)


def test_config_validation_of_fine_tuning(tmp_path):
    config = finetune.get_config()
    config.data.dir = str(tmp_path)
    config_lib.validate(config)
    shipped_alpha = config.model.alpha
    config.model.alpha = 1.0 if shipped_alpha != 1.0 else 0.5
    with pytest.raises(config_lib.ConfigError, match=rf"'malaria'.*alpha={shipped_alpha}"):
        config_lib.validate(config)
    config = finetune.get_config()
    config.data.dir, config.data.class_names = str(tmp_path), ("cat",)
    with pytest.raises(config_lib.ConfigError, match="two or more distinct"):
        config_lib.validate(config)


# -- a run of three classes, end to end --------------------------------------------------------


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory):
    """A tiny network trained one epoch on a folder of three classes without slide ids."""
    root = tmp_path_factory.mktemp("finetune")
    write_class_folder(root / "data", {"bird": 12, "cat": 12, "dog": 12})
    config = smoke.get_config()
    config.model.num_blocks = 1
    config.data.source, config.data.dir = "folder", str(root / "data")
    config.data.split_by, config.data.split_fractions = "auto", (0.5, 0.25, 0.25)
    config.num_epochs, config.batch_size, config.eval_batch_size = 1, 6, 16
    config.test_time_augmentation, config.async_checkpointing = False, False
    workdir = str(root / "run")
    report = loop.train_and_evaluate(config, workdir)
    return root, workdir, report


def test_three_classes_report_config_and_outputs(three_class_run):
    _, workdir, report = three_class_run
    names = ["bird", "cat", "dog"]
    assert report["data"]["class_names"] == names and report["data"]["split_by"] == "image"
    for split in ("test", "validation"):
        assert report[split]["class_names"] == names
        assert np.array(report[split]["confusion_matrix"]).shape == (3, 3)
        assert sum(map(sum, report[split]["confusion_matrix"])) == report[split]["n"] == 9
    assert report["test_patient"] is None and "threshold_at_spec_95" not in report["calibration"]
    assert run_folder.read_config(workdir).data.class_names == names
    manifest = run_folder.read_manifest(workdir)
    assert manifest["split_by"] == "image" and manifest["class_names"] == names
    with open(os.path.join(workdir, run_folder.PREDICTIONS_CSV)) as f:
        rows = list(csv.reader(f))
    assert rows[0] == [
        "name",
        "slide_id",
        "label",
        "predicted",
        "prob_bird",
        "prob_cat",
        "prob_dog",
    ]
    assert len(rows) == 10
    assert run_folder.read_test_outputs(workdir)["logits"].shape == (9, 3)
    assert "confusion_matrix.png" in os.listdir(workdir) and "roc.png" not in os.listdir(workdir)
    text = open(os.path.join(workdir, run_folder.REPORT_MD)).read()
    assert "| images: true / predicted | bird | cat | dog |" in text
    assert run_folder.load_run(workdir).class_names == tuple(names)


def test_three_classes_export_and_predict_name_the_classes(three_class_run, capsys):
    root, workdir, _ = three_class_run
    assert main(["export", workdir, "--formats", "stablehlo"]) == 0
    exported = os.path.join(workdir, "export", "model.stablehlo")
    assert json.load(open(exported + ".json"))["class_names"] == ["bird", "cat", "dog"]
    capsys.readouterr()
    for model in (workdir, exported):
        assert main(["predict", model, str(root / "data" / "cat"), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["class_names"] == ["bird", "cat", "dog"] and out["slides"] == []
        for row in out["images"]:
            assert row["label"] == max(row["probs"], key=row["probs"].get)
            assert row["prob"] == row["probs"][row["label"]]
            assert sum(row["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    assert main(["predict", exported, str(root / "data" / "cat")]) == 0
    assert "most probable of 3 classes (bird, cat, dog)" in capsys.readouterr().out
    for flag in (["--operating-point", "spec95"], ["--threshold", "0.7"]):
        with pytest.raises(SystemExit):
            main(["predict", workdir, str(root / "data" / "cat"), *flag])
        assert f"{flag[0]} needs a model of two classes" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_config_trains_three_classes_from_the_malaria_weights(tmp_path, stored, caplog):
    write_class_folder(tmp_path / "data", {"bird": 12, "cat": 12, "dog": 12})
    config = finetune.get_config()
    config.data.dir, config.data.image_size = str(tmp_path / "data"), 32
    config.data.split_fractions = (0.5, 0.25, 0.25)
    config.num_epochs, config.batch_size, config.eval_batch_size = 1, 6, 18
    config.test_time_augmentation = False
    with caplog.at_level(logging.INFO):
        report = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert "starts from its initialisation" in caplog.text
    assert report["data"]["class_names"] == ["bird", "cat", "dog"]
    assert np.array(report["test"]["confusion_matrix"]).shape == (3, 3)
    run = run_folder.load_run(str(tmp_path / "run"))
    trained, shipped = run.variables["params"], stored_for(stored, run.model)
    # Three steps at 5e-4 from the shipped weights: still close to them, far from an init.
    first, start = trained["stem"]["Conv1"]["kernel"], shipped["params"]["stem"]["Conv1"]["kernel"]
    assert np.corrcoef(np.ravel(first), np.ravel(start))[0, 1] > 0.9
