"""Weight layout of the projections that gates and surgery touch: ``nn.Linear`` and the layer types adapters add.

``nn.Linear`` stores its weight ``[out, in]``; some families use a projection that stores it ``[in, out]`` (GPT-2's
``Conv1D``). An adapter declares such a type once as a :class:`LayerLayout` (``Adapter.layouts``); everything else
asks the helpers here, never the class name:

* :func:`in_features` / :func:`out_features`: the widths;
* :func:`weight_in_out`: the weight as ``[in, out]`` whatever the storage;
* :func:`feature_dim`: which weight dimension holds the input (or output) features;
* :func:`set_features_`: make the width attributes agree with a sliced weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

Side = Literal["in", "out"]


@dataclass(frozen=True)
class LayerLayout:
    """How one projection class stores its weight and widths.

    Args:
        cls: the module class (instances of subclasses match too).
        in_dim: the weight dimension indexed by input features (``1`` for ``[out, in]``, ``0`` for ``[in, out]``).
        in_attr: attribute holding the input width.
        out_attr: attribute holding the output width.
        empty_input: whether the forward runs with 0 input features (a block left with no unit).
        name: how messages name the class.
    """

    cls: type
    in_dim: int
    in_attr: str
    out_attr: str
    empty_input: bool = True
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.cls.__name__


LINEAR = LayerLayout(nn.Linear, 1, "in_features", "out_features", name="nn.Linear")
LAYOUTS: list[LayerLayout] = [LINEAR]  # nn.Linear first; adapters append theirs through taskprune.arch.register


def add_layout(layout: LayerLayout) -> None:
    """Make the helpers here understand ``layout.cls`` (called by :func:`taskprune.arch.register`)."""
    if not isinstance(layout, LayerLayout):
        raise TypeError(f"expected a taskprune.arch.LayerLayout, got {type(layout).__name__}; describe the projection "
                        "class with LayerLayout(cls, in_dim, in_attr, out_attr)")
    if layout.in_dim not in (0, 1):
        raise ValueError(f"LayerLayout.in_dim must be 0 (weight [in, out]) or 1 (weight [out, in]), got "
                         f"{layout.in_dim!r}")
    if all(existing.cls is not layout.cls for existing in LAYOUTS):
        LAYOUTS.append(layout)


def layout_of(module: nn.Module) -> LayerLayout | None:
    """The :class:`LayerLayout` of ``module``, or None when it is no projection type known to taskprune."""
    for layout in LAYOUTS:
        if isinstance(module, layout.cls):
            return layout
    return None


def known_projections() -> str:
    """``"nn.Linear or Conv1D"``: the projection classes known now, for messages."""
    return " or ".join(layout.label for layout in LAYOUTS)


def _layout(module: nn.Module) -> LayerLayout:
    layout = layout_of(module)
    if layout is None:
        raise TypeError(f"expected {known_projections()}, got {type(module).__name__}")
    return layout


def is_projection(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or a projection type an adapter declared."""
    return layout_of(module) is not None


def in_features(module: nn.Module) -> int:
    """Input width of a projection (``nn.Linear``, or a declared type such as GPT-2's ``[in, out]`` ``Conv1D``)."""
    return getattr(module, _layout(module).in_attr)


def out_features(module: nn.Module) -> int:
    """Output width of a projection."""
    return getattr(module, _layout(module).out_attr)


def feature_dim(module: nn.Module, side: Side) -> int:
    """The weight dimension indexed by input (``side="in"``) or output (``"out"``) features."""
    in_dim = _layout(module).in_dim
    return in_dim if side == "in" else 1 - in_dim


def weight_in_out(module: nn.Module) -> Tensor:
    """The weight, detached, as ``[in, out]`` (a view: ``nn.Linear`` stores ``[out, in]``, ``Conv1D`` ``[in, out]``)."""
    w = module.weight.detach()
    return w if _layout(module).in_dim == 0 else w.t()


def set_features_(module: nn.Module, side: Side, n: int) -> None:
    """Set the input or output width attribute of ``module`` to ``n`` (after its weight was sliced)."""
    layout = _layout(module)
    setattr(module, layout.in_attr if side == "in" else layout.out_attr, n)


def accepts_empty_input(module: nn.Module) -> bool:
    """Whether ``module`` still runs with 0 input features."""
    return _layout(module).empty_input
