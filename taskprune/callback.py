"""TaskPruning: a Lightning callback that turns attribution scores into a structured spec and applies it.

Protocol for any LightningModule (``AttributionModule`` implements it; so can yours):

- ``pruning_model`` (required): the ``nn.Module`` that holds the transformers model to prune.
- ``unit_scores() -> UnitScores`` (optional): scores summed over all processes. Without it, the callback calibrates
  by itself at the end of ``fit``: it scores up to ``calib_batches`` batches of the train dataloader with ``method``.
- ``pruning_batch(batch) -> dict`` (optional): turns one of your batches into the model's keyword arguments plus
  ``labels``; without it, batches must already be such dicts.
- ``keep_dense_copy()``, ``spec`` and ``spec_mode`` (optional): for side-by-side evaluation and checkpoints.

At the end of ``fit`` the callback selects a spec (on rank zero, broadcast so every rank applies the same), writes
``spec.json`` and ``scores.safetensors`` atomically (rank zero), and applies it (``mask`` or ``shrink``). At
``test`` / ``validate`` / ``predict`` start it applies the spec found in ``output_dir`` (or ``spec_path``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DistributedSampler
from lightning.pytorch.utilities import rank_zero_info

from taskprune.attribution import AGGREGATIONS, METHODS, Attributor
from taskprune.selection import select_units
from taskprune.spec import PruneSpec
from taskprune.surgery import apply_mask, shrink_
from taskprune.unitscores import UnitScores

log = logging.getLogger(__name__)

BUDGET_KINDS = ("macs", "params", "sparsity", "heads", "neurons")
APPLY = ("mask", "shrink", "none")
SCOPES = ("per_kind", "global", "layerwise")
NORMALIZE = ("none", "l1", "l2", "max")


def _check_writable(folder: Path, what: str) -> None:
    """Fail before any work when ``folder`` cannot be created or written to (creates nothing)."""
    probe = folder.absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{what} {str(folder)!r} cannot be created: {str(probe)!r} is a file, not a folder; "
                                 "choose another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {str(folder)!r} is not writable: {str(probe)!r} is read-only for this user; "
                              "choose another folder or fix its permissions")


class TaskPruning(L.Callback):
    """Select and apply a structured pruning spec from attribution scores.

    Args:
        budget: fraction to remove, in [0, 1), of what ``budget_kind`` names.
        budget_kind: ``macs`` (prunable MACs at ``seq_len``), ``params``, ``sparsity`` (fraction of heads and of
            neurons), ``heads`` or ``neurons``.
        scope: ``per_kind`` (default: the same share of attention and of FFN cost, units ranked across layers within
            a kind), ``global`` (heads and neurons pooled by score per MAC) or ``layerwise`` (same fraction per block).
        normalize: per-block score normalisation before a global ranking: ``none``, ``l1``, ``l2``, ``max``.
        units: ``all``, ``heads`` or ``neurons``: the kinds that may be removed.
        apply: ``shrink`` (physical removal: real speed), ``mask`` (soft gates: reversible, no speed), ``none``.
        output_dir: where ``spec.json`` and ``scores.safetensors`` go.
        spec_path: an existing spec to apply at test/validate/predict (default: ``output_dir/spec.json``).
        seq_len: sequence length at which MACs are counted.
        min_heads: attention units kept per block, at least 1.
        min_neurons: FFN neurons kept per block.
        overwrite: replace a spec already in ``output_dir`` (otherwise a second run there is refused).
        method, target, steps, aggregate, calib_batches: used only when the module has no ``unit_scores()``.
        checkpoint_every: write ``output_dir/calibration.ckpt`` (atomically) every this many calibration batches;
            resume a killed run with ``--ckpt_path <output_dir>/calibration.ckpt`` (calibration has no optimizer step,
            so ``ModelCheckpoint(every_n_train_steps=...)`` never fires).
        reconstruct: training-free compensation of the removed units before they go (:mod:`taskprune.reconstruct`),
            from the calibration batches: ``none`` (default: the pre-trained weights stay untouched), ``scale`` (per
            unit least-squares rescaling of the kept units: a small gain at every MAC cut measured), ``bias``
            (FLAP-style mean compensation) or ``lstsq`` (both): larger gains at 40-50 % cuts, harmful at >= 60 %
            (benchmarks/results/reconstruction.md). Costs one more pass over the calibration data. One process only.
        export_dir: with ``apply="shrink"``, also save the shrunk model there at the end of ``fit``
            (:func:`taskprune.export.save_pruned`, rank zero; reload with :func:`taskprune.export.load_pruned`).
    """

    def __init__(
        self,
        budget: float = 0.4,
        budget_kind: Literal["macs", "params", "sparsity", "heads", "neurons"] = "macs",
        scope: Literal["per_kind", "global", "layerwise"] = "per_kind",
        normalize: Literal["none", "l1", "l2", "max"] = "l1",
        units: Literal["all", "heads", "neurons"] = "all",
        apply: Literal["mask", "shrink", "none"] = "shrink",
        output_dir: str = "runs/taskprune",
        spec_path: str | None = None,
        seq_len: int = 128,
        min_heads: int = 1,
        min_neurons: int = 1,
        overwrite: bool = False,
        method: Literal["ig", "grad_x_gate", "fisher", "activation", "magnitude", "random"] = "ig",
        target: Literal["label", "pseudo", "neg_loss"] = "label",
        steps: int = 4,
        aggregate: Literal["abs", "signed"] = "abs",
        calib_batches: int | None = None,
        checkpoint_every: int | None = None,
        export_dir: str | None = None,
        reconstruct: Literal["none", "bias", "scale", "lstsq"] = "none",
    ) -> None:
        super().__init__()
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget < 1:
            raise ValueError(f"budget must be a fraction in [0, 1), got {budget!r}; e.g. budget=0.4 removes 40% "
                             f"of the {budget_kind}")
        for name, value, allowed in (("budget_kind", budget_kind, BUDGET_KINDS), ("apply", apply, APPLY),
                                     ("scope", scope, SCOPES), ("normalize", normalize, NORMALIZE),
                                     ("units", units, ("all", "heads", "neurons")), ("method", method, METHODS),
                                     ("aggregate", aggregate, AGGREGATIONS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; allowed: {list(allowed)}")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if not isinstance(min_heads, int) or min_heads < 1:
            raise ValueError(f"min_heads must be an integer >= 1 (a layer keeps at least one head), got {min_heads!r}")
        for name, value in (("calib_batches", calib_batches), ("checkpoint_every", checkpoint_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if export_dir is not None and apply != "shrink":
            raise ValueError(f"export_dir needs apply='shrink' (got apply={apply!r}): only a shrunk model is exported")
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.checkpoint_every = checkpoint_every
        from taskprune.reconstruct import METHODS as RECONSTRUCT

        if reconstruct not in RECONSTRUCT:
            raise ValueError(f"unknown reconstruct {reconstruct!r}; allowed: {list(RECONSTRUCT)}")
        if reconstruct != "none" and apply == "none":
            raise ValueError("reconstruct needs a spec to apply: set apply='shrink' (or 'mask'), or reconstruct='none'")
        self.reconstruct = reconstruct
        self.budget, self.budget_kind, self.scope, self.normalize = float(budget), budget_kind, scope, normalize
        self.units, self.apply, self.seq_len = units, apply, seq_len
        self.min_heads, self.min_neurons, self.overwrite = min_heads, min_neurons, overwrite
        self.output_dir = Path(output_dir)
        self.spec_path = Path(spec_path) if spec_path else None
        self.method, self.target, self.steps, self.aggregate = method, target, steps, aggregate
        self.calib_batches = calib_batches
        self.spec: PruneSpec | None = None
        self.applied: str | None = None

    # ------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _model(pl_module):
        model = getattr(pl_module, "pruning_model", None)
        if model is None:
            raise TypeError(
                f"{type(pl_module).__name__} does not expose `pruning_model`; add a property that returns the "
                "nn.Module holding your transformers model (see taskprune.callback's protocol)"
            )
        return model

    def _select(self, scores: UnitScores) -> PruneSpec:
        kwargs = {self.budget_kind: self.budget}
        spec = select_units(scores, seq_len=self.seq_len, scope=self.scope, normalize=self.normalize,
                            min_heads=self.min_heads, min_neurons=self.min_neurons, units=self.units, **kwargs)
        return spec

    def _spec_file(self) -> Path:
        return self.spec_path or self.output_dir / "spec.json"

    # ------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = self._model(pl_module)
        if stage == "fit":
            if self.export_dir is not None and self.export_dir.exists() and not self.overwrite:
                raise FileExistsError(f"export_dir {self.export_dir} already exists; pass overwrite=True or choose "
                                      "another export_dir")
            _check_writable(self.output_dir, "output_dir")
            if self.export_dir is not None:
                _check_writable(self.export_dir.parent, "export_dir's parent")
            # fail before any work when the budget is unreachable for this model
            from taskprune.arch import get_architecture
            from taskprune.unitscores import empty_scores

            fp = get_architecture(model).fingerprint()
            kinds = ("heads", "neurons") if self.units == "all" else (self.units,)
            selection_log = logging.getLogger("taskprune.selection")
            level = selection_log.level
            selection_log.setLevel(logging.WARNING)  # a probe: its selection means nothing, do not report it
            try:
                self._select(empty_scores(fp, kinds, "probe"))
            finally:
                selection_log.setLevel(level)
            return
        self._apply_existing(pl_module, model, required=self.spec_path is not None)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # here, not in setup: Lightning sets trainer.ckpt_path only when it restores, after setup
        existing = self.output_dir / "spec.json"
        if existing.exists() and not self.overwrite and trainer.ckpt_path is None:
            raise FileExistsError(
                f"{existing} already holds a spec from an earlier run; pass overwrite=True "
                "(--pruning.overwrite true or TaskPruning(overwrite=True)) or choose another output_dir, so runs "
                "never mix"
            )

    def _apply_existing(self, pl_module, model, required: bool) -> None:
        path = self._spec_file()
        if self.spec is None:
            if not path.exists():
                if required:
                    raise FileNotFoundError(f"spec_path {path} does not exist; run `fit` first to write it, or "
                                            "point spec_path at an existing spec.json")
                rank_zero_info(f"taskprune: no spec at {path}; evaluating the dense model only")
                return
            self.spec = PruneSpec.load(path)
        state = self.spec.validate(model)  # raises for a spec of another model
        if state == "shrunk" or self.apply == "none":
            return
        if getattr(pl_module, "spec", None) is not None and getattr(pl_module, "spec_mode", None):
            return  # already applied (e.g. right after fit in the same process)
        self._apply(pl_module, model)

    def _apply(self, pl_module, model) -> None:
        if hasattr(pl_module, "keep_dense_copy"):
            pl_module.keep_dense_copy()
        if self.apply == "shrink":
            shrink_(model, self.spec)
        elif self.apply == "mask":
            apply_mask(model, self.spec)
        self.applied = self.apply
        if hasattr(pl_module, "spec"):
            pl_module.spec, pl_module.spec_mode = self.spec, self.apply
        rank_zero_info(f"taskprune: applied spec ({self.apply}): {self.spec.summary()}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = self._model(pl_module)
        if hasattr(pl_module, "unit_scores"):
            scores = pl_module.unit_scores()
        else:
            scores = self._calibrate(trainer, pl_module, model)
        scores.check_finite()
        if scores.count == 0 and scores.method not in ("magnitude", "random"):
            raise ValueError("calibration saw no samples: the train dataloader was empty (check limit_train_batches "
                             "and the calibration set size)")
        spec = self._select(scores) if trainer.is_global_zero else None
        spec_dict = trainer.strategy.broadcast(spec.to_dict() if spec is not None else None, src=0)
        self.spec = PruneSpec.from_dict(spec_dict)
        if trainer.is_global_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            scores.save(self.output_dir / "scores.safetensors")
            self.spec.save(self.output_dir / "spec.json")
            rank_zero_info(f"taskprune: wrote {self.output_dir / 'spec.json'} ({scores.count} samples, "
                           f"method {scores.method})")
        trainer.strategy.barrier("taskprune_spec_written")
        if self.reconstruct != "none":
            self._reconstruct(trainer, pl_module, model)
        if self.apply != "none":
            self._apply(pl_module, model)
        if self.export_dir is not None:
            if trainer.is_global_zero:
                from taskprune.export import save_pruned

                tokenizer = getattr(pl_module, "tokenizer", None) or getattr(pl_module, "tokenizer_path", None)
                save_pruned(model, self.spec, self.export_dir, tokenizer=tokenizer, overwrite=self.overwrite)
                rank_zero_info(f"taskprune: exported the shrunk model to {self.export_dir}")
            trainer.strategy.barrier("taskprune_exported")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.checkpoint_every and (batch_idx + 1) % self.checkpoint_every == 0:
            self.save_calibration_checkpoint(trainer)

    def save_calibration_checkpoint(self, trainer: L.Trainer) -> Path:
        """Write ``output_dir/calibration.ckpt`` atomically (collective: every rank calls it, rank zero writes)."""
        path = self.output_dir / "calibration.ckpt"
        tmp = self.output_dir / ".calibration.ckpt.tmp"
        try:
            trainer.save_checkpoint(tmp)
        except BaseException:
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)  # e.g. a full disk: no half-written file stays beside the last good one
            raise
        if trainer.is_global_zero:
            os.replace(tmp, path)
        trainer.strategy.barrier("taskprune_calibration_checkpoint")
        return path

    def _batches(self, trainer: L.Trainer, pl_module):
        """The calibration batches (converted by ``pruning_batch`` and moved to the module's device)."""
        loaders = trainer.train_dataloader
        loader = loaders if not isinstance(loaders, (list, tuple)) else loaders[0]
        convert = getattr(pl_module, "pruning_batch", None)
        for i, batch in enumerate(loader):
            if self.calib_batches is not None and i >= self.calib_batches:
                break
            batch = convert(batch) if convert else batch
            yield {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _reconstruct(self, trainer: L.Trainer, pl_module, model) -> None:
        from taskprune.reconstruct import reconstruct_

        if trainer.world_size > 1:
            raise ValueError(f"reconstruct={self.reconstruct!r} runs in one process (its statistics are not summed "
                             "across processes yet); calibrate with several, then reconstruct with devices=1")
        if hasattr(pl_module, "keep_dense_copy"):
            pl_module.keep_dense_copy()  # the dense reference must not carry the compensation
        reconstruct_(model, self.spec, self._batches(trainer, pl_module), self.reconstruct,
                     forward=getattr(pl_module, "forward_fn", None))
        rank_zero_info(f"taskprune: reconstruction {self.reconstruct!r} applied to the kept units")

    def _calibrate(self, trainer: L.Trainer, pl_module, model) -> UnitScores:
        """Score units on the train dataloader (for modules without ``unit_scores()``), summed over ranks."""
        att = Attributor(model, self.method, self.target, self.units, steps=self.steps, aggregate=self.aggregate)
        if att.data_free:
            return att.to_scores(att.data_free_sums(), 0)
        total = torch.zeros(att.gates.n_units, dtype=torch.float64)
        count = 0.0
        loaders = trainer.train_dataloader
        loader = loaders if not isinstance(loaders, (list, tuple)) else loaders[0]
        convert = getattr(pl_module, "pruning_batch", None)
        world, rank = trainer.world_size, trainer.global_rank
        for i, batch in enumerate(loader):
            if self.calib_batches is not None and i >= self.calib_batches:
                break
            batch = convert(batch) if convert else batch
            batch = {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            sampler = getattr(loader, "sampler", None)
            if world > 1 and isinstance(sampler, DistributedSampler) and not sampler.drop_last:
                local = i * loader.batch_size + torch.arange(len(next(iter(batch.values()))))
                batch["sample_weight"] = (rank + local * world < len(loader.dataset)).double()  # drop padding
            sums, w = att.batch_sums(batch)
            total += sums
            count += w
        total = trainer.strategy.reduce(total.to(pl_module.device), reduce_op="sum").cpu()
        count = float(trainer.strategy.reduce(torch.tensor(count, device=pl_module.device), reduce_op="sum"))
        return att.to_scores(total, int(round(count)))

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"spec_path": str(self._spec_file()), "applied": self.applied}

    def load_state_dict(self, state_dict: dict) -> None:
        self.applied = state_dict.get("applied")
