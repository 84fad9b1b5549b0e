"""The run folder: every file a training run writes, named, written and read here only.

A run folder (`workdir`) holds what `mnres.training` writes and what evaluation and deployment
read back; nothing else knows its file names.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mnres import models
from mnres.inference import Classifier
from mnres.training import checkpoint

CONFIG_JSON = "config.json"
MANIFEST_JSON = "manifest.json"
METRICS_JSONL = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PREDICTIONS_CSV = "predictions_test.csv"
TEST_OUTPUTS_NPZ = "test_outputs.npz"
CALIBRATION_JSON = "calibration.json"
HISTORY_PNG = "history.png"
CONFUSION_MATRIX_PNG = "confusion_matrix.png"
ROC_PNG = "roc.png"
RELIABILITY_UNCALIBRATED_PNG = "reliability_uncalibrated.png"
RELIABILITY_CALIBRATED_PNG = "reliability_calibrated.png"


def write_json(path: str, obj) -> None:
    """The one JSON writer: indented, sorted keys, non-JSON values as strings, newline."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run was trained with (`config.json`)."""
    return ml_collections.ConfigDict(read_json(os.path.join(workdir, CONFIG_JSON)))


def load_run(workdir: str, *, which: str = "best") -> Classifier:
    """Restores a training run: its model from `config.json`, weights from its checkpoints.

    Args:
      workdir: the run's folder (holding `config.json` and `checkpoints/`).
      which: 'best' (best validation accuracy; falls back to the latest) or 'latest'.

    Raises:
      ValueError: not a run folder, no checkpoint, or a checkpoint that does not fit the
        model its config describes.
    """
    config_path = os.path.join(workdir, CONFIG_JSON)
    checkpoint_dir = os.path.join(workdir, CHECKPOINTS_DIR)
    if not os.path.isfile(config_path) or not os.path.isdir(checkpoint_dir):
        raise ValueError(
            f"{workdir} is not a training run: expected config.json and checkpoints/ in it "
            "(the workdir of `python -m experiments.malaria`)"
        )
    if which not in ("best", "latest"):
        raise ValueError(f"checkpoint {which!r}: use 'best' or 'latest'")
    config = read_config(workdir)
    model = models.from_config(config.model)
    size = int(config.data.image_size)
    expected = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    ckpts = checkpoint.Checkpoints(checkpoint_dir, async_save=False)
    try:
        best = which == "best" and ckpts.best_step() is not None
        step = ckpts.best_step() if best else ckpts.latest_step()
        # No target: the saved tree as it is, then checked against the model below.
        state = None if step is None else ckpts.restore(None, best=best)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot restore the checkpoint in {checkpoint_dir}: {e}") from e
    finally:
        ckpts.close()
    if state is None:
        raise ValueError(f"no checkpoint in {checkpoint_dir}")
    # A run that kept a moving average of its weights was evaluated with it (TrainState).
    params = state.get("ema_params") or state["params"]
    variables = {"params": params, "batch_stats": state.get("batch_stats") or {}}
    _check_fits(variables, dict(expected), f"the checkpoint at step {step} in {checkpoint_dir}",
                config.model.name)  # fmt: skip
    metadata = {
        "run": os.path.abspath(workdir),
        "checkpoint": "best" if best else "latest",
        "step": int(step),
        "model": config.model.to_dict(),
    }
    return Classifier(model, variables, size, metadata, config)


def _check_fits(variables: dict, expected: dict, what: str, model_name: str) -> None:
    """Raises ValueError naming the first parameter whose presence or shape differs."""
    got = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree.leaves_with_path(variables)}
    want = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree.leaves_with_path(expected)}
    for key in sorted(set(got) | set(want)):
        if got.get(key) != want.get(key):
            raise ValueError(
                f"{what} does not fit {model_name} as config.json describes it: {key} is "
                f"{got.get(key, 'missing')} there, {want.get(key, 'missing')} in the model"
            )
