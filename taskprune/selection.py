"""Selection: per-unit scores + a budget -> :class:`~taskprune.spec.PruneSpec`.

Higher score = more important; the units with the **lowest** scores are removed first. Scores are used **signed**: a
unit with a negative score (for example a signed integrated-gradients mean, where removing the unit is expected to
*raise* the target) goes before every unit with a positive score, the most negative first. Pass absolute values if
that is not what you want.

Budgets (exactly one kind, except ``heads`` and ``neurons`` which may be given together), each a fraction in
``[0, 1)`` *to remove*:

``heads`` / ``neurons``
    fraction of the attention units (KV groups; heads for multi-head attention) / FFN neurons.
``sparsity``
    fraction of the units of every selected kind: ``sparsity=f`` is ``heads=f, neurons=f`` (so ``f`` of all units
    pooled are removed, but a head is never traded for neurons: their scores and costs are not comparable).
``macs``
    fraction of the prunable MACs (:func:`taskprune.flops.count_macs` at ``seq_len``: attention + FFN blocks).
``params``
    fraction of the prunable weight parameters (:func:`taskprune.flops.prunable_params`).

For ``macs`` / ``params`` both fractions are of the *whole* prunable model, even when ``units`` restricts pruning to
one kind.

Scopes:

``"auto"`` (default)
    ``"search"`` where the search is meaningful — a ``macs`` budget over both kinds with scores on one loss scale
    (Fisher-like: ``fisher``, or ``aggregate="square"``, the default) — and ``"per_kind"`` otherwise (count or
    parameter budgets, one kind, ``abs`` / ``signed`` attributions, weight norms, random). Chosen on the selection
    splits (benchmarks/results/archive/quality_selection.md); ``spec.budget["scope"]`` records what it resolved to.
``"global"``
    units of a kind are ranked across blocks, after per-block ``normalize`` (``"l1"``, ``"l2"``, ``"max"``: divide
    every block's scores by that norm of the block's scores, so that layers with large scores do not protect all
    their units). For ``macs`` / ``params``, heads and neurons are pooled and ranked by **score per unit of cost**
    (score / MACs or score / parameters of the unit): the greedy fractional-knapsack rule, which removes the units
    that give up the least score for what they cost, until the cut reaches the target.
``"per_kind"``
    for ``macs`` / ``params``: each kind (heads, neurons) gives up its share of the cut in proportion to its cost,
    i.e. the same fraction of attention MACs and of FFN MACs; within a kind, units are ranked across blocks as in
    ``"global"``. Scores of heads and of neurons are never compared with each other. Best of the selection rules on
    SST-2's selection split (benchmarks/results/archive/quality_demo_model.md); for count budgets it is the same as ``"global"``.
``"search"``
    Kwon et al. 2022's mask search (:func:`taskprune.search.search_macs`, ``macs`` budgets only): heads and
    neurons are ranked model-wide by raw score (no normalisation), and the split of the budget between the kinds
    is the one that keeps the largest total score; ``min_heads`` best heads per block are always kept.
``"layerwise"``
    every block loses the same fraction of its units (rounded up per block); for ``macs`` / ``params`` that fraction
    is the smallest that reaches the target. Within a block, units go lowest score first.

Rounding: the achieved cut is never below the request. In global scope it exceeds it by less than one unit (for
counts) or than the cost of the last removed unit (``macs`` / ``params``); in layerwise scope by less than one unit per
block.

How the search splits a MAC budget between heads and neurons (``Budget.split``): by the largest total score
(``"score"``, Kwon et al.), or by the lowest task loss on rows held out from calibration (``"loss"``:
:func:`taskprune.search.search_by_loss`, needs ``model`` and ``held_out``); ``"auto"`` (default) is ``"loss"`` when
held-out rows are given and ``"score"`` otherwise. ``spec.budget["allocation"]`` records which one ran.

Options that do not apply to the scope a budget resolves to are refused, never ignored: ``normalize`` applies to
``global`` / ``per_kind`` (default there: ``l1``), ``min_neurons`` to every scope but ``search``, ``split`` to
``search`` only.

Floors: every attention block keeps at least ``min_heads`` units and every FFN block ``min_neurons`` units. The
selection skips units that would break a floor; a budget that cannot be reached with the floors is a ``ValueError``.

Ties are broken by (kind, block order, unit index): heads before neurons, earlier blocks and lower indices first.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from taskprune.arch import UNIT_KINDS
from taskprune.attribution import AGGREGATED
from taskprune.flops import fingerprint_of, unit_costs
from taskprune.gates import check_units
from taskprune.search import search_by_loss, search_macs
from taskprune.spec import PruneSpec
from taskprune.unitscores import UnitScores

log = logging.getLogger(__name__)

__all__ = ["Budget", "select_units", "check_budget", "BUDGETS", "SCOPES", "NORMALIZATIONS"]

# every option is a Literal written once here; the tuples of allowed values derive from it
BudgetKind = Literal["sparsity", "heads", "neurons", "macs", "params"]
Scope = Literal["auto", "global", "layerwise", "per_kind", "search"]
Normalize = Literal["none", "l1", "l2", "max"]
Split = Literal["auto", "score", "loss"]
BUDGETS: tuple[str, ...] = get_args(BudgetKind)
SCOPES: tuple[str, ...] = get_args(Scope)
NORMALIZATIONS: tuple[str, ...] = get_args(Normalize)
SPLITS: tuple[str, ...] = get_args(Split)
RANKED_SCOPES = ("global", "per_kind")  # the scopes that rank units across blocks (where normalize applies)
_OPTIONS = ("scope", "normalize", "min_heads", "min_neurons", "seq_len", "split")  # Budget fields besides kind and amount

_EPS = 1e-9  # absorbs float error in fraction * count (0.3 * 10 == 3.0000000000000004)


@dataclass(frozen=True)
class Budget:
    """What to remove and how the units are chosen: one object for :func:`select_units`, the callback and YAML."""

    amount: float = 0.4
    """Fraction to remove, in [0, 1), of what kind names (0.4 removes 40 %)."""
    kind: BudgetKind = "macs"
    """What the amount is a fraction of: macs (prunable MACs at seq_len), params (prunable weights), sparsity (of the
    heads and of the neurons), heads or neurons."""
    scope: Scope = "auto"
    """auto (search for a MAC budget over both kinds with Fisher-scale scores, e.g. the default squared IG; per_kind
    otherwise), per_kind (the same share of attention and of FFN cost, units ranked across layers within a kind), global
    (heads and neurons pooled by score per cost), search (Kwon et al.'s mask search: the split of a MAC budget
    between heads and neurons that keeps the largest total score) or layerwise (the same fraction in every block)."""
    normalize: Normalize | None = None
    """Per-block score normalisation before a ranking across blocks (scopes global and per_kind only; refused with
    search and layerwise): l1 (the default there, measured best), none, l2, max."""
    min_heads: int = 1
    """Attention units every block keeps (1 by default; 0 lets a block lose every head, as Kwon et al.'s search does:
    the shrunk attention module then adds only its output bias, the residual and its norm stay)."""
    min_neurons: int | None = None
    """FFN neurons every block keeps (1 by default; refused with scope search, whose allocation has no FFN floor)."""
    seq_len: int | Literal["mean"] = 128
    """Sequence length at which MACs are counted, or mean: the calibration batches' mean number of real tokens
    (Kwon et al. count at the task's mean length; resolved by :class:`taskprune.pipeline.Pipeline`). The CLI links it to data.max_length, and the callback takes the
    datamodule's max_length when there is one (and says so)."""
    split: Split = "auto"
    """How the mask search splits a MAC budget between heads and neurons (scope search, or auto resolving to it): score
    (the largest total score, Kwon et al.), loss (the lowest task loss on held-out rows: needs them, e.g.
    TaskDataModule(holdout_samples=256)) or auto (loss when held-out rows are given, else score). Measured:
    docs/defaults.md."""

    def __post_init__(self) -> None:
        if self.kind not in BUDGETS:
            raise ValueError(f"unknown budget kind {self.kind!r}; allowed: {list(BUDGETS)}")
        _check_fraction(self.kind, self.amount)
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r} is not allowed; use one of {list(SCOPES)}")
        if self.normalize is not None and self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={self.normalize!r} is not allowed; use one of {list(NORMALIZATIONS)}")
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r} is not allowed; use one of {list(SPLITS)}")
        _refuse_inapplicable(self, self.scope)
        if self.scope == "search" and self.kind != "macs":
            raise ValueError(f"scope='search' searches under a MAC budget; got kind={self.kind!r}. Use kind='macs' "
                             "or another scope")
        _check_floor("min_heads", self.min_heads, 0)
        if self.min_neurons is not None:
            _check_floor("min_neurons", self.min_neurons, 0)
        if self.seq_len != "mean" and (isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int)
                                       or self.seq_len < 1):
            raise ValueError(f"seq_len must be a positive int or 'mean', got {self.seq_len!r}")

    @property
    def request(self) -> dict[str, float]:
        """``{kind: amount}``, as recorded in ``spec.budget["request"]``."""
        return {self.kind: float(self.amount)}

    def to_dict(self) -> dict:
        return asdict(self)


def select_units(
    scores: UnitScores | dict,
    budget: Budget | None = None,
    *,
    units: str | Sequence[str] = "all",
    fingerprint: dict | None = None,
    method: str = "",
    model: nn.Module | None = None,
    held_out: Sequence[dict] | None = None,
    target="label",
    forward: Callable | None = None,
    **shorthand,
) -> PruneSpec:
    """Choose the units to remove under a budget; return the :class:`PruneSpec` of the units kept.

    This is the one allocation of taskprune: scopes, Kwon et al.'s mask search and its heads / neurons split by
    held-out loss all go through it.

    Args:
        scores: a :class:`UnitScores` (its per-unit :meth:`~UnitScores.mean`, fingerprint and method are used), or
            per-unit values ``{"heads"|"neurons": {block_name: [n_units]}}`` together with ``fingerprint``.
        budget: a :class:`Budget` (amount, kind, scope, normalize, floors, seq_len).
        units: kinds that may be pruned: ``"all"``, ``"heads"``, ``"neurons"`` (kinds without scores are left whole).
        fingerprint: the model's fingerprint, only when ``scores`` is a plain dict.
        method: the scoring method's name, only when ``scores`` is a plain dict.
        model, held_out, target, forward: for ``split`` by loss only: the dense model, batches of rows held out from
            calibration, the target whose sum on them is maximised (``"pseudo"``: the dense model's predictions) and
            how the model is called.
        **shorthand: instead of ``budget``, the amount as ``<kind>=fraction`` (``macs=0.4``; ``heads`` and
            ``neurons`` may be given together) plus any other :class:`Budget` field (``scope="global"``...).

    Returns:
        a spec that lists every block of the model; ``spec.budget`` records the request (``"request"`` and the
        options) and what was achieved (``"achieved"``: fractions of heads and neurons removed, of prunable MACs and
        parameters cut; ``"removed"``: unit counts).
    """
    scores = _as_unit_scores(scores, fingerprint, method)
    scores.check_finite()
    budget, request = _budget(budget, shorthand)
    search = None
    if held_out is not None and len(held_out) == 0:
        held_out = None
    if budget.split == "loss" and held_out is None:
        raise ValueError("split='loss' needs held-out batches (rows not used for scoring), got none; give "
                         "TaskDataModule(holdout_samples=256) or your datamodule a holdout_dataloader() (from Python: "
                         "held_out=[...]), or use split='score'")
    if budget.split != "score" and held_out is not None:
        if model is None:
            raise ValueError("a split by held-out loss needs the dense model: pass model=... with held_out")
        search = _loss_search(model, list(held_out), target, forward)
    spec = _select(scores, budget, request, units, search)
    removed, achieved = spec.budget["removed"], spec.budget["achieved"]
    log.info("selected %s: removed %d heads, %d neurons (%.1f%% of prunable MACs at seq_len=%d, scope %s, "
             "allocation %s)", request, removed["heads"], removed["neurons"], 100 * achieved["macs"], budget.seq_len,
             spec.budget["scope"], spec.budget["allocation"])
    return spec


def _loss_search(model, held_out: list[dict], target, forward) -> Callable:
    """``search(scores, macs, seq_len, min_heads) -> spec``: the mask search split by held-out loss."""
    from taskprune.attribution import default_forward, pseudo_labels

    forward = forward or default_forward
    if target == "pseudo":  # the dense model's own predictions are the labels of the held-out rows
        held_out, target = [pseudo_labels(model, b, forward) for b in held_out], "label"

    def search(scores, macs, seq_len, min_heads):
        return search_by_loss(model, scores, macs, held_out, seq_len=seq_len, target=target, forward=forward,
                              min_heads=min_heads)

    return search


def check_budget(fingerprint: dict, budget: Budget, units: str | Sequence[str] = "all", method: str = "probe",
                 options: dict | None = None) -> None:
    """Raise the error :func:`select_units` would when ``budget`` cannot be reached on a model of this fingerprint
    whatever the scores (floors, kinds, options that do not apply); ``method`` / ``options`` are those the scores will
    have (they decide what scope ``"auto"`` resolves to). For failing before any work. Logs nothing."""
    from taskprune.unitscores import empty_scores

    _select(empty_scores(fingerprint, check_units(units), method, options), budget, budget.request, units)


def _refuse_inapplicable(budget: Budget, scope: str) -> None:
    """Refuse the options that have no effect in ``scope`` (``"auto"``: none refused yet; checked once resolved)."""
    if scope == "auto":
        return
    hint = f"leave it out, or choose a scope where it applies (scope={scope!r}"
    if budget.normalize is not None and scope not in RANKED_SCOPES:
        raise ValueError(f"normalize={budget.normalize!r} has no effect with scope={scope!r}: only {list(RANKED_SCOPES)} "
                         f"rank units across blocks; {hint})")
    if budget.min_neurons is not None and scope == "search":
        raise ValueError(f"min_neurons={budget.min_neurons!r} has no effect with scope='search' (the mask search keeps "
                         f"min_heads per block only); {hint})")
    if budget.split != "auto" and scope != "search":
        raise ValueError(f"split={budget.split!r} chooses the heads / neurons split of the mask search, but the budget "
                         f"resolves to scope={scope!r}; use a MAC budget with scope 'search' (or 'auto' with squared "
                         "scores), or leave split out")


def _select(scores: UnitScores, budget: Budget, request: dict[str, float], units,
            search: Callable | None = None) -> PruneSpec:
    fp = fingerprint_of(scores.fingerprint)
    values = scores.mean()
    seq_len = budget.seq_len
    if seq_len == "mean":
        raise ValueError("seq_len='mean' is the calibration batches' mean length, which select_units does not see; "
                         "run it through taskprune.pipeline.Pipeline (prune / resolve), or give a number")
    kinds = _prunable_kinds(units, values, fp)
    scope = resolve_scope(budget, request, kinds, scores)
    _refuse_inapplicable(budget, scope)
    normalize = (budget.normalize or "l1") if scope in RANKED_SCOPES else "none"
    min_heads = budget.min_heads
    min_neurons = 0 if scope == "search" else (1 if budget.min_neurons is None else budget.min_neurons)
    allocation = "score"
    for kind in ("heads", "neurons"):
        if kind in request and kind not in kinds:
            raise ValueError(
                f"a {kind}={request[kind]} budget was given but {kind} are not pruned (units={units!r}, scored kinds "
                f"{list(scores.kinds)}); add {kind!r} to units or score {kind}"
            )

    floors = {"heads": min_heads, "neurons": min_neurons}
    table = _UnitTable(fp, values, kinds, floors, seq_len, normalize if scope != "layerwise" else "none")
    options = f"min_heads={min_heads}, min_neurons={min_neurons}, scope={scope!r}"

    drop: dict[str, dict[str, list[int]]] = {k: {n: [] for n in fp[k]} for k in UNIT_KINDS}
    if scope == "search":
        if set(kinds) != set(UNIT_KINDS):
            raise ValueError(f"scope='search' chooses between heads and neurons; it needs both scored and pruned "
                             f"(units={units!r}, scored kinds {list(scores.kinds)})")
        if search is not None:
            found, allocation = search(scores, request["macs"], seq_len, min_heads), "loss"
        else:
            found = search_macs(scores, request["macs"], seq_len, min_heads=min_heads)
        drop = {k: {n: found.drop(k, n) for n in fp[k]} for k in UNIT_KINDS}
    elif "macs" in request or "params" in request:
        name = "macs" if "macs" in request else "params"
        table.select_cost(name, request[name], scope, drop, options)
    else:
        per_kind = {k: request["sparsity"] for k in kinds} if "sparsity" in request else request
        for kind, fraction in per_kind.items():
            name = "sparsity" if "sparsity" in request else kind
            table.select_count(kind, name, fraction, "global" if scope == "per_kind" else scope, drop, options)

    keep = {k: {n: sorted(set(range(fp[k][n])) - set(drop[k][n])) for n in fp[k]} for k in UNIT_KINDS}
    achieved, removed = table.achieved(drop)
    record = {
        "request": request,
        "scope": scope,
        "normalize": normalize,
        "seq_len": seq_len,
        "min_heads": min_heads,
        "min_neurons": min_neurons,
        "split": budget.split,
        "allocation": allocation if scope == "search" else None,
        "units": list(kinds),
        "achieved": achieved,
        "removed": removed,
    }
    return PruneSpec(keep=keep, fingerprint=fp, method=scores.method, budget=record,
                     meta={"n_samples": scores.count})


def on_loss_scale(scores: UnitScores) -> bool:
    """Whether heads' and neurons' scores share one scale (squared gradients or attributions: Fisher-like), so that
    the mask search may trade one kind for the other by their sums."""
    if scores.method in ("fisher", "fisher_batch"):  # fisher_batch: Kwon et al.'s, from tuning.fisher_scores
        return True
    return scores.method in AGGREGATED and scores.options.get("aggregate") == "square"


def resolve_scope(budget: Budget, request: dict[str, float], kinds, scores: UnitScores) -> str:
    """The scope a budget's ``"auto"`` stands for with these scores (any other scope as given)."""
    if budget.scope != "auto":
        return budget.scope
    if "macs" in request and set(kinds) == set(UNIT_KINDS) and on_loss_scale(scores):
        return "search"
    return "per_kind"


def _budget(budget: Budget | None, shorthand: dict) -> tuple[Budget, dict[str, float]]:
    """The validated budget and its request ``{kind: fraction}`` (two kinds only for ``heads`` + ``neurons``)."""
    unknown = sorted(set(shorthand) - set(BUDGETS) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"select_units got unknown keyword(s) {unknown}; budget keywords are {list(BUDGETS)} and "
                        f"{list(_OPTIONS)}, or pass budget=Budget(...)")
    if budget is not None:
        if not isinstance(budget, Budget):
            raise TypeError(f"budget must be a taskprune.selection.Budget, got {type(budget).__name__}; "
                            "or give the shorthand keywords (macs=0.4, ...)")
        if shorthand:
            raise ValueError(f"pass either budget=Budget(...) or shorthand keywords, not both (got "
                             f"{sorted(shorthand)})")
        return budget, budget.request
    request = {k: shorthand[k] for k in BUDGETS if shorthand.get(k) is not None}
    if not request:
        raise ValueError(f"no budget given; pass exactly one of {list(BUDGETS)} (or heads and neurons together)")
    if len(request) > 1 and set(request) != {"heads", "neurons"}:
        raise ValueError(
            f"conflicting budgets {sorted(request)}; pass exactly one of {list(BUDGETS)} (only heads and neurons "
            "may be combined)"
        )
    options = {k: shorthand[k] for k in _OPTIONS if k in shorthand}
    budgets = [Budget(amount=v, kind=k, **options) for k, v in request.items()]  # each validated
    return budgets[0], {b.kind: float(b.amount) for b in budgets}


# ---------------------------------------------------------------------------------------------- validation
def _as_unit_scores(scores, fingerprint: dict | None, method: str) -> UnitScores:
    if isinstance(scores, UnitScores):
        if fingerprint is not None and fingerprint != scores.fingerprint:
            raise ValueError("fingerprint differs from scores.fingerprint; leave fingerprint out for UnitScores")
        return scores
    if isinstance(scores, dict):
        if fingerprint is None:
            raise ValueError(
                "scores given as a dict need fingerprint=...: pass taskprune.get_architecture(model).fingerprint(), "
                "or pass a UnitScores"
            )
        bad = [k for k in scores if k not in UNIT_KINDS]
        if bad:
            raise ValueError(
                f"scores dict has unknown kind(s) {bad}; expected {{'heads'|'neurons': {{block_name: values}}}}"
            )
        sums = {k: {n: torch.as_tensor(v, dtype=torch.float64).flatten() for n, v in blocks.items()}
                for k, blocks in scores.items()}
        return UnitScores(sums, 0, method, fingerprint)  # count 0: mean() returns the values unchanged
    raise TypeError(f"scores must be a UnitScores or a dict of per-unit values, got {type(scores).__name__}")


def _check_floor(name: str, value, lowest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lowest:
        why = " (a spec cannot remove every head of an attention block)" if name == "min_heads" else ""
        raise ValueError(f"{name} must be an int >= {lowest}{why}, got {value!r}")


def _prunable_kinds(units, values: dict[str, dict[str, Tensor]], fp: dict) -> tuple[str, ...]:
    kinds = check_units(units)
    scored = tuple(k for k in kinds if values.get(k))
    if units != "all":
        missing = [k for k in kinds if k not in scored]
        if missing:
            raise ValueError(f"units={units!r} asks to prune {missing} but the scores have none; score them first")
    if not scored:
        raise ValueError(f"the scores hold no {' or '.join(kinds)}; nothing to select from")
    for kind in scored:
        if set(values[kind]) != set(fp[kind]):
            lacking = sorted(set(fp[kind]) - set(values[kind]))[:3]
            raise ValueError(
                f"scores for {kind} do not cover the model's blocks (missing e.g. {lacking}); score all blocks of a "
                "kind, or leave the kind out of units"
            )
        for name, v in values[kind].items():
            if v.numel() != fp[kind][name]:
                raise ValueError(
                    f"scores for {kind} of {name!r} have {v.numel()} values but the block has {fp[kind][name]} units; "
                    "were the scores computed on another (or an already shrunk) model?"
                )
    return scored


def _check_fraction(kind: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(
            f"budget must be a fraction in [0, 1), got {value!r}: {kind}={value!r} is not a fraction in [0, 1); it is "
            "the fraction to remove (0.3 removes 30%)"
        )


# ---------------------------------------------------------------------------------------------- selection
class _UnitTable:
    """Scores, costs and floors of the prunable units, in (kind, block, index) order."""

    def __init__(self, fp: dict, values: dict, kinds: tuple[str, ...], floors: dict[str, int], seq_len: int,
                 normalize: str) -> None:
        self.fp, self.kinds, self.floors = fp, kinds, floors
        self.costs = unit_costs(fp, seq_len)
        self.totals = {
            c: sum(fp[k][n] * self.costs[k][n][i] for k in UNIT_KINDS for n in fp[k])
            for i, c in enumerate(("macs", "params"))
        }
        self.blocks = [(k, n) for k in kinds for n in fp[k]]  # in tie-break order
        self.scores = {(k, n): _normalize(values[k][n].to(torch.float64), normalize) for k, n in self.blocks}

    def cap(self, kind: str, name: str) -> int:
        """Most units the floor lets this block lose."""
        return max(self.fp[kind][name] - self.floors[kind], 0)

    def _error(self, name: str, value: float, reachable: float, options: str) -> ValueError:
        return ValueError(
            f"budget {name}={value} cannot be reached with {options}: at most {reachable:.4f} can be removed; "
            "lower the budget or the floor (min_heads / min_neurons)"
        )

    # ------------------------------------------------------------------ counts
    def select_count(self, kind: str, name: str, fraction: float, scope: str, drop: dict, options: str) -> None:
        blocks = [n for k, n in self.blocks if k == kind]
        n_total = sum(self.fp[kind][n] for n in blocks)
        if scope == "layerwise":
            reachable = min((self.cap(kind, n) / self.fp[kind][n] for n in blocks if self.fp[kind][n]), default=0.0)
            for n in blocks:
                k = math.ceil(fraction * self.fp[kind][n] - _EPS)
                if k > self.cap(kind, n):
                    raise self._error(name, fraction, reachable, options)
                drop[kind][n] = self._lowest(kind, n, k)
            return
        target = math.ceil(fraction * n_total - _EPS)
        reachable = sum(self.cap(kind, n) for n in blocks)
        if target > reachable:
            raise self._error(name, fraction, reachable / n_total, options)
        self._greedy([(kind, n) for n in blocks], lambda k, n: 1.0, target, drop)

    # ------------------------------------------------------------------ costs
    def select_cost(self, name: str, fraction: float, scope: str, drop: dict, options: str) -> None:
        col = 0 if name == "macs" else 1
        target = fraction * self.totals[name] * (1 - _EPS)
        if scope == "layerwise":
            self._layerwise_cost(name, col, fraction, target, drop, options)
            return
        if scope == "per_kind":
            kind_totals = {k: sum(self.fp[k][n] * self.costs[k][n][col] for kk, n in self.blocks if kk == k)
                           for k in self.kinds}
            for kind, total in kind_totals.items():
                blocks = [(k, n) for k, n in self.blocks if k == kind]
                share = target * total / max(sum(kind_totals.values()), 1)
                reachable = sum(self.cap(k, n) * self.costs[k][n][col] for k, n in blocks)
                if share > reachable:
                    raise self._error(name, fraction, reachable / max(total, 1) * fraction * self.totals[name]
                                      / max(target, 1), f"{options} ({kind} would have to lose more than they can)")
                self._greedy(blocks, lambda k, n: float(self.costs[k][n][col]), share, drop)
            return
        reachable = sum(self.cap(k, n) * self.costs[k][n][col] for k, n in self.blocks)
        if target > reachable:
            raise self._error(name, fraction, reachable / self.totals[name], options)
        self._greedy(self.blocks, lambda k, n: float(self.costs[k][n][col]), target, drop)

    def _layerwise_cost(self, name: str, col: int, fraction: float, target: float, drop: dict, options: str) -> None:
        def counts(g: float) -> dict:
            return {(k, n): math.ceil(g * self.fp[k][n] - _EPS) for k, n in self.blocks}

        def cut(c: dict) -> float:
            return sum(c[b] * self.costs[b[0]][b[1]][col] for b in self.blocks)

        # the largest fraction every block can lose under its floor
        g_max = min((self.cap(k, n) / self.fp[k][n] for k, n in self.blocks if self.fp[k][n]), default=0.0)
        if cut(counts(g_max)) < target:
            raise self._error(name, fraction, cut(counts(g_max)) / self.totals[name], options)
        grid = sorted({j / self.fp[k][n] for k, n in self.blocks for j in range(self.fp[k][n] + 1)})
        grid = [g for g in grid if g <= g_max + _EPS]
        lo, hi = 0, len(grid) - 1  # smallest grid fraction whose cut reaches the target (cut grows with g)
        while lo < hi:
            mid = (lo + hi) // 2
            if cut(counts(grid[mid])) >= target:
                hi = mid
            else:
                lo = mid + 1
        for (k, n), c in counts(grid[lo]).items():
            drop[k][n] = self._lowest(k, n, c)

    # ------------------------------------------------------------------ helpers
    def _lowest(self, kind: str, name: str, k: int) -> list[int]:
        """Indices of the ``k`` lowest-scored units of one block (ties: lower index first), sorted."""
        order = torch.sort(self.scores[(kind, name)], stable=True).indices[:k]
        return sorted(order.tolist())

    def _greedy(self, blocks: list[tuple[str, str]], cost, target: float, drop: dict) -> None:
        """Remove units in increasing score / cost, skipping floor-breaking ones, until the cut reaches ``target``."""
        if target <= 0:
            return
        keys, owners, unit_cost = [], [], []
        for k, n in blocks:
            c = cost(k, n)
            keys.append(self.scores[(k, n)] / c)
            owners.extend([(k, n)] * self.fp[k][n])
            unit_cost.extend([c] * self.fp[k][n])
        flat = torch.cat(keys)
        order = torch.sort(flat, stable=True).indices.tolist()  # stable: ties keep (kind, block, index) order
        starts, offset = {}, 0
        for b in blocks:
            starts[b], offset = offset, offset + self.fp[b[0]][b[1]]
        taken = {b: 0 for b in blocks}
        done = 0.0
        for pos in order:
            b = owners[pos]
            if taken[b] >= self.cap(*b):
                continue
            taken[b] += 1
            drop[b[0]][b[1]].append(pos - starts[b])
            done += unit_cost[pos]
            if done >= target:
                break
        for b in blocks:
            drop[b[0]][b[1]].sort()

    def achieved(self, drop: dict) -> tuple[dict, dict]:
        return achieved_cut(self.fp, drop, costs=self.costs)


def achieved_cut(fp: dict, drop: dict, seq_len: int = 128, costs: dict | None = None) -> tuple[dict, dict]:
    """``(fractions removed, unit counts removed)`` when ``drop`` (``{kind: {block: unit indices}}``) leaves the
    model of fingerprint ``fp``: fractions of its heads, neurons, prunable MACs (at ``seq_len``) and parameters."""
    costs = costs if costs is not None else unit_costs(fp, seq_len)
    removed = {k: sum(len(drop.get(k, {}).get(n, ())) for n in fp[k]) for k in UNIT_KINDS}
    out = {k: removed[k] / max(sum(fp[k].values()), 1) for k in UNIT_KINDS}
    for i, c in enumerate(("macs", "params")):
        total = sum(fp[k][n] * costs[k][n][i] for k in UNIT_KINDS for n in fp[k])
        cut = sum(len(drop.get(k, {}).get(n, ())) * costs[k][n][i] for k in UNIT_KINDS for n in fp[k])
        out[c] = cut / max(total, 1)
    return out, removed


def _normalize(v: Tensor, how: str) -> Tensor:
    if how == "none":
        return v
    norm = {"l1": lambda: v.abs().sum(), "l2": lambda: v.norm(), "max": lambda: v.abs().max()}[how]()
    return v / norm if float(norm) > 0 else v
