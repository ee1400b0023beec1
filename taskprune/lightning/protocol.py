"""The hooks :class:`~taskprune.lightning.callback.TaskPruning` looks for on a LightningModule, as one ``typing.Protocol``.

Only ``pruning_model`` is required; the callback asks for every other hook with ``hasattr`` and falls back as
described on each member. :class:`~taskprune.lightning.module.AttributionModule` implements all of them; a module of your own
implements what it needs (see ``examples/own_project``)::

    class MyModule(L.LightningModule):
        @property
        def pruning_model(self):               # required: the nn.Module holding the transformers model
            return self.net
        def pruning_batch(self, batch):        # optional: your batch -> model kwargs + labels
            ids, mask, y = batch
            return {"input_ids": ids, "attention_mask": mask, "labels": y}

A model with a head of its own (an encoder plus a linear layer) needs nothing more when ``model(**inputs)`` returns
logits (a tensor or an object with ``.logits``): the default target reads them. Only other outputs need a target of
your own, a callable ``(outputs, batch) -> [batch]`` tensor to attribute, and, when ``model(**batch)`` is not how it
runs, a ``forward_fn``::

    def my_target(outputs, batch):             # outputs: whatever forward_fn returns
        return outputs["scores"].log_softmax(-1).gather(1, batch["labels"][:, None])[:, 0]

    TaskPruning(attribution=AttributionConfig(target=my_target), budget=Budget(amount=0.4))

Rows held out from calibration, whose task loss chooses the heads / neurons split of the mask search
(``Budget(split="auto" | "loss")``), come from a ``holdout_dataloader()`` on the *datamodule* (as
:class:`~taskprune.lightning.data.TaskDataModule` serves them; ``None`` when there are none) or, failing that, on the module.
Without one, ``split="auto"`` keeps Kwon et al.'s split by total score.

``isinstance(module, PruningModule)`` (runtime checkable) tells whether a module has *every* hook; the callback
itself needs only ``pruning_model``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from torch import nn

if TYPE_CHECKING:
    from taskprune.attribution import AttributionConfig
    from taskprune.spec import PruneSpec
    from taskprune.unitscores import UnitScores


@runtime_checkable
class PruningModule(Protocol):
    """What :class:`~taskprune.lightning.callback.TaskPruning` reads from ``pl_module`` (all but ``pruning_model`` optional)."""

    @property
    def pruning_model(self) -> nn.Module:
        """Required. The ``nn.Module`` that holds the transformers model: scored, then masked or shrunk in place."""
        ...

    attribution: AttributionConfig
    """With ``unit_scores()``: the config the module scores with; a different ``TaskPruning(attribution=...)`` is
    refused (one source of truth). Without ``unit_scores()`` the callback's own config is used."""

    def unit_scores(self) -> UnitScores:
        """Scores summed over all processes (collective: called on every rank at the end of ``fit``). Without it the
        callback scores up to ``calib_batches`` train batches itself, with its ``attribution`` config."""
        ...

    def pruning_batch(self, batch: Any) -> dict:
        """One of your batches -> the model's keyword arguments plus ``labels``. Without it batches must already be
        such dicts. Used by the callback's own calibration, tuning and reconstruction."""
        ...

    forward_fn: Callable[[nn.Module, dict], Any]
    """``fn(model, batch) -> outputs`` (with ``.logits`` or a logits tensor). Without it ``model(**inputs)``."""

    def keep_dense_copy(self) -> None:
        """Called before a spec is applied: keep an unpruned copy for side-by-side evaluation (optional)."""
        ...

    tokenizer_path: str | None
    """With ``TaskPruning(export_dir=...)``: the tokenizer saved beside the exported model (an attribute
    ``tokenizer`` holding a tokenizer object is looked for first)."""

    spec: PruneSpec | None
    """Set by the callback to the spec it applied (optional: checkpoints of shrunk models rebuild from it)."""

    spec_mode: Literal["shrink", "mask", "none"] | None
    """Set by the callback with ``spec``: how it was applied."""


__all__ = ["PruningModule"]
