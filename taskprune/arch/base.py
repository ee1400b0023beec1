"""What the rest of taskprune sees of a model: blocks of structured units, and the :class:`Adapter` of its family.

Paths are relative to the *base model* (``model.base_model``), so a prune spec made on a task model applies
unchanged to the bare encoder or to a wrapper that holds the same encoder. Widths are read from the modules' weights,
not from the config: after :func:`taskprune.shrink_` layers differ.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from taskprune.arch.layout import LayerLayout

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
    fused_qkv: bool = False  # q, k and v are one projection whose outputs are [q | k | v]
    d_model: int = 0
    residual: tuple[str, int] | None = None  # (module, positional arg) whose input is the residual stream this
    #   sub-layer's output is added to: the LayerNorm's other summand (post-norm) or the pre-norm's input (pre-norm)
    group: int = 1  # query heads per KV head, for a block shrunk to no head (nothing left to count them from)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads if self.n_kv_heads else self.group

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
    d_model: int = 0
    residual: tuple[str, int] | None = None  # as AttentionBlock.residual

    @property
    def n_units(self) -> int:
        return self.n_neurons

    @property
    def unit_width(self) -> int:
        return 1


def unit_channels(units: Sequence[int], width: int) -> Tensor:
    """Channel indices owned by ``units`` when each unit is ``width`` consecutive channels: ``[len(units) * width]``.

    Unit ``j`` owns ``[j * width, (j + 1) * width)``: for a block's output projection, ``width`` is its
    ``unit_width``; for the key and value projections of a KV group it is ``head_dim``.
    """
    u = torch.as_tensor(list(units), dtype=torch.long)
    return (u[:, None] * width + torch.arange(width)).reshape(-1)


@dataclass(frozen=True)
class Architecture:
    """The prunable structure of one model, and the adapter that knows its Hugging Face names."""

    model_type: str
    attention: tuple[AttentionBlock, ...]
    ffn: tuple[FFNBlock, ...]
    adapter: Adapter | None = field(default=None, compare=False, repr=False)

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


class Adapter(ABC):
    """Everything taskprune knows about one family of Hugging Face models; one subclass per family, one file each.

    A subclass sets :attr:`family` and :attr:`model_types`, implements :meth:`discover` and
    :meth:`shrink_attention_`, overrides the other hooks where its family needs more, and is made known with
    :func:`taskprune.arch.register`. Gates, scoring, selection, surgery, reconstruction, export and FLOP counts then
    work on it unchanged.
    """

    family: str = ""  # a name for messages, e.g. "bert"
    model_types: tuple[str, ...] = ()  # config.model_type values this adapter handles
    layouts: tuple[LayerLayout, ...] = ()  # projection classes other than nn.Linear (e.g. GPT-2's [in, out] Conv1D)
    ffn_width_field: str | None = None  # config field Hugging Face builds every feed-forward block's width from
    empty_attention: bool = True  # whether an attention module shrunk to no head still runs (its sub-layer then adds
    #   only the output projection's bias to the residual stream: the sub-layer is removed, residual and norm kept)

    # ---------------------------------------------------------------------------------------- discovery
    @abstractmethod
    def discover(self, base: nn.Module) -> tuple[Sequence[AttentionBlock], Sequence[FFNBlock]]:
        """The attention and feed-forward blocks of ``base`` (the HF base model), paths relative to it."""

    def architecture(self, base: nn.Module) -> Architecture:
        attention, ffn = self.discover(base)
        return Architecture(base.config.model_type, tuple(attention), tuple(ffn), self)

    # ---------------------------------------------------------------------------------------- shrink
    @abstractmethod
    def shrink_attention_(self, attn: nn.Module, block: AttentionBlock, keep: list[int]) -> None:
        """Make the attention module's attributes (head counts, widths) agree with its sliced weights.

        Called after surgery kept units ``keep`` of ``block`` (``attn`` is the module at ``block.name``). Install any
        hooks the family needs here (they survive on the module).
        """

    def shrink_ffn_(self, ffn: nn.Module, block: FFNBlock, keep: list[int]) -> None:
        """Make the feed-forward module's attributes agree with its sliced weights (default: nothing to do)."""

    def record_widths_(self, config, arch: Architecture, widths: dict[str, dict[str, int]]) -> None:
        """Update the standard config fields after a shrink, where every block of a kind keeps the same count
        (so plain ``from_pretrained`` builds the same shapes). ``widths``: ``{"heads"|"neurons": {block: n_kept}}``.

        Default: the feed-forward width field (:attr:`ffn_width_field`).
        """
        counts = set(widths["neurons"].values())
        field_ = self.ffn_width_field
        if len(counts) == 1 and arch.ffn and field_ is not None and hasattr(config, field_):
            setattr(config, field_, counts.pop())

    def dense_config_(self, config, fingerprint: dict) -> None:
        """Inverse of :meth:`record_widths_`: put back the dense widths of ``fingerprint`` (a dense
        :meth:`Architecture.fingerprint`) into a config read from an export.
        """
        dense = set(fingerprint["neurons"].values())
        field_ = self.ffn_width_field
        if len(dense) == 1 and field_ is not None and hasattr(config, field_):
            setattr(config, field_, dense.pop())

    # ---------------------------------------------------------------------------------------- reconstruction
    def bias_flag(self, kind: str) -> str | None:
        """The config flag that gives the projections of ``kind`` (``"heads"``/``"neurons"``) a bias when they
        have none, or None when the config cannot express one (default)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, model_types={list(self.model_types)})"
