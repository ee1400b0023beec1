"""Training-free reconstruction after structured pruning: compensate removed units from calibration statistics.

Every structured unit ``i`` of a block writes ``c_i = W_out[:, cols_i] @ x[cols_i]`` into the block's output, where
``x`` is the input of the block's output (or down) projection and
``cols_i`` the channels the unit owns (``unit_width`` of them: one per neuron, ``group_size * head_dim`` per KV
group). Removing units ``drop`` loses ``Σ_drop c_i``. Over calibration tokens (real tokens only, where the batch has
an ``attention_mask`` of the right shape) this module estimates and folds back, without gradients:

* ``"bias"`` (FLAP-style, An et al. 2024): the mean lost contribution, ``Δb = W_out[:, drop] @ E[x[drop]]``, added to
  the output projection's bias.
* ``"scale"``: per kept unit a scale ``s_i`` minimising ``E || Σ_keep s_i c_i − Σ_all c_i ||²`` (Kwon et al. 2022's
  mask tuning, without training), folded into ``W_out[:, cols_i]``; no bias change.
* ``"lstsq"``: the same least squares with an intercept: scales fitted on centred contributions, then the bias takes
  the remaining mean error. It is the least-squares optimum over (scales, bias), so it contains ``"bias"``.
* ``"none"``: the model is left untouched.

The normal equations need the Gram matrix of unit contributions, ``G_ij = E[c_i·c_j] = Σ_{a∈i, b∈j} (WᵀW)_ab E[x_a x_b]``,
so one pass accumulates the channel second moments ``E[x xᵀ]`` (``[width, width]`` per block) and means. The solve
is damped towards the identity (``(G_KK + λ·diag(G_KK)) s = G_K,all·1 + λ·diag(G_KK)·1``) and scales are clamped to
``scale_range``.

When to call it: on the **dense** model, with the spec, *before* :func:`~taskprune.surgery.shrink_` (or
:func:`~taskprune.surgery.apply_mask`): the removed units' activations are needed and are gone after shrinking.
Statistics are taken in one pass of the dense model (every block sees dense inputs; layer-by-layer refitting on the
pruned model's own activations is not done). The changes only touch kept columns and biases, which ``shrink_`` keeps,
so ``reconstruct_(model, spec, ...); shrink_(model, spec)`` gives the compensated shrunk model, and masking the
reconstructed dense model gives the same outputs.

Where an output projection has no bias, one is created when the family's config can express it (the adapter's
:meth:`~taskprune.arch.Adapter.bias_flag`, a config flag; zero biases are then also added to
the block's other projections that the flag switches on, so ``save_pretrained`` / rebuild-and-load round trips
exactly). Where it cannot, the bias part is skipped for that block with a warning; the scales still apply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from taskprune.arch import (Architecture, find_base, feature_dim, get_architecture, in_features, out_features,
                            unit_channels, weight_in_out)
from taskprune.attribution import default_forward
from taskprune.spec import PruneSpec

log = logging.getLogger(__name__)

METHODS = ("none", "bias", "scale", "lstsq")
Method = Literal["none", "bias", "scale", "lstsq"]


@dataclass
class _Stats:
    """Running statistics of the input of one output projection over real tokens."""

    sum: Tensor  # [width] float64
    gram: Tensor | None  # [width, width] float64 (least-squares methods only)
    n: int = 0


def reconstruct_(
    model: nn.Module,
    spec: PruneSpec,
    batches: Iterable[dict] | None,
    method: Method = "bias",
    *,
    forward: Callable | None = None,
    damping: float = 1e-2,
    scale_range: tuple[float, float] = (0.0, 2.0),
) -> nn.Module:
    """Compensate, in place, the units ``spec`` removes from the dense ``model``; return ``model``.

    Args:
        model: the dense model the spec was made for (a HF model or a module holding one), not yet shrunk or masked.
        spec: the pruning to compensate.
        batches: calibration batches (dicts of tensors, as for :func:`~taskprune.attribution.score_units`; labels are
            not used). Ignored for ``method="none"``.
        method: ``"none"``, ``"bias"``, ``"scale"`` or ``"lstsq"`` (see the module doc).
        forward: ``fn(model, batch) -> outputs``; default calls ``model(**inputs)``.
        damping: relative ridge ``λ`` pulling scales towards 1 (``>= 0``).
        scale_range: ``(low, high)`` clamp for the fitted scales.

    Call :func:`~taskprune.surgery.shrink_` (or ``apply_mask``) with the same spec afterwards.
    """
    from taskprune.surgery import active_mask  # surgery imports nothing from here; keep the import local anyway

    if method not in METHODS:
        raise ValueError(f"unknown reconstruction method {method!r}; allowed: {list(METHODS)}")
    if not isinstance(spec, PruneSpec):
        raise TypeError(f"expected a taskprune PruneSpec, got {type(spec).__name__}; load one with PruneSpec.load")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping < 0:
        raise ValueError(f"damping must be a number >= 0, got {damping!r}")
    low, high = _check_range(scale_range)
    if method == "none":
        return model
    if spec.validate(model) != "dense":
        raise ValueError("the model is already shrunk by this spec: reconstruction needs the removed units' "
                         "activations, so call reconstruct_ on the dense model before shrink_")
    if active_mask(model) is not None:
        raise ValueError("the model carries a mask from apply_mask; call taskprune.surgery.remove_mask(model) first, "
                         "reconstruct, then mask or shrink again")
    if batches is None:
        raise ValueError(f"method {method!r} needs calibration batches; pass batches=... (an iterable of dicts)")

    base, _ = find_base(model)
    arch = get_architecture(model)
    blocks = [("heads", b) for b in arch.attention if spec.drop("heads", b.name)]
    blocks += [("neurons", b) for b in arch.ffn if spec.drop("neurons", b.name)]
    if not blocks:
        log.info("the spec removes nothing; reconstruct_ does nothing")
        return model
    stats = _collect(model, base, blocks, batches, forward or default_forward, gram=method != "bias")

    skipped = []
    with torch.no_grad():
        for kind, block in blocks:
            st = stats[block.name]
            if st.n == 0:
                raise ValueError(f"no calibration token reached {block.name!r}; check the batches' attention_mask")
            out = base.get_submodule(block.out if kind == "heads" else block.down)
            w = weight_in_out(out).t().double()  # [d, width]
            keep = spec.kept(kind, block.name)
            drop = spec.drop(kind, block.name)
            width = block.unit_width
            mean = st.sum / st.n
            kc, dc = unit_channels(keep, width), unit_channels(drop, width)
            col_scale = torch.ones(w.shape[1], dtype=torch.float64)
            if method == "bias":
                delta = w[:, dc] @ mean[dc]
            else:
                second = st.gram / st.n
                if method == "lstsq":
                    second = second - torch.outer(mean, mean)  # centred: the intercept absorbs the mean
                s = _solve_scales(w, second, keep, width, damping, low, high)
                col_scale[kc] = s.repeat_interleave(width)
                delta = (w @ mean - w[:, kc] @ (col_scale[kc] * mean[kc])) if method == "lstsq" else None
                _scale_columns_(out, col_scale)
            if delta is not None and not _add_bias_(base, arch, kind, out, delta):
                skipped.append(block.name)
    if skipped:
        log.warning("bias compensation skipped for %d block(s) whose output projection has no bias and whose config "
                    "cannot express one (%s...): only the scales were applied there", len(skipped), skipped[0])
    base.config.taskprune_reconstruction = {"method": method, "n_tokens": int(next(iter(stats.values())).n),
                                            "damping": float(damping), "scale_range": [low, high],
                                            "bias_skipped": skipped}
    log.info("reconstructed %d blocks with method=%r on %d calibration tokens", len(blocks), method,
             next(iter(stats.values())).n)
    return model


# ------------------------------------------------------------------------------------------------ statistics
def _collect(model, base, blocks, batches, forward, gram: bool) -> dict[str, _Stats]:
    stats: dict[str, _Stats] = {}
    current: dict = {}
    handles = []
    for kind, block in blocks:
        module = base.get_submodule(block.out if kind == "heads" else block.down)
        width = in_features(module)
        dev = module.weight.device
        stats[block.name] = _Stats(torch.zeros(width, dtype=torch.float64, device=dev),
                                   torch.zeros(width, width, dtype=torch.float64, device=dev) if gram else None)

        def hook(mod, args, st=stats[block.name]):
            x = args[0].detach()
            tok = _token_mask(current, x)
            x = x.reshape(-1, x.shape[-1]) if tok is None else x[tok.to(x.device)]
            x = x.double()
            st.sum += x.sum(0)
            if st.gram is not None:
                st.gram += x.t() @ x
            st.n += x.shape[0]

        handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        with torch.no_grad():
            for batch in batches:
                current["masks"] = [m for m in (batch.get("attention_mask"), batch.get("decoder_attention_mask"))
                                    if isinstance(m, Tensor)]
                forward(model, batch)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("no calibration batches: the iterable is empty; give at least one batch")
    return stats


def _token_mask(current: dict, x: Tensor) -> Tensor | None:
    """``[batch, seq]`` bool mask of real tokens for an activation ``[batch, seq, width]``, or None (all tokens)."""
    if x.dim() != 3:
        return None
    for m in current.get("masks", ()):
        if m.shape == x.shape[:2]:
            return m.bool()
    return None


# ------------------------------------------------------------------------------------------------ solve
def _solve_scales(w: Tensor, second: Tensor, keep: list[int], width: int, damping: float, low: float,
                  high: float) -> Tensor:
    """Scales ``[len(keep)]`` minimising ``E||Σ_keep s_i c_i − Σ_all c_i||²`` given ``E[x xᵀ]`` (``second``)."""
    n = w.shape[1] // width
    m = w.t() @ w  # [width_all, width_all]
    g = (m * second.to(m.device)).reshape(n, width, n, width).sum((1, 3))  # [n_units, n_units]
    k = torch.as_tensor(keep, dtype=torch.long, device=g.device)
    gkk = g[k][:, k]
    rhs = g[k].sum(1)  # G_K,all · 1
    diag = gkk.diagonal().clamp(min=1e-12 * float(gkk.diagonal().abs().max().clamp(min=1e-30)))
    a = gkk + damping * torch.diag(diag)
    b = rhs + damping * diag
    try:
        s = torch.linalg.solve(a, b)
    except RuntimeError:  # singular even after damping (e.g. dead units): least-norm solution
        s = torch.linalg.lstsq(a, b.unsqueeze(-1)).solution.squeeze(-1)
    s = torch.nan_to_num(s, nan=1.0)
    return s.clamp(low, high).cpu()


def _check_range(r) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in r)
    except (TypeError, ValueError):
        raise ValueError(f"scale_range must be a pair (low, high) of numbers, got {r!r}") from None
    if not low <= 1.0 <= high:
        raise ValueError(f"scale_range must contain 1 (low <= 1 <= high), got {r!r}; e.g. (0.0, 2.0)")
    return low, high


# ------------------------------------------------------------------------------------------------ weights
def _scale_columns_(m: nn.Module, col_scale: Tensor) -> None:
    """Multiply input channel ``j`` of ``m`` by ``col_scale[j]`` (``[in]``), in the weight's dtype."""
    w = m.weight
    s = col_scale.to(device=w.device, dtype=torch.float64)
    scaled = (w.double() * (s[:, None] if feature_dim(m, "in") == 0 else s[None, :])).to(w.dtype)
    w.copy_(scaled)


def _add_bias_(base: nn.Module, arch: Architecture, kind: str, out: nn.Module, delta: Tensor) -> bool:
    """Add ``delta`` ``[d]`` to ``out``'s bias, creating one where the config can express it; False if skipped."""
    if out.bias is None:
        flag = arch.adapter.bias_flag(kind)
        if flag is None or not hasattr(base.config, flag):
            return False
        _enable_biases(base, arch, kind, flag)
    b = out.bias
    b.copy_((b.double() + delta.to(b.device)).to(b.dtype))
    return True


def _enable_biases(base: nn.Module, arch: Architecture, kind: str, flag: str) -> None:
    """Turn ``config.<flag>`` on and give every projection it governs (all blocks of ``kind``) a zero bias."""
    blocks = arch.blocks(kind)
    for block in blocks:
        paths = (block.q, block.k, block.v, block.out) if kind == "heads" else (*block.up, block.down)
        for p in dict.fromkeys(paths):
            m = base.get_submodule(p)
            if isinstance(m, nn.Linear) and m.bias is None:
                w = m.weight
                m.bias = nn.Parameter(torch.zeros(out_features(m), dtype=w.dtype, device=w.device),
                                      requires_grad=w.requires_grad)
    if not getattr(base.config, flag):
        setattr(base.config, flag, True)
        log.info("set config.%s = True (zero biases added to the %s projections) to hold the compensation", flag,
                 kind)


__all__ = ["reconstruct_", "METHODS"]
