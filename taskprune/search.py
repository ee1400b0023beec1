"""Mask search under a MAC budget (Kwon et al. 2022): how many heads, how many neurons, and which, model-wide.

Heads and neurons are each ranked model-wide by score. For every possible number of kept heads ``h`` (the ``h``
best), the neurons that still fit in the MAC budget are the best ones in order until the next would exceed it; the
``h`` with the largest total score of kept units wins. Every attention block keeps its best head (a block with no
head cannot be shrunk; their latency search keeps one per layer too), so the search runs over the other heads with
those heads' MACs set aside. The allocation across layers falls out of the ranking (a layer
may keep more heads and fewer neurons than its neighbour, or none), and the kept MACs never exceed the budget: they
fall short of it by less than one more unit's cost.

:func:`search_by_loss` chooses the heads / neurons split instead by the task loss on held-out rows (a few
model-wide head counts are tried): ``Budget(split="loss")``.

Any :class:`~taskprune.unitscores.UnitScores` can be searched (Fisher in their paper; summing scores assumes the
two kinds' scores are on one scale, true of a loss-based score such as Fisher or integrated gradients).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch

from taskprune.attribution import default_forward, make_target
from taskprune.flops import count_macs, unit_costs
from taskprune.gates import Gates
from taskprune.spec import PruneSpec
from taskprune.unitscores import UnitScores

log = logging.getLogger(__name__)


def search_macs(scores: UnitScores, macs: float, seq_len: int = 128, min_heads: int = 1,
                heads: int | None = None) -> PruneSpec:
    """Keep the units of largest total score whose MACs (per ``seq_len``-token sequence) are at most
    ``(1 - macs)`` of the dense model's attention + FFN MACs.

    Args:
        scores: per-unit scores of both kinds (``scores.mean()`` is ranked: higher = more important).
        macs: fraction of the MACs to remove, in [0, 1).
        seq_len: sequence length the MACs are counted at (attention scales with it).
        heads: keep exactly this many heads model-wide (the best-scored ones, ``min_heads`` per block included)
            and spend the rest of the budget on neurons, instead of choosing the split by total score; for
            choosing the heads / neurons split by another criterion (e.g. a held-out loss, see
            :func:`head_counts`).
    """
    if isinstance(macs, bool) or not isinstance(macs, (int, float)) or not 0.0 <= macs < 1.0:
        raise ValueError(f"macs={macs!r}: the fraction of MACs to remove must be in [0, 1), e.g. 0.4")
    kinds = scores.kinds
    if set(kinds) != {"heads", "neurons"}:
        raise ValueError(f"the mask search needs scores of heads and neurons, got {list(kinds)}; score with "
                         "units='all'")
    fp = scores.fingerprint
    costs = unit_costs(fp, seq_len)
    budget = (1.0 - macs) * count_macs(fp, seq_len)
    values = scores.mean()
    if isinstance(min_heads, bool) or not isinstance(min_heads, int) or min_heads < 0:
        raise ValueError(f"min_heads={min_heads!r} must be an int >= 0 (0: a block may lose every head, as in Kwon "
                         "et al.'s search)")
    floor = {name: sorted(torch.argsort(-v.double(), stable=True)[:min_heads].tolist())
             for name, v in values["heads"].items() if v.numel()}
    budget -= sum(costs["heads"][name][0] * len(idx) for name, idx in floor.items())
    if budget < 0:
        raise ValueError(f"macs={macs!r} leaves less than min_heads={min_heads} head(s) per attention block; remove a smaller fraction")
    rest = {name: v.double().clone() for name, v in values["heads"].items()}
    for name, idx in floor.items():
        rest[name][idx] = -float("inf")  # ranked last, never searched: kept anyway
    ranked = {"heads": _ranked(rest, costs["heads"]), "neurons": _ranked(values["neurons"], costs["neurons"])}
    n_free = sum(v.numel() for v in values["heads"].values()) - sum(len(i) for i in floor.values())
    ranked["heads"] = tuple(x[:n_free] for x in ranked["heads"])
    h_cost = torch.cumsum(ranked["heads"][1], 0)
    h_score = torch.cumsum(ranked["heads"][0], 0)
    n_cost = torch.cumsum(ranked["neurons"][1], 0)
    n_score = torch.cumsum(ranked["neurons"][0], 0)
    n_floor = sum(len(i) for i in floor.values())
    if heads is not None:
        if isinstance(heads, bool) or not isinstance(heads, int) or not n_floor <= heads <= n_floor + len(h_cost):
            raise ValueError(f"heads={heads!r}: must be an int from {n_floor} (min_heads per block) to "
                             f"{n_floor + len(h_cost)} (every head)")
        if heads > n_floor and float(h_cost[heads - n_floor - 1]) > budget:
            raise ValueError(f"heads={heads!r} alone cost more than macs={macs!r} leaves; keep fewer heads")
    best, best_h, best_n = -float("inf"), 0, 0
    for h in range(0, len(h_cost) + 1) if heads is None else (heads - n_floor,):
        spent = float(h_cost[h - 1]) if h else 0.0
        if spent > budget:
            break
        n = int(torch.searchsorted(n_cost, torch.tensor(budget - spent, dtype=n_cost.dtype), right=True))
        total = (float(h_score[h - 1]) if h else 0.0) + (float(n_score[n - 1]) if n else 0.0)
        if total > best:
            best, best_h, best_n = total, h, n
    keep: dict[str, dict[str, list[int]]] = {}
    for kind, count in (("heads", best_h), ("neurons", best_n)):
        owners = ranked[kind][2][:count]
        keep[kind] = {name: list(floor.get(name, [])) if kind == "heads" else [] for name in fp[kind]}
        for name, idx in owners:
            keep[kind][name].append(idx)
        keep[kind] = {name: sorted(v) for name, v in keep[kind].items()}
    return PruneSpec(keep=keep, fingerprint=fp, method=scores.method,
                     budget={"kind": "macs", "amount": macs, "seq_len": seq_len, "allocation": "search"})


def head_counts(scores: UnitScores, macs: float, seq_len: int = 128, min_heads: int = 1, n: int = 8) -> list[int]:
    """``n`` evenly spaced model-wide head counts that ``search_macs(..., heads=h)`` accepts at this cut (from
    ``min_heads`` per block to as many heads as the budget holds), plus the count the score-sum search picks."""
    searched = search_macs(scores, macs, seq_len, min_heads).n_kept("heads")
    low = min_heads * sum(1 for v in scores.mean()["heads"].values() if v.numel())
    high = low
    for h in range(low + 1, sum(int(v.numel()) for v in scores.mean()["heads"].values()) + 1):
        try:
            search_macs(scores, macs, seq_len, min_heads, heads=h)
        except ValueError:
            break
        high = h
    grid = {round(low + (high - low) * i / max(n - 1, 1)) for i in range(n)}
    return sorted(grid | {searched})


@torch.no_grad()
def search_by_loss(model: torch.nn.Module, scores: UnitScores, macs: float, batches: list[dict], seq_len: int = 128,
                   target="label", n: int = 8, forward: Callable = default_forward, min_heads: int = 1) -> PruneSpec:
    """The mask search at each of ``n`` model-wide head counts (:func:`head_counts`, the score-sum search's own count
    among them); returns the spec whose masked model has the highest summed ``target`` (``"label"``: the lowest task
    loss) on ``batches``, which should be held out from the calibration batches the scores came from. Ties go to the
    fewest heads. ``spec.budget["allocation"]`` is ``"loss"``.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("search_by_loss got no batches; pass held-out batches (rows not used for scoring)")
    fn = make_target(target, model)
    best = None
    with Gates(model) as gates:
        for h in head_counts(scores, macs, seq_len=seq_len, min_heads=min_heads, n=n):
            spec = search_macs(scores, macs, seq_len=seq_len, min_heads=min_heads, heads=h)
            gates.set(gates.values_of(spec))
            total = sum(float(fn(forward(model, b), b).double().sum()) for b in batches)
            log.debug("search_by_loss macs=%.2f: %d heads -> summed target %.5f", macs, h, total)
            if best is None or total > best[0]:
                best = (total, spec)
        gates.set(None)
    spec = best[1]
    return replace(spec, budget={**spec.budget, "allocation": "loss"})


def _ranked(blocks: dict[str, torch.Tensor], costs: dict[str, tuple[int, int]]):
    """``(scores, costs, owners)`` of every unit of one kind, best first (ties: model order)."""
    s, c, owners = [], [], []
    for name, v in blocks.items():
        s.append(v.double().flatten())
        c.append(torch.full((v.numel(),), float(costs[name][0]), dtype=torch.float64))
        owners.extend((name, i) for i in range(v.numel()))
    s, c = torch.cat(s), torch.cat(c)
    order = torch.argsort(-s, stable=True)
    return s[order], c[order], [owners[i] for i in order.tolist()]
