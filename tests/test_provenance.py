"""mnres.provenance: each recorded value checked against an independent reading of it."""

import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import flax
import jax
import jaxlib
import numpy as np
import pytest

import mnres
from experiments.configs import smoke
from mnres import provenance, run_folder
from mnres.deploy import export
from mnres.training import loop

REPO = Path(__file__).resolve().parents[1]
CPUINFO = Path("/proc/cpuinfo")


def _git(cwd, *args) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True).stdout


def _runs_from_checkout() -> bool:
    in_repo = Path(mnres.__file__).resolve().is_relative_to(REPO)
    try:
        return in_repo and bool(_git(REPO, "ls-files", "mnres/__init__.py").strip())
    except (OSError, subprocess.CalledProcessError):
        return False


def test_versions_are_the_imported_ones():
    found = provenance.versions()
    assert found["jax"] == jax.__version__
    assert found["jaxlib"] == jaxlib.__version__
    assert found["flax"] == flax.__version__
    assert found["numpy"] == np.__version__
    assert found["mnres"] == importlib.metadata.version("mnres")
    assert found["python"] == platform.python_version()
    assert set(found) == {*provenance.PACKAGES, "python"}


@pytest.mark.skipif(not _runs_from_checkout(), reason="mnres does not run from a git checkout")
def test_commit_and_dirty_are_the_checkouts():
    state = provenance.git_state()
    assert state["commit"] == _git(REPO, "rev-parse", "HEAD").strip()
    assert len(state["commit"]) == 40
    assert state["dirty"] == bool(_git(REPO, "status", "--porcelain").strip())


def test_git_state_of_a_repository_follows_its_commits_and_edits(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "_PACKAGE_DIR", str(tmp_path))
    assert provenance.git_state() == {"commit": None, "dirty": None}  # not a repository
    _git(tmp_path, "init", "-q")
    (tmp_path / "__init__.py").write_text("")
    # A repository that does not track the package (a virtual environment inside one).
    assert provenance.git_state() == {"commit": None, "dirty": None}
    _git(tmp_path, "add", "__init__.py")
    _git(tmp_path, "commit", "-q", "-m", "one")
    head = _git(tmp_path, "rev-parse", "HEAD").strip()
    assert provenance.git_state() == {"commit": head, "dirty": False}
    (tmp_path / "__init__.py").write_text("x = 1\n")
    assert provenance.git_state() == {"commit": head, "dirty": True}


def test_devices_are_jaxs():
    found = provenance.devices()
    assert found["count"] == jax.device_count()
    assert found["kind"] == jax.devices()[0].device_kind
    assert found["platform"] == jax.devices()[0].platform
    assert found["processes"] == jax.process_count()


@pytest.mark.skipif(not CPUINFO.is_file(), reason="needs /proc/cpuinfo (Linux)")
def test_cpu_model_and_vector_flags_are_proc_cpuinfos():
    lines = CPUINFO.read_text().splitlines()
    first = lambda key: next(
        (line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == key),
        None,
    )
    listed = set((first("flags") or first("Features") or "").split())
    found = provenance.cpu()
    assert set(found["vector_flags"]) <= listed
    for flag in ("avx", "avx2", "avx512f", "fma", "sse4_2", "amx_tile", "asimd", "sve"):
        assert (flag in found["vector_flags"]) == (flag in listed), flag
    assert "smep" not in found["vector_flags"]  # a security feature, not an instruction set
    if first("model name"):
        assert found["model"] == first("model name")


def test_cpu_reads_arm_features_and_copes_without_cpuinfo(tmp_path):
    arm = tmp_path / "cpuinfo"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve sve2 sme smep\n")
    assert provenance.cpu(str(arm))["vector_flags"] == ["asimd", "sme", "sve", "sve2"]
    missing = provenance.cpu(str(tmp_path / "absent"))
    assert missing["vector_flags"] is None
    assert missing["model"] == (platform.processor() or None)


def test_xla_flags_are_the_environments(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert provenance.collect()["xla_flags"] == "--xla_cpu_enable_fast_math=false"
    monkeypatch.delenv("XLA_FLAGS")
    assert provenance.collect()["xla_flags"] is None


def test_manifest_hash_is_the_written_files_sha256(tmp_path):
    manifest = {"seed": np.int64(3), "splits": {"test": {"names_sha256": "ab"}}, "x": float("nan")}
    path = tmp_path / "manifest.json"
    run_folder.write_json(str(path), manifest)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert provenance.manifest_sha256(manifest) == expected
    assert provenance.manifest_sha256({**manifest, "seed": 4}) != expected
    assert provenance.collect()["manifest_sha256"] is None


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke config shortened (one block, 200 cells, 1 epoch), trained in this process."""
    config = smoke.get_config()
    config.model.num_blocks = 1
    config.data.synthetic_size = 200
    config.batch_size = 64
    config.num_epochs = 1
    config.progress_bar = False
    workdir = tmp_path_factory.mktemp("smoke") / "run"
    loop.train_and_evaluate(config, str(workdir))
    return workdir


def test_report_records_the_runs_provenance(smoke_run):
    recorded = run_folder.read_report(str(smoke_run))["provenance"]
    manifest_bytes = (smoke_run / run_folder.MANIFEST_JSON).read_bytes()
    assert recorded["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert recorded["versions"]["jax"] == jax.__version__
    assert recorded["devices"]["count"] == jax.device_count()
    assert recorded["cpu"] == provenance.cpu()
    if _runs_from_checkout():
        assert recorded["git"]["commit"] == _git(REPO, "rev-parse", "HEAD").strip()


def test_export_sidecar_records_both_provenances(smoke_run, tmp_path):
    classifier = run_folder.load_run(str(smoke_run))
    path = str(tmp_path / "model.stablehlo")
    export.export_stablehlo(classifier, path, platforms=("cpu",))
    meta = export.read_metadata(path)
    manifest_bytes = (smoke_run / run_folder.MANIFEST_JSON).read_bytes()
    assert meta["provenance"]["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert meta["provenance"]["versions"]["jax"] == jax.__version__
    assert meta["training_provenance"] == run_folder.read_report(str(smoke_run))["provenance"]
