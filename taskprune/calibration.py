"""The one calibration loop: score batches with an :class:`~taskprune.attribution.Attributor`, give the duplicates
that ``DistributedSampler`` pads the last round with weight 0, and sum.

Used by :func:`~taskprune.attribution.score_units` (plain PyTorch), by ``AttributionModule.training_step`` (one
:func:`calibration_step` per step, Lightning's fit loop drives it) and by the ``TaskPruning`` callback (modules
without ``unit_scores()``). Needs torch only; the attributor is any object with ``data_free``, ``target_name``,
``gates.n_units`` and ``batch_sums(batch) -> ([n_units], weight)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

LABELLED_TARGETS = ("label", "neg_loss")  # targets that read batch["labels"]


def _n_samples(batch: dict) -> int:
    return next(v for v in batch.values() if isinstance(v, Tensor)).shape[0]


def padding_weights(n: int, batch_idx: int, loader) -> Tensor | None:
    """``[n]`` float64: 1 for real samples, 0 for ``DistributedSampler`` padding; ``None`` when nothing is padded.

    The sampler gives rank ``r`` the global positions ``r, r + W, r + 2W, ...`` of its (possibly shuffled, padded)
    index list; positions ``>= len(dataset)`` are padding. A batch's local positions follow from ``batch_idx`` and the
    loader's batch size (Lightning keeps ``batch_idx`` across a resume).
    """
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last or sampler.num_replicas == 1:
        return None
    local = batch_idx * loader.batch_size + torch.arange(n)
    return (sampler.rank + local * sampler.num_replicas < len(loader.dataset)).double()


def real_samples(batch: dict, batch_idx: int, loader) -> Tensor:
    """``[n]`` bool: which samples of the batch are real (not ``DistributedSampler`` padding)."""
    n = _n_samples(batch)
    weights = padding_weights(n, batch_idx, loader)
    return torch.ones(n, dtype=torch.bool) if weights is None else weights.bool()


def calibration_step(attributor, batch: dict, batch_idx: int = 0, loader=None) -> tuple[Tensor, float]:
    """Attribution of one batch: ``([n_units] float64 sums over real samples, their weight)``.

    Data-free methods read no data: ``(zeros, 0.0)``. ``loader`` (the batch's ``DataLoader``) lets padding be dropped.
    """
    if attributor.data_free:
        return torch.zeros(attributor.gates.n_units, dtype=torch.float64), 0.0
    if attributor.target_name in LABELLED_TARGETS and "labels" not in batch:
        raise ValueError(f"target={attributor.target_name!r} needs labelled batches: the target needs "
                         "batch['labels']; use target='pseudo' for unlabelled calibration data")
    weights = padding_weights(_n_samples(batch), batch_idx, loader) if loader is not None else None
    if weights is not None:
        given = batch.get("sample_weight")
        batch = {**batch, "sample_weight": weights if given is None else weights * given.detach().double().cpu()}
    return attributor.batch_sums(batch)


def calibrate(attributor, batches: Iterable[dict], loader=None) -> tuple[Tensor, float, int]:
    """Sum :func:`calibration_step` over ``batches``: ``([n_units] sums, weight of real samples, batches seen)``.

    Sums of this process only; add those of other processes (they are plain sums). Data-free methods read nothing.
    """
    total = torch.zeros(attributor.gates.n_units, dtype=torch.float64)
    if attributor.data_free:
        return total, 0.0, 0
    count, n_batches = 0.0, 0
    for i, batch in enumerate(batches):
        sums, weight = calibration_step(attributor, batch, i, loader)
        total += sums
        count += weight
        n_batches += 1
    return total, count, n_batches


def loader_batches(loader, limit: int | None = None, convert: Callable[[dict], dict] | None = None,
                   device: torch.device | str | None = None) -> Iterator[dict]:
    """The first ``limit`` batches of ``loader`` (all when ``None``), converted by ``convert``, moved to ``device``."""
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        batch = convert(batch) if convert else batch
        yield {k: v.to(device) if device is not None and isinstance(v, Tensor) else v for k, v in batch.items()}


__all__ = ["calibrate", "calibration_step", "loader_batches", "padding_weights", "real_samples"]
