"""The module paths of mnres 0.1 still import, warn with their new home, and give its names."""

import importlib
import sys

import pytest

import mnres
from mnres import _moved

# A name each old path must still give, read from the module(s) it moved to.
NAMES = {
    "mnres.layers": "ConvBN",
    "mnres.blocks": "InvertedResidual",
    "mnres.params": "count_params",
    "mnres.keras_weights": "load_keras_weights",
    "mnres.steps": "TrainState",
    "mnres.optim": "cross_entropy",
    "mnres.checkpoint": "Checkpoints",
    "mnres.train": "train_and_evaluate",
    "mnres.calibration": "write_run_calibration",  # now in mnres.reporting.report
    "mnres.report": "write_report",
    "mnres.crossval": "assign_folds",  # now in mnres.data.folds
    "mnres.gradcam": "gradcam",
    "mnres.export": "export_tflite",
    "mnres.predict": "predict_files",
    "mnres.evaluation.metrics": "binary_metrics",
    "mnres.evaluation.multiclass": "classification_metrics",
    "mnres.evaluation.slide_prior": "adjust",
    "mnres.evaluation.calibration": "fit_temperature",
    "mnres.evaluation.report": "write_report",
    "mnres.evaluation.plots": "plot_roc",
    "mnres.evaluation.gradcam": "gradcam",
    "mnres.evaluation.crossval": "run_crossval",
    "mnres.evaluation.ensemble_run": "combine",
    "mnres.evaluation.search": "read_test",
    "mnres.evaluation.fold_summary": "summarize_fold",
    "mnres.evaluation.ensemble_folds": "record_ensemble",
    "mnres.pretrained": "load_pretrained",
    "mnres.models.imagenet_weights": "choose_weights",
    "mnres.models.keras_weights": "load_keras_weights",
    "mnres.training.warm_start": "warm_start",
    "mnres.config_validation": "validate",
    "mnres.data.config": "MALARIA_CLASSES",
}


def _forget(name: str) -> None:
    """Drops an old path from the import cache, so importing it runs the alias again."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    parent, _, attr = name.rpartition(".")
    if parent in sys.modules and attr in vars(sys.modules[parent]):
        delattr(sys.modules[parent], attr)


def test_every_old_path_is_listed():
    assert set(NAMES) | {"mnres.evaluation"} == set(_moved.MOVED)


@pytest.mark.parametrize("old", sorted(NAMES))
def test_old_path_warns_and_gives_its_names(old):
    _forget(old)
    new = _moved.MOVED[old]
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated.*{new[0]}"):
        module = importlib.import_module(old)
    assert getattr(module, NAMES[old]) is getattr(
        next(m for m in map(importlib.import_module, new) if hasattr(m, NAMES[old])), NAMES[old]
    )


def test_old_top_level_attribute_warns():
    _forget("mnres.params")
    with pytest.warns(DeprecationWarning, match="mnres.params is deprecated"):
        count_params = mnres.params.count_params
    from mnres.models import params

    assert count_params is params.count_params


def test_new_paths_do_not_warn(recwarn):
    for name in ("mnres.metrics", "mnres.reporting.report", "mnres.weights.shipped"):
        importlib.import_module(name)
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)
                and "mnres" in str(w.message)]  # fmt: skip
