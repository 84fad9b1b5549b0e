"""The command line's persistent compilation cache: a second predict loads what the first
compiled; two processes at once share the folder; it can be turned off."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _predict(cache, *flags, env=None):
    environ = {k: v for k, v in os.environ.items() if k != "MNRES_COMPILE_CACHE"}
    environ.update({"MNRES_CACHE": str(cache), "JAX_PLATFORMS": "cpu", **(env or {})})
    return subprocess.Popen(
        [sys.executable, "-m", "mnres", "predict", "--sample", "--json", "--quiet", *flags],
        cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _entries(cache):
    folder = cache / "jax-compile"
    return sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []


@pytest.mark.slow
def test_two_processes_share_the_cache_and_a_third_compiles_nothing_new(tmp_path):
    first = [_predict(tmp_path), _predict(tmp_path)]  # at once, on an empty cache
    outs = [p.communicate(timeout=600) for p in first]
    assert all(p.returncode == 0 for p in first), [err[-2000:] for _, err in outs]
    assert outs[0][0] == outs[1][0]
    entries = _entries(tmp_path)
    assert any(name.endswith("-cache") for name in entries), entries
    third = _predict(tmp_path)
    out, err = third.communicate(timeout=600)
    assert third.returncode == 0, err[-2000:]
    assert out == outs[0][0] and _entries(tmp_path) == entries  # nothing new compiled


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flag", "env"])
def test_the_cache_can_be_turned_off(tmp_path, how):
    flags, env = (
        (["--no-compile-cache"], None) if how == "flag" else ([], {"MNRES_COMPILE_CACHE": "0"})
    )
    proc = _predict(tmp_path, *flags, env=env)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert _entries(tmp_path) == []
