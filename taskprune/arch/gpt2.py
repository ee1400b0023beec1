"""GPT-2 (decoder-only): ``h.<i>`` with a fused ``attn.c_attn`` (``[q | k | v]``) and ``mlp``; its projections are
``Conv1D``, which stores the weight ``[in, out]``."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from taskprune.arch.base import Adapter, AttentionBlock, FFNBlock
from taskprune.arch.layout import LayerLayout, in_features, out_features
from taskprune.arch.registry import register

# Conv1D cannot run with 0 input features (its forward views the input as [-1, 0])
CONV1D = LayerLayout(Conv1D, in_dim=0, in_attr="nx", out_attr="nf", empty_input=False)


class GPT2Adapter(Adapter):
    family = "gpt2"
    model_types = ("gpt2",)
    layouts = (CONV1D,)
    ffn_width_field = "n_inner"
    empty_attention = False  # the fused c_attn output is split in three: with no head there is nothing to split

    def discover(self, base: nn.Module) -> tuple[list[AttentionBlock], list[FFNBlock]]:
        att, ffn = [], []
        for i, block in enumerate(base.h):
            p = f"h.{i}"
            a = block.attn
            if getattr(a, "is_cross_attention", False):
                raise ValueError("GPT-2 cross-attention blocks are not supported; use a decoder-only GPT-2")
            n = in_features(a.c_proj) // a.head_dim
            c = f"{p}.attn.c_attn"
            att.append(AttentionBlock(f"{p}.attn", c, c, c, f"{p}.attn.c_proj", n, n, a.head_dim, fused_qkv=True,
                                      d_model=in_features(a.c_attn), residual=(f"{p}.ln_1", 0)))
            ffn.append(FFNBlock(f"{p}.mlp", (f"{p}.mlp.c_fc",), f"{p}.mlp.c_proj", in_features(block.mlp.c_proj),
                                d_model=out_features(block.mlp.c_proj), residual=(f"{p}.ln_2", 0)))
        return att, ffn

    def shrink_attention_(self, attn: nn.Module, block: AttentionBlock, keep: list[int]) -> None:
        n_heads = len(keep) * block.group_size
        attn.num_heads = n_heads
        attn.split_size = n_heads * block.head_dim


register(GPT2Adapter())
