"""What ``test`` / ``validate`` measure, as declared types, and a stopwatch that synchronises the device.

An :class:`Evaluation` holds one :class:`MetricRow` per (evaluation set, metric) with the dense and pruned values, and
the throughput of each model variant. GPU kernels run asynchronously: :class:`Stopwatch` waits for the device before
it reads the clock, so the time is that of the work, not of its launch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch


@dataclass(frozen=True)
class MetricRow:
    """One metric of one evaluation set: the in-domain dev set of the task or an out-of-domain set."""

    set: str
    kind: Literal["in-domain", "ood"]
    metric: str
    pruned: float | None  # None when no spec was applied (the model evaluated is the dense one: ``dense``)
    dense: float | None = None  # None when no dense copy was kept (compare_dense=False)
    note: str = ""  # why a value is missing (e.g. MCC of a set of one class)


@dataclass(frozen=True)
class Evaluation:
    """Rows of metrics and samples per second per model variant (``"pruned"``, and ``"dense"`` when compared)."""

    rows: tuple[MetricRow, ...] = ()
    throughput: dict[str, float | None] = field(default_factory=dict)

    def as_rows(self) -> list[dict]:
        """Rows as dicts ``{"set", "kind", "metric", "dense", "pruned"}`` (what :mod:`taskprune.lightning.report` prints)."""
        return [asdict(r) for r in self.rows]


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the work queued on ``device`` (CUDA, MPS); nothing to wait for on the CPU."""
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


class Stopwatch:
    """Seconds and samples per variant; :meth:`time` synchronises the device before and after the timed work."""

    def __init__(self, variants: list[str]) -> None:
        self.seconds = {v: 0.0 for v in variants}
        self.samples = {v: 0 for v in variants}

    @contextlib.contextmanager
    def time(self, variant: str, n_samples: int, device: torch.device | str | None):
        synchronize(device)
        start = time.perf_counter()
        yield
        synchronize(device)
        self.seconds[variant] += time.perf_counter() - start
        self.samples[variant] += int(n_samples)

    def throughput(self) -> dict[str, float | None]:
        """Samples per second per variant (``None`` when nothing was timed)."""
        return {v: (self.samples[v] / s if s > 0 else None) for v, s in self.seconds.items()}


__all__ = ["Evaluation", "MetricRow", "Stopwatch", "synchronize"]
