"""The registry: ``config.model_type`` -> :class:`~taskprune.arch.base.Adapter`, and finding the Hugging Face model
inside a module."""

from __future__ import annotations

from torch import nn

from taskprune.arch.base import Adapter, Architecture
from taskprune.arch.layout import add_layout

REGISTRY: dict[str, Adapter] = {}  # config.model_type -> adapter


def register(adapter: Adapter, replace: bool = False) -> Adapter:
    """Make ``adapter`` handle every ``config.model_type`` in ``adapter.model_types``; return it.

    A model type already handled by another adapter is refused unless ``replace=True``.
    """
    if isinstance(adapter, type):
        raise TypeError(f"register needs an adapter instance, got the class {adapter.__name__}; call "
                        f"register({adapter.__name__}())")
    if not isinstance(adapter, Adapter):
        raise TypeError(f"expected a taskprune.arch.Adapter, got {type(adapter).__name__}; subclass Adapter")
    types = adapter.model_types
    if isinstance(types, str) or not types or not all(isinstance(t, str) and t for t in types):
        raise ValueError(f"{type(adapter).__name__}.model_types must be a non-empty tuple of config.model_type "
                         f"strings, got {types!r}; e.g. model_types = ('bert', 'roberta')")
    taken = {t: REGISTRY[t] for t in types if t in REGISTRY and REGISTRY[t] is not adapter}
    if taken and not replace:
        raise ValueError(f"model_type(s) {sorted(taken)} are already handled by "
                         f"{sorted({type(a).__name__ for a in taken.values()})}; pass replace=True to override")
    for layout in adapter.layouts:
        add_layout(layout)
    for t in types:
        REGISTRY[t] = adapter
    return adapter


def adapter_for(model_type: str) -> Adapter:
    """The adapter registered for ``model_type`` (``ValueError`` naming the supported ones if none)."""
    if model_type not in REGISTRY:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {sorted(REGISTRY)}. "
            "Write an Adapter for it and call taskprune.arch.register(adapter) to support another architecture."
        )
    return REGISTRY[model_type]


def _hf_models(model: nn.Module):
    """``(path, module)`` of every Hugging Face model inside ``model``, outermost first (pre-order)."""
    for path, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "model_type") and hasattr(module, "base_model"):
            yield path, module


def find_hf_model(model: nn.Module) -> tuple[nn.Module, str]:
    """``(hf_model, path)``: the outermost Hugging Face model in ``model`` (e.g. the
    ``BertForSequenceClassification``, not its ``BertModel``), and where it sits ("" for ``model`` itself)."""
    for path, module in _hf_models(model):
        return module, path
    raise _not_found(model)


def find_base(model: nn.Module) -> tuple[nn.Module, str]:
    """Return ``(base_model, path)`` for a Hugging Face model, or for any module that contains one.

    ``path`` is where the base model sits inside ``model`` ("" when ``model`` is the base model).
    """
    for path, module in _hf_models(model):
        base = module.base_model
        for sub_path, sub in module.named_modules():
            if sub is base:
                return base, ".".join(x for x in (path, sub_path) if x)
    raise _not_found(model)


def _not_found(model: nn.Module) -> TypeError:
    return TypeError(f"no Hugging Face model found inside {type(model).__name__}; pass a transformers "
                     "PreTrainedModel or a module that holds one as a submodule")


def get_architecture(model: nn.Module) -> Architecture:
    """Resolve the prunable structure of ``model`` (or of the HF model it contains)."""
    base, _ = find_base(model)
    return adapter_for(base.config.model_type).architecture(base)
