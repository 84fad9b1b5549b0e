"""Provenance: what produced a result, recorded beside it (report.json, export sidecars).

Two runs of one command, seed, data and versions on one machine give identical files; on two
CPUs they do not, because XLA compiles for each CPU's own instructions (AVX-512 or AVX2 kernels,
fused multiply-adds) and training amplifies the rounding differences (docs/training.md,
"Reproducibility"). So a result carries the package versions, the git commit, the device, the
CPU and its vector instruction sets, the XLA flags and the hash of its data manifest.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import subprocess

import jax

from mnres import run_folder

PACKAGES = ("mnres", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
# Instruction-set flags that change the kernels XLA's CPU backend emits (x86 /proc/cpuinfo
# `flags`, ARM `Features`).
_VECTOR_FLAG = re.compile(r"^(avx.*|fma.*|f16c|sse4.*|amx.*|neon|asimd.*|sve.*|sme|sme[2bfi].*)$")
_GIT_TIMEOUT_S = 5
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def versions() -> dict[str, str | None]:
    """{package: installed version (None when missing)} for `PACKAGES`, and 'python'."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["python"] = platform.python_version()
    return found


def _git(*args: str) -> str | None:
    """stdout of `git ARGS` run in the package's folder; None when git fails or is missing."""
    try:
        proc = subprocess.run(
            ["git", *args], cwd=_PACKAGE_DIR, capture_output=True, text=True,
            timeout=_GIT_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state() -> dict[str, str | bool | None]:
    """{'commit', 'dirty'} of the git checkout mnres runs from; both None outside one.

    'dirty': `git status --porcelain` lists anything (changed, staged or untracked files).
    """
    # The package's own files must be tracked: an installed copy in a virtual environment
    # inside some other repository is not a checkout of mnres.
    if _git("ls-files", "--error-unmatch", "__init__.py") is None:
        return {"commit": None, "dirty": None}
    commit, status = _git("rev-parse", "HEAD"), _git("status", "--porcelain")
    return {
        "commit": commit.strip() if commit else None,
        "dirty": None if status is None else bool(status.strip()),
    }


def devices() -> dict:
    """The JAX platform, the first device's kind, and the device and process counts."""
    return {
        "platform": jax.devices()[0].platform,
        "kind": jax.devices()[0].device_kind,
        "count": jax.device_count(),
        "processes": jax.process_count(),
    }


def cpu(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
    """The host CPU: model, architecture, logical cores, vector instruction sets (sorted).

    Args:
      cpuinfo_path: Linux's CPU description; elsewhere `platform.processor()` names the model
        and the instruction sets are None (unknown).
    """
    model, flags = None, None
    try:
        with open(cpuinfo_path) as f:
            text = f.read()
    except OSError:
        text = ""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    model = fields.get("model name") or fields.get("Model") or fields.get("Hardware")
    listed = fields.get("flags") or fields.get("Features")
    if listed is not None:
        flags = sorted(f for f in listed.split() if _VECTOR_FLAG.match(f))
    return {
        "model": model or platform.processor() or None,
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "vector_flags": flags,
    }


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, hex (read a MiB at a time: weight files are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_sha256(manifest: dict) -> str:
    """sha256 (hex) of a data manifest in its canonical JSON form: that of `manifest.json`."""
    return hashlib.sha256(run_folder.json_text(manifest).encode()).hexdigest()


def collect(manifest: dict | None = None) -> dict:
    """Everything that decides a run's numbers besides its config, for report.json and exports.

    Args:
      manifest: the run's data manifest (`Dataset.manifest`, written as manifest.json); None
        when there is none (its hash is then None).

    Returns:
      {'versions', 'git', 'devices', 'cpu', 'xla_flags', 'manifest_sha256'}, plain
      JSON values; nothing in it measures time, so two runs of one command on one machine
      record the same provenance.
    """
    return {
        "versions": versions(),
        "git": git_state(),
        "devices": devices(),
        "cpu": cpu(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "manifest_sha256": None if manifest is None else manifest_sha256(manifest),
    }
