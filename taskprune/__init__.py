"""taskprune: training-free, attribution-based structured pruning of multi-task language models for one task.

The core (``arch``, ``gates``, ``attribution``, ``calibration``, ``selection``, ``spec``, ``surgery``, ``flops``,
``models``, ``evaluation``) needs only torch and transformers; the Lightning layer (``scores``, ``module``,
``callback``, ``data``, ``cli``) builds on it.
"""

from __future__ import annotations

import importlib

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
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # lazy: `import taskprune` stays cheap and never imports Lightning
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'taskprune' has no attribute {name!r}")
