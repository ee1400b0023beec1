"""The one calibration loop: score batches with an :class:`~taskprune.attribution.Attributor`, give the duplicates
that ``DistributedSampler`` pads the last round with weight 0, and sum.

Used by :func:`~taskprune.attribution.score_units` (plain PyTorch), by ``AttributionModule.training_step`` (one
:func:`calibration_step` per step, Lightning's fit loop drives it) and by the ``TaskPruning`` callback (modules
without ``unit_scores()``). Needs torch only; the attributor is any object with ``data_free``, ``target_name``,
``gates.n_units`` and ``batch_sums(batch) -> ([n_units], weight)``.

Every batch is checked here, once, before its forward (:func:`check_batch`: one label per input row, no negative
class label, token ids inside the input embedding); the label range that needs the head's width is checked where the
logits are read (:func:`check_label_range`, from the built-in targets). Either raises :class:`BatchError`, which
:func:`calibration_step` prefixes with the batch index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

LABELLED_TARGETS = ("label", "neg_loss")  # targets that read batch["labels"]
NON_INPUT_KEYS = ("labels", "idx", "sample_weight", "task")  # batch keys that are not model inputs
ID_KEYS = ("input_ids", "decoder_input_ids")  # token ids looked up in the input embedding
IGNORE_INDEX = -100


class BatchError(ValueError):
    """A calibration batch that cannot be scored; :func:`calibration_step` names the batch index."""


def _bad_row(values: Tensor, mask: Tensor) -> tuple[int, int | float]:
    """``(row, value)`` of the first masked entry of ``values``."""
    pos = mask.nonzero()[0]
    return int(pos[0]), values[tuple(pos)].item()


def check_batch(batch: dict, labelled: bool, n_vocab: int | None = None) -> None:
    """Refuse, before any forward, a batch whose labels or token ids cannot be scored (:class:`BatchError`).

    ``labels`` must have one row per input row; with ``labelled`` (a built-in target that reads the labels) integer
    class labels ``[batch]`` must be >= 0 (no -100 ignore index: each row is scored against its label) and token
    labels ``[batch, seq]`` >= 0 or -100; ``input_ids`` / ``decoder_input_ids`` must lie in ``[0, n_vocab)``.
    Costs a min / max per tensor, no forward.
    """
    inputs = [(k, v) for k, v in batch.items() if k not in NON_INPUT_KEYS and isinstance(v, Tensor) and v.dim() >= 1]
    labels = batch.get("labels")
    if isinstance(labels, Tensor) and inputs:
        key, x = next(((k, v) for k, v in inputs if k in ID_KEYS), inputs[0])
        n = x.shape[0]
        if labels.dim() == 0 or labels.shape[0] != n:
            k = "no rows (a scalar)" if labels.dim() == 0 else f"{labels.shape[0]} row(s)"
            raise BatchError(f"labels has {k} but the inputs have {n} ({key}: {list(x.shape)}); give one label per "
                             f"input row (labels of shape [{n}], or [{n}, seq] for token labels), or drop the rows "
                             "without a label")
        if labelled and not labels.is_floating_point() and labels.numel():
            if labels.dim() == 1 and int(labels.min()) < 0:
                row, v = _bad_row(labels, labels < 0)
                what = (f"label {v} is the ignore index, which a class label cannot be: every row is scored against "
                        "its own label" if v == IGNORE_INDEX else f"label {v} is negative")
                raise BatchError(f"row {row}: {what}; allowed: class indices 0..n_outputs-1 of the head. Drop the "
                                 "row, map its label to a class (the task's label_map), or use target='pseudo' for "
                                 "unlabelled rows")
            if labels.dim() == 2 and int(labels.min()) < 0:
                bad = (labels < 0) & (labels != IGNORE_INDEX)
                if bad.any():
                    row, v = _bad_row(labels, bad)
                    raise BatchError(f"row {row}: token label {v} is negative; allowed: token ids 0..vocab-1, or "
                                     f"{IGNORE_INDEX} for positions to ignore. Fix the labels (e.g. pad with "
                                     f"{IGNORE_INDEX}, not another negative value)")
    if n_vocab is None:
        return
    for key in ID_KEYS:
        ids = batch.get(key)
        if not isinstance(ids, Tensor) or ids.is_floating_point() or not ids.numel():
            continue
        if int(ids.min()) < 0 or int(ids.max()) >= n_vocab:
            row, v = _bad_row(ids, (ids < 0) | (ids >= n_vocab))
            raise BatchError(f"row {row}: {key} holds token id {v}, outside the model's input embedding (ids "
                             f"0..{n_vocab - 1}); the ids come from another tokenizer than the model's: tokenize with "
                             "the model's own tokenizer")


def check_label_range(labels: Tensor, n_outputs: int) -> None:
    """Refuse integer labels outside the ``n_outputs`` logits they index (:class:`BatchError`): class labels
    ``[batch]`` in ``[0, n_outputs)``, token labels ``[batch, seq]`` there or -100. Called by the built-in targets,
    where the logits are read (no extra forward)."""
    if labels.is_floating_point() or not labels.numel():
        return
    bad = (labels >= n_outputs) | (labels < 0)
    if labels.dim() == 2:
        bad &= labels != IGNORE_INDEX
    if not bool(bad.any()):
        return
    row, v = _bad_row(labels, bad)
    if labels.dim() == 2:
        raise BatchError(f"row {row}: token label {v} is out of range of the model's {n_outputs} output tokens "
                         f"(allowed: 0..{n_outputs - 1}, or {IGNORE_INDEX} to ignore a position); tokenize the "
                         "targets with the model's own tokenizer")
    raise BatchError(f"row {row}: label {v} is out of range of the head's {n_outputs} outputs (allowed: class "
                     f"indices 0..{n_outputs - 1}); map the labels to 0..{n_outputs - 1} (the task's label_map), or "
                     "load a head with one output per class")


def _n_vocab(attributor) -> int | None:
    """Rows of the model's input embedding, or ``None`` when the attributor's model has none to read."""
    base = getattr(getattr(attributor, "gates", None), "base", None)
    get = getattr(base, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    n = getattr(emb, "num_embeddings", None)
    return n if isinstance(n, int) else None


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
    A batch that cannot be scored (:func:`check_batch`, :func:`check_label_range`) raises :class:`BatchError`
    naming ``batch_idx``, before its sums.
    """
    if attributor.data_free:
        return torch.zeros(attributor.gates.n_units, dtype=torch.float64), 0.0
    if attributor.target_name in LABELLED_TARGETS and "labels" not in batch:
        raise ValueError(f"target={attributor.target_name!r} needs labelled batches: the target needs "
                         "batch['labels']; use target='pseudo' for unlabelled calibration data")
    try:
        check_batch(batch, attributor.target_name in LABELLED_TARGETS, _n_vocab(attributor))
        weights = padding_weights(_n_samples(batch), batch_idx, loader) if loader is not None else None
        if weights is not None:
            given = batch.get("sample_weight")
            batch = {**batch, "sample_weight": weights if given is None else weights * given.detach().double().cpu()}
        return attributor.batch_sums(batch)
    except BatchError as e:
        raise BatchError(f"batch {batch_idx}: {e}") from None


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


__all__ = ["BatchError", "calibrate", "calibration_step", "check_batch", "check_label_range", "loader_batches",
           "padding_weights", "real_samples"]
