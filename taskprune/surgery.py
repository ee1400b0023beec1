"""Apply a :class:`~taskprune.spec.PruneSpec`: reversibly (0/1 gates) or physically (slicing weights).

* :func:`apply_mask` installs :class:`~taskprune.gates.Gates` with 0 on the removed units: the model keeps its
  weights, :func:`remove_mask` (or ``gates.remove()``) restores it bit for bit, and applying another spec replaces the
  active mask (switching tasks).
* :func:`shrink_` removes the units in place. An attention unit ``j`` (a KV group of ``group_size`` query heads) owns
  rows ``[j * group_size * head_dim, (j + 1) * group_size * head_dim)`` of the query projection, rows
  ``[j * head_dim, (j + 1) * head_dim)`` of the key and value projections and the same columns as the query rows of
  the output projection; an FFN neuron ``i`` owns row ``i`` of the up (and gate) projections and column ``i`` of the
  down projection. New weights are built by ``index_select`` with the old dtype, device and ``requires_grad``; the
  modules themselves are kept (hooks registered on them survive). Output biases are untouched.

What a family needs beyond slicing (head-count attributes, hooks that slice a position bias shared across layers,
config fields) is done by its adapter (:class:`taskprune.arch.Adapter`); surgery itself names no Hugging Face
attribute. Where an adapter installs hooks that need the kept *indices*, rebuilding a shrunk model needs the spec,
not only the widths: replay the spec on a fresh dense model with :func:`shrink_`, then load the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from taskprune.arch import (Adapter, Architecture, AttentionBlock, FFNBlock, accepts_empty_input, feature_dim, find_base,
                            get_architecture, is_projection, known_projections, set_features_, unit_channels)
from taskprune.gates import Gates
from taskprune.spec import SHRUNK_BY, PruneSpec

log = logging.getLogger(__name__)

MASK_ATTR = "_taskprune_mask"  # attribute of the base model holding the active mask's Gates


# ---------------------------------------------------------------------------------------------------- masking
def apply_mask(model: nn.Module, spec: PruneSpec) -> Gates:
    """Install 0/1 gates that switch off the units ``spec`` removes; return the installed :class:`Gates`.

    ``model`` is a dense HF model or a module holding one. A mask applied earlier with :func:`apply_mask` is removed
    first, so masks replace each other instead of stacking.
    """
    _check_spec(spec)
    state = spec.validate(model)
    if state != "dense":
        raise ValueError(
            "this model was already shrunk by the spec, so its removed units are gone; apply masks to the dense model "
            "(a fresh copy of the model the spec was made for)"
        )
    base, _ = find_base(model)
    gates = Gates(model, units="all")
    remove_mask(model)
    gates.install()
    gates.set(gates.values_of(spec, scaled=False))
    setattr(base, MASK_ATTR, gates)
    log.info("masked %s", _describe(spec))
    return gates


def active_mask(model: nn.Module) -> Gates | None:
    """The Gates installed by :func:`apply_mask` on ``model``, or None."""
    base, _ = find_base(model)
    gates = getattr(base, MASK_ATTR, None)
    return gates if gates is not None and gates.installed else None


def remove_mask(model: nn.Module) -> bool:
    """Remove the mask installed by :func:`apply_mask`; return whether there was one."""
    base, _ = find_base(model)
    gates = getattr(base, MASK_ATTR, None)
    if gates is None:
        return False
    was_installed = gates.installed
    gates.remove()
    delattr(base, MASK_ATTR)
    return was_installed


# ---------------------------------------------------------------------------------------------------- shrinking
def shrink_(model: nn.Module, spec: PruneSpec) -> nn.Module:
    """Physically remove the units ``spec`` drops from ``model`` (in place) and return ``model``.

    The whole spec is checked against the model before anything changes, so a bad spec leaves the model untouched.
    A model already shrunk by this spec (its widths are the spec's kept widths) is left as it is, with a warning:
    shrinking twice is a no-op, so a pipeline that replays a spec can call this safely. A model carrying a mask from
    :func:`apply_mask` is refused (call :func:`remove_mask` first), and so is a feed-forward block left with no
    neuron whose down projection cannot run with 0 input features (a :class:`~taskprune.arch.LayerLayout`
    with ``empty_input=False``; ``nn.Linear`` can).

    A spec that carries tuning (``scales``, refitted ``columns`` or ``biases``: :class:`taskprune.pipeline.Pipeline`'s
    default) is folded into the weights of a dense model first (:func:`taskprune.tuning.fold_scales_`), after every
    check: the shrunk model is the tuned one.

    The per-block widths are recorded in ``config.taskprune_widths`` (``{"heads": {block: n_kept_units},
    "neurons": {...}}``); where every block of a kind keeps the same count and Hugging Face would then build the same
    shapes, the adapter updates the standard config fields too (:meth:`taskprune.arch.Adapter.record_widths_`: the
    feed-forward width for every family; head counts where the config can say so). The spec's
    :meth:`~taskprune.spec.PruneSpec.identity` is recorded in ``config.taskprune_spec_id``: ``spec.validate`` (so
    ``save_pruned``, ``fold_scales_`` and a second ``shrink_``) then refuses another spec of the same widths.
    """
    _check_spec(spec)
    state = spec.validate(model)
    if state == "shrunk":
        log.warning("model already has the widths this spec leaves (%s); shrink_ does nothing", _describe(spec))
        return model
    base, _ = find_base(model)
    if active_mask(model) is not None:
        raise ValueError("the model carries a mask from apply_mask; call taskprune.surgery.remove_mask(model) before "
                         "shrink_ (the mask's gates have the dense widths)")
    arch = get_architecture(model)
    # plan first: resolve and type-check every module, build every index, before mutating anything
    plan = []
    for block in arch.attention:
        if spec.drop("heads", block.name):
            plan.append(_plan_attention(base, arch.adapter, block, spec.kept("heads", block.name)))
    for block in arch.ffn:
        if spec.drop("neurons", block.name):
            plan.append(_plan_ffn(base, arch.adapter, block, spec.kept("neurons", block.name)))
    if spec.scales or spec.columns or spec.biases:
        from taskprune.tuning import fold_scales_

        spec = fold_scales_(model, spec)  # checks every shape before writing
    with torch.no_grad():
        for step in plan:
            step.apply()
    _record_widths(base, arch, spec)
    log.info("shrunk %s", _describe(spec))
    return model


@dataclass
class _Slice:
    module: nn.Module
    index: Tensor
    dim: str  # "out" | "in"

    def apply(self) -> None:
        _slice(self.module, self.index, self.dim)


@dataclass
class _Step:
    block: AttentionBlock | FFNBlock
    slices: list[_Slice]
    owner: nn.Module  # the attention / feed-forward module whose attributes follow the widths
    keep: list[int]
    adapter: Adapter

    def apply(self) -> None:
        for s in self.slices:
            s.apply()
        if isinstance(self.block, AttentionBlock):
            self.adapter.shrink_attention_(self.owner, self.block, self.keep)
        else:
            self.adapter.shrink_ffn_(self.owner, self.block, self.keep)


def _plan_attention(base: nn.Module, adapter: Adapter, block: AttentionBlock, keep: list[int]) -> _Step:
    hd = block.head_dim
    q_idx = unit_channels(keep, block.unit_width)  # query rows == output-projection columns
    kv_idx = unit_channels(keep, hd)
    if block.fused_qkv:  # one projection: [q | k | v] along the output features
        q_w, kv_w = block.n_heads * hd, block.n_kv_heads * hd
        slices = [_Slice(_linear(base, block.q), torch.cat([q_idx, kv_idx + q_w, kv_idx + q_w + kv_w]), "out")]
    else:
        slices = [_Slice(_linear(base, block.q), q_idx, "out"), _Slice(_linear(base, block.k), kv_idx, "out"),
                  _Slice(_linear(base, block.v), kv_idx, "out")]
    slices.append(_Slice(_linear(base, block.out), q_idx, "in"))
    if not keep and not adapter.empty_attention:
        raise ValueError(f"the spec removes every head of {block.name!r}, which a {adapter.family} attention module "
                         "cannot run without; keep at least one head per attention block (Budget(min_heads=1))")
    return _Step(block, slices, base.get_submodule(block.name), keep, adapter)


def _plan_ffn(base: nn.Module, adapter: Adapter, block: FFNBlock, keep: list[int]) -> _Step:
    idx = torch.as_tensor(keep, dtype=torch.long)
    slices = [_Slice(_linear(base, up), idx, "out") for up in block.up]
    down = _linear(base, block.down)
    slices.append(_Slice(down, idx, "in"))
    if not keep and not accepts_empty_input(down):
        raise ValueError(f"the spec removes every neuron of {block.name!r}, whose down projection "
                         f"({type(down).__name__}) cannot run with 0 input features; keep at least one neuron per "
                         "feed-forward block (raise the per-layer floor of the selection)")
    return _Step(block, slices, base.get_submodule(block.name), keep, adapter)


def _linear(base: nn.Module, path: str) -> nn.Module:
    m = base.get_submodule(path)
    if not is_projection(m):
        raise TypeError(f"cannot slice {path!r}: expected {known_projections()}, got {type(m).__name__} (quantized or "
                        "wrapped layers are not supported; shrink before quantizing)")
    return m


def _slice(m: nn.Module, index: Tensor, dim: str) -> None:
    """Keep output (``dim="out"``) or input (``"in"``) features ``index`` of a projection, in place."""
    w = m.weight
    wdim = feature_dim(m, dim)
    m.weight = nn.Parameter(w.index_select(wdim, index.to(w.device)).contiguous(), requires_grad=w.requires_grad)
    if dim == "out" and m.bias is not None:
        b = m.bias
        m.bias = nn.Parameter(b.index_select(0, index.to(b.device)).contiguous(), requires_grad=b.requires_grad)
    set_features_(m, dim, len(index))


# ---------------------------------------------------------------------------------------------------- config
def _record_widths(base: nn.Module, arch: Architecture, spec: PruneSpec) -> None:
    """``config.taskprune_widths`` (kept units per block), ``config.taskprune_spec_id`` (the spec's identity), and the
    adapter's standard fields where widths are uniform."""
    widths = {
        "heads": {b.name: len(spec.kept("heads", b.name)) for b in arch.attention},
        "neurons": {b.name: len(spec.kept("neurons", b.name)) for b in arch.ffn},
    }
    base.config.taskprune_widths = widths
    setattr(base.config, SHRUNK_BY, spec.identity())
    arch.adapter.record_widths_(base.config, arch, widths)


# ---------------------------------------------------------------------------------------------------- helpers
def _check_spec(spec) -> None:
    if not isinstance(spec, PruneSpec):
        raise TypeError(f"expected a taskprune PruneSpec, got {type(spec).__name__}; load one with PruneSpec.load")


def _describe(spec: PruneSpec) -> str:
    s = spec.summary()
    return ", ".join(f"{k}: {v['kept']}/{v['total']} kept" for k, v in s.items())
