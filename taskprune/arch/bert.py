"""BERT-style encoders (BERT, RoBERTa, ELECTRA, XLM-R): ``encoder.layer.<i>`` with ``attention.self`` and
``intermediate`` / ``output``."""

from __future__ import annotations

from torch import nn

from taskprune.arch.base import Adapter, AttentionBlock, FFNBlock
from taskprune.arch.layout import in_features, out_features
from taskprune.arch.registry import register


class BertAdapter(Adapter):
    family = "bert"
    model_types = ("bert", "roberta", "electra", "xlm-roberta")
    ffn_width_field = "intermediate_size"

    def discover(self, base: nn.Module) -> tuple[list[AttentionBlock], list[FFNBlock]]:
        att, ffn = [], []
        for i, layer in enumerate(base.encoder.layer):
            p = f"encoder.layer.{i}"
            sa = layer.attention.self
            hd = sa.attention_head_size
            n = out_features(sa.query) // hd
            att.append(AttentionBlock(f"{p}.attention.self", f"{p}.attention.self.query", f"{p}.attention.self.key",
                                      f"{p}.attention.self.value", f"{p}.attention.output.dense", n, n, hd,
                                      d_model=in_features(sa.query), residual=(f"{p}.attention.output", 1)))
            # post-norm: BertSelfOutput / BertOutput.forward(hidden_states, input_tensor) -> LN(dense(h) + input)
            ffn.append(FFNBlock(f"{p}.intermediate", (f"{p}.intermediate.dense",), f"{p}.output.dense",
                                out_features(layer.intermediate.dense), d_model=in_features(sa.query),
                                residual=(f"{p}.output", 1)))
        return att, ffn

    def shrink_attention_(self, attn: nn.Module, block: AttentionBlock, keep: list[int]) -> None:
        n_heads = len(keep) * block.group_size
        attn.num_attention_heads = n_heads
        attn.all_head_size = n_heads * block.head_dim


register(BertAdapter())
