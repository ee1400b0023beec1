"""Training-free stages after selection: mask rearrangement, mask tuning, scale folding (Kwon et al. 2022).

A pruning is **score → allocate → rearrange → tune → apply**, composed in one place (:mod:`taskprune.pipeline`);
every stage here takes a spec and returns a spec, so any score can go through any later stage:

* :func:`batch_gradients` — the gradient of the batch-mean task target w.r.t. every unit's mask, one row per
  calibration batch (``[n_batches, n_units]`` per block), what rearrangement needs. (Kwon et al.'s Fisher of the
  masks, ``Σ_b g_b²``, is the scoring method ``AttributionConfig(method="fisher", per="batch")``.)
* :func:`rearrange` — keeps each block's unit *count* and re-chooses *which* units, greedily, under the block-diagonal
  Fisher (the within-block correlation of the mask gradients), as in their mask rearrangement.
* :func:`tune_masks` — layer-wise least squares on real-valued scales of the kept units: block by block in forward
  order, the pruned model's (student's) block output is fitted to a teacher's on the calibration batches, with the
  student's earlier blocks already tuned. Their damping (damped least squares around scale 1, ``damp = 1`` on sums
  over tokens) and their stop rule (a solve with a scale beyond ±``max_scale`` ends the tuning) are kept; the
  teacher is the dense model or, as in their code, a less-pruned spec (:func:`teacher_keep`: the square root of the
  kept MAC fraction).
* :func:`fold_scales_` — multiplies each kept unit's columns of the output / down projection by its scale, so the
  spec needs no scales any more and :func:`taskprune.surgery.shrink_` gives the tuned model with no mask at all.

Deviations from their code, said plainly: the fit matches each block's own output (the output projection's result),
not the output plus the residual stream, because where the residual is added is architecture-specific; and every
block is tuned, where they skip the first attention layer and fit the last FFN on the [CLS] token only (our heads pool
over all tokens).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from taskprune.arch import find_base, get_architecture, unit_channels, weight_in_out
from taskprune.attribution import default_forward, frozen, make_target
from taskprune.gates import Gates
from taskprune.spec import PruneSpec
from taskprune.unitscores import UnitScores

log = logging.getLogger(__name__)

Tune = Literal["none", "dense", "schedule"]
TUNES: tuple[str, ...] = get_args(Tune)


@dataclass(frozen=True)
class TuningConfig:
    """The training-free stages after selection: one object for Python, the callback and YAML (``pruning.tuning``)."""

    rearrange: bool = False
    """Re-choose each block's kept units under the block-diagonal Fisher of the per-batch mask gradients (Kwon et
    al.'s mask rearrangement); keeps every block's unit count."""
    tune: Tune = "none"
    """Fit real-valued scales of the kept units, block by block, to a teacher (Kwon et al.'s mask tuning): none,
    dense (teacher = the dense model) or schedule (their teacher: the same selection at sqrt of the kept fraction).
    The scales are folded into the weights before the spec is applied: the pruned model needs no mask."""
    damping: float = 1.0
    """Damping of the scales' least squares (their value, on sums over calibration tokens)."""
    max_scale: float = 10.0
    """A solve with a scale beyond +-max_scale stops the tuning there (their rule); later blocks keep scale 1."""

    def __post_init__(self) -> None:
        if not isinstance(self.rearrange, bool):
            raise ValueError(f"rearrange must be true or false, got {self.rearrange!r}")
        if self.tune not in TUNES:
            raise ValueError(f"tune={self.tune!r} is not allowed; use one of {list(TUNES)}")
        for name, v, low in (("damping", self.damping, 0.0), ("max_scale", self.max_scale, 1.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
                raise ValueError(f"{name}={v!r} must be a finite number >= {low}")

    @property
    def active(self) -> bool:
        """Whether rearrangement or tuning runs (both read the calibration batches)."""
        return self.rearrange or self.tune != "none"

    def to_dict(self) -> dict:
        return asdict(self)


BatchGrads = dict[str, dict[str, Tensor]]  # {kind: {block: [n_batches, n_units] float64}}


# ------------------------------------------------------------------------------------------ mask gradients
def batch_gradients(model: nn.Module, batches: Iterable[dict], target="label", units="all",
                    forward: Callable = default_forward) -> tuple[BatchGrads, int]:
    """Gradient of the batch-mean ``target`` w.r.t. one shared mask per unit (all masks at 1), per batch.

    Returns ``({kind: {block: [n_batches, n_units]}}, n_samples)``. Weights are not touched (no ``.grad`` is
    written to them). ``target`` is as in :func:`taskprune.attribution.make_target` (``"label"``: log-probability of
    the gold label, so the gradient is minus that of the cross-entropy: the sign does not matter to Fisher).
    """
    fn = make_target(target, model)
    rows, n_samples = [], 0
    with frozen(model), Gates(model, units) as gates:
        for batch in batches:
            n = len(next(v for v in batch.values() if isinstance(v, Tensor)))
            g = torch.ones(gates.n_units, requires_grad=True)
            gates.set(g)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(fn(forward(model, batch), batch).mean(), g)
            gates.set(None)
            rows.append(grad.detach().double().cpu())
            n_samples += n
        if not rows:
            raise ValueError("batch_gradients got no batches; pass a non-empty iterable of batches")
        stacked = torch.stack(rows)  # [n_batches, n_units]
        return {k: {n: v.clone() for n, v in d.items()} for k, d in gates.split(stacked).items()}, n_samples


def rearrange(spec: PruneSpec, grads: BatchGrads) -> PruneSpec:
    """Re-choose the kept units of every block under the block-diagonal Fisher, keeping each block's count.

    Pruning the set ``P`` of a block costs about ``|Σ_{i∈P} g_i|²`` summed over batches (second-order expansion of
    the loss with the Fisher as Hessian). Starting from the lowest-Fisher units, each remaining unit in ascending
    order joins ``P`` and then the member whose removal leaves the smallest cost leaves it (their greedy).
    """
    keep = {k: dict(v) for k, v in spec.keep.items()}
    for kind, blocks in grads.items():
        for name, g in blocks.items():
            n_units = g.shape[1]
            kept = spec.kept(kind, name)
            n_drop = n_units - len(kept)
            if n_drop == 0 or len(kept) == 0:
                continue
            keep.setdefault(kind, {})[name] = _greedy_keep(g.t(), n_drop)
    return replace(spec, keep=keep, scales={}, meta={**spec.meta, "rearranged": True})


@torch.no_grad()
def _greedy_keep(g: Tensor, n_drop: int) -> list[int]:
    """``g [n_units, n_batches]`` -> sorted kept indices after the greedy choice of ``n_drop`` units to prune."""
    order = g.pow(2).sum(1).argsort().tolist()  # ascending Fisher
    dropped = order[:n_drop]
    for i in order[n_drop:]:
        dropped.append(i)
        vecs = g[dropped]  # [n_drop + 1, n_batches]
        without = vecs.sum(0, keepdim=True) - vecs  # the pruned sum if member j leaves
        del dropped[int(without.pow(2).sum(1).argmin())]
    gone = set(dropped)
    return [i for i in range(g.shape[0]) if i not in gone]


# ------------------------------------------------------------------------------------------ scaled masks
@contextmanager
def scaled_mask(model: nn.Module, spec: PruneSpec):
    """Within the block, ``model`` runs as masked by ``spec`` with its unit scales (no weight is changed)."""
    spec.validate(model)
    with Gates(model) as gates:
        gates.set(gates.values_of(spec))
        yield model


# ------------------------------------------------------------------------------------------ mask tuning
def teacher_keep(keep_fraction: float) -> float:
    """Kwon et al.'s teacher schedule (two steps): the teacher keeps ``sqrt(keep_fraction)`` of the MACs."""
    return math.sqrt(keep_fraction)


class _Stop(Exception):
    pass


@torch.no_grad()
def tune_masks(model: nn.Module, spec: PruneSpec, batches: list[dict], teacher: PruneSpec | None = None,
               damping: float = 1.0, max_scale: float = 10.0, forward: Callable = default_forward) -> PruneSpec:
    """Fit real-valued scales of ``spec``'s kept units, block by block, to a teacher's block outputs.

    ``model`` must be the dense model (masks are applied with gates; no weight changes). ``teacher`` is a spec
    (Kwon et al.: a less-pruned one, see :func:`teacher_keep`) or ``None`` for the dense model. For block ``k`` with
    kept units ``K``, unit contributions ``c_i = W[:, cols_i] x[cols_i]`` at the student's input ``x`` and teacher
    output ``y`` (both over real tokens), the scales solve ``min |A u - r|² + damping²|u|²`` with ``s = 1 + u``,
    ``A = Σ_tokens c cᵀ`` and ``r = Σ_tokens c (y - b) - A 1``: the damped least squares of their code, which never
    increases the block's error on these batches. Returns the spec with ``scales``; blocks after a failed solve
    (non-finite, or a scale beyond ±``max_scale``) keep scale 1, as their code stops there.
    """
    if damping < 0 or max_scale <= 0:
        raise ValueError(f"damping={damping!r} must be >= 0 and max_scale={max_scale!r} > 0")
    if not batches:
        raise ValueError("tune_masks needs calibration batches; pass a non-empty list")
    spec.validate(model)
    base, _ = find_base(model)
    scales: dict[str, dict[str, list[float]]] = {}
    tuned = replace(spec, scales={})
    with Gates(model) as gates:
        order = _forward_order(model, gates, batches[0], forward)
        targets = _teacher_outputs(model, gates, gates.values_of(teacher), order, batches, forward)
        for slot in order:
            kind, name = slot.kind, slot.block.name
            kept = spec.kept(kind, name)
            if not kept or len(kept) == slot.n_units and teacher is None:
                continue  # nothing to fit (a full block against the dense teacher is already exact)
            proj = base.get_submodule(slot.block.out if kind == "heads" else slot.block.down)
            cols = unit_channels(kept, slot.block.unit_width)
            w = weight_in_out(proj).detach().double()[cols]  # [Kc, d_out]
            bias = proj.bias.detach().double() if getattr(proj, "bias", None) is not None else None
            xx = torch.zeros(len(cols), len(cols), dtype=torch.float64)
            xt = torch.zeros(len(cols), w.shape[1], dtype=torch.float64)
            for batch, y in zip(batches, targets[name]):
                x = _capture(model, gates, gates.values_of(tuned, scaled=True), proj, batch, forward, "input")
                x, y = x.double()[_real_tokens(batch, x)][:, cols], y.double()
                if bias is not None:
                    y = y - bias
                xx += x.t() @ x
                xt += x.t() @ y
            width = slot.block.unit_width
            a = _block_sum((w @ w.t()) * xx, width)  # [K, K]
            r = (w * xt).sum(1).view(len(kept), width).sum(1) - a.sum(1)  # [K]
            u = _damped_lstsq(a, r, damping)
            s = 1.0 + u
            if not torch.isfinite(s).all() or s.abs().max() > max_scale:
                log.warning("mask tuning stopped at %s: scales out of range (max |s| = %.3g > %g); later blocks keep "
                            "scale 1", name, float(s.abs().max()), max_scale)
                break
            scales.setdefault(kind, {})[name] = s.tolist()
            tuned = replace(spec, scales=scales)
    return replace(spec, scales=scales, meta={**spec.meta, "tuned": {"damping": damping,
                                                                     "teacher": "dense" if teacher is None else
                                                                     teacher.meta.get("name", "spec")}})


def _damped_lstsq(a: Tensor, r: Tensor, damping: float) -> Tensor:
    """``argmin |A u - r|² + damping² |u|²`` through the stacked system (exact, well-conditioned for damping > 0)."""
    k = a.shape[0]
    if damping == 0:
        return torch.linalg.lstsq(a, r[:, None]).solution[:, 0]
    lhs = torch.cat([a, damping * torch.eye(k, dtype=a.dtype)])
    rhs = torch.cat([r, torch.zeros(k, dtype=a.dtype)])
    return torch.linalg.lstsq(lhs, rhs[:, None], driver="gels").solution[:, 0]


def _block_sum(m: Tensor, width: int) -> Tensor:
    """``[K*width, K*width]`` -> ``[K, K]``: sums of the ``width x width`` tiles."""
    k = m.shape[0] // width
    return m.view(k, width, k, width).sum((1, 3))


def _real_tokens(batch: dict, x: Tensor) -> Tensor:
    """Boolean ``[batch, seq]`` of real tokens where the attention mask fits ``x``, else all positions."""
    m = batch.get("attention_mask")
    if m is not None and x.dim() == 3 and tuple(m.shape) == tuple(x.shape[:2]):
        return m.to(x.device).bool()
    return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)


def _teacher_outputs(model, gates: Gates, values, order: list, batches: list[dict], forward) -> dict[str, list]:
    """Every block's output-projection output under the teacher's gates, over real tokens, one pass per batch
    (float32 ``[n_real_tokens, d_out]`` per block and batch: the teacher does not change while the student is tuned)."""
    base, _ = find_base(model)
    out: dict[str, list] = {s.block.name: [] for s in order}
    current: dict = {}
    handles = []
    for s in order:
        proj = base.get_submodule(s.block.out if s.kind == "heads" else s.block.down)

        def hook(module, args, result, name=s.block.name):
            current[name] = result.detach()

        handles.append(proj.register_forward_hook(hook))
    gates.set(values)
    try:
        for batch in batches:
            current.clear()
            forward(model, batch)
            for name, y in current.items():
                out[name].append(y[_real_tokens(batch, y)].float())
    finally:
        for h in handles:
            h.remove()
        gates.set(None)
    return out


def _capture(model, gates: Gates, values, proj: nn.Module, batch: dict, forward, what: str) -> Tensor:
    """Run ``model`` with ``values`` as gates up to ``proj`` and return its (gated) input or its output."""
    out: list[Tensor] = []

    def hook(module, args, result):
        out.append((args[0] if what == "input" else result).detach())
        raise _Stop

    h = proj.register_forward_hook(hook)
    gates.set(values)
    try:
        forward(model, batch)
    except _Stop:
        pass
    finally:
        h.remove()
        gates.set(None)
    if not out:
        raise RuntimeError(f"the forward pass never reached {type(proj).__name__}; is the block used by the model?")
    return out[0]


def _forward_order(model, gates: Gates, batch: dict, forward) -> list:
    """The gate slots in the order the forward pass reaches their projections."""
    base, _ = find_base(model)
    seen: list = []
    handles = []
    for s in gates.slots:
        proj = base.get_submodule(s.block.out if s.kind == "heads" else s.block.down)
        handles.append(proj.register_forward_pre_hook(lambda m, a, s=s: seen.append(s) if s not in seen else None))
    try:
        forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return seen + [s for s in gates.slots if s not in seen]


# ------------------------------------------------------------------------------------------ folding
@torch.no_grad()
def fold_scales_(model: nn.Module, spec: PruneSpec) -> PruneSpec:
    """Multiply each kept unit's input columns of its output / down projection by its scale, in place.

    Apply to the dense model before :func:`~taskprune.surgery.shrink_` (or to a model already shrunk by ``spec``);
    returns the spec without scales. Folding then shrinking equals running the dense model masked with scales.
    """
    state = spec.validate(model)
    base, _ = find_base(model)
    arch = get_architecture(model)
    for kind, blocks in spec.scales.items():
        for block in arch.blocks(kind):
            if block.name not in blocks:
                continue
            kept = spec.kept(kind, block.name)
            s = torch.tensor(blocks[block.name], dtype=torch.float64)
            units = kept if state == "dense" else list(range(len(kept)))
            cols = unit_channels(units, block.unit_width)
            proj = base.get_submodule(block.out if kind == "heads" else block.down)
            w = weight_in_out(proj)  # a view [in, out] of the weight
            col_scale = s.repeat_interleave(block.unit_width).to(w.dtype).to(w.device)
            w[cols] *= col_scale[:, None]
    return replace(spec, scales={}, meta={**spec.meta, "scales_folded": True})
