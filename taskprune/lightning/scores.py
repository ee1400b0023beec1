"""Attribution scores as a torchmetrics ``Metric``: per-unit running sums and a sample count, summed across processes."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class UnitScoreMetric(Metric):
    """Accumulates ``[n_units]`` float64 attribution sums and the number of real samples behind them.

    States are reduced with ``sum`` once, at :meth:`compute`, and are persistent, so they travel in Lightning
    checkpoints (resuming calibration continues the sums). Only detached tensors are accepted. :meth:`compute` is not
    cached (``compute_with_cache=False``): scores asked for twice include the updates in between.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, n_units: int, **kwargs) -> None:
        kwargs.setdefault("compute_with_cache", False)
        super().__init__(**kwargs)
        if n_units < 1:
            raise ValueError(f"n_units must be >= 1, got {n_units}")
        self.n_units = n_units
        self.add_state("sums", torch.zeros(n_units, dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("batches", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)

    def update(self, sums: Tensor, count: float | Tensor) -> None:
        if sums.requires_grad:
            raise ValueError("UnitScoreMetric.update takes detached tensors; call .detach() first")
        if sums.shape != (self.n_units,):
            raise ValueError(f"expected sums of shape [{self.n_units}], got {tuple(sums.shape)}")
        self.sums += sums.to(self.sums.device, torch.float64)
        self.count += torch.as_tensor(count, dtype=torch.float64, device=self.count.device)
        self.batches += 1

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(sums [n_units], count)`` over all processes."""
        return self.sums.clone(), self.count.clone()

    # float64 states must stay float64 when Lightning moves the module to another dtype (e.g. bf16 precision)
    def _apply(self, fn, *args, **kwargs):
        this = super()._apply(fn, *args, **kwargs)
        for name in ("sums", "count", "batches"):
            value = getattr(this, name)
            if isinstance(value, Tensor) and value.dtype != torch.float64:
                setattr(this, name, value.to(torch.float64))
        return this
