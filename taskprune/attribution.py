"""Unit scoring methods behind one interface, usable from a plain PyTorch loop.

``ig`` is the paper's method: integrated gradients of a target function with respect to the gates of all units of all
layers at once, along the straight path from all gates at 0 to all gates at 1::

    IG_i(x) = ∫_0^1 ∂F(x; α·1)/∂g_i dα  ≈  Σ_j w_j ∂F(x; α_j·1)/∂g_i

so that ``Σ_i IG_i(x) ≈ F(x; 1) − F(x; 0)`` (completeness). ``baseline=b`` starts the path at all gates = ``b``
instead of 0 (``IG_i = (1 − b) ∫_0^1 ∂F(x; (b + α(1 − b))·1)/∂g_i dα``, completeness against ``F(x; b)``): the
path then stays among networks that still work, at the price of attributing only the last part of the gap. The default
is ``baseline=0.5``: on the selection splits of six GLUE tasks it kept 92.4 / 86.6 % of the dense metric at 40 / 60 %
MAC cuts against 91.4 / 85.3 % for the all-off path (``benchmarks/results/archive/quality_demo_model.md``); ``baseline=0`` is the paper's
path. Every sample gets its own row of gates, so one backward
pass gives per-sample attributions of every unit, and ``m`` quadrature nodes cost ``m`` forward+backward passes per
batch whatever the number of layers. ``alpha_batch`` nodes share one forward (the batch is repeated), trading memory
for fewer, larger passes. Parameters never get gradients: they are frozen for the duration of the call.

Baselines with the same interface: ``grad_x_gate`` (first-order Taylor, one step at α = 1), ``fisher`` (Σ of squared
gradients at α = 1, per sample; with ``per="batch"`` of the batch-mean gradient, Kwon et al. 2022's Fisher of the
masks), ``activation`` (mean |input| of the unit's channels into the
output projection over real tokens), ``magnitude`` (weight norms, data-free) and ``random`` (seeded, data-free).

Scores are running sums over samples plus the number of samples (:class:`~taskprune.unitscores.UnitScores`), so batches
and processes add up. Higher means more important.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from taskprune.arch import find_base, in_features, weight_in_out
from taskprune.calibration import NON_INPUT_KEYS, calibrate, check_label_range
from taskprune.gates import Gates, check_units
from taskprune.unitscores import UnitScores

log = logging.getLogger(__name__)

# every option is a Literal written once here; the tuples of allowed values derive from it
Method = Literal["ig", "grad_x_gate", "fisher", "activation", "magnitude", "random"]
Target = Literal["label", "pseudo", "neg_loss"]
Quadrature = Literal["riemann_left", "riemann_right", "riemann_middle", "trapezoid", "gauss_legendre"]
Aggregate = Literal["abs", "signed", "square"]
Per = Literal["sample", "batch"]
Units = Literal["all", "heads", "neurons"]
METHODS: tuple[str, ...] = get_args(Method)
TARGETS: tuple[str, ...] = get_args(Target)
QUADRATURES: tuple[str, ...] = get_args(Quadrature)
AGGREGATIONS: tuple[str, ...] = get_args(Aggregate)
PERS: tuple[str, ...] = get_args(Per)
DATA_FREE = ("magnitude", "random")
AGGREGATED = ("ig", "grad_x_gate", "fisher")  # methods whose signed attributions go through ``aggregate`` / ``per``
DEFAULT_BASELINE = 0.5  # where the IG path starts (gate value); chosen by measurement, see the module docstring
#: option -> the methods it applies to; with any other method a value other than its default is refused
METHOD_OPTIONS = {
    "steps": ("ig",), "quadrature": ("ig",), "baseline": ("ig",), "alpha_batch": ("ig",),
    "aggregate": ("ig", "grad_x_gate"), "per": ("ig", "grad_x_gate", "fisher"), "seed": ("random",),
}

PSEUDO_REGRESSION = (
    "target='pseudo' on a regression head (1 output): its pseudo-label is its own output, so the squared error it "
    "explains is 0 along the whole path, every attribution is ~0 and the units would be chosen from noise. Use "
    "target='label' with the split's scores (--model.attribution.target label), or a method that reads no labels "
    "(magnitude)"
)
TargetFn = Callable[[object, dict], Tensor]  # (model outputs, batch) -> per-sample scalar [batch]


def _choice(name: str, value, allowed: tuple[str, ...], hint: str = "") -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {list(allowed)}{hint}")


def _positive_int(name: str, value, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}{hint}")


@dataclass(frozen=True)
class AttributionConfig:
    """How units are scored: one object for :class:`Attributor`, the Lightning module and the callback."""

    method: Method = "ig"
    """Scoring method: ig (integrated gradients over the unit gates), grad_x_gate, fisher, activation, magnitude
    (data-free), random (data-free, seeded)."""
    target: Target = "label"
    """What the attribution explains: label (log-probability of the gold label), pseudo (of the dense model's own
    prediction: unsupervised), neg_loss (the negative per-sample loss). From Python also a callable
    (outputs, batch) -> [batch]."""
    units: Units = "all"
    """Unit kinds scored and pruned: all, heads or neurons."""
    steps: int = 4
    """IG quadrature nodes (ig only; default 4): m nodes cost m forward+backward passes per batch."""
    quadrature: Quadrature = "riemann_middle"
    """IG quadrature rule (ig only; default riemann_middle)."""
    baseline: float = DEFAULT_BASELINE
    """Gate value where the IG path starts, in [0, 1) (ig only): 0.5 by measurement (the default); 0 is the paper's
    all-off path."""
    alpha_batch: int = 1
    """IG nodes that share one forward pass (ig only; default 1; the batch is repeated): memory grows with
    alpha_batch x batch size."""
    aggregate: Aggregate = "square"
    """Mean over samples of the squared attribution (square: on a Fisher score's scale, so heads and neurons compare
    in the model-wide mask search that Budget(scope='auto') then runs; chosen on the selection splits), of
    |attribution| (abs) or of the signed attribution (signed); ig and grad_x_gate only (default square; fisher always
    squares)."""
    per: Per = "sample"
    """What ``aggregate`` is applied to (ig, grad_x_gate, fisher): each sample's attribution (sample) or each
    calibration batch's mean attribution (batch, weighted by the batch's size). fisher with per=batch is Kwon et al.'s
    Fisher of the masks (squared gradients of the batch-mean loss, summed over batches). Default sample."""
    seed: int = 0
    """Seed of the random method (random only; default 0)."""

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        for name, methods in METHOD_OPTIONS.items():  # a value the method would not use is refused
            value, default = getattr(self, name), self.__dataclass_fields__[name].default
            if self.method not in methods and value != default:
                raise ValueError(f"{name}={value!r} has no effect with method={self.method!r}: it applies to "
                                 f"{list(methods)} only; leave it at its default ({default!r})")
        if not callable(self.target):
            _choice("target", self.target, TARGETS, " or a callable (outputs, batch) -> [B]")
        check_units(self.units)
        _choice("aggregate", self.aggregate, AGGREGATIONS)
        _choice("per", self.per, PERS)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.method != "ig":
            return
        _choice("quadrature", self.quadrature, QUADRATURES)
        _positive_int("steps", self.steps)
        if self.quadrature == "trapezoid" and self.steps < 2:
            raise ValueError("the trapezoid rule needs steps >= 2 (nodes at 0 and 1); use riemann_right for 1 step")
        _positive_int("alpha_batch", self.alpha_batch)
        if isinstance(self.baseline, bool) or not isinstance(self.baseline, (int, float)) \
                or not 0.0 <= self.baseline < 1.0:
            raise ValueError(f"baseline={self.baseline!r}: the gate value where the IG path starts must be in [0, 1) "
                             "(0 = all units off, the paper's baseline; 0.5 = a path from half-on gates)")

    @property
    def data_free(self) -> bool:
        """Whether the method reads no data (``magnitude``, ``random``)."""
        return self.method in DATA_FREE

    @property
    def target_name(self) -> str:
        return self.target if isinstance(self.target, str) else getattr(self.target, "__name__", "custom")

    def to_dict(self) -> dict:
        """Plain fields (a callable target by its name): for hyperparameters, checkpoints and YAML."""
        return {**asdict(self), "target": self.target_name,
                "units": self.units if isinstance(self.units, str) else list(self.units)}

    @classmethod
    def of(cls, value: AttributionConfig | dict | None) -> AttributionConfig:
        """``value`` as a config: a config, a dict of its fields (e.g. checkpoint hyperparameters) or ``None``."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown attribution option(s) {unknown}; allowed: {list(cls.__dataclass_fields__)}")
            return cls(**value)
        raise TypeError(f"attribution must be an AttributionConfig or a dict of its fields, got {type(value).__name__}")


def quadrature(kind: str, steps: int) -> tuple[Tensor, Tensor]:
    """Nodes ``α_j`` and weights ``w_j`` on [0, 1] (``[steps]`` each, float64, weights summing to 1)."""
    if kind not in QUADRATURES:
        raise ValueError(f"unknown quadrature {kind!r}; allowed: {list(QUADRATURES)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    m = steps
    if kind == "riemann_left":
        return torch.arange(m, dtype=torch.float64) / m, torch.full((m,), 1.0 / m, dtype=torch.float64)
    if kind == "riemann_right":
        return torch.arange(1, m + 1, dtype=torch.float64) / m, torch.full((m,), 1.0 / m, dtype=torch.float64)
    if kind == "riemann_middle":
        return (torch.arange(m, dtype=torch.float64) + 0.5) / m, torch.full((m,), 1.0 / m, dtype=torch.float64)
    if kind == "trapezoid":
        if m < 2:
            raise ValueError("the trapezoid rule needs steps >= 2 (nodes at 0 and 1); use riemann_right for 1 step")
        w = torch.full((m,), 1.0 / (m - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (m - 1)
        return torch.linspace(0, 1, m, dtype=torch.float64), w
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(m)
    return torch.tensor((x + 1) / 2, dtype=torch.float64), torch.tensor(w / 2, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- targets
def _sequence_logprob(logits: Tensor, labels: Tensor, shift: bool) -> tuple[Tensor, Tensor]:
    """Per-sample sum of log p(label token) over positions whose label is not -100, and the token count."""
    if shift:  # causal LM: position t predicts token t+1
        logits, labels = logits[:, :-1], labels[:, 1:]
    valid = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * valid).sum(-1), valid.sum(-1)


def make_target(target: str | TargetFn, model: nn.Module) -> TargetFn:
    """Resolve a target name into ``fn(outputs, batch) -> [batch]``.

    - ``"label"``: log-probability of the gold label (``batch["labels"]``); for ``[batch, seq]`` labels (seq2seq or
      causal LM, -100 = ignore) the summed log-probability of the gold target tokens; for a regression head
      (one output, float labels) the negative squared error.
    - ``"pseudo"``: the same with the dense model's own prediction as the label (unsupervised; labels never read).
      :func:`score_units` fills ``batch["labels"]`` with the prediction before attributing.
    - ``"neg_loss"``: the negative per-sample loss (cross-entropy, mean over target tokens for sequences).
    - a callable ``fn(outputs, batch) -> [batch]`` for anything else (prompted classifiers, label words...).
    """
    if callable(target):
        return target
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; allowed: {list(TARGETS)} or a callable (outputs, batch) -> [B]")
    shift = not getattr(getattr(find_base(model)[0], "config", None), "is_encoder_decoder", False)
    mean = target == "neg_loss"

    def fn(outputs, batch: dict) -> Tensor:
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        labels = batch.get("labels")
        if labels is None:
            raise ValueError(
                f"target {target!r} needs batch['labels']; use target='pseudo' for unlabelled data"
            )
        labels = labels.to(logits.device)
        if labels.dim() == 2:  # sequence targets
            check_label_range(labels, logits.shape[-1])
            total, n = _sequence_logprob(logits, labels, shift and logits.shape[1] == labels.shape[1])
            return total / n.clamp(min=1) if mean else total
        if logits.shape[-1] == 1 and labels.is_floating_point():  # regression
            return -(logits.squeeze(-1).float() - labels.float()) ** 2
        if logits.shape[-1] == 1:
            raise ValueError(
                f"target {target!r}: the head has 1 output (a regression head) but the labels are integers "
                f"({labels.dtype}, e.g. {labels.reshape(-1)[:4].tolist()}): the log-probability of a single output is "
                "always 0, so every attribution would be 0. For a regression task give float scores (problem_type: "
                "regression); for classification load a head with one output per class"
            )
        check_label_range(labels, logits.shape[-1])
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)

    return fn


def model_inputs(batch: dict, model: nn.Module) -> dict:
    """The model's keyword arguments: the batch less labels and bookkeeping keys (decoder inputs built from labels)."""
    inputs = {k: v for k, v in batch.items() if k not in NON_INPUT_KEYS}
    labels = batch.get("labels")
    cfg = getattr(find_base(model)[0], "config", None)
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" not in inputs and labels is not None:
        hf = model if hasattr(model, "prepare_decoder_input_ids_from_labels") else None
        if hf is None:
            raise ValueError("an encoder-decoder batch needs decoder_input_ids (or a model that builds them)")
        inputs["decoder_input_ids"] = hf.prepare_decoder_input_ids_from_labels(labels=labels)
    return inputs


@torch.no_grad()
def pseudo_labels(model: nn.Module, batch: dict, forward: Callable | None = None) -> dict:
    """``batch`` with ``labels`` replaced by the model's own predictions (the ``"pseudo"`` target; the one place that
    makes them): argmax for classifiers, the output for a 1-output regression head, the teacher-forced argmax at the
    positions the gold labels mark for sequence models. Gates in the model are applied as set (set none for the dense
    prediction)."""
    out = (forward or default_forward)(model, {k: v for k, v in batch.items() if k != "labels"})
    logits = out.logits if hasattr(out, "logits") else out
    if logits.dim() == 3:
        pred = logits.argmax(-1)
        gold = batch.get("labels")
        if gold is not None and gold.shape == pred.shape:
            pred = pred.masked_fill(gold == -100, -100)
        labels = pred
    elif logits.shape[-1] == 1:
        labels = logits.squeeze(-1).detach().float()
    else:
        labels = logits.argmax(-1)
    return {**batch, "labels": labels}


def default_forward(model: nn.Module, batch: dict):
    return model(**model_inputs(batch, model))


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Eval mode and no parameter gradients for the duration; restores both afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _batch_size(batch: dict) -> int:
    for v in batch.values():
        if isinstance(v, Tensor) and v.dim() >= 1:
            return v.shape[0]
    raise ValueError("a batch must hold at least one tensor with a batch dimension (e.g. input_ids)")


def _repeat(batch: dict, k: int, n: int) -> dict:
    """Repeat every per-sample tensor of the batch ``k`` times along dim 0 (rows: node-major)."""
    if k == 1:
        return batch
    return {key: v.repeat(k, *([1] * (v.dim() - 1))) if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == n
            else v for key, v in batch.items()}


class Attributor:
    """Scores units of one model with one method; call :meth:`batch_sums` per batch, or use :func:`score_units`.

    ``Attributor(model, AttributionConfig(steps=8))``, or the shorthand ``Attributor(model, "ig", steps=8)`` (a
    method name and :class:`AttributionConfig`'s other fields as keywords). ``forward``: ``fn(model, batch) ->
    outputs``; default calls ``model(**inputs)``. ``model`` is a transformers model or a module that contains one
    (e.g. a multi-task wrapper).
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method | AttributionConfig = "ig",
        target: str | TargetFn = "label",
        units: str | Sequence[str] = "all",
        *,
        forward: Callable | None = None,
        **options,
    ) -> None:
        if isinstance(method, AttributionConfig):
            if options or target != "label" or units != "all":
                raise ValueError("pass either an AttributionConfig or a method name and options, not both")
            config = method
        else:
            config = AttributionConfig(method, target, units, **options)
        self.config = config
        self.model = model
        self.method = config.method
        self.units = check_units(config.units)
        self.gates = Gates(model, self.units)
        self.target_name = config.target_name
        self.target = make_target(config.target, model)
        self.forward = forward or default_forward
        self.nodes = self.weights = None
        if config.method == "ig":
            b = config.baseline
            nodes, weights = quadrature(config.quadrature, config.steps)
            # the path b -> 1: nodes b + α(1 - b), weights scaled by the length 1 - b
            self.nodes, self.weights = (b + nodes * (1 - b), weights * (1 - b)) if b else (nodes, weights)
        self.alpha_batch = min(config.alpha_batch, config.steps) if config.method == "ig" else 1
        self.aggregate = config.aggregate
        self.seed = config.seed
        self.options = {
            "target": self.target_name, "units": list(self.units),
            **({"seed": config.seed} if config.method == "random" else {}),
            **({"aggregate": config.aggregate} if config.method in METHOD_OPTIONS["aggregate"] else {}),
            **({"per": config.per} if config.per != "sample" else {}),
            **({"steps": config.steps, "quadrature": config.quadrature, "alpha_batch": self.alpha_batch,
                "baseline": float(config.baseline)} if config.method == "ig" else {}),
        }

    @property
    def data_free(self) -> bool:
        return self.config.data_free

    def empty(self) -> UnitScores:
        fp = self.gates.arch.fingerprint()
        return UnitScores(self.gates.split(torch.zeros(self.gates.n_units, dtype=torch.float64)), 0, self.method, fp,
                          dict(self.options))

    def to_scores(self, flat: Tensor, count: int) -> UnitScores:
        s = self.empty()
        s.sums = {k: {n: v.clone() for n, v in blocks.items()} for k, blocks in self.gates.split(flat.double()).items()}
        s.count = count
        return s

    def result(self, sums: Tensor | None = None, count: float = 0.0) -> UnitScores:
        """Scores from calibration sums (``[n_units]``, summed over processes) and their sample weight; a data-free
        method ignores both and computes its scores here (count 0)."""
        if self.data_free:
            return self.to_scores(self.data_free_sums(), 0)
        return self.to_scores(sums, int(round(float(count))))

    # ------------------------------------------------------------------ data-free
    def data_free_sums(self) -> Tensor:
        """``[n_units]`` float64 scores that need no data."""
        if self.method == "random":
            g = torch.Generator().manual_seed(self.seed)
            return torch.rand(self.gates.n_units, generator=g, dtype=torch.float64)
        out = torch.zeros(self.gates.n_units, dtype=torch.float64)
        base = self.gates.base
        for s in self.gates.slots:
            if s.kind == "heads":
                w = weight_in_out(base.get_submodule(s.block.out))  # [in, out]
                norms = w.reshape(s.n_units, s.block.unit_width, -1).double().pow(2).sum((1, 2)).sqrt()
            else:
                down = weight_in_out(base.get_submodule(s.block.down)).double()  # [n_neurons, d]
                norms = down.norm(dim=1)
                for up in s.block.up:
                    norms = norms * weight_in_out(base.get_submodule(up)).double().t().norm(dim=1)
            out[s.offset : s.stop] = norms
        return out

    # ------------------------------------------------------------------ per batch
    def batch_sums(self, batch: dict) -> tuple[Tensor, float]:
        """Attribution summed over the batch's samples: ``([n_units] float64, weight of real samples)``.

        ``batch["sample_weight"]`` (optional, ``[batch]``) weights samples; 0 drops one (e.g. DDP padding).
        """
        n = _batch_size(batch)
        if n == 0:
            raise ValueError("empty batch: a calibration batch needs at least one sample")
        weight = batch.get("sample_weight")
        weight = torch.ones(n, dtype=torch.float64) if weight is None else weight.detach().double().cpu()
        if self.data_free:
            return torch.zeros(self.gates.n_units, dtype=torch.float64), float(weight.sum())
        with frozen(self.model), self.gates:
            if self.target_name == "pseudo":
                batch = self._with_pseudo_labels(batch)
            per_sample = getattr(self, f"_{self.method}")(batch, n)  # [n, n_units]
        per_sample = per_sample.detach().double().cpu()
        if not torch.isfinite(per_sample).all():
            raise ValueError(
                f"non-finite attributions (NaN/Inf) from method {self.method!r}: the model probably overflowed in "
                "half precision; run attribution in float32, or use fewer IG steps / a smaller alpha_batch"
            )
        if self.method not in AGGREGATED:  # activation: already a per-sample score
            return (weight[:, None] * per_sample).sum(0), float(weight.sum())
        total = float(weight.sum())
        if self.config.per == "batch":
            mean = (weight[:, None] * per_sample).sum(0) / max(total, 1e-12)
            return total * self._agg(mean), total
        return (weight[:, None] * self._agg(per_sample)).sum(0), total

    def _with_pseudo_labels(self, batch: dict) -> dict:
        self.gates.set(None)
        batch = pseudo_labels(self.model, batch, self.forward)
        if self.method in AGGREGATED and batch["labels"].dim() == 1 and batch["labels"].is_floating_point():
            raise ValueError(PSEUDO_REGRESSION)
        return batch

    def _grads(self, batch: dict, gate_values: Tensor) -> Tensor:
        """Gradient of Σ target w.r.t. per-row gates ``[rows, n_units]``."""
        g = gate_values.detach().to(torch.float32).requires_grad_(True)
        self.gates.set(g)
        with torch.enable_grad():
            out = self.forward(self.model, batch)
            f = self.target(out, batch)
            (grad,) = torch.autograd.grad(f.sum(), g)
        self.gates.set(None)
        return grad

    def _agg(self, x: Tensor) -> Tensor:
        """A signed attribution (per sample or batch mean) as a score: fisher always squares its gradients."""
        if self.method == "fisher" or self.aggregate == "square":
            return x.pow(2)
        return x.abs() if self.aggregate == "abs" else x

    def _ig(self, batch: dict, n: int) -> Tensor:
        total = torch.zeros(n, self.gates.n_units, dtype=torch.float64)
        for start in range(0, len(self.nodes), self.alpha_batch):
            alphas, ws = self.nodes[start : start + self.alpha_batch], self.weights[start : start + self.alpha_batch]
            k = len(alphas)
            rows = alphas.float().repeat_interleave(n)[:, None].expand(k * n, self.gates.n_units)
            grad = self._grads(_repeat(batch, k, n), rows).double().view(k, n, -1)
            total += (ws[:, None, None] * grad.cpu()).sum(0)
        return total

    def _grad_x_gate(self, batch: dict, n: int) -> Tensor:
        return self._grads(batch, torch.ones(n, self.gates.n_units))

    def _fisher(self, batch: dict, n: int) -> Tensor:
        return self._grads(batch, torch.ones(n, self.gates.n_units))  # squared by _agg

    def _activation(self, batch: dict, n: int) -> Tensor:
        acts = torch.zeros(n, self.gates.n_units, dtype=torch.float64)
        masks = [m for m in (batch.get("attention_mask"), batch.get("decoder_attention_mask")) if m is not None]
        handles = []
        for s in self.gates.slots:
            def hook(module, args, s=s):
                x = args[0].detach().abs().double()  # [n, seq, width]
                x = x.reshape(*x.shape[:-1], s.n_units, s.block.unit_width).mean(-1)  # [n, seq, units]
                tok = next((m for m in masks if m.shape[:2] == x.shape[:2]), None)
                if tok is None:
                    acts[:, s.offset : s.stop] = x.mean(1).cpu()
                else:
                    tok = tok.to(x.device).double()[..., None]
                    acts[:, s.offset : s.stop] = ((x * tok).sum(1) / tok.sum(1).clamp(min=1)).cpu()

            target = s.block.out if s.kind == "heads" else s.block.down
            handles.append(self.gates.base.get_submodule(target).register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                self.forward(self.model, batch)
        finally:
            for h in handles:
                h.remove()
        return acts


def score_units(
    model: nn.Module,
    batches: Iterable[dict] | None = None,
    method: Method | AttributionConfig = "ig",
    target: str | TargetFn = "label",
    units: str | Sequence[str] = "all",
    **options,
) -> UnitScores:
    """Score every structured unit of ``model`` on ``batches`` (dicts of tensors; ``labels`` for supervised targets).

    ``method`` is a method name followed by the other options as keywords, or an :class:`AttributionConfig` (as for
    :class:`Attributor`; ``forward=`` either way). A ``DataLoader`` with a ``DistributedSampler`` has its padding
    dropped.
    Returns running sums and the sample count; ``.mean()`` gives per-unit scores. Data-free methods (``magnitude``,
    ``random``) ignore ``batches``.
    """
    att = Attributor(model, method, target, units, **options)
    if att.data_free:
        return att.result()
    if batches is None:
        raise ValueError(f"method {att.method!r} needs calibration batches; pass batches=... (an iterable of dicts)")
    total, count, n_batches = calibrate(att, batches, loader=batches)
    if n_batches == 0:
        raise ValueError("no calibration batches: the data loader is empty; give at least one sample")
    if count != math.floor(count):
        log.info("sample weights are fractional; count=%s", count)
    return att.result(total, count)


__all__ = ["AttributionConfig", "Attributor", "score_units", "quadrature", "make_target", "METHODS", "QUADRATURES",
           "in_features"]
