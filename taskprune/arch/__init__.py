"""Architecture registry, keyed by ``config.model_type``.

This is the only module that knows Hugging Face attribute names. Everything else sees
:class:`AttentionBlock` and :class:`FFNBlock` records whose paths are relative to the *base model*
(``model.base_model``: ``BertModel``, ``T5ForConditionalGeneration``, ``LlamaModel``, ``GPT2Model``...), so a
prune spec made on ``BertForSequenceClassification`` applies unchanged to a bare ``BertModel`` or to a multi-task
wrapper that holds the same encoder.

Widths are read from the modules' weights, not from the config: after :func:`taskprune.shrink_` layers differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

UNIT_KINDS = ("heads", "neurons")


@dataclass(frozen=True)
class AttentionBlock:
    """One attention module. Its structured unit is a KV group: ``group_size`` query heads sharing one K/V head.

    For multi-head attention (``n_kv_heads == n_heads``) a unit is one head.
    """

    name: str  # path of the attention module, relative to the base model
    q: str  # path of the query projection (for a fused qkv, the fused module)
    k: str
    v: str
    out: str  # output projection; its input is gated
    n_heads: int
    n_kv_heads: int
    head_dim: int
    style: str  # "bert" | "t5" | "llama" | "gpt2": how surgery updates module attributes
    fused_qkv: bool = False
    d_model: int = 0

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def n_units(self) -> int:
        return self.n_kv_heads

    @property
    def unit_width(self) -> int:
        """Channels of the output projection's input that belong to one unit."""
        return self.group_size * self.head_dim


@dataclass(frozen=True)
class FFNBlock:
    """One feed-forward module. Its structured unit is an intermediate neuron."""

    name: str  # path of the feed-forward module, relative to the base model
    up: tuple[str, ...]  # projections into the intermediate space (up, and gate for gated MLPs)
    down: str  # projection out of it; its input is gated
    n_neurons: int
    style: str
    d_model: int = 0

    @property
    def n_units(self) -> int:
        return self.n_neurons

    @property
    def unit_width(self) -> int:
        return 1


@dataclass(frozen=True)
class Architecture:
    """The prunable structure of one model."""

    model_type: str
    attention: tuple[AttentionBlock, ...]
    ffn: tuple[FFNBlock, ...]

    def blocks(self, kind: str) -> tuple[AttentionBlock | FFNBlock, ...]:
        if kind == "heads":
            return self.attention
        if kind == "neurons":
            return self.ffn
        raise ValueError(f"unknown unit kind {kind!r}; allowed: {list(UNIT_KINDS)}")

    def fingerprint(self) -> dict:
        """Widths that a spec must match: model type, and units per block of each kind."""
        return {
            "model_type": self.model_type,
            "heads": {b.name: b.n_units for b in self.attention},
            "neurons": {b.name: b.n_units for b in self.ffn},
            "head_dim": {b.name: b.head_dim for b in self.attention},
            "group_size": {b.name: b.group_size for b in self.attention},
            "d_model": {b.name: b.d_model for b in (*self.attention, *self.ffn)},
            "gated": {b.name: len(b.up) > 1 for b in self.ffn},
        }


def in_features(module: nn.Module) -> int:
    """Input width of a ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[0]
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[1]
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def _bert(base: nn.Module) -> Architecture:
    att, ffn = [], []
    for i, layer in enumerate(base.encoder.layer):
        p = f"encoder.layer.{i}"
        sa = layer.attention.self
        hd = sa.attention_head_size
        n = out_features(sa.query) // hd
        att.append(AttentionBlock(f"{p}.attention.self", f"{p}.attention.self.query", f"{p}.attention.self.key",
                                  f"{p}.attention.self.value", f"{p}.attention.output.dense", n, n, hd, "bert",
                                  d_model=in_features(sa.query)))
        ffn.append(FFNBlock(f"{p}.intermediate", (f"{p}.intermediate.dense",), f"{p}.output.dense",
                            out_features(layer.intermediate.dense), "bert", d_model=in_features(sa.query)))
    return Architecture(base.config.model_type, tuple(att), tuple(ffn))


def _t5(base: nn.Module) -> Architecture:
    att, ffn = [], []
    for stack in ("encoder", "decoder"):
        if getattr(base, stack, None) is None:
            continue
        for i, block in enumerate(getattr(base, stack).block):
            p = f"{stack}.block.{i}"
            for j, sub in enumerate(block.layer):
                lp = f"{p}.layer.{j}"
                for attr in ("SelfAttention", "EncDecAttention"):
                    a = getattr(sub, attr, None)
                    if a is None:
                        continue
                    ap = f"{lp}.{attr}"
                    n = out_features(a.q) // a.key_value_proj_dim
                    att.append(AttentionBlock(ap, f"{ap}.q", f"{ap}.k", f"{ap}.v", f"{ap}.o", n, n,
                                              a.key_value_proj_dim, "t5", d_model=in_features(a.q)))
                dense = getattr(sub, "DenseReluDense", None)
                if dense is not None:
                    dp = f"{lp}.DenseReluDense"
                    up = ("wi",) if hasattr(dense, "wi") else ("wi_0", "wi_1")
                    ffn.append(FFNBlock(dp, tuple(f"{dp}.{u}" for u in up), f"{dp}.wo",
                                        in_features(dense.wo), "t5", d_model=out_features(dense.wo)))
    return Architecture(base.config.model_type, tuple(att), tuple(ffn))


def _llama(base: nn.Module) -> Architecture:
    att, ffn = [], []
    for i, layer in enumerate(base.layers):
        p = f"layers.{i}"
        a = layer.self_attn
        hd = a.head_dim
        att.append(AttentionBlock(f"{p}.self_attn", f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj",
                                  f"{p}.self_attn.v_proj", f"{p}.self_attn.o_proj", out_features(a.q_proj) // hd,
                                  out_features(a.k_proj) // hd, hd, "llama", d_model=in_features(a.q_proj)))
        m = layer.mlp
        ffn.append(FFNBlock(f"{p}.mlp", (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"), f"{p}.mlp.down_proj",
                            in_features(m.down_proj), "llama", d_model=out_features(m.down_proj)))
    return Architecture(base.config.model_type, tuple(att), tuple(ffn))


def _gpt2(base: nn.Module) -> Architecture:
    att, ffn = [], []
    for i, block in enumerate(base.h):
        p = f"h.{i}"
        a = block.attn
        if getattr(a, "is_cross_attention", False):
            raise ValueError("GPT-2 cross-attention blocks are not supported; use a decoder-only GPT-2")
        n = in_features(a.c_proj) // a.head_dim
        c = f"{p}.attn.c_attn"
        att.append(AttentionBlock(f"{p}.attn", c, c, c, f"{p}.attn.c_proj", n, n, a.head_dim, "gpt2",
                                  fused_qkv=True, d_model=in_features(a.c_attn)))
        ffn.append(FFNBlock(f"{p}.mlp", (f"{p}.mlp.c_fc",), f"{p}.mlp.c_proj", in_features(block.mlp.c_proj),
                            "gpt2", d_model=out_features(block.mlp.c_proj)))
    return Architecture(base.config.model_type, tuple(att), tuple(ffn))


REGISTRY: dict[str, Callable[[nn.Module], Architecture]] = {
    "bert": _bert,
    "roberta": _bert,
    "electra": _bert,
    "xlm-roberta": _bert,
    "t5": _t5,
    "mt5": _t5,
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
    "gpt2": _gpt2,
}


def find_base(model: nn.Module) -> tuple[nn.Module, str]:
    """Return ``(base_model, path)`` for a Hugging Face model, or for any module that contains one.

    ``path`` is where the base model sits inside ``model`` ("" when ``model`` is the base model).
    """
    for path, module in model.named_modules():  # pre-order: the outermost HF model comes first
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "model_type") and hasattr(module, "base_model"):
            base = module.base_model
            for sub_path, sub in module.named_modules():
                if sub is base:
                    full = ".".join(x for x in (path, sub_path) if x)
                    return base, full
    raise TypeError(
        f"no Hugging Face model found inside {type(model).__name__}; pass a transformers PreTrainedModel "
        "or a module that holds one as a submodule"
    )


def get_architecture(model: nn.Module) -> Architecture:
    """Resolve the prunable structure of ``model`` (or of the HF model it contains)."""
    base, _ = find_base(model)
    model_type = base.config.model_type
    if model_type not in REGISTRY:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {sorted(REGISTRY)}. "
            "Add an entry to taskprune.arch.REGISTRY to support another architecture."
        )
    return REGISTRY[model_type](base)
