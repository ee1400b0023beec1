"""Structured gates: one scalar per unit, applied at the input of the output / down projection.

A head (KV group) ``j`` of an attention block owns channels ``[j * unit_width, (j + 1) * unit_width)`` of its output
projection's input; an FFN neuron ``i`` owns channel ``i`` of its down projection's input. Multiplying those channels
by a gate ``g`` scales the unit's contribution to the residual stream: ``g == 1`` is the identity (multiplication by
one is exact in floating point), ``g == 0`` is the same as removing the unit.

All gates of a model live in one flat vector ``[n_units]`` (or one row per sample, ``[batch, n_units]``) so that a
single backward pass gives the gradient of every unit of every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from taskprune.arch import UNIT_KINDS, Architecture, AttentionBlock, FFNBlock, find_base, get_architecture


@dataclass(frozen=True)
class Slot:
    """Where one block's gates sit in the flat gate vector."""

    kind: str  # "heads" | "neurons"
    block: AttentionBlock | FFNBlock
    offset: int

    @property
    def n_units(self) -> int:
        return self.block.n_units

    @property
    def stop(self) -> int:
        return self.offset + self.block.n_units


def check_units(units: str | Sequence[str]) -> tuple[str, ...]:
    """Validate a unit selection: ``"heads"``, ``"neurons"``, ``"all"`` or a list of kinds."""
    if isinstance(units, str):
        units = UNIT_KINDS if units == "all" else (units,)
    units = tuple(units)
    bad = [u for u in units if u not in UNIT_KINDS]
    if bad or not units:
        raise ValueError(f"unknown unit kind(s) {bad or units!r}; allowed: {list(UNIT_KINDS)} or 'all'")
    return tuple(u for u in UNIT_KINDS if u in units)


class Gates:
    """Gate hooks on every structured unit of ``model`` (a HF model or a module that contains one).

    Use as a context manager, or call :meth:`install` / :meth:`remove`. With no values set, the hooks do nothing.

    Example::

        with Gates(model) as gates:
            g = torch.ones(batch_size, gates.n_units, requires_grad=True)
            gates.set(g)
            model(**batch).logits[...].sum().backward()   # g.grad: [batch_size, n_units]
    """

    def __init__(self, model: nn.Module, units: str | Sequence[str] = "all") -> None:
        self.units = check_units(units)
        self.model = model
        self.base, _ = find_base(model)
        self.arch: Architecture = get_architecture(model)
        slots, offset = [], 0
        for kind in self.units:
            for block in self.arch.blocks(kind):
                slots.append(Slot(kind, block, offset))
                offset += block.n_units
        self.slots: tuple[Slot, ...] = tuple(slots)
        self.n_units: int = offset
        self._values: Tensor | None = None
        self._handles: list = []

    # ------------------------------------------------------------------ values
    @property
    def values(self) -> Tensor | None:
        return self._values

    def set(self, values: Tensor | None) -> None:
        """Set all gates: ``[n_units]`` (shared by all samples), ``[batch, n_units]`` (one row per sample), or None."""
        if values is not None:
            if values.shape[-1] != self.n_units or values.dim() not in (1, 2):
                raise ValueError(
                    f"gate values of shape {tuple(values.shape)} do not fit this model: expected [{self.n_units}] "
                    f"or [batch, {self.n_units}] ({', '.join(self.units)})"
                )
        self._values = values

    def flat(self, per_block: dict[str, dict[str, Tensor]], fill: float = 1.0) -> Tensor:
        """Assemble a flat vector from ``{kind: {block_name: [n_units]}}``; missing blocks get ``fill``."""
        out = torch.full((self.n_units,), fill, dtype=torch.float32)
        for s in self.slots:
            v = per_block.get(s.kind, {}).get(s.block.name)
            if v is not None:
                out[s.offset : s.stop] = torch.as_tensor(v, dtype=torch.float32)
        return out

    def values_of(self, spec, scaled: bool = True) -> Tensor | None:
        """The flat gate vector of a :class:`~taskprune.spec.PruneSpec`: 0 for removed units, the unit's scale (or 1
        with ``scaled=False``) for kept ones; ``None`` for no spec. Kinds this object does not gate are left out."""
        if spec is None:
            return None
        per_block: dict[str, dict[str, Tensor]] = {}
        for s in self.slots:
            v = torch.zeros(s.n_units)
            kept = spec.kept(s.kind, s.block.name)
            v[kept] = torch.tensor(spec.scale_of(s.kind, s.block.name) if scaled else [1.0] * len(kept))
            per_block.setdefault(s.kind, {})[s.block.name] = v
        return self.flat(per_block)

    def split(self, flat: Tensor) -> dict[str, dict[str, Tensor]]:
        """Inverse of :meth:`flat`: ``[..., n_units]`` -> ``{kind: {block_name: [..., n_block_units]}}``."""
        out: dict[str, dict[str, Tensor]] = {k: {} for k in self.units}
        for s in self.slots:
            out[s.kind][s.block.name] = flat[..., s.offset : s.stop]
        return out

    # ------------------------------------------------------------------ hooks
    def _hook(self, slot: Slot):
        width = slot.block.unit_width

        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            g = self._values
            if g is None:
                return None
            x = args[0]
            g = g[..., slot.offset : slot.stop].to(dtype=x.dtype, device=x.device)
            scale = g.repeat_interleave(width, dim=-1) if width > 1 else g
            if scale.dim() == 2:  # [batch, width] -> [batch, 1, ..., width]
                if scale.shape[0] != x.shape[0]:
                    raise ValueError(
                        f"per-sample gates have {scale.shape[0]} rows but the input of {slot.block.name} has batch "
                        f"size {x.shape[0]}"
                    )
                scale = scale.view(scale.shape[0], *([1] * (x.dim() - 2)), scale.shape[-1])
            return (x * scale, *args[1:])

        return pre_hook

    def install(self) -> Gates:
        if self._handles:
            return self
        for slot in self.slots:
            target = slot.block.out if slot.kind == "heads" else slot.block.down
            module = self.base.get_submodule(target)
            self._handles.append(module.register_forward_pre_hook(self._hook(slot)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._values = None

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> Gates:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

