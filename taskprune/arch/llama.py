"""LLaMA-style decoders (LLaMA, Mistral, Qwen2): ``layers.<i>`` with ``self_attn`` (grouped-query attention) and a
gated ``mlp``."""

from __future__ import annotations

from torch import nn

from taskprune.arch.base import Adapter, Architecture, AttentionBlock, FFNBlock
from taskprune.arch.layout import in_features, out_features
from taskprune.arch.registry import register


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")
    ffn_width_field = "intermediate_size"

    def discover(self, base: nn.Module) -> tuple[list[AttentionBlock], list[FFNBlock]]:
        att, ffn = [], []
        for i, layer in enumerate(base.layers):
            p = f"layers.{i}"
            a = layer.self_attn
            hd = a.head_dim
            att.append(AttentionBlock(f"{p}.self_attn", f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj",
                                      f"{p}.self_attn.v_proj", f"{p}.self_attn.o_proj", out_features(a.q_proj) // hd,
                                      out_features(a.k_proj) // hd, hd, d_model=in_features(a.q_proj),
                                      residual=(f"{p}.input_layernorm", 0),
                                      group=getattr(a, "num_key_value_groups", 1)))
            m = layer.mlp  # pre-norm: the residual stream is the input of the sub-layer's norm
            ffn.append(FFNBlock(f"{p}.mlp", (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"), f"{p}.mlp.down_proj",
                                in_features(m.down_proj), d_model=out_features(m.down_proj),
                                residual=(f"{p}.post_attention_layernorm", 0)))
        return att, ffn

    def shrink_attention_(self, attn: nn.Module, block: AttentionBlock, keep: list[int]) -> None:
        # views use -1 and num_key_value_groups is unchanged; keep the optional attributes in step
        if hasattr(attn, "num_heads"):
            attn.num_heads = len(keep) * block.group_size
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = len(keep)

    def shrink_ffn_(self, ffn: nn.Module, block: FFNBlock, keep: list[int]) -> None:
        if hasattr(ffn, "intermediate_size"):  # the MLP keeps its width as an attribute
            ffn.intermediate_size = len(keep)

    def record_widths_(self, config, arch: Architecture, widths: dict[str, dict[str, int]]) -> None:
        """FFN width, and with an explicit ``head_dim`` the head counts (``num_key_value_heads`` and
        ``num_attention_heads``) when every attention block keeps the same number of KV groups."""
        super().record_widths_(config, arch, widths)
        counts = set(widths["heads"].values())
        if len(counts) == 1 and arch.attention and getattr(config, "head_dim", None) == arch.attention[0].head_dim:
            n_kv = counts.pop()
            config.num_key_value_heads = n_kv
            config.num_attention_heads = n_kv * arch.attention[0].group_size

    def dense_config_(self, config, fingerprint: dict) -> None:
        super().dense_config_(config, fingerprint)
        dense, groups = set(fingerprint["heads"].values()), set(fingerprint.get("group_size", {}).values())
        if len(dense) == 1 and len(groups) == 1 and hasattr(config, "num_key_value_heads") \
                and getattr(config, "head_dim", None) is not None:
            n_kv = dense.pop()
            config.num_key_value_heads = n_kv
            config.num_attention_heads = n_kv * groups.pop()

    def bias_flag(self, kind: str) -> str | None:
        return {"heads": "attention_bias", "neurons": "mlp_bias"}.get(kind)


register(LlamaAdapter())
