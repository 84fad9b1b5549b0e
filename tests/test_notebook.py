"""notebooks/malaria_colab.ipynb runs from top to bottom on a CPU, as Colab would run it.

Executed by nbclient in an IPython kernel of this Python, from the repository root, with its
parameters overridden in a cell inserted after the one tagged `parameters` (a scratch WORKDIR,
a 2-epoch smoke run). Off Colab the install cell does nothing and the TPU cell says it is
skipped; the smoke, export and predict cells must print what they print for a user. Each code
cell is found by its tag.
"""

import json
import os
import re
import sys
from pathlib import Path

import pytest
from conftest import HAS_TFLITE

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "malaria_colab.ipynb"
KERNEL = "mnres-test-python"


def _shipped_model_ready() -> bool:
    """Whether `python -m mnres predict --sample` has its model and crops in this checkout."""
    try:
        from mnres.data import sample
        from mnres.weights import shipped as pretrained

        pretrained.shipped_folder("malaria")
        return bool(sample.sample_cells())
    except (FileNotFoundError, ImportError, AttributeError):
        return False


def _tagged(notebook, tag: str) -> int:
    (index,) = [i for i, cell in enumerate(notebook.cells) if tag in cell.metadata.get("tags", [])]
    return index


def _text(cell) -> str:
    """A cell's printed output: its streams, and any error it raised."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type == "error":
            parts.append("\n".join(output.traceback))
    return "".join(parts)


def _kernel_of_this_python(folder: Path) -> None:
    """A kernelspec `KERNEL` under `folder` that runs this interpreter (not whatever 'python3'
    names on the machine)."""
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "mnres test", "language": "python"})
    )


def test_notebook_is_tagged_and_guards_the_tpu_cell():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for tag in ("parameters", "setup", "smoke", "tpu", "export", "predict", "shipped-model"):
        assert notebook.cells[_tagged(notebook, tag)].cell_type == "code", tag
    tpu = notebook.cells[_tagged(notebook, "tpu")].source
    assert "experiments/configs/tpu.py" in tpu and tpu.startswith('TPU_RUN = f"')
    assert "if RUN_TPU:" in tpu
    # No outputs are committed: the notebook is the commands, not one machine's answers.
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")


@pytest.mark.slow  # ~2.5 min on a 2-core CPU: a 2-epoch smoke run, 3 exports, 3 predicts
def test_notebook_runs_on_a_cpu(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    workdir = tmp_path / "work"
    overrides = nbformat.v4.new_code_cell(f"WORKDIR = {str(workdir)!r}\nEPOCHS = 2")
    notebook.cells.insert(_tagged(notebook, "parameters") + 1, overrides)
    shipped = _shipped_model_ready()
    if not shipped:  # the shipped model and crops are not in this checkout: nothing to run
        del notebook.cells[_tagged(notebook, "shipped-model")]
    _kernel_of_this_python(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # The kernel's connection file and IPython's history: in the scratch folder, not in HOME.
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter" / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    # `python` in the notebook's commands: this interpreter, whatever the PATH says.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)

    client = nbclient.NotebookClient(
        notebook, timeout=900, kernel_name=KERNEL, resources={"metadata": {"path": str(REPO)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"a notebook cell failed:\n{e}")
    text = {tag: _text(notebook.cells[_tagged(notebook, tag)])
            for tag in ("setup", "smoke", "tpu", "export", "predict")}  # fmt: skip

    assert "JAX backend: cpu" in text["setup"], text["setup"]
    assert f"TFLite export: {HAS_TFLITE}" in text["setup"], text["setup"]

    # absl's log line of experiments.malaria, merged into the cell's output.
    found = re.search(r"Test: cell accuracy (\d\.\d{4}), AUC", text["smoke"])
    assert found, text["smoke"]
    assert 0.0 <= float(found.group(1)) <= 1.0
    assert (workdir / "smoke" / "report.md").is_file()

    assert "TPU training skipped" in text["tpu"], text["tpu"]

    formats = ["stablehlo", "tflite", "int8"] if HAS_TFLITE else ["stablehlo"]
    sizes = re.findall(r"^(\w+) +(\d+\.\d{3}) MB  (\S+)$", text["export"], re.MULTILINE)
    assert [fmt for fmt, _, _ in sizes] == formats, text["export"]
    for _, megabytes, path in sizes:
        assert float(megabytes) > 0 and Path(REPO, path).is_file(), path
    # The export's own lines, none of TensorFlow's (mnres.deploy.export quiets them).
    assert "W0000" not in text["export"] and "absl::InitializeLog" not in text["export"]

    # The run folder, then an exported file, on the 8 crops the cell writes.
    assert text["predict"].count("8 image(s) predicted, 0 unreadable") == 2, text["predict"]
    model = "model_int8.tflite" if HAS_TFLITE else "model.stablehlo"
    assert f"$ python -m mnres predict {workdir}/smoke/export/{model}" in text["predict"]

    if shipped:
        sample = _text(notebook.cells[_tagged(notebook, "shipped-model")])
        found = re.search(r"^(\d+) image\(s\) predicted, 0 unreadable$", sample, re.MULTILINE)
        assert found and int(found.group(1)) >= 100, sample
        assert "shipped with mnres" in sample, sample
