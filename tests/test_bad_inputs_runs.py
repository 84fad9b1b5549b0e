"""Bad inputs to the training commands and the run folder: one line each, nothing written over.

The rows (tests/bad_inputs.py's harness): a workdir that is not a run (other files, a file, a
folder that cannot be written), a re-run of another recipe, a config.json that is not a run's,
a checkpoint whose bytes changed.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path

import pytest
from bad_inputs import REPO, Case, check
from conftest import make_run

from experiments.configs import smoke
from mnres import config as config_lib
from mnres import run_folder, workdir_lock
from mnres.training import loop

SMOKE = f"--config={REPO / 'experiments/configs/smoke.py'}"
TRAIN = ("experiments.malaria", SMOKE, "--config.progress_bar=False")
# A user's folder: files of the names a run writes, that are not a run's.
USER_FILES = {"config.json": '{"mine": 1}\n', "report.md": "# mine\n", "metrics.jsonl": "{}\n"}


def _user_folder(work: Path, name: str = "d") -> None:
    (work / name).mkdir()
    for file, text in USER_FILES.items():
        (work / name / file).write_text(text)


def _a_file(work: Path) -> None:
    (work / "d").write_text("a file, not a folder\n")


def _smoke_run_folder(work: Path, **changes) -> None:
    """A marked run folder whose config.json is the smoke config's (training never started)."""
    config = smoke.get_config()
    for key, value in changes.items():
        block, field = key.split(".")
        config[block][field] = value
    (work / "d").mkdir()
    run_folder.write_json(str(work / "d" / run_folder.MARK_JSON), {"kind": run_folder.RUN})
    run_folder.write_config(str(work / "d"), config)


def _config_without_model(work: Path) -> None:
    _smoke_run_folder(work)
    path = work / "d" / run_folder.CONFIG_JSON
    config = json.loads(path.read_text())
    del config["model"]
    path.write_text(json.dumps(config))
    (work / "d" / run_folder.CHECKPOINTS_DIR).mkdir()


def _flipped_checkpoint(work: Path) -> None:
    """A real saved run whose largest array file has 8 bytes flipped."""
    make_run(str(work / "d"))
    files = glob.glob(str(work / "d/checkpoints/best/*/default/ocdbt.process_0/d/*"))
    path = max(files, key=os.path.getsize)
    data = bytearray(Path(path).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    Path(path).write_bytes(data)


def _crossval_folder(work: Path) -> None:
    workdir_lock.claim(str(work / "d"), run_folder.CROSSVAL)


def _train(work: Path, workdir: str = "d"):
    return loop.train_and_evaluate(smoke.get_config(), str(work / workdir))


CASES = [
    # The commands (each ~5 s: the interpreter and its imports).
    Case(
        "train into a folder of other files",
        r"^error: d holds files that are not an mnres "
        r"run \(config.json, metrics.jsonl, report.md\).*another --workdir",
        argv=(*TRAIN, "--workdir=d"),
        setup=_user_folder,
        exit_code=1,
    ),  # fmt: skip
    Case(
        "train into a file",
        r"^error: d is a file, not a folder: give another --workdir",
        argv=(*TRAIN, "--workdir=d"),
        setup=_a_file,
        exit_code=1,
    ),  # fmt: skip
    Case(
        "train under a read-only parent",
        r"^error: cannot write into /sys/mnres_run ",
        argv=(*TRAIN, "--workdir=/sys/mnres_run"),
        exit_code=1,
    ),  # fmt: skip
    Case(
        "re-run with another alpha",
        r"^error: d was trained with another recipe "
        r"\(config.model.alpha=0.5, the run has 0.25\).*give a new --workdir",
        argv=(*TRAIN, "--workdir=d", "--config.model.alpha=0.5"),
        setup=_smoke_run_folder,
        may_change=("d/.lock",),
    ),  # fmt: skip
    Case(
        "resume a run whose config.json has no model",
        r"^error: d/config.json has no model "
        r"block",
        argv=(*TRAIN, "--workdir=d"),
        setup=_config_without_model,
        exit_code=1,
        may_change=("d/.lock",),
    ),  # fmt: skip
    Case(
        "cross-validate into a folder of other files",
        r"^error: d holds files that are not "
        r"an mnres crossval",
        argv=("experiments.crossval", SMOKE, "--workdir=d"),
        setup=_user_folder,
        exit_code=1,
    ),  # fmt: skip
    # The library.
    Case(
        "train_and_evaluate into a folder of other files",
        r"holds files that are not an "
        r"mnres run",
        call=_train,
        setup=_user_folder,
        raises=FileExistsError,
    ),  # fmt: skip
    Case(
        "train_and_evaluate under a file",
        r"cannot write into .*d/run \(Not a directory\)",
        call=lambda w: _train(w, "d/run"),
        setup=_a_file,
        raises=PermissionError,
    ),  # fmt: skip
    Case(
        "train a run into a cross-validation folder",
        r"is an mnres crossval folder, not a "
        r"run folder",
        call=_train,
        setup=_crossval_folder,
        raises=FileExistsError,
    ),  # fmt: skip
    Case(
        "claim a folder of other files for a cross-validation",
        r"not an mnres crossval "
        r"\(config.json, metrics.jsonl, report.md\)",
        call=lambda w: workdir_lock.claim(str(w / "d"), run_folder.CROSSVAL),
        setup=_user_folder,
        raises=FileExistsError,
    ),  # fmt: skip
    Case(
        "check_recipe of another image size",
        r"config.data.image_size=48, the run has 32",
        call=lambda w: run_folder.check_recipe(str(w / "d"), _with("data", "image_size", 48)),
        setup=_smoke_run_folder,
        raises=config_lib.ConfigError,
    ),  # fmt: skip
    Case(
        "check_recipe of another optimizer",
        r"config.optimizer.learning_rate=0.1, the run "
        r"has 0.003",
        call=lambda w: run_folder.check_recipe(
            str(w / "d"), _with("optimizer", "learning_rate", 0.1)
        ),
        setup=_smoke_run_folder,
        raises=config_lib.ConfigError,
    ),  # fmt: skip
    Case(
        "load_run of a config.json without model",
        r"config.json has no model block",
        call=lambda w: run_folder.load_run(str(w / "d")),
        setup=_config_without_model,
    ),  # fmt: skip
    Case(
        "read_config of a config.json that is not JSON",
        r"config.json is not JSON",
        call=lambda w: run_folder.read_config(str(w / "d")),
        setup=lambda w: _a_file_named(w, "d/config.json", "{not json"),
    ),  # fmt: skip
    Case(
        "read_config of a config.json that is a list",
        r"config.json has no model block",
        call=lambda w: run_folder.read_config(str(w / "d")),
        setup=lambda w: _a_file_named(w, "d/config.json", "[1, 2]"),
    ),  # fmt: skip
    Case(
        "load_run of a checkpoint with 8 flipped bytes",
        r"the checkpoint at step 7 in .*"
        r"checkpoints/best is corrupt \(\['params'\].* does not match the checksum saved with "
        r"it\): delete .*best/7",
        call=lambda w: run_folder.load_run(str(w / "d")),
        setup=_flipped_checkpoint,
    ),  # fmt: skip
]


def _with(block: str, field: str, value):
    config = smoke.get_config()
    config[block][field] = value
    return config


def _a_file_named(work: Path, name: str, text: str) -> None:
    (work / name).parent.mkdir(parents=True, exist_ok=True)
    (work / name).write_text(text)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input(case, tmp_path, monkeypatch):
    if "/sys/" in " ".join(case.argv or ()) and not sys.platform.startswith("linux"):
        pytest.skip("/sys is Linux's read-only file system")
    check(case, tmp_path, monkeypatch)
