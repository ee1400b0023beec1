"""T5 / mT5 (encoder-decoder): ``{encoder,decoder}.block.<i>.layer.<j>`` with ``SelfAttention`` /
``EncDecAttention`` and ``DenseReluDense`` (``wi`` or gated ``wi_0`` + ``wi_1``, then ``wo``).

T5 shares one relative position bias ``[1, n_heads, q, k]`` across the layers of a stack: the first layer computes
it from ``relative_attention_bias`` and hands it on. With other kept heads per layer that cannot be sliced once, so
the bias stays full width (the embedding keeps all dense heads, its state-dict shape is unchanged) and each shrunk
``T5Attention`` gets hooks (:class:`T5BiasSlice`) that slice the full bias to its kept heads on the way in and hand
the full bias on to the next layer on the way out. Rebuilding a shrunk T5 therefore needs the spec (kept indices), not
only the widths: replay the spec on a fresh dense model with :func:`~taskprune.surgery.shrink_`, then load the weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from taskprune.arch.base import Adapter, AttentionBlock, FFNBlock
from taskprune.arch.layout import in_features, out_features
from taskprune.arch.registry import register


class T5Adapter(Adapter):
    family = "t5"
    model_types = ("t5", "mt5")
    ffn_width_field = "d_ff"

    def discover(self, base: nn.Module) -> tuple[list[AttentionBlock], list[FFNBlock]]:
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
                                                  a.key_value_proj_dim, d_model=in_features(a.q),
                                                  residual=(f"{lp}.layer_norm", 0)))
                    dense = getattr(sub, "DenseReluDense", None)
                    if dense is not None:
                        dp = f"{lp}.DenseReluDense"
                        up = ("wi",) if hasattr(dense, "wi") else ("wi_0", "wi_1")
                        ffn.append(FFNBlock(dp, tuple(f"{dp}.{u}" for u in up), f"{dp}.wo", in_features(dense.wo),
                                            d_model=out_features(dense.wo), residual=(f"{lp}.layer_norm", 0)))
        return att, ffn

    def shrink_attention_(self, attn: nn.Module, block: AttentionBlock, keep: list[int]) -> None:
        n_heads = len(keep) * block.group_size
        attn.n_heads = n_heads
        attn.inner_dim = n_heads * block.head_dim
        T5BiasSlice(keep, block.n_heads).register(attn)



register(T5Adapter())

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
