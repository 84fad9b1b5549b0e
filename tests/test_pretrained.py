"""The model shipped inside mnres, its card and the bundled sample crops.

Every shipped file must be there: a missing one fails these tests, it never skips them.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import mnres
from experiments import model_card, package_model
from mnres import models, run_folder
from mnres.__main__ import main
from mnres.data import decode, sample
from mnres.data.folders import slide_id
from mnres.weights import shipped as pretrained

REPO = pathlib.Path(__file__).resolve().parent.parent
DEV_SLIDES = REPO.parent / "shared" / "data" / "malaria_dev_slides.txt"


@pytest.fixture(scope="module")
def shipped():
    return mnres.load_pretrained("malaria")


@pytest.fixture(scope="module")
def sample_images(shipped):
    paths = sample.sample_cells()
    images = decode.decode_files(paths, shipped.image_size)
    return paths, images, np.array(sample.sample_labels(paths))


def test_every_shipped_file_is_in_the_package():
    folder = pretrained.shipped_folder("malaria")
    for name in pretrained.SHIPPED_FILES:
        assert (folder / name).is_file(), name
    weights = (folder / pretrained.WEIGHTS).stat().st_size
    assert 0.1e6 < weights < 8e6  # float32 of a mobile network: 4 bytes x ~1.4 M parameters
    paths = sample.sample_cells()
    assert 200 <= len(paths) <= 300
    assert sum(os.path.getsize(p) for p in paths) < 3.2e6


def test_the_card_regenerates_from_the_run_record_and_hashes_the_shipped_files():
    folder = pretrained.shipped_folder("malaria")
    card = package_model.build_card()
    shipped_card = run_folder.read_json(folder / pretrained.CARD_JSON)
    assert json.loads(run_folder.json_text(card)) == shipped_card, (
        "python -m experiments.package_model --card_only"
    )
    assert package_model.CARD_PAGE.read_text() == model_card.markdown(card)
    assert (
        shipped_card["files_sha256"][pretrained.WEIGHTS]
        == hashlib.sha256((folder / pretrained.WEIGHTS).read_bytes()).hexdigest()
    )
    # The card's figures are the report's, not typed in (a final run's: its validation's).
    report = run_folder.read_json(package_model.RECORD_DIR / run_folder.REPORT_JSON)
    split = "validation" if model_card.is_final(report) else "test"
    assert shipped_card["evaluation"][f"{split}_cells"]["accuracy"] == report[split]["accuracy"]
    assert "Not a diagnostic device" in shipped_card["not_a_diagnostic_device"]


def test_the_shipped_config_builds_a_model_with_every_shipped_parameter(shipped):
    model = models.from_config(shipped.config.model)
    size = shipped.image_size
    expected = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3)), train=False)
    )
    leaves = lambda tree: {
        jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree.leaves_with_path(tree)
    }
    assert leaves(shipped.variables) == leaves(dict(expected))
    assert shipped.preprocessing["image_size"] == size == shipped.config.data.image_size
    assert shipped.preprocessing["test_time_augmentation"] is True
    assert shipped.calibration["threshold_at_spec_95"] is not None


def test_golden_logits_of_the_sample_catch_preprocessing_drift(shipped, sample_images):
    paths, images, _ = sample_images
    golden = run_folder.read_json(pretrained.shipped_folder() / pretrained.GOLDEN)
    assert sorted(golden) == sorted(os.path.basename(p) for p in paths)
    logits = shipped.classifier.logits(images)
    want = np.array([golden[os.path.basename(p)] for p in paths])
    np.testing.assert_allclose(logits, want, atol=2e-3)


def test_the_shipped_model_is_right_on_the_sample(shipped, sample_images):
    # A sanity check, not an accuracy claim (the card has the held-out figures): a broken
    # preprocessing or a wrong weight file lands near 50%. The model classifies its own training
    # crops 96.5% right (4,000 drawn at random), and a 250-crop sample spreads +/- 1.2 points
    # around that: 93% leaves room for the draw. The golden log-odds test is the exact check.
    _, images, labels = sample_images
    predicted = np.argmax(shipped.classifier.logits(images), axis=-1)
    assert np.mean(predicted == labels) >= 0.93
    assert set(predicted) == {0, 1}


def test_the_int8_file_agrees_with_the_float_model(shipped, sample_images):
    from mnres.deploy import predict

    _, images, _ = sample_images
    float_labels = np.argmax(shipped.classifier.logits(images), axis=-1)
    int8 = predict.load_predictor(str(pretrained.shipped_folder() / pretrained.INT8))
    int8_labels = (predict.probabilities(int8, images) >= 0.5).astype(int)
    assert np.mean(int8_labels == float_labels) >= 0.98


def test_the_sample_comes_from_held_out_development_slides():
    slides = {slide_id(p) for p in sample.sample_cells()}
    labels = sample.sample_labels(sample.sample_cells())
    assert len(slides) >= 5 and set(labels) == {0, 1}
    manifest = run_folder.read_json(package_model.RECORD_DIR / run_folder.MANIFEST_JSON)
    assert slides <= set(manifest["splits"][model_card.SAMPLE_SPLIT]["slide_ids"])
    if not DEV_SLIDES.is_file():
        pytest.skip("needs ../shared/data/malaria_dev_slides.txt beside the repository")
    assert slides <= set(DEV_SLIDES.read_text().split())


def test_weights_into_a_model_with_other_fields_name_the_field():
    network = pretrained.shipped_network()
    alpha, norm = network["alpha"], network["input_normalization"]
    wrong = 1.0 if alpha != 1.0 else 0.5
    other = models.create_model(
        "mobilenet_v2", alpha=wrong, num_classes=2, input_normalization=norm
    )
    with pytest.raises(ValueError, match=rf"alpha={alpha} \(this model has {wrong}\)"):
        mnres.load_pretrained("malaria", model=other)
    with pytest.raises(ValueError, match="MobileNetV2; this model is a MobileNetV1"):
        mnres.load_pretrained("malaria", model=models.create_model("mobilenet_v1"))
    # Fields that change no parameter may differ.
    grouped = models.create_model("mobilenet_v2", alpha=alpha, num_classes=2,
                                  input_normalization=norm, conv_formulation="grouped")  # fmt: skip
    assert mnres.load_pretrained("malaria", model=grouped).model is grouped
    with pytest.raises(ValueError, match="no pretrained model 'malria'"):
        mnres.load_pretrained("malria")


def test_the_library_refuses_no_classes_and_crops_that_are_not_uint8(shipped, sample_images):
    with pytest.raises(ValueError, match="num_classes=0: a classifier needs a whole number >= 1"):
        mnres.load_pretrained("malaria", num_classes=0)  # was: the 2-class model
    assert mnres.load_pretrained("malaria", num_classes=1).model.num_classes == 1
    crops = sample_images[1][:4]
    # The same crops as floats in [0, 1] gave confident wrong answers; now one line.
    with pytest.raises(ValueError, match=r"serve takes uint8 RGB crops \(0-255\), got float32"):
        shipped.classifier.serve(crops.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"logits takes uint8 RGB crops \(0-255\), got float64"):
        shipped.classifier.logits(crops / 255)
    with pytest.raises(ValueError, match="the network takes float images scaled to"):
        shipped.model.apply(shipped.variables, crops, train=False)
    from mnres.deploy import predict

    predictor = predict.from_classifier(shipped.classifier)
    with pytest.raises(ValueError, match="no images to classify"):
        predict.class_probabilities(predictor, crops[:0])
    assert predict.class_probabilities(predictor, crops).shape == (4, 2)


def test_list_pretrained_names_the_shipped_and_the_downloadable_weights():
    entries = mnres.list_pretrained()
    assert entries[0]["name"] == "malaria" and entries[0]["kind"] == "shipped"
    names = {e["name"] for e in entries}
    assert "mobilenet_v1_1.0_224.imagenet" in names
    assert "mobilenet_v2_0.35_96.imagenet" in names


def test_predict_uses_the_shipped_model_without_a_model_argument(tmp_path, capsys):
    assert main(["predict", "--sample", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"].startswith("malaria")
    assert len(out["images"]) == len(sample.sample_cells())
    assert all(r["error"] is None for r in out["images"])
    assert len(out["slides"]) >= 5
    cells = tmp_path / "cells"
    cells.mkdir()
    for p in sample.sample_cells()[:3]:
        (cells / os.path.basename(p)).write_bytes(pathlib.Path(p).read_bytes())
    assert main(["predict", str(cells), "--operating-point", "spec98"]) == 0
    text = capsys.readouterr().out
    assert "malaria (shipped with mnres)" in text and "3 image(s) predicted" in text
    with pytest.raises(SystemExit):
        main(["predict"])
    assert "no images given" in capsys.readouterr().err


def test_the_shipped_model_loads_and_predicts_in_a_fresh_process_without_network(tmp_path):
    code = textwrap.dedent(
        """
        import socket
        def refuse(*args, **kwargs):
            raise OSError("network disabled for this test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        import mnres
        from mnres.__main__ import main
        raise SystemExit(main(["predict", "--sample"]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "image(s) predicted, 0 unreadable" in result.stdout


@pytest.fixture
def shipped_ensemble(tmp_path, monkeypatch):
    """The shipped folder with its network replaced by an ensemble of two tiny networks (random
    weights, 32 px): what a shipped ensemble gives, whatever ships now."""
    import flax.serialization
    import ml_collections
    from data_fixtures import tiny_crossval_config

    real, folder = pretrained.shipped_folder(), tmp_path / "malaria"
    folder.mkdir()
    for name in pretrained.SHIPPED_FILES:
        (folder / name).write_bytes((real / name).read_bytes())
    config = pretrained.shipped_config()
    plain = tiny_crossval_config().model.to_dict()
    members = [{**plain, "input_normalization": "gray_world"}, plain]
    with config.unlocked():
        config.model = ml_collections.ConfigDict({"name": "ensemble", "members": members})
        config.data.image_size = 32
    run_folder.write_config(folder, config)
    model = models.from_config(config.model)
    variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    (folder / pretrained.WEIGHTS).write_bytes(
        flax.serialization.msgpack_serialize(jax.device_get(variables))
    )
    monkeypatch.setattr(pretrained, "shipped_folder", lambda name="malaria": folder)
    return mnres.load_pretrained("malaria")


def test_a_shipped_ensemble_loads_whole_or_as_the_member_a_network_is(shipped_ensemble):
    shipped = shipped_ensemble
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    assert isinstance(shipped.model, models.Ensemble)
    members = shipped.config.model.members
    whole = shipped.classifier.logits(images)
    each = []
    for member in members:
        net = models.from_config(member)
        loaded = mnres.load_pretrained("malaria", model=net)
        assert loaded.calibration is None  # the ensemble's temperature is not a member's
        each.append(loaded.classifier.logits(images))
    np.testing.assert_allclose(whole, np.mean(each, axis=0), atol=1e-4)
    # A new classifier without a network named: the first member's backbone.
    three = mnres.load_pretrained("malaria", num_classes=3)
    assert three.model.num_classes == 3
    assert three.model.input_normalization == members[0]["input_normalization"]


def test_a_shipped_ensembles_report_calls_its_maps_the_members_mean(shipped_ensemble, tmp_path):
    page = tmp_path / "report.html"
    assert main(["predict", "--sample", "--quiet", "--json", "--report", str(page)]) == 0
    note = page.read_text().split("Heat maps:", 1)[1].split("</p>", 1)[0]
    assert "the mean of the ensemble members" in note


def test_predict_reads_the_slide_prior_prevalence_from_the_shipped_card(capsys):
    assert main(["predict", "--sample", "--json", "--slide-prior"]) == 0
    out = json.loads(capsys.readouterr().out)
    card = run_folder.read_json(pretrained.shipped_folder() / pretrained.CARD_JSON)
    prevalence = card["evaluation"]["train_prevalence"]
    assert 0.45 < prevalence < 0.55 and prevalence != 0.5
    assert out["slide_prior"]["train_prevalence"] == prevalence


@pytest.mark.slow
def test_the_shipped_models_fast_and_export_formulations_agree_on_the_sample():
    from mnres.deploy import crops, export, predict

    classifier = mnres.load_pretrained("malaria").classifier
    images = np.stack([crops.read_crop(p, classifier.image_size)[0]
                       for p in sorted(mnres.data.sample_cells())])  # fmt: skip
    fast = predict.probabilities(predict.from_classifier(classifier), images)
    portable = np.concatenate([np.asarray(jax.jit(export.serving_function(classifier))(
        images[i : i + 64]))[:, 1] for i in range(0, len(images), 64)])  # fmt: skip
    np.testing.assert_allclose(fast, portable, atol=1e-5)
