"""Architecture adapters, keyed by ``config.model_type``: the only package that knows Hugging Face names.

One :class:`Adapter` per family, one file each (:mod:`~taskprune.arch.bert`, :mod:`~taskprune.arch.t5`,
:mod:`~taskprune.arch.llama`, :mod:`~taskprune.arch.gpt2`). An adapter owns block discovery, the weight layout of its
projections (:mod:`~taskprune.arch.layout`), the module attributes and config fields a shrink updates and their
inverse for export, and the config flags that give projections a bias. Everything else sees
:class:`AttentionBlock` and :class:`FFNBlock` records (paths relative to the *base model*, ``model.base_model``) and
asks ``Architecture.adapter``.

Adding a family is one file, ``taskprune/arch/<family>.py`` (every module of this package but ``base``, ``layout``
and ``registry`` is imported on first use), or the same code anywhere outside the package::

    class MyAdapter(Adapter):
        family, model_types, ffn_width_field = "my", ("my-model",), "intermediate_size"
        def discover(self, base): ...            # -> (attention blocks, feed-forward blocks)
        def shrink_attention_(self, attn, block, keep): ...   # head-count attributes after slicing

    register(MyAdapter())
"""

from __future__ import annotations

import importlib
import pkgutil

from taskprune.arch.base import UNIT_KINDS, Adapter, Architecture, AttentionBlock, FFNBlock, unit_channels
from taskprune.arch.layout import (LayerLayout, accepts_empty_input, feature_dim, in_features, is_projection,
                                   known_projections, out_features, set_features_, weight_in_out)
from taskprune.arch.registry import REGISTRY, adapter_for, find_base, find_hf_model, get_architecture, register

_INFRA = ("base", "layout", "registry")
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _INFRA):
    importlib.import_module(f"{__name__}.{_module}")  # each family module registers its adapter

__all__ = [
    "UNIT_KINDS", "Adapter", "Architecture", "AttentionBlock", "FFNBlock", "LayerLayout", "REGISTRY", "register",
    "adapter_for", "find_hf_model", "find_base", "get_architecture", "unit_channels", "in_features", "out_features",
    "weight_in_out", "feature_dim", "set_features_", "is_projection", "accepts_empty_input", "known_projections",
]
