"""The module paths of mnres 0.1, before the sub-packages: `import mnres.train` still works.

Each old name is the new module itself (same object), so `mnres.params.count_params`,
`from mnres import calibration` and patches of old paths all reach the code that runs.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "mnres.layers": "mnres.models.layers",
    "mnres.blocks": "mnres.models.blocks",
    "mnres.params": "mnres.models.params",
    "mnres.keras_weights": "mnres.models.keras_weights",
    "mnres.steps": "mnres.training.steps",
    "mnres.optim": "mnres.training.optim",
    "mnres.checkpoint": "mnres.training.checkpoint",
    "mnres.train": "mnres.training.loop",
    "mnres.metrics": "mnres.evaluation.metrics",
    "mnres.calibration": "mnres.evaluation.calibration",
    "mnres.report": "mnres.evaluation.report",
    "mnres.crossval": "mnres.evaluation.crossval",
    "mnres.gradcam": "mnres.evaluation.gradcam",
    "mnres.export": "mnres.deploy.export",
    "mnres.predict": "mnres.deploy.predict",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name and loads it as the module it moved to."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module):
        # Already executed under its new name; importlib has just stamped the alias's spec on
        # it, so give it back its own (reload and pickling use it).
        module.__spec__ = self._own_spec


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())


def module(name: str):
    """`mnres.<name>` for an old top-level name (used by `mnres.__getattr__`)."""
    return importlib.import_module(MOVED[f"mnres.{name}"])
