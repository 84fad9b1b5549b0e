"""Packaging: one version, the console script, and the files a wheel must carry."""

import importlib.metadata
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from data_fixtures import REPO

import mnres
from mnres.data import sample
from mnres.weights import shipped as pretrained


def test_the_version_is_written_once():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]  # mnres/__init__.py
    assert importlib.metadata.version("mnres") == mnres.__version__
    out = subprocess.run(
        [sys.executable, "-m", "mnres", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"mnres {mnres.__version__}"


def test_console_script_is_the_same_program():
    script = shutil.which("mnres")
    if script is None:
        pytest.skip("the mnres console script is not on PATH (package not installed with pip)")
    out = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"mnres {mnres.__version__}"
    usage = subprocess.run([script, "predict"], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: mnres predict")


@pytest.mark.slow
def test_the_wheel_carries_its_package_data_and_predicts_from_a_fresh_venv(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        check=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("mnres-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("mnres/py.typed", "mnres/run_folder.py", "mnres/inference.py",
                   "mnres/models/mobilenet.py", "mnres/training/loop.py",
                   "mnres/training/crossval.py", "mnres/deploy/predict.py"):  # fmt: skip
        assert module in names, module
    metadata = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "mnres = mnres.__main__:main" in zipfile.ZipFile(wheel).read(metadata).decode()
    for name in pretrained.SHIPPED_FILES:  # package data, with .tflite and .png not ignored
        assert f"mnres/weights/malaria/{name}" in names, name
    crops = [n for n in names if n.startswith("mnres/data/sample_cells/") and n.endswith(".png")]
    assert len(crops) == len(sample.sample_cells())
    # Installed into a fresh venv (its dependencies from this environment), run from elsewhere:
    # the shipped model loads from the installed package's data and predicts offline.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # This environment's packages after the venv's own (--system-site-packages would give the
    # base interpreter's, which lack them when this environment is itself a venv, as in CI).
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = subprocess.run([python, "-c", where], capture_output=True, text=True,
                             check=True).stdout.strip()  # fmt: skip
    Path(purelib, "this_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True)  # fmt: skip
    code = (
        "import mnres, sys; assert mnres.__file__.startswith(sys.prefix), mnres.__file__\n"
        "from mnres.__main__ import main; raise SystemExit(main(['predict', '--sample']))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{len(crops)} image(s) predicted, 0 unreadable" in out.stdout


# The core workflow, then a look at the import graph: no package of an extra was imported, so a
# core install (no extras) runs it.
CORE_ONLY = """
import sys
import jax, jax.numpy as jnp, numpy as np
import mnres
from mnres import models, run_folder
from mnres.data import sample_cells
from mnres.deploy import predict
x = jnp.zeros((2, 32, 32, 3))
for name in sorted(models.MODELS):
    model = mnres.create_model(name, num_classes=2)
    variables = model.init(jax.random.key(0), x, train=False)
    logits, _ = model.apply(variables, x, train=False)
    assert logits.shape == (2, 2), (name, logits.shape)
classifier = run_folder.load_run(sys.argv[1])
probs = predict.from_classifier(classifier).parasitized(np.zeros((3, 32, 32, 3), np.uint8))
assert probs.shape == (3,) and np.all((probs >= 0) & (probs <= 1))
shipped = predict.from_classifier(mnres.load_pretrained("malaria").classifier)
rows = predict.predict_files(shipped, sample_cells()[:4])
assert all(r["error"] is None for r in rows), rows
extras = ("tensorflow", "keras", "h5py", "torch", "tensorflow_datasets", "sklearn",
          "ai_edge_litert")
imported = sorted(name for name in extras if name in sys.modules)
assert not imported, f"the core workflow imported {imported}"
print("core ok")
"""


def test_the_core_install_builds_every_model_and_predicts():
    run = REPO / "tests" / "testdata" / "run_v0.1.0"
    out = subprocess.run(
        [sys.executable, "-c", CORE_ONLY, str(run)], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "core ok" in out.stdout


def test_extras_name_what_is_missing(tmp_path):
    code = (
        "import sys; sys.modules['h5py'] = None\n"
        "from mnres.models import keras_weights\n"
        "try:\n"
        f"    keras_weights.load_keras_weights(None, {{}}, {str(tmp_path / 'w.h5')!r})\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "pip install 'mnres[keras]'" in out.stdout, out.stdout + out.stderr
