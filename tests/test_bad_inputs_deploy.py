"""Bad inputs to predict, export and the deploy library: one line each, nothing written
(`tests/bad_inputs.py` is the harness)."""

import functools
import json
import os
import shutil
import tempfile

import pytest
from bad_inputs import Case, check
from conftest import make_run
from PIL import Image

from mnres.deploy import crops, export, predict, run_checks


@functools.cache
def _tiny_run() -> str:
    """One tiny run folder per test session, copied into each row that needs one."""
    return make_run(os.path.join(tempfile.mkdtemp(prefix="bad-inputs-deploy-"), "run"))


def _run(work, **data):
    """work/run: the tiny run, with a manifest; `data` edits config.json's data section."""
    shutil.copytree(_tiny_run(), work / "run")
    (work / "run" / "manifest.json").write_text(json.dumps({"image_size": 32, "splits": {}}))
    config = json.loads((work / "run" / "config.json").read_text())
    config["data"].update(data)
    (work / "run" / "config.json").write_text(json.dumps(config))


def _crops(folder, *sizes, mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes or (32, 32)):
        Image.new(mode, (size, size), 180).save(folder / f"C39P4ThinF_IMG_1_cell_{i}.png")


def _sidecar(work, name="m.stablehlo", **meta):
    (work / name).write_bytes(b"not loaded: the sidecar is read first")
    (work / f"{name}.json").write_text(json.dumps({"image_size": 32, **meta}))


def _truncated(work):
    _crops(work / "cal", 32, 32)
    path = work / "cal" / "C39P4ThinF_IMG_1_cell_1.png"
    path.write_bytes(path.read_bytes()[:40])


def _both(*steps):
    return lambda work: [step(work) for step in steps]


CASES = [
    # Commands (defects 5, 7, 8, 11, 13).
    Case("predict_mistyped_model_path", r"error: no model at runs/typo: give a training run",
         argv=("mnres", "predict", "runs/typo", "cells"), setup=lambda w: _crops(w / "cells")),
    Case("predict_missing_input_exits_1_after_the_rest", r"^error: 1 input\(s\) do not exist: gone",
         argv=("mnres", "predict", "run", "cells", "gone.png", "--quiet"), exit_code=1,
         setup=_both(_run, lambda w: _crops(w / "cells"))),
    Case("predict_escape_codes_in_a_name_are_escaped", r"error: \\x1b\]0;pwned\\x07\\x1bcx.png "
         r"does not exist", argv=("mnres", "predict", "\x1b]0;pwned\x07\x1bcx.png")),
    Case("predict_sidecar_image_size_20000", r"image_size 20000, not a crop side in \[8, 1024\]",
         argv=("mnres", "predict", "m.tflite", "cells"),
         setup=_both(lambda w: _sidecar(w, "m.tflite", image_size=20000),
                     lambda w: _crops(w / "cells"))),
    Case("predict_config_image_size_edited", r"config.json says data.image_size=48, but the run "
         r"trained at 32 \(manifest.json\)", argv=("mnres", "predict", "run", "cells"),
         setup=_both(lambda w: _run(w, image_size=48), lambda w: _crops(w / "cells"))),
    Case("export_default_out_is_a_link", r"run/export is a link to .*victim: export writes into "
         r"the run folder only", argv=("mnres", "export", "run", "--formats", "stablehlo"),
         setup=_both(_run, lambda w: (w / "victim").mkdir(), lambda w: (w / "run" / "export")
                     .symlink_to(w / "victim"))),
    Case("export_calibration_dir_with_a_truncated_png", r"--calibration-dir cal: cannot read "
         r"cal/C39P4ThinF_IMG_1_cell_1.png as a crop \(", argv=("mnres", "export", "run",
         "--formats", "int8", "--calibration-dir", "cal", "--out", "out"),
         setup=_both(_run, _truncated), may_change=("out",)),
    Case("export_calibration_dir_with_a_1x1_crop", r"cannot read cal/C39P4ThinF_IMG_1_cell_1.png "
         r"as a crop \(ValueError: a crop of 1x1 pixels; crops need at least 8",
         argv=("mnres", "export", "run", "--formats", "int8", "--calibration-dir", "cal",
               "--out", "out"), setup=_both(_run, lambda w: _crops(w / "cal", 32, 1)),
         may_change=("out",)),
    # Library calls (defects 8, 11, 13).
    Case("read_metadata_image_size_huge", r"image_size 20000, not a crop side",
         call=lambda w: export.read_metadata(str(w / "m.stablehlo")),
         setup=lambda w: _sidecar(w, image_size=20000)),
    Case("read_metadata_image_size_zero", r"image_size 0, not a crop side",
         call=lambda w: export.read_metadata(str(w / "m.stablehlo")),
         setup=lambda w: _sidecar(w, image_size=0)),
    Case("read_metadata_image_size_a_string", r"image_size '64', not a crop side",
         call=lambda w: export.read_metadata(str(w / "m.stablehlo")),
         setup=lambda w: _sidecar(w, image_size="64")),
    Case("read_metadata_not_an_object", r"m.stablehlo.json is not a JSON object",
         call=lambda w: export.read_metadata(str(w / "m.stablehlo")),
         setup=lambda w: (w / "m.stablehlo.json").write_text("[32]")),
    Case("read_metadata_not_json", r"cannot read the sidecar .*m.stablehlo.json",
         call=lambda w: export.read_metadata(str(w / "m.stablehlo")),
         setup=lambda w: (w / "m.stablehlo.json").write_text("{image_size: 32")),
    Case("load_predictor_sidecar_image_size_huge", r"image_size 20000, not a crop side",
         call=lambda w: predict.load_predictor(str(w / "m.tflite")),
         setup=lambda w: _sidecar(w, "m.tflite", image_size=20000)),
    Case("load_predictor_mistyped_run", r"no model at runs/typo",
         call=lambda w: predict.load_predictor("runs/typo")),
    Case("load_predictor_config_image_size_edited", r"data.image_size=64, but the run trained "
         r"at 32", call=lambda w: predict.load_predictor(str(w / "run")),
         setup=lambda w: _run(w, image_size=64)),
    Case("check_image_size_edited", r"set it back to 32 in config.json",
         call=lambda w: run_checks.check_image_size(str(w / "run")),
         setup=lambda w: _run(w, image_size=224)),
    Case("read_crop_1x1", r"a crop of 1x1 pixels; crops need at least 8 on each side",
         call=lambda w: crops.read_crop(str(w / "c" / "C39P4ThinF_IMG_1_cell_0.png"), 32),
         setup=lambda w: _crops(w / "c", 1)),
    Case("read_crop_7_pixels", r"a crop of 7x7 pixels",
         call=lambda w: crops.read_crop(str(w / "c" / "C39P4ThinF_IMG_1_cell_0.png"), None),
         setup=lambda w: _crops(w / "c", 7, mode="L")),
    Case("read_crops_truncated_names_it", r"--calibration-dir cal: cannot read .*cell_1.png as a "
         r"crop", call=lambda w: crops.read_crops(
             [str(p) for p in sorted((w / "cal").iterdir())], 32, "--calibration-dir cal"),
         setup=_truncated),
    Case("looks_like_model_missing_run_is_a_model", r"runs/typo does not exist",
         call=lambda w: _must_be_model("runs/typo")),
]  # fmt: skip


def _must_be_model(item):
    """predict takes a missing first argument without an image suffix as its model."""
    if predict.looks_like_model(item):
        raise ValueError(f"{item} does not exist")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input(case, tmp_path, monkeypatch):
    check(case, tmp_path, monkeypatch)
