"""Module paths of mnres 0.1, kept for one release: importing one warns and gives its new home.

`import mnres.train` or `from mnres.evaluation import metrics` still works, with a
`DeprecationWarning` that names the module to import instead; the list is in CHANGELOG.md, and
these paths go in 0.3. A path whose module was split in two reads names from both.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

# Old path -> the module(s) that hold its names now (the first is the one to import).
MOVED = {
    # 0.1.0's top-level modules.
    "mnres.layers": ("mnres.models.layers",),
    "mnres.blocks": ("mnres.models.blocks",),
    "mnres.params": ("mnres.models.params",),
    "mnres.keras_weights": ("mnres.weights.keras",),
    "mnres.steps": ("mnres.training.steps",),
    "mnres.optim": ("mnres.training.optim",),
    "mnres.checkpoint": ("mnres.training.checkpoint",),
    "mnres.train": ("mnres.training.loop",),
    "mnres.calibration": ("mnres.metrics.calibration", "mnres.reporting.report"),
    "mnres.report": ("mnres.reporting.report",),
    "mnres.crossval": ("mnres.training.crossval", "mnres.data.folds"),
    "mnres.gradcam": ("mnres.reporting.gradcam",),
    "mnres.export": ("mnres.deploy.export",),
    "mnres.predict": ("mnres.deploy.predict",),
    # 0.1.0's sub-packages.
    "mnres.evaluation": (),
    "mnres.evaluation.metrics": ("mnres.metrics",),
    "mnres.evaluation.multiclass": ("mnres.metrics.multiclass",),
    "mnres.evaluation.slide_prior": ("mnres.metrics.slide_prior",),
    "mnres.evaluation.calibration": ("mnres.metrics.calibration", "mnres.reporting.report"),
    "mnres.evaluation.report": ("mnres.reporting.report",),
    "mnres.evaluation.plots": ("mnres.reporting.plots",),
    "mnres.evaluation.gradcam": ("mnres.reporting.gradcam",),
    "mnres.evaluation.crossval": ("mnres.training.crossval", "mnres.data.folds"),
    "mnres.evaluation.ensemble_run": ("mnres.training.ensemble",),
    "mnres.evaluation.search": ("experiments.search.records",),
    "mnres.evaluation.fold_summary": ("experiments.search.fold_summary",),
    "mnres.evaluation.ensemble_folds": ("experiments.search.ensemble_folds",),
    "mnres.pretrained": (
        "mnres.weights.loader",
        "mnres.weights.registry",
        "mnres.weights.shipped",
        "mnres.weights.transfer",
    ),
    "mnres.models.imagenet_weights": ("mnres.weights.imagenet",),
    "mnres.models.keras_weights": ("mnres.weights.keras",),
    "mnres.training.warm_start": ("mnres.weights.transfer", "mnres.config"),
    # The config schema: one module for the defaults, the kinds of the fields and validation;
    # the command line's flag plumbing went to the experiment suite.
    "mnres.config_validation": ("mnres.config", "experiments._cli"),
    "mnres.data.config": ("mnres.config",),
}


def warn(old: str) -> None:
    new = MOVED[old]
    where = " and ".join(new) if new else "mnres.metrics, mnres.reporting and experiments.search"
    warnings.warn(
        f"{old} is deprecated and goes in mnres 0.3: import {where} instead",
        DeprecationWarning,
        stacklevel=3,
    )


class _Joined(types.ModuleType):
    """An old module whose names now live in several modules."""

    def __init__(self, name: str, modules: list[types.ModuleType]):
        super().__init__(name)
        self._modules = modules
        self.__path__ = []  # a package too, so `mnres.evaluation.metrics` resolves through it

    def __getattr__(self, attr: str):
        for module in self._modules:
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name and loads the module(s) it moved to."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        warn(spec.name)
        modules = [importlib.import_module(name) for name in MOVED[spec.name]]
        if len(modules) == 1:
            self._own_spec = modules[0].__spec__
            return modules[0]
        self._own_spec = None
        return _Joined(spec.name, modules)

    def exec_module(self, module):
        # A single new module was executed under its own name; importlib has just stamped the
        # alias's spec on it, so give it back its own (reload and pickling use it).
        if self._own_spec is not None:
            module.__spec__ = self._own_spec


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())


def module(name: str):
    """`mnres.<name>` for an old top-level name (used by `mnres.__getattr__`)."""
    return importlib.import_module(f"mnres.{name}")
