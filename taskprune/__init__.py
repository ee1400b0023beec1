"""taskprune: training-free, attribution-based structured pruning of multi-task language models for one task.

Layers (imports point down):

* the core, torch + transformers only: ``arch/``, ``gates``, ``unitscores``, ``calibration``, ``attribution``,
  ``selection`` + ``search`` (allocation), ``tuning``, ``pipeline`` (the composition), ``spec``, ``surgery``,
  ``flops``, ``export``, ``bank``, ``io``;
* ``models/``: model wrappers (loading a task's model, the multi-task model, the prompted decoder, GGUF);
* ``tasks/``: tasks as data;
* ``lightning/``: the Lightning layer (metric, module, callback + protocol, data + loader, CLI, report);
* ``zoo/``: building the project's models (training), found by ``models`` through an entry point, imported by
  nothing in the library.

Modules of 0.1 that moved (``taskprune.callback``, ``taskprune.data``, ``taskprune.multitask`` ...) still import,
with a warning that names their new place.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

_EXPORTS = {
    "Gates": "taskprune.gates",
    "get_architecture": "taskprune.arch",
    "UnitScores": "taskprune.unitscores",
    "AttributionConfig": "taskprune.attribution",
    "score_units": "taskprune.attribution",
    "Budget": "taskprune.selection",
    "select_units": "taskprune.selection",
    "PruneSpec": "taskprune.spec",
    "apply_mask": "taskprune.surgery",
    "shrink_": "taskprune.surgery",
    "count_macs": "taskprune.flops",
    "count_params": "taskprune.flops",
    "Pipeline": "taskprune.pipeline",
    "prune": "taskprune.pipeline",
    "TaskPruning": "taskprune.lightning.callback",
    "AttributionModule": "taskprune.lightning.module",
    "TaskDataModule": "taskprune.lightning.data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # lazy: `import taskprune` stays cheap and never imports Lightning
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'taskprune' has no attribute {name!r}")


#: modules of taskprune 0.1 -> where they live now
MOVED = {**{f"taskprune.{m}": f"taskprune.lightning.{m}" for m in
            ("callback", "cli", "data", "evaluation", "loader", "module", "protocol", "report", "scores")},
         **{f"taskprune.{m}": f"taskprune.models.{m}" for m in ("multitask", "fewshot", "gguf")}}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import taskprune.callback`` gives ``taskprune.lightning.callback`` (the same module object) and a warning."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; import it from there", DeprecationWarning,
                      stacklevel=2)
        module = importlib.import_module(MOVED[spec.name])
        self._spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self._spec  # the import machinery set the alias's spec on the module


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
