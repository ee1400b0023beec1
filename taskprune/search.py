"""Mask search under a MAC budget (Kwon et al. 2022): how many heads, how many neurons, and which, model-wide.

Heads and neurons are each ranked model-wide by score. For every possible number of kept heads ``h`` (the ``h``
best), the neurons that still fit in the MAC budget are the best ones in order until the next would exceed it; the
``h`` with the largest total score of kept units wins. Every attention block keeps its best head (a block with no
head cannot be shrunk; their latency search keeps one per layer too), so the search runs over the other heads with
those heads' MACs set aside. The allocation across layers falls out of the ranking (a layer
may keep more heads and fewer neurons than its neighbour, or none), and the kept MACs never exceed the budget: they
fall short of it by less than one more unit's cost.

Any :class:`~taskprune.unitscores.UnitScores` can be searched (Fisher in their paper; summing scores assumes the
two kinds' scores are on one scale, true of a loss-based score such as Fisher or integrated gradients).
"""

from __future__ import annotations

import torch

from taskprune.flops import count_macs, unit_costs
from taskprune.spec import PruneSpec
from taskprune.unitscores import UnitScores


def search_macs(scores: UnitScores, macs: float, seq_len: int = 128, min_heads: int = 1) -> PruneSpec:
    """Keep the units of largest total score whose MACs (per ``seq_len``-token sequence) are at most
    ``(1 - macs)`` of the dense model's attention + FFN MACs.

    Args:
        scores: per-unit scores of both kinds (``scores.mean()`` is ranked: higher = more important).
        macs: fraction of the MACs to remove, in [0, 1).
        seq_len: sequence length the MACs are counted at (attention scales with it).
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
    if isinstance(min_heads, bool) or not isinstance(min_heads, int) or min_heads < 1:
        raise ValueError(f"min_heads={min_heads!r} must be an int >= 1 (a block cannot lose every head)")
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
    best, best_h, best_n = -float("inf"), 0, 0
    for h in range(0, len(h_cost) + 1):
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
