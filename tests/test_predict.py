"""predict: files, folders, globs -> checkpoint or exported model -> labels, slide summary."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HAS_TFLITE, needs_tflite
from PIL import Image

from mnres import config as config_lib
from mnres import run_folder
from mnres.__main__ import main
from mnres.data import synthetic
from mnres.data.splits import Split
from mnres.deploy import crops, export, predict, slides
from mnres.reporting import gradcam
from mnres.training import steps

SLIDES = ("C100P61", "C39P4")


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """NIH-named cells of two slides and assorted sizes, a corrupt PNG and a non-image."""
    folder = tmp_path_factory.mktemp("cells")
    (folder / "more").mkdir()
    images = synthetic.draw_cells(6, 48, 2, 3)[0]
    sizes = ((48, 48), (40, 30), (48, 48), (30, 44), (48, 48), (48, 48))
    for i, (image, (h, w)) in enumerate(zip(images, sizes, strict=True)):
        name = f"{SLIDES[i % 2]}ThinF_IMG_20150918_1441{i:02d}_cell_{i}.png"
        Image.fromarray(image[:h, :w]).save(folder / ("more" if i >= 4 else "") / name)
    (folder / "C39P4ThinF_IMG_broken_cell_9.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_find_images_takes_files_folders_and_globs(cells):
    found = crops.find_images([str(cells)])
    assert len(found) == 7 and not any(f.endswith(".txt") for f in found)
    assert sum("more" in f for f in found) == 2  # folders are searched recursively
    by_glob = crops.find_images([str(cells / "C100*.png"), str(cells / "**" / "*.png")])
    assert len(by_glob) == 7 and "C100P61" in os.path.basename(by_glob[0])  # order, no repeats
    assert crops.find_images([str(cells / "notes.txt")]) == [str(cells / "notes.txt")]
    # Beside inputs that give files, one that gives none is kept for predict_files to report.
    more = crops.find_images([str(cells / "more")])
    assert crops.find_images([str(cells / "more"), str(cells / "*.jpg"), "gone.png"]) == [
        *more,
        str(cells / "*.jpg"),
        "gone.png",
    ]


def test_inputs_without_any_file_are_refused_in_one_line(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no image")
    cases = {
        "no images found in {}/empty/": [f"{tmp_path}/empty/"],
        "no image files match {}/*.jpg": [f"{tmp_path}/*.jpg"],
        "{}/gone.png does not exist": [f"{tmp_path}/gone.png"],
        "no images found in {0}/empty; {0}/gone.png does not exist": [
            f"{tmp_path}/empty",
            f"{tmp_path}/gone.png",
        ],
    }
    for expected, inputs in cases.items():
        with pytest.raises(ValueError) as error:
            crops.find_images(inputs)
        message = str(error.value)
        assert message.startswith(expected.format(tmp_path)) and "\n" not in message, message
        assert "looked for .png, .jpg" in message and "give image files, folders or glob" in message


def test_checkpoint_and_exports_predict_the_same(run, cells, tmp_path):
    paths = crops.find_images([str(cells)])
    models = {"checkpoint": run}
    classifier = run_folder.load_run(run)
    models["stablehlo"] = export.export_stablehlo(classifier, str(tmp_path / "m.stablehlo"))
    if HAS_TFLITE:
        models["tflite"] = export.export_tflite(classifier, str(tmp_path / "m.tflite"))
    results = {}
    for name, path in models.items():
        rows = predict.predict_files(predict.load_predictor(path), paths)
        errors = [r for r in rows if r["error"]]
        assert len(errors) == 1 and "broken" in errors[0]["file"]
        assert "unreadable image" in errors[0]["error"]
        results[name] = np.array([r["prob_parasitized"] for r in rows if not r["error"]])
        assert all(r["label"] in config_lib.MALARIA_CLASSES for r in rows if not r["error"])
    for name, probs in results.items():
        np.testing.assert_allclose(probs, results["checkpoint"], atol=1e-4, err_msg=name)
    assert np.ptp(results["checkpoint"]) > 0.05

    summary = slides.slide_rows(rows, None)
    assert [s["slide_id"] for s in summary] == sorted(SLIDES)
    assert [s["cells"] for s in summary] == [3, 3]  # the broken file counts nowhere
    table = predict.format_table(rows, slides.format_slides(summary))
    assert "6 image(s) predicted, 1 unreadable" in table and "C39P4" in table


@needs_tflite
def test_int8_model_predicts_any_crop(run, cells, tmp_path):
    classifier = run_folder.load_run(run)
    calibration = synthetic.draw_cells(32, classifier.image_size, 2, 0)[0]
    path = export.export_tflite(
        classifier, str(tmp_path / "int8.tflite"), quantize="int8",
        representative_images=calibration,
    )  # fmt: skip
    predictor = predict.load_predictor(path)
    assert predictor.image_size == classifier.image_size
    rows = predict.predict_files(predictor, crops.find_images([str(cells)]))
    assert sum(r["error"] is None for r in rows) == 6


def test_predict_command_prints_json_and_tables(run, cells, capsys):
    assert main(["predict", run, str(cells), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["images"]) == 7 and len(out["slides"]) == 2
    assert sum(r["error"] is not None for r in out["images"]) == 1
    # A path that does not exist: the rest answered, then exit 1 (as `cat` does).
    assert main(["predict", run, str(cells / "more" / "*.png"), str(cells / "gone.png")]) == 1
    text = capsys.readouterr().out
    assert "parasitized iff p >= 0.5" in text and "2 image(s) predicted, 1 unreadable" in text
    assert "gone.png" in text and "gone.png does not exist" in text


def test_predict_command_refuses_empty_inputs_and_answers_every_good_file(
    run, cells, tmp_path, capsys
):
    empty = tmp_path / "empty"
    empty.mkdir()
    for inputs, expected in (
        ([str(empty)], f"error: no images found in {empty} (looked for .png"),
        ([str(cells / "*.jpg")], f"error: no image files match {cells / '*.jpg'} ("),
        ([str(tmp_path / "gone")], f"error: {tmp_path / 'gone'} does not exist ("),
    ):
        assert expected in _predict_error(capsys, run, *inputs)
    # Among good files, an empty folder and an unreadable file are one row each.
    assert main(["predict", run, str(cells), str(empty), "--json"]) == 0
    rows = {r["file"]: r for r in json.loads(capsys.readouterr().out)["images"]}
    assert sum(r["error"] is None for r in rows.values()) == 6
    assert rows[str(empty)]["error"] == f"no images found in {empty}"
    broken = str(cells / "C39P4ThinF_IMG_broken_cell_9.png")
    assert "unreadable image" in rows[broken]["error"]
    # Files that exist but none of which is an image: each row says why, and exit code 1.
    assert main(["predict", run, broken, str(cells / "notes.txt")]) == 1
    captured = capsys.readouterr()
    assert "0 image(s) predicted, 2 unreadable" in captured.out
    assert (
        captured.err.strip()
        .splitlines()[-1]
        .startswith("error: not one of the 2 input(s) could be read as an image")
    )


def _export_error(capsys, *argv) -> str:
    """The last line `export ARGV` writes when it exits with a usage error (code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_export_command_refuses_bad_arguments_in_one_line(run, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "is not a training run" in _export_error(capsys, str(tmp_path), "--out", out)
    error = _export_error(capsys, run, "--out", out, "--formats", "tflite,coreml")
    assert "unknown format(s) coreml; use some of stablehlo,tflite,int8,onnx" in error
    assert "no format" in _export_error(capsys, run, "--out", out, "--formats", ",")
    (tmp_path / "a_file").write_text("")
    for bad_out in (tmp_path / "a_file", tmp_path / "a_file" / "export"):
        error = _export_error(capsys, run, "--out", str(bad_out), "--formats", "stablehlo")
        assert f"cannot write the export to {bad_out} (" in error
        assert error.endswith("): give --out a folder that can be written"), error
    assert not os.path.exists(out)  # refused before writing anything


def _predict_error(capsys, *argv) -> str:
    """The last line `predict ARGV` writes when it exits with a usage error (code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_predict_command_fails_with_one_line(run, cells, tmp_path, capsys):
    error = lambda model: _predict_error(capsys, model, str(cells))
    assert "no model at" in error(str(tmp_path / "missing.tflite"))
    assert "not a training run" in error(str(tmp_path))
    (tmp_path / "model.pt").write_bytes(b"torch")
    assert "unknown model format" in error(str(tmp_path / "model.pt"))
    (tmp_path / "bad.stablehlo").write_bytes(b"not a stablehlo module")
    assert "cannot load" in error(str(tmp_path / "bad.stablehlo"))
    # A checkpoint of another width than its config says.
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    os.symlink(os.path.join(run, "checkpoints"), wrong / "checkpoints")
    config = json.loads(open(os.path.join(run, "config.json")).read())
    config["model"]["alpha"] = 1.0
    (wrong / "config.json").write_text(json.dumps(config))
    assert "does not fit" in error(str(wrong))


def test_operating_point_takes_the_threshold_of_the_runs_calibration(run, cells, tmp_path, capsys):
    def predict_json(model, *options):
        assert main(["predict", model, str(cells), "--json", *options]) == 0
        return json.loads(capsys.readouterr().out)

    plain = predict_json(run)
    probs = sorted(r["prob_parasitized"] for r in plain["images"] if r["error"] is None)
    cut = (probs[2] + probs[3]) / 2  # between two crops: the threshold decides their labels
    calibrated = tmp_path / "calibrated"
    calibrated.mkdir()
    for name in ("checkpoints", "config.json"):
        os.symlink(os.path.join(run, name), calibrated / name)
    run_folder.write_calibration(
        str(calibrated),
        {"temperature": 1.0, "threshold_at_spec_95": cut, "threshold_at_spec_98": None},
    )
    out = predict_json(str(calibrated), "--operating-point", "spec95")
    assert out["threshold"] == cut
    called = [r["label"] == "parasitized" for r in out["images"] if r["error"] is None]
    assert called == [r["prob_parasitized"] >= cut for r in out["images"] if r["error"] is None]
    assert sum(called) == 3

    error = lambda model, point: _predict_error(
        capsys, model, str(cells), "--operating-point", point
    )
    assert "lacked a class" in error(str(calibrated), "spec98")
    assert "no calibration.json" in error(run, "spec95")


def test_operating_threshold_of_an_export_comes_from_its_run(tmp_path):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "model_int8.tflite").write_bytes(b"")
    run_folder.write_calibration(
        str(run), {"temperature": 1.0, "threshold_at_spec_95": 0.3, "threshold_at_spec_98": 0.7}
    )
    exported = str(run / "export" / "model_int8.tflite")
    assert predict.operating_threshold(exported, "spec98") == 0.7
    # A run folder reads its own calibration only, never a parent's.
    (run / "nested_run").mkdir()
    with pytest.raises(ValueError, match="no calibration.json"):
        predict.operating_threshold(str(run / "nested_run"), "spec95")
    with pytest.raises(ValueError, match="unknown operating point"):
        predict.operating_threshold(exported, "spec90")


def test_serving_predict_evaluation_and_gradcam_classify_alike(classifier, tmp_path):
    """The exported function, predict's JAX path, the eval step and Grad-CAM's calls on the
    same crops, with and without test-time augmentation: one `mnres.inference.classify`."""
    images, labels, slides = synthetic.draw_cells(6, classifier.image_size, 2, 5)
    split = Split(images, labels, slides, np.array([f"cell_{i}" for i in range(len(images))]))
    mesh = steps.make_mesh()
    answers = {}
    for tta in (False, True):
        config = classifier.config.copy_and_resolve_references()
        config.test_time_augmentation = tta
        run = dataclasses.replace(classifier, config=config)
        assert run.test_time_augmentation == tta
        # The state a training run evaluates: its weights, nothing else is read.
        state = steps.TrainState(
            params=run.variables["params"],
            batch_stats=run.variables["batch_stats"],
            opt_state={},
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.key_data(jax.random.key(0)),
        )
        eval_step = steps.make_eval_step(run.model, mesh, tta=run.test_time_augmentation)
        answers[tta] = {
            "serving": np.asarray(jax.jit(export.serving_function(run))(images))[:, 1],
            "predict": predict.probabilities(predict.from_classifier(run), images),
            "evaluation": steps.evaluate(eval_step, state, split, 8, mesh)["probs"],
            "gradcam": gradcam.explain_split(run, split, str(tmp_path / "g.png"), num=2)["probs"],
        }
        for name, probs in answers[tta].items():
            np.testing.assert_allclose(probs, answers[tta]["serving"], atol=1e-5, err_msg=name)
    # Each path did average the 8 views: one view answers otherwise.
    assert np.max(np.abs(answers[True]["serving"] - answers[False]["serving"])) > 1e-4


def _row(slide, p, error=None):
    return {"file": f"{slide}_cell.png", "slide_id": slide, "label": None,
            "prob_parasitized": None if error else p, "error": error}  # fmt: skip


def test_slide_prior_moves_each_slide_by_its_called_fraction():
    # Slide A: 20 of 25 crops called parasitized, so a doubtful crop (0.4) there is called
    # parasitized after all; slide B has too few crops to say anything of its patient.
    rows = [_row("A", 0.9) for _ in range(20)] + [_row("A", 0.4) for _ in range(5)]
    rows += [_row("B", 0.4) for _ in range(5)] + [_row("", 0.4), _row("A", None, error="bad")]
    assert predict.apply_slide_prior(rows, 0.5, threshold=0.5) == ["A"]
    shift = np.log(0.8 / 0.2)  # logit(20/25) - logit(0.5)
    assert rows[20]["prob_parasitized"] == pytest.approx(
        1 / (1 + np.exp(-(np.log(0.4 / 0.6) + shift)))
    )
    assert rows[20]["label"] == "parasitized" and rows[0]["prob_parasitized"] > 0.9
    assert all(r["prob_parasitized"] == 0.4 for r in rows[25:31])  # B and the unknown slide
    assert rows[-1]["prob_parasitized"] is None  # an unreadable file stays unscored


def test_training_prevalence_comes_from_the_runs_manifest(tmp_path):
    manifest = {"splits": {"train": {"counts": {"parasitized": 30, "uninfected": 70}}}}
    run_folder.write_json(str(tmp_path / "manifest.json"), manifest)
    (tmp_path / "export").mkdir()
    assert predict.training_prevalence(str(tmp_path)) == pytest.approx(0.3)
    assert predict.training_prevalence(str(tmp_path / "export" / "model.tflite")) == 0.3
    assert predict.training_prevalence(str(tmp_path / "export")) is None


def test_predict_command_applies_the_slide_prior(run, tmp_path, capsys):
    images = synthetic.draw_cells(24, 48, 1, 5)[0]
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"C100P61ThinF_IMG_20150918_1441_cell_{i}.png")
    assert main(["predict", run, str(tmp_path), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["predict", run, str(tmp_path), "--json", "--slide-prior"]) == 0
    prior = json.loads(capsys.readouterr().out)
    assert prior["slide_prior"] == {"train_prevalence": 0.5, "slides_adjusted": ["C100P61"]}
    p = np.array([r["prob_parasitized"] for r in plain["images"]])
    f = np.clip(np.mean(p >= 0.5), 0.01, 0.99)
    expected = 1 / (1 + np.exp(-(np.log(p / (1 - p)) + np.log(f / (1 - f)))))
    got = [r["prob_parasitized"] for r in prior["images"]]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("tta", [False, True])
def test_predict_runs_the_backends_formulation_and_equals_the_export_one(run, tta):
    classifier = run_folder.load_run(run)
    config = classifier.config.copy_and_resolve_references()
    config.test_time_augmentation = tta
    classifier = dataclasses.replace(classifier, config=config)
    exported = classifier.for_export()
    assert classifier.model.conv_formulation != exported.model.conv_formulation
    images = synthetic.draw_cells(10, classifier.image_size, 2, 1)[0]
    fast = predict.from_classifier(classifier, batch_size=16).run(images)  # padded to 16
    portable = np.asarray(jax.jit(export.serving_function(classifier))(images))
    np.testing.assert_allclose(fast, portable, atol=2e-5)
    # Called on arrays, serve runs compiled (another batch shape: rounding apart).
    np.testing.assert_allclose(np.asarray(classifier.serve(images)), fast, atol=2e-5)


def test_serve_and_logits_compile_once_per_shape_across_calls(run, monkeypatch):
    from mnres import inference

    traced = []
    classify = inference.classify
    # Python runs `classify` only while JAX traces: a cached compiled call does not reach it.
    monkeypatch.setattr(
        inference, "classify", lambda *a, **k: traced.append(1) or classify(*a, **k)
    )
    classifier = run_folder.load_run(run)
    images = synthetic.draw_cells(3, classifier.image_size, 2, 1)[0]
    for method in (classifier.serve, lambda x: classifier.logits(x, batch_size=4)):
        traced.clear()
        first = np.asarray(method(images))
        assert len(traced) == 1
        np.testing.assert_array_equal(np.asarray(method(images)), first)
        assert len(traced) == 1, "a second call on the same shape traced and compiled again"


def test_predict_sample_prints_short_lines_a_truth_column_and_an_accuracy_line(capsys):
    assert main(["predict", "--sample", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) < 120
    header = next(line for line in text.splitlines() if line.startswith("file"))
    assert header.split()[-1] == "truth" and "prediction" in header
    assert "sample/Parasitized/" in text and "/site-packages/" not in text
    assert "accuracy on the 250 crop(s) in class folders" in text
    assert "from the model's training slides" in text
