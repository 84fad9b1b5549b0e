"""predict and export on hostile-but-realistic inputs: crafted run folders, edited sidecars,
links, tiny, grayscale and oddly named crops, long inputs (issue 29, defects 5, 7, 8, 9, 11,
12, 13). Each test makes the fault for real: files, links and terminals, not patches."""

import fcntl
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import termios
import warnings

import pytest
from conftest import make_run, needs_tflite
from data_fixtures import write_cell_folder
from PIL import Image

from mnres import run_folder
from mnres.__main__ import main
from mnres.data import synthetic
from mnres.deploy import crops, export, predict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cells(folder, count: int = 4, size: int = 32, mode: str = "RGB") -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, image in enumerate(synthetic.draw_cells(count, size, 2, 0)[0]):
        paths.append(os.path.join(folder, f"C39P4ThinF_IMG_20150918_1441{i:02d}_cell_{i}.png"))
        Image.fromarray(image).convert(mode).save(paths[-1])
    return paths


def _edit_config(run, **data):
    path = os.path.join(run, run_folder.CONFIG_JSON)
    config = json.loads(open(path).read())
    config["data"].update(data)
    open(path, "w").write(json.dumps(config))


def _last_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_export_writes_nothing_to_the_cache_dir_a_run_folder_names(tmp_path, capsys):
    # Defect 5: the run's data reloaded for --evaluate (and int8 calibration) is never cached
    # into config.json's data.cache_dir.
    write_cell_folder(tmp_path / "data", {f"C{i}P{i}": (3, 3) for i in range(1, 9)})
    run = make_run(str(tmp_path / "run"))
    elsewhere = tmp_path / "elsewhere" / "cache"
    _edit_config(run, source="folder", dir=str(tmp_path / "data"), cache_dir=str(elsewhere))
    out = tmp_path / "out"
    assert main(["export", run, "--formats", "stablehlo", "--evaluate", "--out", str(out)]) == 0
    assert "test split:" in capsys.readouterr().out
    assert not (tmp_path / "elsewhere").exists()
    assert sorted(os.listdir(out)) == ["model.stablehlo", "model.stablehlo.json"]


def test_export_does_not_write_through_a_link_in_the_run_folder(run, tmp_path, capsys):
    # Defect 5: RUN/export a link to another folder: refused; a link at a file's place: replaced.
    crafted, victim = tmp_path / "crafted", tmp_path / "victim"
    victim.mkdir()
    (victim / "model.stablehlo").write_text("mine")
    crafted.mkdir()
    for name in ("config.json", "checkpoints"):
        os.symlink(os.path.join(run, name), crafted / name)
    os.symlink(victim, crafted / "export")
    error = _last_error(capsys, ["export", str(crafted), "--formats", "stablehlo"])
    assert f"{crafted / 'export'} is a link to {victim}" in error and "--out" in error
    os.remove(crafted / "export")
    (crafted / "export").mkdir()
    os.symlink(victim / "model.stablehlo", crafted / "export" / "model.stablehlo")
    assert main(["export", str(crafted), "--formats", "stablehlo"]) == 0
    assert (victim / "model.stablehlo").read_text() == "mine"
    assert not os.path.islink(crafted / "export" / "model.stablehlo")
    assert sorted(os.listdir(victim)) == ["model.stablehlo"]


def test_calibration_dir_with_a_truncated_png_is_one_line_naming_it(run, tmp_path, capsys):
    # Defect 7 (export): refused, naming the file (a user's calibration set is theirs to fix).
    paths = _cells(tmp_path / "cal", 3)
    data = open(paths[1], "rb").read()
    open(paths[1], "wb").write(data[: len(data) // 2])
    out = tmp_path / "out"
    argv = ["export", run, "--formats", "int8", "--calibration-dir", str(tmp_path / "cal")]
    error = _last_error(capsys, [*argv, "--out", str(out)])
    assert f"--calibration-dir {tmp_path / 'cal'}: cannot read {paths[1]} as a crop" in error
    assert "OSError" in error or "SyntaxError" in error
    assert os.listdir(out) == []


def test_sidecar_image_size_out_of_bounds_is_refused(run, tmp_path):
    # Defect 8: an edited sidecar decided the decode size (20000: 4.25 GB for one crop).
    classifier = run_folder.load_run(run)
    path = export.export_stablehlo(classifier, str(tmp_path / "m.stablehlo"))
    meta = json.loads(open(path + ".json").read())
    for bad in (20000, 0, "64", 7.5):
        open(path + ".json", "w").write(json.dumps({**meta, "image_size": bad}))
        with pytest.raises(ValueError, match=r"image_size .*not a crop side in \[8, 1024\]"):
            predict.load_predictor(path)


@needs_tflite
def test_sidecar_image_size_must_match_the_tflite_input_shape(classifier, tmp_path):
    # Defect 8: an S x S TFLite model's sidecar may not say another S.
    calibration = synthetic.draw_cells(8, classifier.image_size, 2, 0)[0]
    path = export.export_tflite(classifier, str(tmp_path / "m.tflite"), quantize="int8",
                                representative_images=calibration)  # fmt: skip
    meta = json.loads(open(path + ".json").read())
    open(path + ".json", "w").write(json.dumps({**meta, "image_size": 48}))
    with pytest.raises(ValueError, match="says image_size 48, the model takes 32 x 32"):
        predict.load_predictor(path)


def test_config_image_size_edited_against_the_manifest_is_refused(run, tmp_path, capsys):
    # Defect 8: config.json edited to 48 after training at 32 (manifest.json): p -> 0.0000.
    crafted = tmp_path / "edited"
    shutil.copytree(run, crafted)
    run_folder.write_json(str(crafted / "manifest.json"), {"image_size": 32, "splits": {}})
    _edit_config(str(crafted), image_size=48)
    cells = _cells(tmp_path / "cells", 2)
    expected = "config.json says data.image_size=48, but the run trained at 32"
    assert expected in _last_error(capsys, ["predict", str(crafted), *cells])
    assert expected in _last_error(capsys, ["export", str(crafted), "--formats", "stablehlo"])
    assert not (crafted / "export").exists()


def test_the_same_image_is_counted_once(run, tmp_path, monkeypatch, capsys):
    # Defect 9: `predict d ./d` and a recursive glob through a folder that links to itself.
    monkeypatch.chdir(tmp_path)
    _cells(tmp_path / "d", 3)
    os.symlink("..", tmp_path / "d" / "loop")
    assert len(crops.find_images(["d", "./d", "d/*.png", os.path.abspath("d")])) == 3
    assert len(crops.find_images(["d/**/*.png"])) == 3
    assert main(["predict", run, "d", "./d", "d/**/*.png", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["images"]) == 3 and out["slides"][0]["cells"] == 3


def test_tiny_crops_control_characters_and_grayscale(run, tmp_path, capsys):
    # Defect 11: a 1x1 crop is refused per file; an escape code in a name is shown escaped; a
    # grayscale crop warns once per run, with the count.
    folder = tmp_path / "cells"
    good = _cells(folder, 2)
    _cells(folder / "gray", 3, mode="L")
    Image.new("RGB", (1, 1), (200, 100, 100)).save(folder / "dot.png")
    Image.new("RGB", (7, 40), (200, 100, 100)).save(folder / "thin.png")
    os.rename(good[0], folder / "\x1b[2J\x1b[31mred.png")
    predictor = predict.load_predictor(run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = predict.predict_files(predictor, crops.find_images([str(folder)]))
    gray = [w for w in caught if issubclass(w.category, predict.GrayscaleWarning)]
    assert len(gray) == 1 and str(gray[0].message).startswith("3 crop(s) were grayscale")
    errors = {os.path.basename(r["file"]): r["error"] for r in rows if r["error"]}
    assert set(errors) == {"dot.png", "thin.png"}
    assert "a crop of 1x1 pixels; crops need at least 8 on each side" in errors["dot.png"]
    assert main(["predict", run, str(folder)]) == 0
    captured = capsys.readouterr()
    assert "\x1b" not in captured.out + captured.err
    assert "\\x1b[2J\\x1b[31mred.png" in captured.out and "5 image(s) predicted" in captured.out
    assert captured.err.count("were grayscale") == 1


def _stderr_on_a_terminal(argv, cwd) -> str:
    """What `python -m mnres ARGV` writes to stderr when stderr is a terminal (a pty)."""
    master, slave = pty.openpty()
    # 24 x 100: a terminal's size (tqdm draws nothing in a terminal of no columns).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "mnres", *argv], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=slave)  # fmt: skip
    os.close(slave)
    said = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the pty closes with the process
                break
            if not chunk:
                break
            said += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=120)
    os.close(master)
    return said.decode(errors="replace")


def test_predict_shows_a_progress_bar_on_a_terminal_unless_quiet(run, tmp_path):
    # Defect 12: 10,000 crops ran ~9 minutes without a word.
    _cells(tmp_path / "cells", 80)
    said = _stderr_on_a_terminal(["predict", run, "cells"], tmp_path)
    assert "predict:" in said and "/80" in said, said
    quiet = _stderr_on_a_terminal(["predict", run, "cells", "--quiet"], tmp_path)
    assert "predict:" not in quiet and "/80" not in quiet, quiet


def test_a_mistyped_model_is_never_replaced_by_the_shipped_model(tmp_path, capsys):
    # Defect 13: `predict runs/typo cells/` answered cells/ with the shipped model, exit 0.
    _cells(tmp_path / "cells", 2)
    typo = tmp_path / "runs" / "typo"
    error = _last_error(capsys, ["predict", str(typo), str(tmp_path / "cells")])
    assert f"no model at {typo}" in error
