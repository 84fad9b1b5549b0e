"""The run folder: every file a training run writes, named, written and read here only.

A run folder (`workdir`) holds what `mnres.training` writes and what evaluation and deployment
read back; nothing else knows its file names. JSON files are written by `write_json`, one format
for all: indented, sorted keys, plain JSON values (NaN and infinities as null). Every file is
written whole or not at all (`mnres.atomic_file`).

A folder is trained into only when it is a run folder already (it holds `MARK_JSON`, written
first; a run of mnres 0.1, with config.json, manifest.json and checkpoints/, is marked when it
is resumed), empty or new (`mnres.workdir_lock.claim`); a re-run must keep the run's recipe
(`check_recipe`).
"""

from __future__ import annotations

import csv
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mnres import atomic_file, models
from mnres.config import schema as config_lib
from mnres.inference import Classifier

# Written first into every folder mnres trains into: {"kind": "run"} or {"kind": "crossval"}.
MARK_JSON = "mnres_folder.json"
RUN, CROSSVAL = "run", "crossval"
CONFIG_JSON = "config.json"
MANIFEST_JSON = "manifest.json"
METRICS_JSONL = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"  # event files, with config.tensorboard
# Either marks a folder as a training run (`python -m mnres predict RUN ...`).
RUN_MARKERS = (CONFIG_JSON, CHECKPOINTS_DIR)
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PREDICTIONS_CSV = "predictions_test.csv"
TEST_OUTPUTS_NPZ = "test_outputs.npz"
# Training crops kept with the run: int8 export calibrates on them when the data has moved.
CALIBRATION_SAMPLE_NPZ = "calibration_sample.npz"
CALIBRATION_JSON = "calibration.json"
# The slide verdict rule fitted on the validation slides (mnres.metrics.verdict_fitting).
VERDICT_RULE_JSON = "verdict_rule.json"
LOCK_FILE = ".lock"
HISTORY_PNG = "history.png"
CONFUSION_MATRIX_PNG = "confusion_matrix.png"
ROC_PNG = "roc.png"
RELIABILITY_UNCALIBRATED_PNG = "reliability_uncalibrated.png"
RELIABILITY_CALIBRATED_PNG = "reliability_calibrated.png"


def to_json_types(value):
    """Plain JSON types: numpy scalars/arrays, tuples, ConfigDicts; non-finite floats -> None.

    Anything else becomes its `str`.
    """
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): to_json_types(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [to_json_types(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def json_text(obj) -> str:
    """The package's one JSON format: `to_json_types`, indented, sorted keys, final newline."""
    return json.dumps(to_json_types(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: str, obj) -> None:
    """The one JSON writer of the package (`json_text`, atomically); the folder is created."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_file.write_text(path, json_text(obj))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the resolved config a run is trained with (`config.json`)."""
    write_json(os.path.join(workdir, CONFIG_JSON), config)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run was trained with (`config.json`), as overrides of the schema
    (`mnres.config.from_overrides`): a field added since the run was written has its default.

    Raises:
      ValueError: config.json is not JSON, or not a run's config (no `model` block naming its
        model: every run's config.json, of any mnres version, has one).
    """
    path = os.path.join(workdir, CONFIG_JSON)
    try:
        given = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e}): not a run's config.json") from None
    model = given.get("model") if isinstance(given, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise ValueError(
            f"{path} has no model block naming the model (config.json of a run has "
            '"model": {"name": ...}): not a run this mnres wrote; give another run folder'
        )
    return config_lib.from_overrides(given)


def check_recipe(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses a re-run whose recipe differs from the run's config.json (before it is replaced).

    Only the recipe fields count (`mnres.config.schema.FIELD_KINDS`): evaluation fields (e.g.
    `test_time_augmentation`) re-evaluate the finished run, execution fields may change.

    Raises:
      ConfigError: a recipe field differs; the message names it and both values.
    """
    if not os.path.isfile(os.path.join(workdir, CONFIG_JSON)):
        return
    stored = to_json_types(config_lib.recipe_fields(read_config(workdir)))
    given = to_json_types(config_lib.recipe_fields(config))
    changed = [k for k in sorted(stored.keys() | given.keys()) if stored.get(k) != given.get(k)]
    if changed:
        shown = "; ".join(
            f"config.{k}={given.get(k)!r}, the run has {stored.get(k)!r}" for k in changed[:3]
        )
        raise config_lib.ConfigError(
            f"{workdir} was trained with another recipe ({shown}"
            f"{'; ...' if len(changed) > 3 else ''}): a re-run resumes or re-evaluates its own "
            "recipe; give a new --workdir to train this one"
        )


def write_manifest(workdir: str, dataset) -> None:
    """Writes the split manifest of `dataset` (a `mnres.data.Dataset`) as `manifest.json`."""
    write_json(os.path.join(workdir, MANIFEST_JSON), dataset.manifest)


def read_manifest(workdir: str) -> dict:
    return read_json(os.path.join(workdir, MANIFEST_JSON))


def read_history(workdir: str, last_step: int | None = None) -> list[dict]:
    """Rows of `metrics.jsonl`, one dict per epoch; [] when the file is not there yet.

    A resumed run that logged an epoch again: the last row of an epoch wins. A torn last line
    (a run killed while writing it) is skipped; a bad line elsewhere raises.

    Args:
      workdir: the run folder.
      last_step: keep only rows up to this step (those a checkpoint at `last_step` covers).

    Raises:
      json.JSONDecodeError: a line before the last is not JSON.
    """
    path = os.path.join(workdir, METRICS_JSONL)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
        if "epoch" in row:
            rows = [r for r in rows if r.get("epoch") != row["epoch"]]
        rows.append(row)
    return rows if last_step is None else [r for r in rows if r["step"] <= last_step]


def write_history(workdir: str, rows: list[dict]) -> None:
    """Replaces `metrics.jsonl` with `rows` (a resumed run drops the rows after its checkpoint)."""
    atomic_file.write_text(os.path.join(workdir, METRICS_JSONL), "".join(map(_jsonl, rows)))


def append_history_row(workdir: str, row: dict) -> None:
    """Appends one epoch's row to `metrics.jsonl` (a torn row, the last, is dropped on resume)."""
    with open(os.path.join(workdir, METRICS_JSONL), "a") as f:
        f.write(_jsonl(row))


def epochs_seconds(rows: list[dict]) -> float:
    """The time `metrics.jsonl` rows took: each epoch's training and its validation."""
    return float(sum(r.get("epoch_time_s", 0.0) + r.get("eval_time_s", 0.0) for r in rows))


def _jsonl(row: dict) -> str:
    # One compact line per row, so that a torn line (a kill while writing) is only the last.
    return json.dumps(row) + "\n"


def write_predictions(workdir: str, split, probs, class_names=config_lib.MALARIA_CLASSES) -> None:
    """Writes `predictions_test.csv`: name, slide_id, label and the probabilities per example.

    Args:
      workdir: the run folder.
      split: the `mnres.data.Split` scored (names, slide ids, labels, in order).
      probs: float [N], P(class 1) of each example (column `prob_parasitized` for the malaria
        pair, `prob_<class 1>` for another pair), or [N, K] for K classes (the column
        `predicted`, the most probable class's index, then one `prob_<class>` per class).
      class_names: the classes, in label order.
    """
    probs = np.asarray(probs)
    with atomic_file.writing(os.path.join(workdir, PREDICTIONS_CSV)) as f:
        writer = csv.writer(f)
        if probs.ndim == 1:
            writer.writerow(["name", "slide_id", "label", f"prob_{class_names[1]}"])
            for row in zip(split.names, split.slide_ids, split.labels, probs, strict=True):
                writer.writerow([row[0], row[1], int(row[2]), f"{float(row[3]):.6f}"])
            return
        writer.writerow(
            ["name", "slide_id", "label", "predicted", *(f"prob_{c}" for c in class_names)]
        )
        for row in zip(split.names, split.slide_ids, split.labels, probs, strict=True):
            cells = [f"{float(p):.6f}" for p in row[3]]
            writer.writerow([row[0], row[1], int(row[2]), int(np.argmax(row[3])), *cells])


def write_test_outputs(
    workdir: str, *, labels, slide_ids, names, log_odds=None, logits=None
) -> None:
    """Writes `test_outputs.npz`: the test split's log-odds (two classes) or logits [N, K] (more
    classes), labels, slide ids and names [N]."""
    scores = {"log_odds": log_odds} if logits is None else {"logits": logits}
    with atomic_file.writing(os.path.join(workdir, TEST_OUTPUTS_NPZ), binary=True) as f:
        np.savez_compressed(
            f,
            **scores,
            labels=labels,
            slide_ids=np.asarray(slide_ids, str),
            names=np.asarray(names, str),
        )


def read_test_outputs(workdir: str) -> dict[str, np.ndarray]:
    """`test_outputs.npz` as {'log_odds' (or 'logits'), 'labels', 'slide_ids', 'names'} arrays."""
    with np.load(os.path.join(workdir, TEST_OUTPUTS_NPZ)) as outputs:
        return {name: outputs[name] for name in outputs.files}


def write_calibration_sample(workdir: str, images) -> None:
    """Writes `calibration_sample.npz`: uint8 training crops [N, S, S, 3] for int8 export."""
    with atomic_file.writing(os.path.join(workdir, CALIBRATION_SAMPLE_NPZ), binary=True) as f:
        np.savez_compressed(f, images=images)


def read_calibration_sample(workdir: str) -> np.ndarray | None:
    """The run's stored calibration crops, or None (runs of mnres 0.1 stored none)."""
    path = os.path.join(workdir, CALIBRATION_SAMPLE_NPZ)
    if not os.path.isfile(path):
        return None
    with np.load(path) as stored:
        return stored["images"]


def write_calibration(workdir: str, record: dict) -> str:
    """Writes `calibration.json` (a `mnres.metrics.calibration.calibrate` record); its path."""
    path = os.path.join(workdir, CALIBRATION_JSON)
    write_json(path, record)
    return path


def read_calibration(workdir: str) -> dict | None:
    """The run's calibration record, or None if it was never calibrated."""
    path = os.path.join(workdir, CALIBRATION_JSON)
    return read_json(path) if os.path.isfile(path) else None


def write_report(workdir: str, report: dict, markdown: str) -> None:
    """Writes `report.json` (the dict) and `report.md` (the text)."""
    write_json(os.path.join(workdir, REPORT_JSON), report)
    atomic_file.write_text(os.path.join(workdir, REPORT_MD), markdown)


def read_report(workdir: str) -> dict:
    return read_json(os.path.join(workdir, REPORT_JSON))


def has_test_split(report: dict) -> bool:
    """Whether the run held out a test split. A final run keeps none (`data.num_test` 0): its
    figures are its validation split's and none is held out. A partial report without the
    count counts as having one."""
    return (report.get("data") or {}).get("num_test", 1) > 0


def whole_run_seconds(training: dict) -> float | None:
    """A run's cost from its report's "training": its last command plus the epochs earlier
    invocations trained when it resumed from a checkpoint (a report written before it kept
    `earlier_epochs_seconds` counts its last command only); None without a wall time."""
    last = training.get("wall_seconds_this_run")
    return None if last is None else last + training.get("earlier_epochs_seconds", 0.0)


def run_warnings(workdir: str) -> list[str]:
    """What a user of the run's model should know: its report's `warnings` (e.g. one output
    for every crop) and, for a run trained on synthetic cells, that real crops are unknown to it.
    """
    found = []
    if os.path.isfile(os.path.join(workdir, REPORT_JSON)):
        found += read_report(workdir).get("warnings") or []
    if os.path.isfile(os.path.join(workdir, CONFIG_JSON)):
        if read_config(workdir).data.source == "synthetic":
            found.append(
                "This model was trained on synthetic cells (config.data.source='synthetic'): "
                "its outputs on real crops mean nothing. Train on real crops for real use."
            )
    return found


def plot_files(workdir: str) -> list[str]:
    """The PNG files in the run folder, sorted by name (report.md links each)."""
    return sorted(p for p in os.listdir(workdir) if p.endswith(".png"))


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
    # The classes are the data's (config.json's data.class_names; unset: the malaria pair).
    model = models.from_config(config.model, num_classes=len(config_lib.class_names(config.data)))
    size = int(config.data.image_size)
    expected = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    # The one reader of orbax checkpoints; the training package imports this module, hence here.
    from mnres.training import checkpoint

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
    check_fits(variables, dict(expected), f"the checkpoint at step {step} in {checkpoint_dir}",
                config.model.name)  # fmt: skip
    metadata = {
        "run": os.path.abspath(workdir),
        "checkpoint": "best" if best else "latest",
        "step": int(step),
        "model": config.model.to_dict(),
    }
    return Classifier(model, variables, size, metadata, config)


def check_fits(variables: dict, expected: dict, what: str, model_name: str) -> None:
    """Raises ValueError naming the first parameter whose presence or shape differs."""
    got = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree.leaves_with_path(variables)}
    want = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree.leaves_with_path(expected)}
    for key in sorted(set(got) | set(want)):
        if got.get(key) != want.get(key):
            raise ValueError(
                f"{what} does not fit {model_name} as config.json describes it: {key} is "
                f"{got.get(key, 'missing')} there, {want.get(key, 'missing')} in the model"
            )
