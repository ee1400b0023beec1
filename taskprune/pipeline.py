"""The pipeline: **score → allocate → rearrange → tune**, composed here and nowhere else.

A :class:`Pipeline` is three configs — :class:`~taskprune.attribution.AttributionConfig` (score),
:class:`~taskprune.selection.Budget` (allocate: scope, mask search, heads / neurons split) and
:class:`~taskprune.tuning.TuningConfig` (rearrange, tune) — and :meth:`Pipeline.prune` runs them on a model and
calibration batches, returning a :class:`~taskprune.spec.PruneSpec` (kept units, and tuned scales or refitted columns).
The Lightning callback, the CLI, the benchmarks and the examples all call it; applying the spec
(:func:`taskprune.surgery.shrink_` after :func:`taskprune.tuning.fold_scales_`) is the one step left to the caller.

Peers and baselines are presets of the same configs (:data:`PRESETS`), not code of their own::

    spec = Pipeline().at(0.4).prune(model, batches)                     # taskprune's default, 40 % of the MACs
    spec = Pipeline.preset("kwon").at(0.4).prune(model, batches)        # Kwon et al. 2022's pipeline

In YAML: ``pruning: {preset: kwon}`` (the callback's ``preset``), with ``budget`` / ``attribution`` / ``tuning``
fields on top.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from taskprune.arch import UNIT_KINDS, get_architecture
from taskprune.attribution import AttributionConfig, default_forward, pseudo_labels, score_units
from taskprune.selection import Budget, achieved_cut, select_units
from taskprune.spec import PruneSpec
from taskprune.surgery import shrink_
from taskprune.tuning import TuningConfig, batch_gradients, rearrange, teacher_keep, tune_masks
from taskprune.unitscores import UnitScores

log = logging.getLogger(__name__)

#: The library's default tuning: K-prune's weight tuning, the kept units' input columns of every output / down
#: projection refitted (ridge 0.1) to the dense model's pre-LayerNorm sum. Chosen on the selection reserve over no
#: tuning and over Kwon et al.'s scale tuning (docs/defaults.md, issue #21).
DEFAULT_TUNING = TuningConfig(tune="dense", target="residual", fit="columns")

#: name -> (attribution, budget fields besides the amount, tuning). ``taskprune`` is the library's default.
PRESETS: dict[str, tuple[AttributionConfig, dict, TuningConfig]] = {
    # squared IG from a half-on baseline, Kwon's mask search split by total score, the column refit (docs/defaults.md)
    "taskprune": (AttributionConfig(), {}, DEFAULT_TUNING),
    # the same without tuning (the default before 0.2; the spec is masks only: what a MaskBank holds)
    "taskprune_notune": (AttributionConfig(), {}, TuningConfig()),
    # no tuning, the heads / neurons split chosen by the task loss on held-out rows (opt-in: docs/defaults.md)
    "taskprune_holdout": (AttributionConfig(), {"split": "loss"}, TuningConfig()),
    # the default's selection followed by Kwon et al.'s faithful mask tuning instead of the refit (measured against
    # the refit on the selection reserve: docs/defaults.md)
    "taskprune_tuned": (AttributionConfig(), {}, TuningConfig(tune="schedule", target="residual", solver="lsmr",
                                                             skip_first_attention=True)),
    # Kwon et al. 2022: Fisher of the masks (per batch), mask search, rearrangement, tuning against their teacher
    # (their code: no head floor, MACs at the task's mean length, tuning of the pre-LayerNorm sum with LSMR, layer-0
    # attention untuned; the project's heads pool every token, so the last FFN is fitted on all of them)
    "kwon": (AttributionConfig(method="fisher", per="batch"), {"scope": "search", "min_heads": 0, "seq_len": "mean"},
             TuningConfig(rearrange=True, tune="schedule", target="residual", solver="lsmr", skip_first_attention=True)),
    "kwon_notune": (AttributionConfig(method="fisher", per="batch"),
                    {"scope": "search", "min_heads": 0, "seq_len": "mean"}, TuningConfig(rearrange=True)),
    # the paper's IG (all-off path, |attribution|), and the usual baselines, each kind cut in proportion
    "ig_paper": (AttributionConfig(baseline=0.0, aggregate="abs"), {"scope": "per_kind"}, TuningConfig()),
    "grad_x_gate": (AttributionConfig(method="grad_x_gate", aggregate="abs"), {"scope": "per_kind"}, TuningConfig()),
    "fisher": (AttributionConfig(method="fisher"), {"scope": "per_kind"}, TuningConfig()),
    "activation": (AttributionConfig(method="activation"), {"scope": "per_kind"}, TuningConfig()),
    "magnitude": (AttributionConfig(method="magnitude"), {"scope": "per_kind"}, TuningConfig()),
    "random": (AttributionConfig(method="random"), {"scope": "per_kind"}, TuningConfig()),
}


@dataclass(frozen=True)
class Pipeline:
    """Score → allocate → rearrange → tune: one object for Python, the callback and the benchmarks."""

    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    """How units are scored (and which kinds: ``attribution.units``)."""
    budget: Budget = field(default_factory=Budget)
    """What to remove and how units are allocated (scope, the mask search and its heads / neurons split)."""
    tuning: TuningConfig = DEFAULT_TUNING
    """The stages after allocation: rearrangement and tuning (default: :data:`DEFAULT_TUNING`, the column refit;
    ``TuningConfig()`` turns them off)."""
    name: str = "custom"
    """The preset it came from (recorded in ``spec.meta["pipeline"]``)."""
    steps: int = 1
    """Iterative pruning: remove the budget in this many equal steps, re-scoring before each the model as the earlier
    steps shrank it (1: score once). MAC and parameter budgets; one shrunk copy of the model is held meanwhile."""

    def __post_init__(self) -> None:
        for attr, cls in (("attribution", AttributionConfig), ("budget", Budget), ("tuning", TuningConfig)):
            if not isinstance(getattr(self, attr), cls):
                raise TypeError(f"{attr} must be a {cls.__module__}.{cls.__name__}, got {getattr(self, attr)!r}")
        if self.tuning.tune == "schedule" and self.budget.kind != "macs":
            raise ValueError(f"tune='schedule' picks its teacher at sqrt of the kept MAC fraction and needs a MAC "
                             f"budget, got kind={self.budget.kind!r}; use tune='dense' or kind='macs'")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r} must be a positive integer (1: score once)")
        if self.steps > 1 and self.budget.kind not in ("macs", "params"):
            raise ValueError(f"steps={self.steps} splits a MAC or parameter budget into equal steps, got "
                             f"kind={self.budget.kind!r}; use kind='macs' or 'params', or steps=1")
        if self.steps > 1 and self.tuning.tune == "schedule":
            raise ValueError("tune='schedule' selects its teacher from the dense model's scores, which steps > 1 does "
                             "not keep; use tune='dense' (or the default tuning), or steps=1")

    @classmethod
    def preset(cls, name: str) -> Pipeline:
        """A named pipeline of :data:`PRESETS` (``"taskprune"``, ``"kwon"``, baselines), at the default amount."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; allowed: {list(PRESETS)}")
        attribution, budget, tuning = PRESETS[name]
        return cls(attribution, Budget(**budget), tuning, name)

    def at(self, amount: float, **budget) -> Pipeline:
        """The same pipeline with another budget amount (and any other :class:`Budget` field)."""
        return replace(self, budget=replace(self.budget, amount=amount, **budget))

    def resolve(self, batches: Sequence[dict]) -> Pipeline:
        """The pipeline with ``budget.seq_len="mean"`` replaced by the batches' mean number of real tokens
        (``attention_mask`` sums; rounded); any other pipeline as it is."""
        if self.budget.seq_len != "mean":
            return self
        lengths = [b["attention_mask"].sum(-1).double() for b in batches if "attention_mask" in b]
        if not lengths:
            raise ValueError("seq_len='mean' needs calibration batches with an attention_mask; give a number")
        mean = float(torch.cat(lengths).mean())
        log.info("counting MACs at the calibration batches' mean length %.1f -> %d tokens", mean, round(mean))
        return self.at(self.budget.amount, seq_len=max(1, round(mean)))

    def score(self, model: nn.Module, batches: Sequence[dict], forward: Callable | None = None) -> UnitScores:
        """Stage 1: score every unit on the calibration batches (:func:`taskprune.attribution.score_units`). A model
        that caches what its weights compute (a ``refresh()`` method: a prompted LM's prefix KV cache and calibration
        bias) rebuilds it first: shrinking replaced its weights, a column refit wrote and restored some."""
        if callable(getattr(model, "refresh", None)):
            model.refresh()
        return score_units(model, batches, self.attribution, forward=forward)

    def allocate(self, model: nn.Module, scores: UnitScores, held_out: Sequence[dict] | None = None,
                 forward: Callable | None = None, amount: float | None = None) -> PruneSpec:
        """Stage 2: the units kept under the budget (:func:`taskprune.selection.select_units`; held-out rows choose
        the heads / neurons split of the mask search when ``budget.split`` says so)."""
        budget = self.budget if amount is None else replace(self.budget, amount=amount)
        return select_units(scores, budget, units=self.attribution.units, model=model, held_out=held_out,
                            target=self.attribution.target, forward=forward)

    def prune(self, model: nn.Module, batches: Sequence[dict], held_out: Sequence[dict] | None = None,
              forward: Callable | None = None, scores: UnitScores | None = None) -> PruneSpec:
        """Run every stage on the dense ``model``; return the spec (with tuned scales or refitted columns).

        Args:
            model: the dense model (a transformers model or a module holding one); its weights are not changed.
            batches: calibration batches (dicts of tensors, ``labels`` as the target needs); scored, and read again
                by rearrangement and tuning.
            held_out: batches of rows not among ``batches``, for the heads / neurons split by loss (``budget.split``).
            forward: ``fn(model, batch) -> outputs`` (default: ``model(**inputs)``).
            scores: scores already computed with this pipeline's attribution (skips stage 1), e.g. to prune one
                scoring at several amounts.
        """
        forward = forward or default_forward
        batches = list(batches)
        pipeline = self.resolve(batches)
        if pipeline.steps > 1 and pipeline.budget.amount > 0:
            spec = pipeline._iterate(model, batches, held_out, forward, scores)
        else:
            if scores is None:
                scores = pipeline.score(model, batches, forward)
            spec = pipeline.allocate(model, scores, held_out, forward)
        return pipeline.finish(model, spec, scores, batches, held_out, forward)

    def _iterate(self, model: nn.Module, batches: list[dict], held_out, forward: Callable,
                 scores: UnitScores | None) -> PruneSpec:
        """``steps`` > 1: step i removes what brings the cut to i / steps of the budget from the model as the earlier
        steps shrank it, scored afresh (step 1 may take the dense model's ``scores``); the spec of the dense model."""
        fp = get_architecture(model).fingerprint()
        kind, seq_len = self.budget.kind, self.budget.seq_len
        keep = {k: {n: list(range(c)) for n, c in fp[k].items()} for k in UNIT_KINDS}
        current, step = model, None
        for i in range(1, self.steps + 1):
            done = achieved_cut(fp, _dropped(fp, keep), seq_len)[0][kind]
            amount = 1.0 - (1.0 - self.budget.amount * i / self.steps) / (1.0 - done)
            if amount <= 0:  # an earlier step's rounding already went this far
                continue
            if i > 1 or scores is None:
                scores = self.score(current, batches, forward)
            step = self.allocate(current, scores, held_out, forward, amount=amount)
            keep = {k: {n: [ids[j] for j in step.keep.get(k, {}).get(n, range(len(ids)))] for n, ids in blocks.items()}
                    for k, blocks in keep.items()}
            log.info("iterative pruning, step %d / %d: %.1f%% of the %s cut", i, self.steps,
                     100 * achieved_cut(fp, _dropped(fp, keep), seq_len)[0][kind], kind)
            if i < self.steps:
                current = shrink_(copy.deepcopy(current), step)
        achieved, removed = achieved_cut(fp, _dropped(fp, keep), seq_len)
        budget = {**step.budget, "request": self.budget.request, "steps": self.steps, "achieved": achieved,
                  "removed": removed}
        return PruneSpec(keep=keep, fingerprint=fp, method=step.method, budget=budget, meta=step.meta)

    def finish(self, model: nn.Module, spec: PruneSpec, scores: UnitScores, batches: Sequence[dict],
               held_out: Sequence[dict] | None = None, forward: Callable | None = None) -> PruneSpec:
        """Stages 3-4 on an allocated ``spec``: rearrange, then tune (scales in the returned spec)."""
        forward = forward or default_forward
        meta = {"pipeline": self.name, "attribution": self.attribution.to_dict(), "tuning": self.tuning.to_dict()}
        if not self.tuning.active:
            return replace(spec, meta={**spec.meta, **meta})
        target = self.attribution.target
        if target == "pseudo":  # rearrangement and tuning read labels: the dense model's predictions
            batches, target = [pseudo_labels(model, b, forward) for b in batches], "label"
        if self.tuning.rearrange:
            grads, _ = batch_gradients(model, batches, target, self.attribution.units, forward)
            spec = rearrange(spec, grads)
        if self.tuning.tune != "none":
            teacher = None
            if self.tuning.tune == "schedule":
                amount = 1.0 - teacher_keep(1.0 - float(self.budget.amount))
                teacher = self.allocate(model, scores, held_out, forward, amount=amount)
            t = self.tuning
            spec = tune_masks(model, spec, batches, teacher, t.damping, t.max_scale, forward, t.target, t.solver,
                              t.skip_first_attention, t.last_ffn_tokens, t.fit, t.ridge, t.shared_prefix)
        log.info("pipeline %s: %s", self.name, spec.summary())
        return replace(spec, meta={**spec.meta, **meta})

    def to_dict(self) -> dict:
        return {"name": self.name, "attribution": self.attribution.to_dict(), "budget": self.budget.to_dict(),
                "tuning": self.tuning.to_dict(), "steps": self.steps}


def _dropped(fp: dict, keep: dict) -> dict:
    """``{kind: {block: removed unit indices}}`` of the dense model of ``fp`` under ``keep``."""
    return {k: {n: sorted(set(range(c)) - set(keep[k][n])) for n, c in fp[k].items()} for k in UNIT_KINDS}


def prune(model: nn.Module, batches: Sequence[dict], pipeline: Pipeline | str = "taskprune",
          amount: float | None = None, held_out: Sequence[dict] | None = None,
          forward: Callable | None = None) -> PruneSpec:
    """Prune ``model`` for the task of ``batches`` with a pipeline (a preset name or a :class:`Pipeline`), at
    ``amount`` when given (else the pipeline's own budget amount); returns the spec."""
    pipeline = Pipeline.preset(pipeline) if isinstance(pipeline, str) else pipeline
    if amount is not None:
        pipeline = pipeline.at(amount)
    return pipeline.prune(model, batches, held_out, forward)
