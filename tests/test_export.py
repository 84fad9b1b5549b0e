"""Export: StableHLO and TFLite (float32, int8) from a saved run, parity with JAX, the resize.

The run is conftest's tiny MobileNetV2 (alpha 0.35, 32 px) with random weights; nothing is
trained. TFLite tests need tensorflow and ai-edge-litert (the test extra); they are skipped
without them.
"""

import collections
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMAGE_SIZE, needs_tflite

from experiments.configs import smoke
from mnres import inference, models, run_folder
from mnres.data import decode, synthetic
from mnres.deploy import export
from mnres.training import loop as train

# Crops of three sizes (square as trained, tall, wide), four of each: one compile per size.
CROP_SHAPES = ((IMAGE_SIZE, IMAGE_SIZE), (45, 27), (21, 40))


def crops(seed: int = 0) -> list[np.ndarray]:
    """Four uint8 [N, H, W, 3] batches of synthetic cells per shape in `CROP_SHAPES`."""
    images = synthetic.draw_cells(4 * len(CROP_SHAPES), 48, 3, seed)[0]
    batches = []
    for i, (h, w) in enumerate(CROP_SHAPES):
        batch = images[4 * i : 4 * i + 4]
        batches.append(np.stack([decode.decode_image(b, 48)[:h, :w] for b in batch]))
    return batches


@pytest.fixture(scope="module")
def reference(classifier):
    """The JAX serving function's probabilities for `crops()`, [12, 2]."""
    serve = jax.jit(export.serving_function(classifier))
    return np.concatenate([np.asarray(serve(batch)) for batch in crops()])


def test_load_run_restores_the_saved_weights(run, classifier):
    assert classifier.image_size == IMAGE_SIZE
    assert classifier.metadata["step"] == 7 and classifier.metadata["checkpoint"] == "best"
    mean = classifier.variables["batch_stats"]["stem"]["bn_Conv1"]["mean"]
    assert np.abs(np.asarray(mean)).max() > 0  # the saved statistics, not a fresh init
    assert classifier.for_export().model.conv_formulation == "grouped"


def test_load_run_rejects_other_folders_and_incompatible_checkpoints(run, tmp_path):
    with pytest.raises(ValueError, match="not a training run"):
        run_folder.load_run(str(tmp_path))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    os.symlink(os.path.join(run, "checkpoints"), wrong / "checkpoints")
    config = json.loads(Path(run, "config.json").read_text())
    config["model"]["alpha"] = 0.5
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit mobilenet_v2"):
        run_folder.load_run(str(wrong))


def test_resize_like_training_matches_the_training_decode():
    resize = jax.jit(inference.resize_like_training, static_argnums=1)
    rng = np.random.default_rng(0)
    more = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in ((50, 37), (37, 50), (20, 20))]
    for crop in [b[0] for b in crops(1)] + more + [np.full((40, 40, 3), 200, np.uint8)]:
        ours = np.asarray(resize(crop[None], IMAGE_SIZE))[0]
        pillow = decode.decode_image(crop, IMAGE_SIZE).astype(np.float32)
        # Pillow rounds to uint8 between its two passes: a level or two apart at most.
        assert np.abs(ours - pillow).max() <= 3, crop.shape
        assert np.abs(ours - pillow).mean() < 0.5, crop.shape
        h, w = crop.shape[:2]
        if h != w:  # the padding is exactly the black of the decode's background
            border = (slice(None), slice(0, 2)) if h > w else (slice(0, 2), slice(None))
            assert (ours[border] == 0).all() and (pillow[border] == 0).all()


def test_stablehlo_runs_without_the_model_code_and_matches_jax(classifier, reference, tmp_path):
    path = export.export_stablehlo(classifier, str(tmp_path / "model.stablehlo"))
    assert export.read_metadata(path)["image_size"] == IMAGE_SIZE
    np.savez(tmp_path / "crops.npz", *crops())
    # A fresh interpreter that imports neither mnres nor flax: only jax and numpy.
    script = textwrap.dedent(f"""
        import sys, jax, numpy as np
        exported = jax.export.deserialize(bytearray(open({path!r}, "rb").read()))
        batches = np.load({str(tmp_path / "crops.npz")!r})
        probs = [np.asarray(exported.call(batches[k])) for k in sorted(batches)]
        assert not any(m.split(".")[0] in ("mnres", "flax") for m in sys.modules)
        np.save({str(tmp_path / "probs.npy")!r}, np.concatenate(probs))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=300)
    probs = np.load(tmp_path / "probs.npy")
    np.testing.assert_allclose(probs, reference, atol=1e-4)
    assert np.ptp(probs[:, 1]) > 0.1  # the crops get different answers


@needs_tflite
def test_tflite_float_takes_any_size_and_matches_jax(classifier, reference, tmp_path):
    path = export.export_tflite(classifier, str(tmp_path / "model.tflite"))
    model = export.load_tflite(path)
    assert model.input_size is None
    ops = collections.Counter(model.op_names())
    assert ops["DEPTHWISE_CONV_2D"] == 17 and ops["CONV_2D"] == 35  # V2: 17 blocks, 35 convs
    probs = np.concatenate([model(batch) for batch in crops()])
    np.testing.assert_allclose(probs, reference, atol=1e-4)


@needs_tflite
def test_tflite_int8_per_channel_and_per_tensor(classifier, reference, tmp_path):
    calibration = synthetic.draw_cells(64, IMAGE_SIZE, 4, 1)[0]
    sizes, outputs = {}, {}
    for per_channel in (True, False):
        path = export.export_tflite(
            classifier,
            str(tmp_path / f"int8_{per_channel}.tflite"),
            quantize="int8",
            per_channel=per_channel,
            representative_images=calibration,
        )
        sizes[per_channel] = os.path.getsize(path)
        model = export.load_tflite(path)
        assert model.input_size == IMAGE_SIZE  # S x S; other crops are resized before it
        assert "DEPTHWISE_CONV_2D" in model.op_names()
        outputs[per_channel] = np.concatenate([model(batch) for batch in crops()])
    assert export.read_metadata(path)["quantization"] == "int8"
    assert sizes[False] < sizes[True]
    float_probs = reference[:, 1]
    agree = np.mean((outputs[True][:, 1] >= 0.5) == (float_probs >= 0.5))
    assert agree >= 0.75, (outputs[True][:, 1], float_probs)


@needs_tflite
def test_int8_needs_calibration_and_a_fixed_size(classifier, tmp_path):
    with pytest.raises(ValueError, match="representative_images"):
        export.export_tflite(classifier, str(tmp_path / "m.tflite"), quantize="int8")
    with pytest.raises(ValueError, match="S x S"):
        export.export_tflite(
            classifier,
            str(tmp_path / "m.tflite"),
            quantize="int8",
            representative_images=np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
            any_size=True,
        )


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("jax2onnx", "onnxruntime")),
    reason="needs jax2onnx and onnxruntime (optional: jax2onnx pins an older orbax)",
)
def test_onnx_takes_any_size_and_matches_jax(classifier, reference, tmp_path):
    run = export.load_onnx(export.export_onnx(classifier, str(tmp_path / "model.onnx")))
    probs = np.concatenate([run(batch) for batch in crops()])
    np.testing.assert_allclose(probs, reference, atol=1e-4)


def test_a_run_evaluated_with_test_time_augmentation_exports_it(classifier):
    def serving(tta):
        config = classifier.config.copy_and_resolve_references()
        config.test_time_augmentation = tta
        return jax.jit(export.serving_function(dataclasses.replace(classifier, config=config)))

    averaged, single = serving(True), serving(False)
    batch = crops()[0]  # square crops at the model's size
    turned = np.ascontiguousarray(np.rot90(batch, 1, (1, 2))[:, ::-1])
    np.testing.assert_allclose(averaged(turned), averaged(batch), atol=1e-5)
    assert np.max(np.abs(single(turned) - single(batch))) > 1e-4  # one view depends on it


def test_export_uses_grouped_depthwise_whatever_the_training_used(classifier):
    trained = classifier.model.clone(conv_formulation="shifted", dtype=jnp.bfloat16)
    model = dataclasses.replace(classifier, model=trained).for_export().model
    assert model.conv_formulation == "grouped" and model.dtype is None
    assert isinstance(model, models.MobileNetV2)


@needs_tflite
def test_smoke_run_exports_to_every_format(tmp_path):
    """The smoke config, shortened to one small epoch, trained and exported by the command."""
    from mnres.__main__ import main

    config = smoke.get_config()
    config.data.synthetic_size = 200
    config.num_epochs = 1
    config.progress_bar = False
    workdir = str(tmp_path / "smoke")
    train.train_and_evaluate(config, workdir)
    stored = run_folder.read_calibration_sample(workdir)  # int8 calibrates on these
    assert stored.dtype == np.uint8 and stored.shape[1:] == (config.data.image_size,) * 2 + (3,)
    out = tmp_path / "export"
    assert main(["export", workdir, "--out", str(out), "--calibration-images", "32"]) == 0
    for name in (export.FILE_NAMES[f] for f in export.DEFAULT_FORMATS):
        assert (out / name).stat().st_size > 10_000
        assert json.loads((out / (name + ".json")).read_text())["step"] > 0


@pytest.mark.slow
@needs_tflite
def test_int8_export_and_evaluation_need_no_training_data(tmp_path, capsys):
    """The run's data has moved: int8 calibrates on stored or given crops, evaluates a folder."""
    from conftest import make_run
    from PIL import Image

    from mnres.__main__ import main

    run = make_run(str(tmp_path / "run"))
    config = json.loads(Path(run, "config.json").read_text())
    config["data"].update(source="folder", dir=str(tmp_path / "moved"))
    Path(run, "config.json").write_text(json.dumps(config))
    images, labels, _ = synthetic.draw_cells(24, IMAGE_SIZE, 3, seed=1)
    cells = tmp_path / "cells"
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = cells / ("Parasitized" if label == 1 else "Uninfected")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"C{i % 3}P1ThinF_cell_{i}.png")

    def export_args(*args):
        return ["export", run, "--out", str(tmp_path / "out"), "--formats", "int8", *args]

    def refused(*args) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(export_args(*args))
        assert exit_info.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    error = refused()
    assert "int8 calibration needs cell crops" in error and "--calibration-dir DIR" in error
    assert "--evaluate DIR" in refused("--calibration-dir", str(cells), "--evaluate")
    assert main(export_args("--calibration-dir", str(cells), "--evaluate", str(cells))) == 0
    out = capsys.readouterr().out
    assert f"{cells}: {len(images)} images" in out and "int8" in out
    # A run that stored its calibration crops at training time needs nothing more.
    run_folder.write_calibration_sample(run, images[:8])
    assert main(export_args()) == 0
    assert (tmp_path / "out" / export.FILE_NAMES["int8"]).stat().st_size > 10_000
