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

T5 shares one relative position bias ``[1, n_heads, q, k]`` across the layers of a stack: the first layer computes
it from ``relative_attention_bias`` and hands it on. With other kept heads per layer that cannot be sliced once, so
the bias stays full width (the embedding keeps all dense heads, its state-dict shape is unchanged) and each shrunk
``T5Attention`` gets hooks (:class:`T5BiasSlice`) that slice the full bias to its kept heads on the way in and hand
the full bias on to the next layer on the way out. Rebuilding a shrunk T5 therefore needs the spec (kept indices), not
only the widths: replay the spec on a fresh dense model with :func:`shrink_`, then load the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from taskprune.arch import AttentionBlock, FFNBlock, find_base, get_architecture
from taskprune.gates import Gates
from taskprune.spec import PruneSpec

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
    per_block = {
        kind: {s.block.name: _zero_one(spec.kept(kind, s.block.name), s.n_units) for s in gates.slots
               if s.kind == kind and spec.drop(kind, s.block.name)}
        for kind in gates.units
    }
    gates.install()
    gates.set(gates.flat(per_block))
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


def _zero_one(keep: list[int], n: int) -> Tensor:
    g = torch.zeros(n)
    g[keep] = 1.0
    return g


# ---------------------------------------------------------------------------------------------------- shrinking
def shrink_(model: nn.Module, spec: PruneSpec) -> nn.Module:
    """Physically remove the units ``spec`` drops from ``model`` (in place) and return ``model``.

    The whole spec is checked against the model before anything changes, so a bad spec leaves the model untouched.
    A model already shrunk by this spec (its widths are the spec's kept widths) is left as it is, with a warning:
    shrinking twice is a no-op, so a pipeline that replays a spec can call this safely. A model carrying a mask from
    :func:`apply_mask` is refused (call :func:`remove_mask` first), and so is a GPT-2 feed-forward block left with no
    neuron (``Conv1D`` cannot run with 0 input features; other architectures accept an empty FFN block).

    The per-block widths are recorded in ``config.taskprune_widths`` (``{"heads": {block: n_kept_units},
    "neurons": {...}}``); where every block of a kind keeps the same count and Hugging Face would then build the same
    shapes, the standard config field is updated too (``intermediate_size`` / ``d_ff`` / ``n_inner``; for LLaMA-style
    models with an explicit ``head_dim`` also ``num_attention_heads`` / ``num_key_value_heads``).
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
            plan.append(_plan_attention(base, block, spec.kept("heads", block.name)))
    for block in arch.ffn:
        if spec.drop("neurons", block.name):
            plan.append(_plan_ffn(base, block, spec.kept("neurons", block.name)))
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

    def apply(self) -> None:
        for s in self.slices:
            s.apply()
        if isinstance(self.block, AttentionBlock):
            _update_attention(self.owner, self.block, self.keep)
        elif hasattr(self.owner, "intermediate_size"):  # LLaMA MLP keeps its width as an attribute
            self.owner.intermediate_size = len(self.keep)


def _channels(keep: list[int], width: int) -> Tensor:
    """Channel indices owned by units ``keep`` when each unit is ``width`` channels wide: ``[len(keep) * width]``."""
    k = torch.as_tensor(keep, dtype=torch.long)
    return (k[:, None] * width + torch.arange(width)).reshape(-1)


def _plan_attention(base: nn.Module, block: AttentionBlock, keep: list[int]) -> _Step:
    hd = block.head_dim
    q_idx = _channels(keep, block.unit_width)  # query rows == output-projection columns
    kv_idx = _channels(keep, hd)
    if block.fused_qkv:  # GPT-2 c_attn: [q | k | v] along the output features
        q_w, kv_w = block.n_heads * hd, block.n_kv_heads * hd
        slices = [_Slice(_linear(base, block.q), torch.cat([q_idx, kv_idx + q_w, kv_idx + q_w + kv_w]), "out")]
    else:
        slices = [_Slice(_linear(base, block.q), q_idx, "out"), _Slice(_linear(base, block.k), kv_idx, "out"),
                  _Slice(_linear(base, block.v), kv_idx, "out")]
    slices.append(_Slice(_linear(base, block.out), q_idx, "in"))
    owner = base.get_submodule(block.name)
    if block.style not in ("bert", "t5", "llama", "gpt2"):
        raise ValueError(f"no surgery for attention style {block.style!r}; known: bert, t5, llama, gpt2")
    return _Step(block, slices, owner, keep)


def _plan_ffn(base: nn.Module, block: FFNBlock, keep: list[int]) -> _Step:
    idx = torch.as_tensor(keep, dtype=torch.long)
    slices = [_Slice(_linear(base, up), idx, "out") for up in block.up]
    slices.append(_Slice(_linear(base, block.down), idx, "in"))
    if not keep and not isinstance(slices[-1].module, nn.Linear):  # Conv1D's forward cannot take 0 input features
        raise ValueError(f"the spec removes every neuron of {block.name!r}, which a GPT-2 Conv1D cannot run with; keep "
                         "at least one neuron per feed-forward block (raise the per-layer floor of the selection)")
    return _Step(block, slices, base.get_submodule(block.name), keep)


def _linear(base: nn.Module, path: str) -> nn.Module:
    m = base.get_submodule(path)
    if not (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"):
        raise TypeError(f"cannot slice {path!r}: expected nn.Linear or Conv1D, got {type(m).__name__} (quantized or "
                        "wrapped layers are not supported; shrink before quantizing)")
    return m


def _slice(m: nn.Module, index: Tensor, dim: str) -> None:
    """Keep output (``dim="out"``) or input (``"in"``) features ``index`` of a Linear or Conv1D, in place."""
    conv1d = not isinstance(m, nn.Linear)  # Conv1D stores its weight as [in, out]
    wdim = (1 if conv1d else 0) if dim == "out" else (0 if conv1d else 1)
    w = m.weight
    m.weight = nn.Parameter(w.index_select(wdim, index.to(w.device)).contiguous(), requires_grad=w.requires_grad)
    if dim == "out" and m.bias is not None:
        b = m.bias
        m.bias = nn.Parameter(b.index_select(0, index.to(b.device)).contiguous(), requires_grad=b.requires_grad)
    n = len(index)
    if conv1d:
        setattr(m, "nf" if dim == "out" else "nx", n)
    else:
        setattr(m, "out_features" if dim == "out" else "in_features", n)


def _update_attention(attn: nn.Module, block: AttentionBlock, keep: list[int]) -> None:
    """Make the attention module's head-count attributes agree with its new weights."""
    n_kv = len(keep)
    n_heads = n_kv * block.group_size
    width = n_heads * block.head_dim
    if block.style == "bert":
        attn.num_attention_heads = n_heads
        attn.all_head_size = width
    elif block.style == "t5":
        attn.n_heads = n_heads
        attn.inner_dim = width
        T5BiasSlice(keep, block.n_heads).register(attn)
    elif block.style == "gpt2":
        attn.num_heads = n_heads
        attn.split_size = width
    elif block.style == "llama":  # views use -1 and num_key_value_groups is unchanged; keep optional attrs in step
        if hasattr(attn, "num_heads"):
            attn.num_heads = n_heads
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = n_kv


class T5BiasSlice:
    """Hooks that let a shrunk ``T5Attention`` take and hand on the stack's full-width position bias.

    * forward pre-hook: slice an incoming full bias ``[1, n_full, q, k]`` to the kept heads, remember the full one;
    * hook on ``relative_attention_bias`` (first layer of a stack): the embedding keeps all ``n_full`` heads; its
      output ``[q, k, n_full]`` is remembered and the kept heads are returned to ``compute_bias``;
    * forward hook: return the full bias (received or computed) in place of the sliced one. A bias the layer made
      itself without an embedding (zeros, in cross-attention) is widened with zeros.
    """

    def __init__(self, keep: list[int], n_full: int) -> None:
        self.keep = torch.as_tensor(keep, dtype=torch.long)
        self.n_full = n_full
        self._full: Tensor | None = None

    def register(self, attn: nn.Module) -> None:
        attn.register_forward_pre_hook(self.pre_hook, with_kwargs=True)
        attn.register_forward_hook(self.hook)
        emb = getattr(attn, "relative_attention_bias", None) if getattr(attn, "has_relative_attention_bias", False) \
            else None
        if emb is not None:
            emb.register_forward_hook(self.embedding_hook)

    def _keep(self, device) -> Tensor:
        if self.keep.device != device:
            self.keep = self.keep.to(device)
        return self.keep

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        self._full = None
        positional = "position_bias" not in kwargs and len(args) > 3
        bias = args[3] if positional else kwargs.get("position_bias")
        if bias is None or bias.shape[1] != self.n_full:
            return None
        self._full = bias
        sliced = bias.index_select(1, self._keep(bias.device))
        if positional:
            return (*args[:3], sliced, *args[4:]), kwargs
        return args, {**kwargs, "position_bias": sliced}

    def embedding_hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        self._full = output.permute(2, 0, 1).unsqueeze(0)  # as T5Attention.compute_bias lays it out
        return output.index_select(-1, self._keep(output.device))

    def hook(self, module: nn.Module, args: tuple, output: tuple) -> tuple:
        full, self._full = self._full, None
        bias = output[1]
        if full is None:
            if bias is None or bias.shape[1] == self.n_full:
                return output
            full = bias.new_zeros((bias.shape[0], self.n_full, *bias.shape[2:]))
            full[:, self._keep(bias.device)] = bias
        return (output[0], full, *output[2:])


# ---------------------------------------------------------------------------------------------------- config
_FFN_FIELD = {"bert": "intermediate_size", "llama": "intermediate_size", "t5": "d_ff", "gpt2": "n_inner"}


def _record_widths(base: nn.Module, arch, spec: PruneSpec) -> None:
    config = base.config
    widths = {
        "heads": {b.name: len(spec.kept("heads", b.name)) for b in arch.attention},
        "neurons": {b.name: len(spec.kept("neurons", b.name)) for b in arch.ffn},
    }
    config.taskprune_widths = widths
    ffn_counts = set(widths["neurons"].values())
    if len(ffn_counts) == 1 and arch.ffn:
        field = _FFN_FIELD.get(arch.ffn[0].style)
        if field is not None and hasattr(config, field):
            setattr(config, field, ffn_counts.pop())
    head_counts = set(widths["heads"].values())
    if len(head_counts) == 1 and arch.attention and arch.attention[0].style == "llama" \
            and getattr(config, "head_dim", None) == arch.attention[0].head_dim:
        n_kv = head_counts.pop()
        config.num_key_value_heads = n_kv
        config.num_attention_heads = n_kv * arch.attention[0].group_size


# ---------------------------------------------------------------------------------------------------- helpers
def _check_spec(spec) -> None:
    if not isinstance(spec, PruneSpec):
        raise TypeError(f"expected a taskprune PruneSpec, got {type(spec).__name__}; load one with PruneSpec.load")


def _describe(spec: PruneSpec) -> str:
    s = spec.summary()
    return ", ".join(f"{k}: {v['kept']}/{v['total']} kept" for k, v in s.items())
