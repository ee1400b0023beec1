"""Training-free stages after selection: mask rearrangement, mask tuning, scale folding (Kwon et al. 2022).

A pruning is **score → allocate → rearrange → tune → apply**, composed in one place (:mod:`taskprune.pipeline`);
every stage here takes a spec and returns a spec, so any score can go through any later stage:

* :func:`batch_gradients` — the gradient of the batch-mean task target w.r.t. every unit's mask, one row per
  calibration batch (``[n_batches, n_units]`` per block), what rearrangement needs. (Kwon et al.'s Fisher of the
  masks, ``Σ_b g_b²``, is the scoring method ``AttributionConfig(method="fisher", per="batch")``.)
* :func:`rearrange` — keeps each block's unit *count* and re-chooses *which* units, greedily, under the block-diagonal
  Fisher (the within-block correlation of the mask gradients), as in their mask rearrangement.
* :func:`tune_masks` — layer-wise least squares, sub-layer by sub-layer in forward order, the pruned model's
  (student's) sub-layer fitted to a teacher's on the calibration batches with its earlier sub-layers already tuned:
  real-valued scales of the kept units (``fit="scales"``, Kwon et al.'s mask tuning: their damping, LSMR and stop
  rule with ``solver="lsmr"``), or every weight of the kept units' input columns of the output / down projection
  (``fit="columns"``, K-prune's weight tuning, a ridge solve). The target is the teacher's output
  (``target="output"``) or, as in their code, the pre-LayerNorm sum (``"residual"``: the teacher's output plus the
  residual drift x_T - x_S, from the architecture adapter's residual place). The teacher is the dense model or, as in
  Kwon et al.'s code, a less-pruned spec (:func:`teacher_keep`: the square root of the kept MAC fraction). The
  calibration batches go through the student once, in lockstep (:class:`_Lockstep`: each forward pauses at every
  fitted projection until the fit is written), so L sub-layers cost one pass, not L partial ones; the teacher runs
  beside it in the same lockstep on a copy that shares all weights but the fitted projections', so no target is
  stored (memory: those projections and the paused forwards, not L x calibration tokens x width).
* :func:`fold_scales_` — writes the scales (or the refitted columns) into the kept units' weights, so the spec
  needs neither any more and :func:`taskprune.surgery.shrink_` gives the tuned model with no mask at all.

Where the ``kwon`` preset still differs from their code is listed in ``docs/design.md`` ("The peer").
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from taskprune.arch import UNIT_KINDS, find_base, get_architecture, unit_channels, weight_in_out
from taskprune.attribution import default_forward, frozen, make_target
from taskprune.gates import Gates
from taskprune.spec import PruneSpec
from taskprune.unitscores import UnitScores

log = logging.getLogger(__name__)

Tune = Literal["none", "dense", "schedule"]
TUNES: tuple[str, ...] = get_args(Tune)
FitTarget = Literal["output", "residual"]
FIT_TARGETS: tuple[str, ...] = get_args(FitTarget)
Solver = Literal["exact", "lsmr"]
SOLVERS: tuple[str, ...] = get_args(Solver)
Tokens = Literal["all", "first"]
Fit = Literal["scales", "columns", "bias", "columns_bias"]
FITS: tuple[str, ...] = get_args(Fit)
TOKENS: tuple[str, ...] = get_args(Tokens)
SharedPrefix = Literal["per_batch", "once"]
SHARED_PREFIXES: tuple[str, ...] = get_args(SharedPrefix)
FIT_OPTIONS = ("damping", "max_scale", "target", "solver", "skip_first_attention", "last_ffn_tokens", "fit",
               "ridge", "shared_prefix")  # of tune only
SCALE_OPTIONS = ("damping", "max_scale", "solver")  # of fit="scales" only


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
    target: FitTarget = "output"
    """What each sub-layer's scales fit: output (the teacher's output-projection output) or residual (Kwon et al.'s:
    the teacher's sum entering the residual add / LayerNorm, teacher output + x_teacher - x_student, so every sub-layer
    also cancels the drift accumulated upstream; the residual stream's place comes from the architecture adapter)."""
    solver: Solver = "exact"
    """exact (float64 products and a float64 damped least-squares solve) or lsmr (theirs: float32 products per batch,
    summed in float64, and scipy's LSMR in float32 on the normal equations, damp = damping, atol = btol = 1e-6, conlim = 1e8, at most 5n iterations; an attention fit has an intercept column,
    solved and dropped; LSMR's stop code >= 3 ends the tuning)."""
    skip_first_attention: bool = False
    """Leave the first attention block untuned (their code does)."""
    last_ffn_tokens: Tokens = "all"
    """Tokens the last feed-forward block is fitted on: all real tokens, or the first one (their rule for
    classifiers that read the [CLS] token; the project's multi-task heads pool the mean of all tokens)."""
    fit: Fit = "scales"
    """What is fitted per sub-layer: ``scales`` (Kwon et al.: one real scale per kept unit, folded into the weights),
    ``columns`` (K-prune's weight tuning: every weight of the kept units' input columns of the output / down
    projection, ridge least squares to the same target; bias untouched; kept in the spec beside its JSON), ``bias``
    (FLAP's bias compensation: the projection's output bias alone, the least-squares intercept at the dense columns,
    i.e. the mean over tokens of target minus output; with the output target and nothing pruned upstream it is the
    removed units' mean output; a projection without a bias gets one) or ``columns_bias`` (both in one solve, the ridge
    on the columns only)."""
    ridge: float = 0.1
    """``fit="columns"``: the ridge, relative to the mean diagonal of the inputs' Gram matrix, pulling the refitted
    columns towards the dense ones."""
    shared_prefix: SharedPrefix = "per_batch"
    """A model whose tuning forward packs a prefix shared by all rows before the batch's rows (a prompted LM's
    few-shot prompt, see :meth:`taskprune.models.fewshot.PromptedLM.single_pass`): ``per_batch`` fits the prefix's
    tokens in every batch (their weight grows with the number of batches), ``once`` in the first batch only (the
    prefix weighs as one sequence whatever the batch size; the rows' own tokens carry the rest). No effect on models
    without a shared prefix."""

    def __post_init__(self) -> None:
        if not isinstance(self.rearrange, bool):
            raise ValueError(f"rearrange must be true or false, got {self.rearrange!r}")
        for name, value, allowed in (("tune", self.tune, TUNES), ("target", self.target, FIT_TARGETS),
                                     ("solver", self.solver, SOLVERS), ("last_ffn_tokens", self.last_ffn_tokens, TOKENS),
                                     ("fit", self.fit, FITS), ("shared_prefix", self.shared_prefix, SHARED_PREFIXES)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not allowed; use one of {list(allowed)}")
        if not isinstance(self.skip_first_attention, bool):
            raise ValueError(f"skip_first_attention must be true or false, got {self.skip_first_attention!r}")
        for name, v, low in (("damping", self.damping, 0.0), ("max_scale", self.max_scale, 1.0),
                             ("ridge", self.ridge, 0.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
                raise ValueError(f"{name}={v!r} must be a finite number >= {low}")
        changed = {k: getattr(self, k) for k in FIT_OPTIONS if getattr(self, k) != self.__dataclass_fields__[k].default}
        if self.tune == "none" and changed:
            raise ValueError(f"{changed} configure mask tuning, which is off (tune='none'); set tune='schedule' or "
                             "'dense', or leave them at their defaults")
        defaults = self.__dataclass_fields__
        if self.fit != "scales" and any(getattr(self, k) != defaults[k].default for k in SCALE_OPTIONS):
            raise ValueError(f"{ {k: getattr(self, k) for k in SCALE_OPTIONS} } configure the scales' solve, which "
                             f"fit={self.fit!r} does not use (a ridge solve: set ridge); leave them at their defaults")
        if self.fit in ("scales", "bias") and self.ridge != defaults["ridge"].default:
            raise ValueError(f"ridge={self.ridge!r} configures fit='columns' or 'columns_bias'; "
                             + ("with fit='scales' set damping instead" if self.fit == "scales" else
                                "fit='bias' fits no columns (the intercept has no ridge)"))

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
               damping: float = 1.0, max_scale: float = 10.0, forward: Callable = default_forward,
               target: FitTarget = "output", solver: Solver = "exact", skip_first_attention: bool = False,
               last_ffn_tokens: Tokens = "all", fit: Fit = "scales", ridge: float = 0.1,
               shared_prefix: SharedPrefix = "per_batch") -> PruneSpec:
    """Fit real-valued scales of ``spec``'s kept units, sub-layer by sub-layer in forward order, to a teacher.

    ``model`` must be the dense model (masks are applied with gates; no weight changes). ``teacher`` is a spec
    (Kwon et al.: a less-pruned one, see :func:`teacher_keep`) or ``None`` for the dense model. For a sub-layer with
    kept units ``K``, unit contributions ``c_i = W[:, cols_i] x[cols_i]`` at the student's input ``x`` (the student's
    earlier sub-layers already tuned) and a target ``y`` over real tokens, the scales ``s = 1 + u`` solve
    ``min |A u - r|² + damping²|u|²`` with ``A = Σ_tokens c cᵀ`` and ``r = Σ_tokens c (y - b) - A 1``: the damped
    least squares of their code, which shrinks the scales towards 1. ``target="output"``: ``y`` is the teacher's
    output-projection output; ``"residual"`` (theirs): the teacher's output plus the residual stream entering the
    teacher's residual add minus the student's (``y_T + x_T - x_S``), so the student's sum before the LayerNorm (post-norm)
    or after the residual add (pre-norm) is fitted to the teacher's. ``solver``, ``skip_first_attention``,
    ``last_ffn_tokens``, ``shared_prefix``: see :class:`TuningConfig`. Returns the spec with ``scales``; the tuning
    stops at the first failed solve (non-finite, a scale beyond ±``max_scale``, or LSMR's stop code >= 3), later sub-layers keep scale
    1, as their code stops there.

    ``fit="columns"`` (K-prune's weight tuning) fits, with the same inputs and targets, every weight of the kept
    columns ``W_K`` instead of one scale per unit: ``W_K' = (X_Kᵀ X_K + ridge·m·I)⁻¹ (X_Kᵀ (Y - b) + ridge·m·W_K)``
    (``m`` the mean diagonal of ``X_Kᵀ X_K``); later sub-layers see the refitted ones (written into the model for the
    duration, restored before returning). Returns the spec with ``columns``; a non-finite solve stops there.
    ``fit="bias"`` fits the output bias alone, ``b' = b + mean_tokens(Y - b - X_K W_K)``, and ``"columns_bias"`` the
    columns and that intercept in one solve (the ridge on the columns only); the spec then also has ``biases``.
    """
    if damping < 0 or max_scale <= 0:
        raise ValueError(f"damping={damping!r} must be >= 0 and max_scale={max_scale!r} > 0")
    if not batches:
        raise ValueError("tune_masks needs calibration batches; pass a non-empty list")
    spec.validate(model)
    base, _ = find_base(model)
    teacher_model = _teacher_copy(model)  # before any hook of ours: the copy must not carry the student's gates
    tbase, _ = find_base(teacher_model)
    scales: dict[str, dict[str, list[float]]] = {}
    columns: dict[str, dict[str, Tensor]] = {}
    biases: dict[str, dict[str, Tensor]] = {}
    originals: list[Callable[[], None]] = []  # each puts back one dense weight slice or bias
    tuned = replace(spec, scales={})
    with frozen(model), frozen(teacher_model), Gates(model) as gates, Gates(teacher_model) as teacher_gates, \
            _restored(originals), _single_pass(model) as prefix, _single_pass(teacher_model):  # eval: no dropout
        teacher_gates.set(teacher_gates.values_of(teacher))
        lead = [0] + [prefix if shared_prefix == "once" else 0] * (len(batches) - 1)  # leading tokens not fitted
        order = _forward_order(model, gates, batches[0], forward)
        residual = target == "residual"
        if residual and any(s.block.residual is None for s in order):
            raise ValueError(f"target='residual' needs the residual stream's place, which the {type(get_architecture(model).adapter).__name__} "
                             "does not give; use target='output'")
        last_ffn = next((s.block.name for s in reversed(order) if s.kind == "neurons"), None)
        first_attention = next((s.block.name for s in order if s.kind == "heads"), None)
        first = {last_ffn} if last_ffn_tokens == "first" else set()
        plan = [slot for slot in order if _fitted(slot, spec, teacher, residual)
                and not (skip_first_attention and slot.block.name == first_attention)]
        names = [s.block.out if s.kind == "heads" else s.block.down for s in plan]
        projs, teacher_projs = [base.get_submodule(n) for n in names], [tbase.get_submodule(n) for n in names]
        places = sorted({s.block.residual for s in plan}) if residual else []
        last = [max(j for j, s in enumerate(plan) if s.block.residual == place) for place in places]
        gates.set(gates.values_of(tuned, scaled=True))
        with _Lockstep(model, batches, forward, projs,
                       [(base.get_submodule(m), i, j) for (m, i), j in zip(places, last)]) as run, \
                _Lockstep(teacher_model, batches, forward, teacher_projs,
                          [(tbase.get_submodule(m), i, j) for (m, i), j in zip(places, last)]) as taught:
            for point, (slot, proj) in enumerate(zip(plan, projs)):
                kind, name = slot.kind, slot.block.name
                kept = spec.kept(kind, name)
                cols = unit_channels(kept, slot.block.unit_width)
                w = weight_in_out(proj).detach().double()[cols]  # [Kc, d_out]
                bias = proj.bias.detach().double() if getattr(proj, "bias", None) is not None else None
                dtype = torch.float32 if solver == "lsmr" or fit != "scales" else torch.float64  # lsmr: theirs
                place = places.index(slot.block.residual) if residual else None
                sums = _sums(batches, taught.reach(point), teacher_projs[point], run.reach(point), cols, w.shape[1],
                             bias, name in first, place, dtype, lead)
                if fit != "scales":
                    new, beta = _refit(fit, sums, w, ridge)
                    if not torch.isfinite(new).all() or (beta is not None and not torch.isfinite(beta).all()):
                        log.warning("mask tuning stopped at %s: the refit is not finite; later sub-layers keep their "
                                    "dense weights", name)
                        break
                    new_cols, new_bias = _write_refit(proj, cols, new, beta, fit, originals)
                    if new_cols is not None:
                        columns.setdefault(kind, {})[name] = new_cols
                    if new_bias is not None:
                        biases.setdefault(kind, {})[name] = new_bias
                    continue
                s = _scales(sums, w, len(kept), slot.block.unit_width, kind, solver, damping)
                if s is None:
                    log.warning("mask tuning stopped at %s: LSMR did not converge (stop code >= 3: ill-conditioned, "
                                "condition number above 1e8); later sub-layers keep scale 1", name)
                    break
                if not torch.isfinite(s).all() or s.abs().max() > max_scale:
                    log.warning("mask tuning stopped at %s: scales out of range (max |s| = %.3g > %g); later blocks "
                                "keep scale 1", name, float(s.abs().max()), max_scale)
                    break
                scales.setdefault(kind, {})[name] = s.tolist()
                tuned = replace(spec, scales=scales)
                gates.set(gates.values_of(tuned, scaled=True))  # the batches go on through the scaled sub-layer
    how = {"fit": fit, "ridge": ridge} if fit != "scales" else {"damping": damping, "solver": solver}
    if prefix:
        how["shared_prefix"] = shared_prefix
    return replace(spec, scales=scales, columns=columns, biases=biases,
                   meta={**spec.meta, "tuned": {**how, "teacher": "dense" if teacher is None else
                                                teacher.meta.get("name", "spec"), "target": target}})


@contextmanager
def _restored(originals: list[Callable[[], None]]):
    """Put back the dense weight columns and biases a refit wrote, last first (also on an error)."""
    try:
        yield
    finally:
        with torch.no_grad():
            for undo in reversed(originals):
                undo()


@contextmanager
def _autocast(modes: list) -> Iterator[None]:
    """The caller's autocast modes in another thread (they are thread-local)."""
    with ExitStack() as stack:
        for device, enabled, dtype in modes:
            if enabled:
                stack.enter_context(torch.autocast(device, dtype=dtype))
        yield


def _fitted(slot, spec: PruneSpec, teacher: PruneSpec | None, residual: bool) -> bool:
    """Whether a sub-layer has anything to fit (a full block against the dense teacher's output is already exact)."""
    kept = spec.kept(slot.kind, slot.block.name)
    return bool(kept) and not (len(kept) == slot.n_units and teacher is None and not residual)


@contextmanager
def _single_pass(model: nn.Module) -> Iterator[int]:
    """The context in which each forward calls every projection once with the batch's tokens: ``single_pass()`` of
    every submodule that has one (a prompted LM packs its prefix with its rows; also inside a user's wrapper). Yields
    the number of leading tokens of every forward that all rows share (``shared_prefix_tokens`` of those submodules;
    0 without)."""
    with ExitStack() as stack:
        shared = 0
        for m in model.modules():
            if callable(getattr(m, "single_pass", None)):
                stack.enter_context(m.single_pass())
                shared = max(shared, int(getattr(m, "shared_prefix_tokens", 0)))
        yield shared


class _Lockstep:
    """The calibration forwards in lockstep, so that each is run once for all the sub-layers fitted (O(L) sub-layers
    of work for L fits, instead of re-running the model up to each one: O(L²)).

    One thread per batch, run one at a time (torch's own threads do the arithmetic), each pausing at the input of
    ``points[0]``, ``points[1]``, ... in turn: :meth:`reach` ``(j)`` runs every batch to point ``j`` and returns what
    each brought there, ``(input, {k: residual stream at streams[k]})``, ``streams[k] = (module, argument, the last
    point that reads it)``: a stream is kept until that point only (each is ``[tokens, width]`` per batch); whatever
    the caller changes before the next :meth:`reach` (gates, weights, biases) is what the paused batches then run
    through. The calls of a point after
    the first in one forward (a prompted LM's content-free rows) do not pause. Leaving the context stops them all."""

    def __init__(self, model: nn.Module, batches: list[dict], forward, points: list[nn.Module],
                 streams: list[tuple[nn.Module, int, int]]) -> None:
        self.model, self.batches, self.forward, self.points = model, batches, forward, points
        n = len(batches)
        self.cv = threading.Condition()
        self.turn: int | None = None  # the batch whose thread may run; None: the caller's
        self.running = 0
        self.abort = False
        self.next = [0] * n  # the point each batch pauses at next
        self.got: list = [None] * n
        self.seen: list[dict[int, Tensor]] = [{} for _ in range(n)]  # the residual streams met so far
        self.done = [False] * n
        self.error: list[BaseException | None] = [None] * n
        self.handles = [p.register_forward_pre_hook(self._pause(j), prepend=True) for j, p in enumerate(points)]
        self.last = [last for _, _, last in streams]
        self.handles += [m.register_forward_pre_hook(self._stream(k, i)) for k, (m, i, _) in enumerate(streams)]
        modes = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")]
        cuda = torch.cuda.current_device() if torch.cuda.is_initialized() else None
        self.threads = [threading.Thread(target=self._body, args=(b, torch.is_grad_enabled(), modes, cuda),
                                         daemon=True) for b in range(n)]
        for t in self.threads:
            t.start()

    # ---- in the batches' threads
    def _body(self, b: int, grad: bool, modes: list, cuda: int | None) -> None:
        """Batch ``b``'s forward with the caller's grad mode, autocast and CUDA device (all thread-local)."""
        try:
            if cuda is not None:
                torch.cuda.set_device(cuda)
            with torch.set_grad_enabled(grad), _autocast(modes):
                self._wait(b)
                self.forward(self.model, self.batches[b])
        except _Stop:
            pass
        except BaseException as e:  # handed to the caller by reach
            self.error[b] = e
        finally:
            with self.cv:
                self.done[b] = True
                self.turn = None
                self.cv.notify_all()

    def _wait(self, b: int) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.turn == b)
        if self.abort:
            raise _Stop

    def _pause(self, j: int):
        def pre_hook(module, args):
            b = self.running
            if j < self.next[b]:
                return None  # a later call in the same forward
            if j > self.next[b]:
                raise RuntimeError(f"the forward pass reached the fitted {type(module).__name__} number {j} before "
                                   f"number {self.next[b]}; the sub-layers are not run in the order found first")
            self.got[b] = (args[0].detach(), dict(self.seen[b]))
            for k in [k for k in self.seen[b] if self.last[k] <= j]:  # no later point reads it
                del self.seen[b][k]
            self.next[b] = j + 1
            with self.cv:
                self.turn = None
                self.cv.notify_all()
            self._wait(b)
            return None

        return pre_hook

    def _stream(self, k: int, index: int):
        def pre_hook(module, args):
            self.seen[self.running][k] = args[index].detach()

        return pre_hook

    # ---- in the caller's thread
    def _run(self, b: int) -> None:
        with self.cv:
            self.running, self.turn = b, b
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.turn is None)

    def reach(self, j: int) -> list[tuple[Tensor, dict[int, Tensor]]]:
        out = []
        for b in range(len(self.batches)):
            if not self.done[b] and self.next[b] <= j:
                self._run(b)
            if self.error[b] is not None:
                raise self.error[b]
            if self.next[b] != j + 1 or self.got[b] is None:
                raise RuntimeError(f"the forward pass never reached {type(self.points[j]).__name__}; is the block "
                                   "used by the model?")
            out.append(self.got[b])
            self.got[b] = None
        return out

    def __enter__(self) -> _Lockstep:
        return self

    def __exit__(self, *exc) -> None:
        self.abort = True
        try:
            for b in range(len(self.batches)):
                while not self.done[b]:  # twice for one interrupted mid-way: it pauses first, then stops
                    self._run(b)
            for t in self.threads:
                t.join()
        finally:
            for h in self.handles:
                h.remove()


@dataclass
class _Sums:
    """One sub-layer's sums over its fitted tokens, in float64: ``xx = XᵀX``, ``xt = Xᵀ(Y - b)``, ``xs = ΣX``,
    ``ysum = Σ(Y - b)`` and the token count (``X``: the kept columns' inputs, ``Y``: the target, ``b``: the dense
    bias)."""

    xx: Tensor
    xt: Tensor
    xs: Tensor
    ysum: Tensor
    n_tok: int


def _sums(batches: list[dict], taught, teacher_proj: nn.Module, reached, cols: list[int], d_out: int,
          bias: Tensor | None, first: bool, place: int | None, dtype: torch.dtype, lead: list[int]) -> _Sums:
    """:class:`_Sums` of one sub-layer over the batches: ``reached`` gives each batch's input to the student's output
    projection and its residual streams, ``taught`` the same in the teacher, whose target is ``teacher_proj``'s output
    (plus its stream at ``place``, minus the student's, with the residual target); ``lead`` each batch's leading tokens
    left out. Per-batch products are taken in ``dtype`` (the solver's precision) and summed in float64."""
    k = len(cols)
    sums = _Sums(torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, d_out, dtype=torch.float64),
                 torch.zeros(k, dtype=torch.float64), torch.zeros(d_out, dtype=torch.float64), 0)
    for batch, (x_t, teacher_streams), (x, streams), skip in zip(batches, taught, reached, lead):
        pick = _tokens(batch, x, first, skip)
        y = teacher_proj(x_t)  # the call the teacher's forward makes next (its gates included)
        if place is not None:
            y = y + teacher_streams[place]
        x, y = x[pick].to(dtype)[:, cols], y[pick].float().to(dtype)
        if place is not None:
            y = y - streams[place][pick].to(dtype)
        if bias is not None:
            y = y - bias.to(dtype)
        sums.xx += (x.t() @ x).double()
        sums.xt += (x.t() @ y).double()
        sums.xs += x.sum(0).double()
        sums.ysum += y.double().sum(0)
        sums.n_tok += x.shape[0]
    return sums


def _refit(fit: Fit, sums: _Sums, w: Tensor, ridge: float) -> tuple[Tensor, Tensor | None]:
    """``(columns [Kc, d_out], bias change [d_out] or None)`` of a ``fit != "scales"`` refit from a sub-layer's
    :class:`_Sums` and the dense kept columns ``w``."""
    if fit == "bias":
        return w, (sums.ysum - sums.xs @ w) / max(sums.n_tok, 1)
    k = len(sums.xs)
    m = float(sums.xx.diagonal().mean()) if k else 0.0
    if m <= 0:
        return w, ((sums.ysum - sums.xs @ w) / max(sums.n_tok, 1) if fit == "columns_bias" else None)
    lhs = sums.xx + ridge * m * torch.eye(k, dtype=torch.float64)
    rhs = sums.xt + ridge * m * w
    if fit == "columns":
        return torch.linalg.solve(lhs, rhs), None
    sol = torch.linalg.solve(_with_intercept(lhs, sums.xs, sums.n_tok), torch.cat([rhs, sums.ysum[None]]))
    return sol[:k], sol[k]


def _write_refit(proj: nn.Module, cols: list[int], new: Tensor, beta: Tensor | None, fit: Fit,
                 originals: list[Callable[[], None]]) -> tuple[Tensor | None, Tensor | None]:
    """Write a refit into ``proj`` for the later sub-layers to see (each dense value's restore appended to
    ``originals``); returns ``(columns, new bias)`` in float32 for the spec, ``None`` where not fitted."""
    new_cols = new_bias = None
    if fit != "bias":
        view = weight_in_out(proj)
        index = torch.as_tensor(cols, device=view.device)
        old = view[index].detach().clone()
        originals.append(lambda v=view, i=index, o=old: v.__setitem__(i, o))
        view[index] = new.to(view.dtype).to(view.device)
        new_cols = new.float()
    if beta is not None:
        full = beta if proj.bias is None else proj.bias.detach().double() + beta
        originals.append(lambda m=proj, o=proj.bias: setattr(m, "bias", o))
        proj.bias = nn.Parameter(full.to(proj.weight.dtype).to(proj.weight.device), requires_grad=False)
        new_bias = full.float()
    return new_cols, new_bias


def _scales(sums: _Sums, w: Tensor, n_kept: int, width: int, kind: str, solver: Solver,
            damping: float) -> Tensor | None:
    """One scale per kept unit from a sub-layer's :class:`_Sums` (unit contributions ``c_i = W[:, cols_i] x``):
    ``A = Σ c cᵀ``, ``b = Σ c (y - b)``, solved for ``u = s - 1``; ``None`` where LSMR stops with code >= 3."""
    a = _block_sum((w @ w.t()) * sums.xx, width)  # [K, K]
    b = (w * sums.xt).sum(1).view(n_kept, width).sum(1)  # [K]
    if solver != "lsmr":
        return 1.0 + _damped_lstsq(a, b - a.sum(1), damping)
    intercept = None
    if kind == "heads":  # their attention fit has an all-ones column (a constant offset), dropped
        intercept = ((w.sum(1) * sums.xs).view(n_kept, width).sum(1), float(sums.ysum.sum()), sums.n_tok * w.shape[1])
    u, ok = _lsmr(a, b, damping, intercept)
    return 1.0 + u if ok else None


def _with_intercept(a: Tensor, c: Tensor, n: int) -> Tensor:
    """The normal matrix ``a [k, k]`` bordered by an all-ones column: ``[[a, c], [cᵀ, n]]`` (``c`` the column sums)."""
    k = a.shape[0]
    aug = torch.zeros(k + 1, k + 1, dtype=a.dtype)
    aug[:k, :k], aug[:k, k], aug[k, :k], aug[k, k] = a, c, c, float(n)
    return aug


def _damped_lstsq(a: Tensor, r: Tensor, damping: float) -> Tensor:
    """``argmin |A u - r|² + damping² |u|²`` through the stacked system (exact, well-conditioned for damping > 0)."""
    k = a.shape[0]
    if damping == 0:
        return torch.linalg.lstsq(a, r[:, None]).solution[:, 0]
    lhs = torch.cat([a, damping * torch.eye(k, dtype=a.dtype)])
    rhs = torch.cat([r, torch.zeros(k, dtype=a.dtype)])
    return torch.linalg.lstsq(lhs, rhs[:, None], driver="gels").solution[:, 0]


def _lsmr(a: Tensor, b: Tensor, damping: float, intercept=None) -> tuple[Tensor, bool]:
    """Their solver: ``u = s - 1`` from LSMR on the normal equations ``A s = b`` in float32 (``damp``, tolerances
    1e-6, condition limit 1e8, at most 5n iterations); one unknown is solved exactly, as in their code.
    ``intercept = (Σ c_i, Σ y, n_elements)`` adds their all-ones column (solved, then dropped). Returns ``(u, ok)``,
    ``ok`` false for LSMR's stop codes >= 3."""
    try:
        from scipy.sparse.linalg import lsmr
    except ImportError as e:  # pragma: no cover - scipy is a dependency
        raise ImportError("solver='lsmr' needs scipy (pip install scipy), or use solver='exact'") from e
    if intercept is not None:
        c, ysum, n = intercept
        a, b = _with_intercept(a, c, n), torch.cat([b, torch.tensor([ysum], dtype=b.dtype)])
    r = b - a.sum(1)
    if a.shape[0] == 1:
        u, ok = r / a[0, 0], True
    else:
        with warnings.catch_warnings():  # its float32 condition estimate may overflow: that is stop code 3 anyway
            warnings.simplefilter("ignore", RuntimeWarning)
            out = lsmr(a.float().numpy(), r.float().numpy(), damp=damping, atol=1e-6, btol=1e-6, conlim=1e8,
                       maxiter=5 * a.shape[0])
        u, ok = torch.from_numpy(out[0]).double(), int(out[1]) < 3
    return (u[:-1] if intercept is not None else u), ok


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


def _tokens(batch: dict, x: Tensor, first: bool, skip: int = 0) -> Tensor:
    """The token positions a sub-layer is fitted on: every real token, or the first token of each row; the first
    ``skip`` positions of each sequence left out (a shared prefix already fitted)."""
    if not first:
        pick = _real_tokens(batch, x)
    else:
        pick = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
        pick[:, 0] = True
    if skip:
        pick[..., :skip] = False
    return pick


def _teacher_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for the teacher's forwards: every parameter and buffer shared with ``model`` except those of
    the output / down projections that can be fitted (the student's refits are written into those)."""
    base, _ = find_base(model)
    arch = get_architecture(model)
    fitted = [base.get_submodule(b.out if kind == "heads" else b.down)
              for kind in UNIT_KINDS for b in arch.blocks(kind)]
    own = {id(t) for m in fitted for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
    memo = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in own}
    return copy.deepcopy(model, memo)


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
    """Write a tuned spec into the weights, in place: multiply each kept unit's input columns of its output / down
    projection by its scale, or replace them by the spec's refitted ``columns``, and set the refitted ``biases``
    (a projection without a bias gets one; its name goes to the returned spec's ``meta["added_biases"]``, which
    :func:`taskprune.export.load_pruned` reads).

    Apply to the dense model before :func:`~taskprune.surgery.shrink_` (or to a model already shrunk by ``spec``);
    returns the spec without scales, columns or biases. Folding then shrinking equals running the dense model masked
    with scales (or with the refitted columns and biases written). Every shape is checked before any weight changes.
    """
    state = spec.validate(model)
    base, _ = find_base(model)
    arch = get_architecture(model)
    writes = []
    for kind in UNIT_KINDS:
        scales, columns, biases = spec.scales.get(kind, {}), spec.columns.get(kind, {}), spec.biases.get(kind, {})
        for block in arch.blocks(kind):
            if block.name not in scales and block.name not in columns and block.name not in biases:
                continue
            kept = spec.kept(kind, block.name)
            units = kept if state == "dense" else list(range(len(kept)))
            cols = unit_channels(units, block.unit_width)
            path = block.out if kind == "heads" else block.down
            proj = base.get_submodule(path)
            w = weight_in_out(proj)  # a view [in, out] of the weight
            new, bias = columns.get(block.name), biases.get(block.name)
            if new is not None and tuple(new.shape) != (len(cols), w.shape[1]):
                raise ValueError(f"columns[{kind!r}][{block.name!r}] has shape {list(new.shape)}, but the block's "
                                 f"kept input columns are [{len(cols)}, {w.shape[1]}]; refit the spec for this model")
            if bias is not None and tuple(bias.shape) != (w.shape[1],):
                raise ValueError(f"biases[{kind!r}][{block.name!r}] has shape {list(bias.shape)}, but the block's "
                                 f"projection has {w.shape[1]} outputs; refit the spec for this model")
            writes.append((path, proj, w, cols, new, bias, scales.get(block.name), block.unit_width))
    added = list(spec.meta.get("added_biases", []))
    with torch.no_grad():
        for path, proj, w, cols, new, bias, scale, width in writes:
            if new is not None:
                w[cols] = new.to(w.dtype).to(w.device)
            elif scale is not None:
                s = torch.tensor(scale, dtype=torch.float64)
                w[cols] *= s.repeat_interleave(width).to(w.dtype).to(w.device)[:, None]
            if bias is None:
                continue
            if getattr(proj, "bias", None) is None:
                proj.bias = nn.Parameter(bias.to(w.dtype).to(w.device), requires_grad=proj.weight.requires_grad)
                added.append(path)
            else:
                proj.bias.copy_(bias.to(proj.bias.dtype))
    meta = {**spec.meta, "scales_folded": True, **({"added_biases": sorted(set(added))} if added else {})}
    return replace(spec, scales={}, columns={}, biases={}, meta=meta)
