"""TaskPruning: a Lightning callback that turns attribution scores into a structured spec and applies it.

Protocol for any LightningModule (``AttributionModule`` implements it; so can yours):

- ``pruning_model`` (required): the ``nn.Module`` that holds the transformers model to prune.
- ``unit_scores() -> UnitScores`` (optional): scores summed over all processes. Without it, the callback calibrates
  by itself at the end of ``fit``: it scores up to ``calib_batches`` batches of the train dataloader with its
  ``attribution`` config, through the same loop as the module (:mod:`taskprune.calibration`).
- ``attribution`` (optional, with ``unit_scores()``): the module's :class:`~taskprune.attribution.AttributionConfig`.
  It is the one source of truth: a callback ``attribution`` that differs from it is refused, not ignored.
- ``pruning_batch(batch) -> dict`` (optional): turns one of your batches into the model's keyword arguments plus
  ``labels``; without it, batches must already be such dicts.
- ``keep_dense_copy()``, ``spec`` and ``spec_mode`` (optional): for side-by-side evaluation and checkpoints.
- ``holdout_dataloader()`` (optional, on the datamodule or the module; ``TaskDataModule`` has it): rows held out from
  calibration, whose task loss chooses the heads / neurons split of the mask search (``budget.split``).
- ``calibration_fingerprint()`` (optional, on the datamodule; ``TaskDataModule`` has it): a string that changes with
  the calibration rows, recorded in calibration checkpoints (a resume on other rows is refused) and in
  ``spec.meta["data"]``.

At the end of ``fit`` the callback runs the pipeline (:class:`taskprune.pipeline.Pipeline`: allocate, rearrange, tune
on the scores) and selects a spec (on rank zero, broadcast so every rank applies the same), writes
``spec.json`` and ``scores.safetensors`` atomically (rank zero), and applies it (``mask`` or ``shrink``). At
``test`` / ``validate`` / ``predict`` start it applies the spec found in ``output_dir`` (or ``spec_path``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal, get_args

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from dataclasses import replace

from taskprune.attribution import AttributionConfig, Attributor, default_forward
from taskprune.deploy import OnnxOptions
from taskprune.calibration import calibrate, loader_batches
from taskprune.io import MARKER, acquire_lock, file_problem, partial_dirs, read_marker, release_lock, write_marker
from taskprune.pipeline import DEFAULT_TUNING, PRESETS, Pipeline
from taskprune.selection import Budget, check_budget
from taskprune.spec import PruneSpec, weights_fingerprint
from taskprune.surgery import apply_mask, shrink_
from taskprune.tuning import TuningConfig, fold_scales_
from taskprune.unitscores import UnitScores

log = logging.getLogger(__name__)

Apply = Literal["shrink", "mask", "none"]
APPLY: tuple[str, ...] = get_args(Apply)
Runtime = Literal["torch", "onnx"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)

RUN_KEY = "taskprune_run"
"""Key of a calibration checkpoint's record of what its sums belong to (:meth:`TaskPruning.run_record`)."""
_FREE_ON_RESUME = ("alpha_batch",)  # attribution fields that change memory use, not the sums


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


# keywords of taskprune 0.1 -> where the value goes now (CHANGELOG.md, 0.2.0)
_BUDGET_FIELDS = ("scope", "normalize", "seq_len", "min_heads", "min_neurons")
_ATTRIBUTION_FIELDS = ("method", "target", "steps", "aggregate", "units")
REMOVED_KEYWORDS: dict[str, str] = {
    "budget_kind": "budget=Budget(amount=..., kind=...) (YAML: pruning.budget.kind)",
    **{k: f"budget=Budget({k}=...) (taskprune.selection.Budget; YAML: pruning.budget.{k})" for k in _BUDGET_FIELDS},
    **{k: f"attribution=AttributionConfig({k}=...) (taskprune.attribution.AttributionConfig; YAML: "
          f"model.attribution.{k})" for k in _ATTRIBUTION_FIELDS},
    "reconstruct": "nothing: it was removed in 0.2; the tuning stage covers its least-squares fits "
                   "(tuning=TuningConfig(...), YAML: pruning.tuning)",
}


def _removed_keywords(given: dict) -> str:
    """The message for keywords ``TaskPruning`` does not take: each old one with its replacement."""
    known = [f"{k} -> {REMOVED_KEYWORDS[k]}" for k in given if k in REMOVED_KEYWORDS]
    unknown = [k for k in given if k not in REMOVED_KEYWORDS]
    parts = []
    if known:
        parts.append("TaskPruning no longer takes " + "; ".join(known) + " (see CHANGELOG.md, 0.2.0)")
    if unknown:
        parts.append(f"TaskPruning got unexpected keyword argument(s) {unknown}; see help(TaskPruning) for its "
                     "arguments")
    return ". ".join(parts)


class TaskPruning(L.Callback):
    """Select and apply a structured pruning spec from attribution scores.

    Args:
        budget: what to remove and how units are chosen (:class:`~taskprune.selection.Budget`: amount, kind, scope,
            normalize, min_heads, min_neurons, seq_len, split). ``seq_len`` follows the datamodule's ``max_length``
            when there is one (logged).
        preset: a named pipeline (:data:`taskprune.pipeline.PRESETS`: ``taskprune``, ``kwon``, baselines). It fills
            the budget fields left at their defaults (scope, floors, seq_len...) and the tuning when left out (None);
            its attribution must be the one in force (the module's, or this callback's), else it is refused
            with the config to set.
        attribution: how units are scored (:class:`~taskprune.attribution.AttributionConfig`). A module with
            ``unit_scores()`` scores with its own config: leave this out (the CLI links it to the module's); a
            different one is refused. Otherwise the callback calibrates with it (default ``AttributionConfig()``).
            Its ``units`` also names the kinds that may be removed.
        apply: ``shrink`` (physical removal: real speed), ``mask`` (soft gates: reversible, no speed), ``none``.
        output_dir: where ``spec.json`` and ``scores.safetensors`` go (with a ``.taskprune`` marker). One run at a
            time: ``fit`` holds ``output_dir/.taskprune.lock`` until it ends.
        spec_path: an existing spec to apply at test/validate/predict (default: ``output_dir/spec.json``).
        overwrite: replace a spec already in ``output_dir`` (otherwise a second run there is refused, a resume from
            another run's checkpoint too), and an ``export_dir`` written by an earlier export. It never deletes what
            taskprune did not write: a folder without taskprune's marker, the input model's folder and the run's own
            ``output_dir`` are refused before any work.
        calib_batches: batches the callback's own calibration reads (modules without ``unit_scores()``), **per
            process** (N processes read N x calib_batches batches); all the train loader's if None. Rearrangement and
            tuning read the same batches. The calibration size summed over processes is logged.
        checkpoint_every: write ``output_dir/calibration.ckpt`` (atomically) every this many calibration batches;
            resume a killed run with ``--ckpt_path <output_dir>/calibration.ckpt`` (calibration has no optimizer step,
            so ``ModelCheckpoint(every_n_train_steps=...)`` never fires). Removed once the spec is written. The
            checkpoint records what its sums belong to (:meth:`run_record`: weights, task, calibration rows,
            attribution, max_length); a resume with another value is refused, naming it.
        keep_checkpoint: keep ``calibration.ckpt`` after a successful run (default: removed with the spec written).
        allow_foreign_spec: at test / validate / predict, apply a spec recorded for another task or for other weights
            (``spec.meta``: ``task``, ``weights``); refused otherwise. The report then says the spec is foreign.
        tuning: the training-free stages after selection (:class:`~taskprune.tuning.TuningConfig`, rank zero, on the
            calibration batches). None (default): the preset's, else :data:`~taskprune.pipeline.DEFAULT_TUNING` (the
            kept output-projection columns refitted to the dense model; the spec carries them and they go into the
            weights when it is applied), off with ``apply="none"``. ``TuningConfig()`` turns tuning off (masks only,
            e.g. for a :class:`~taskprune.bank.MaskBank`); Kwon et al.'s rearrangement and mask tuning are options.
        onnx_dir: with ``apply="shrink"``, also export the shrunk model to ONNX there at the end of ``fit``
            (:func:`taskprune.deploy.save_onnx`: checked against PyTorch before the folder is written; needs
            ``pip install -e '.[deploy]'``, checked before calibration). ``onnx``: its options
            (:class:`~taskprune.deploy.OnnxOptions`: opset, optimize, quantize ``int8``).
        export_dir: with ``apply="shrink"``, also save the shrunk model there at the end of ``fit``
            (:func:`taskprune.export.save_pruned`, rank zero; reload with :func:`taskprune.export.load_pruned`).
        runtime: what ``test`` / ``validate`` evaluate as the pruned model: ``torch`` (the spec applied to the loaded
            model) or ``onnx`` (the artifact that ships: the ONNX Runtime session of ``onnx_dir``, fp32 or int8 as
            exported, checked to hold this run's spec; its throughput is the session's). Needs ``onnx_dir``.
    """

    def __init__(
        self,
        budget: Budget = Budget(),
        attribution: AttributionConfig | None = None,
        apply: Apply = "shrink",
        output_dir: str = "runs/taskprune",
        spec_path: str | None = None,
        overwrite: bool = False,
        calib_batches: int | None = None,
        checkpoint_every: int | None = None,
        tuning: TuningConfig | None = None,
        export_dir: str | None = None,
        onnx_dir: str | None = None,
        onnx: OnnxOptions = OnnxOptions(),
        preset: str | None = None,
        keep_checkpoint: bool = False,
        allow_foreign_spec: bool = False,
        runtime: Runtime = "torch",
        **removed,
    ) -> None:
        super().__init__()
        if removed:
            raise TypeError(_removed_keywords(removed))
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; allowed: {list(PRESETS)}")
        if not isinstance(budget, Budget):
            raise TypeError(f"budget must be a taskprune.selection.Budget, got {budget!r}; e.g. "
                            "Budget(amount=0.4, kind='macs') removes 40% of the prunable MACs")
        if tuning is not None and not isinstance(tuning, TuningConfig):
            raise TypeError(f"tuning must be a taskprune.tuning.TuningConfig or None, got {tuning!r}; e.g. "
                            "TuningConfig(tune='schedule'), or TuningConfig() for none")
        if preset is not None:  # the preset fills what was left at its default
            base = Pipeline.preset(preset)
            defaults = Budget()
            budget = replace(budget, **{k: v for k, v in base.budget.to_dict().items()
                                        if k != "amount" and getattr(budget, k) == getattr(defaults, k)})
        if tuning is None:  # the preset's, else the library's default (nothing to tune without a spec to apply)
            tuning = (base.tuning if preset is not None else DEFAULT_TUNING) if apply != "none" else TuningConfig()
        if tuning.active and apply == "none":
            raise ValueError("tuning needs a spec to apply: set apply='shrink' (or 'mask'), or leave tuning off")
        if attribution is not None and not isinstance(attribution, AttributionConfig):
            raise TypeError(f"attribution must be an AttributionConfig or None, got {type(attribution).__name__}")
        if apply not in APPLY:
            raise ValueError(f"unknown apply {apply!r}; allowed: {list(APPLY)}")
        for name, value in (("calib_batches", calib_batches), ("checkpoint_every", checkpoint_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name, value in (("overwrite", overwrite), ("keep_checkpoint", keep_checkpoint),
                            ("allow_foreign_spec", allow_foreign_spec)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if export_dir is not None and str(export_dir) == "":
            raise ValueError("export_dir is empty; give a folder for the shrunk model, or leave it out (None)")
        if str(output_dir) == "":
            raise ValueError("output_dir is empty; give the folder for spec.json and scores, e.g. 'runs/taskprune'")
        if not isinstance(onnx, OnnxOptions):
            raise TypeError(f"onnx must be a taskprune.deploy.OnnxOptions, got {onnx!r}; e.g. OnnxOptions(quantize='int8')")
        if onnx_dir is not None and (str(onnx_dir) == "" or apply != "shrink"):
            raise ValueError(f"onnx_dir={onnx_dir!r} needs a folder name and apply='shrink' (got apply={apply!r}): only "
                             "a shrunk model is exported")
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; allowed: {list(RUNTIMES)}")
        if runtime == "onnx" and onnx_dir is None:
            raise ValueError("runtime='onnx' evaluates the ONNX export in onnx_dir at test / validate; set onnx_dir "
                             "(--pruning.onnx_dir) to the folder fit exports to, or use runtime='torch'")
        if onnx_dir is None and onnx != OnnxOptions():
            raise ValueError(f"onnx={onnx} configures the ONNX export, which is off; set onnx_dir or leave onnx out")
        if onnx_dir is not None:
            from taskprune.deploy import require_extra

            require_extra()  # a missing extra fails here, before any calibration
        if export_dir is not None and apply != "shrink":
            raise ValueError(f"export_dir needs apply='shrink' (got apply={apply!r}): only a shrunk model is exported")
        self.attribution, self.apply, self.runtime = attribution, apply, runtime
        self.output_dir = Path(output_dir)
        self.spec_path = Path(spec_path) if spec_path else None
        self.overwrite, self.calib_batches, self.checkpoint_every = overwrite, calib_batches, checkpoint_every
        self.budget, self.tuning, self.preset = budget, tuning, preset
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.onnx_dir, self.onnx = (Path(onnx_dir) if onnx_dir is not None else None), onnx
        self.keep_checkpoint, self.allow_foreign_spec = keep_checkpoint, allow_foreign_spec
        self.spec: PruneSpec | None = None
        self.applied: str | None = None
        self.foreign: str | None = None  # why the applied spec is foreign (allow_foreign_spec), else None
        self._config: AttributionConfig | None = None  # the one in force, resolved in setup
        self._lock: Path | None = None  # output_dir/.taskprune.lock while fit runs (rank zero)
        self._created_dir = False  # output_dir did not exist before this fit
        self._identity: dict = {}  # task and weights fingerprint of the dense model, recorded in spec.meta
        self._calibrated = False

    # ------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _model(pl_module):
        model = getattr(pl_module, "pruning_model", None)
        if model is None:
            raise TypeError(
                f"{type(pl_module).__name__} does not expose `pruning_model`; add a property that returns the "
                "nn.Module holding your transformers model (see taskprune.lightning.callback's protocol)"
            )
        return model

    def _resolve_attribution(self, pl_module) -> AttributionConfig:
        """The one attribution config: the module's when it scores (``unit_scores()``), else the callback's."""
        if not hasattr(pl_module, "unit_scores"):
            return self.attribution or AttributionConfig()
        own = getattr(pl_module, "attribution", None)
        own = own if isinstance(own, AttributionConfig) else None
        if self.attribution is not None and self.attribution != own:
            raise ValueError(
                f"TaskPruning(attribution={self.attribution}) differs from the attribution of "
                f"{type(pl_module).__name__} ({own}), which computes the scores (unit_scores()); the callback's "
                "would be ignored. Set it on the module (--model.attribution.*) and leave the callback's out"
            )
        return own or AttributionConfig()

    def _check_preset(self, config: AttributionConfig) -> None:
        if self.preset is None:
            return
        wanted = Pipeline.preset(self.preset).attribution
        if replace(config, target=wanted.target, units=wanted.units) != wanted:
            fields = {k: v for k, v in wanted.to_dict().items() if v is not None and k not in ("target", "units")}
            raise ValueError(f"preset {self.preset!r} scores with {fields}, but the attribution in force is "
                             f"{config.method!r} ({config}); set it (--model.attribution.* or "
                             "TaskPruning(attribution=...)) or leave the preset out")

    def pipeline(self) -> Pipeline:
        """The pipeline this callback runs (resolved in ``setup``: the attribution in force, budget, tuning)."""
        return Pipeline(self._config or self.attribution or AttributionConfig(), self.budget, self.tuning,
                        self.preset or "custom")

    def _units(self) -> str:
        return (self._config or self.attribution or AttributionConfig()).units

    def _spec_file(self) -> Path:
        return self.spec_path or self.output_dir / "spec.json"

    # ------------------------------------------------------------------------------------------ hooks
    @staticmethod
    def _task_name(trainer: L.Trainer, pl_module) -> str | None:
        """The task's name: the module's ``task`` (a Task or a string), else the datamodule's; None without one."""
        for owner in (pl_module, getattr(trainer, "datamodule", None)):
            task = getattr(owner, "task", None)
            name = getattr(task, "name", task)
            if isinstance(name, str) and name:
                return name
        return None

    @staticmethod
    def _input_folders(pl_module, model) -> dict[str, Path]:
        """Folders the model came from (its config's ``name_or_path``, the module's ``tokenizer_path``): an export
        must never replace them."""
        from taskprune.export import input_folders

        found = {"input model's folder": f for f in input_folders(model)}
        tokenizer = getattr(pl_module, "tokenizer_path", None)
        if isinstance(tokenizer, (str, os.PathLike)) and Path(tokenizer).is_dir():
            found["input model's tokenizer folder"] = Path(tokenizer)
        return found

    @staticmethod
    def _check_trainer_runs(trainer: L.Trainer) -> None:
        """An empty calibration is refused before any work (Lightning would skip fit and write nothing)."""
        for name, value in (("limit_train_batches", trainer.limit_train_batches), ("max_epochs", trainer.max_epochs),
                            ("max_steps", trainer.max_steps)):
            if value == 0:
                raise ValueError(f"trainer {name}={value!r} leaves nothing to calibrate on: taskprune's fit is one pass "
                                 f"over the calibration set and would write no spec. Leave {name} out (the CLI "
                                 "defaults to max_epochs=1), or set it to at least 1; calib_batches (or "
                                 "--data.calib_samples) sets the calibration size")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = self._model(pl_module)
        if stage == "fit":
            self._check_trainer_runs(trainer)
            if self.export_dir is not None:
                from taskprune.export import check_export_dir

                check_export_dir(self.export_dir, self.overwrite,
                                 {"run's output_dir": self.output_dir, **self._input_folders(pl_module, model)},
                                 what="export_dir")
            if self.onnx_dir is not None:
                from taskprune.export import check_export_dir

                others = {"run's output_dir": self.output_dir, **self._input_folders(pl_module, model)}
                if self.export_dir is not None:
                    others["export_dir"] = self.export_dir
                check_export_dir(self.onnx_dir, self.overwrite, others, what="onnx_dir")
            _check_writable(self.output_dir, "output_dir")
            for folder, what in ((self.export_dir, "export_dir's parent"), (self.onnx_dir, "onnx_dir's parent")):
                if folder is not None:
                    _check_writable(folder.parent, what)
            self._config = self._resolve_attribution(pl_module)
            self._check_preset(self._config)
            self._follow_max_length(trainer)
            from taskprune.arch import get_architecture

            # fail before any work when the budget is unreachable for this model or an option does not apply
            probe = Attributor(model, self._config)
            probe_budget = self.budget if self.budget.seq_len != "mean" else replace(self.budget, seq_len=128)
            check_budget(get_architecture(model).fingerprint(), probe_budget, units=self._units(),
                         method=probe.method, options=probe.options)
            if self.budget.split == "loss" and self._holdout_loader(trainer, pl_module) is None:
                raise ValueError("budget.split='loss' needs rows held out from calibration, and neither the "
                                 "datamodule nor the module serves them (holdout_dataloader()); set "
                                 "TaskDataModule(holdout_samples=256) (--data.holdout_samples 256) or "
                                 "split='score'")
            self._identity = {"task": self._task_name(trainer, pl_module), "weights": weights_fingerprint(model)}
            self._calibrated = False
            return
        self._apply_existing(pl_module, model, required=self.spec_path is not None,
                             task=self._task_name(trainer, pl_module))
        if self.runtime == "onnx":
            self._load_runtime(pl_module)

    def _load_runtime(self, pl_module) -> None:
        """``runtime="onnx"``: hand the module the ONNX Runtime session of ``onnx_dir`` as its pruned model, after
        checking that the export holds this run's spec."""
        from taskprune.deploy import load_onnx
        from taskprune.export import SPEC_FILE

        if not hasattr(pl_module, "runtime_model"):
            raise TypeError(f"runtime='onnx': {type(pl_module).__name__} has no runtime_model attribute to evaluate "
                            "an ONNX session with (AttributionModule has); use runtime='torch'")
        if self.spec is None:
            raise FileNotFoundError(f"runtime='onnx' evaluates the export of a spec, and there is no spec at "
                                    f"{str(self._spec_file())!r}; run fit with onnx_dir first")
        exported = self.onnx_dir / SPEC_FILE
        if not exported.is_file():
            raise FileNotFoundError(f"runtime='onnx': {str(self.onnx_dir)!r} holds no finished ONNX export "
                                    f"({SPEC_FILE} is missing); run fit with --pruning.onnx_dir {self.onnx_dir}, "
                                    "which exports at its end, or use runtime='torch'")
        theirs = PruneSpec.load(exported)
        if theirs.keep != self.spec.keep or theirs.fingerprint != self.spec.fingerprint:
            raise ValueError(f"onnx_dir {str(self.onnx_dir)!r} holds the export of another spec than "
                             f"{str(self._spec_file())!r} (other kept units): evaluating it would report another "
                             "model. Export this spec again (fit with overwrite) or point onnx_dir at its export")
        runner, _ = load_onnx(self.onnx_dir, threads=torch.get_num_threads())
        pl_module.runtime_model = runner
        rank_zero_info(f"taskprune: evaluating the ONNX export in {self.onnx_dir} ({runner!r}) as the pruned model")

    def _follow_max_length(self, trainer: L.Trainer) -> None:
        """MACs are counted at the data's sequence length: the datamodule's ``max_length`` when it has one."""
        length = getattr(getattr(trainer, "datamodule", None), "max_length", None)
        if self.budget.seq_len == "mean":  # the calibration batches' mean length, resolved at the end of fit
            return
        if isinstance(length, int) and not isinstance(length, bool) and length != self.budget.seq_len:
            rank_zero_info(f"taskprune: counting MACs at the datamodule's max_length={length} "
                           f"(budget.seq_len was {self.budget.seq_len})")
            self.budget = replace(self.budget, seq_len=length)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # here, not in setup: Lightning sets trainer.ckpt_path only when it restores, after setup. The lock comes
        # first, so two runs cannot both pass the check below; rank zero takes it and every rank learns the outcome.
        error = None
        if trainer.is_global_zero:
            try:
                self._created_dir = not self.output_dir.exists()
                self._lock = acquire_lock(self.output_dir, "output_dir")
                self._check_earlier_run(trainer.ckpt_path)
            except (FileExistsError, ValueError) as e:
                error = f"{type(e).__name__}: {e}"
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            kind, _, message = error.partition(": ")
            raise (FileExistsError if kind == "FileExistsError" else ValueError)(message)

    def _check_earlier_run(self, ckpt_path) -> None:
        """A spec already in output_dir is replaced only with ``overwrite``, and only in a folder taskprune marked as a
        run. Resuming from this folder's own ``calibration.ckpt`` (a run killed after it wrote its spec) is the same
        run; a checkpoint from anywhere else is another run."""
        existing = self.output_dir / "spec.json"
        if not existing.exists():
            return
        own = self.output_dir / "calibration.ckpt"
        if ckpt_path is not None and own.exists() and Path(ckpt_path).resolve() == own.resolve():
            return
        if not self.overwrite:
            unfinished = self._unfinished_exports(existing)
            if unfinished:
                raise FileExistsError(
                    f"{existing} already holds a spec from an earlier run, but {'; and '.join(unfinished)}. Nothing "
                    "was changed. Export that spec without calibrating again: taskprune.export.save_pruned(model, "
                    f"PruneSpec.load({str(existing)!r}), <folder>) with the dense model; or calibrate again with "
                    "--pruning.overwrite true (TaskPruning(overwrite=True)), or into another output_dir"
                )
            resume = (f" (resuming from another run's checkpoint {str(ckpt_path)!r} would replace it too)"
                      if ckpt_path is not None else "")
            raise FileExistsError(
                f"{existing} already holds a spec from an earlier run{resume}; pass overwrite=True "
                "(--pruning.overwrite true or TaskPruning(overwrite=True)) or choose another output_dir, so runs "
                "never mix"
            )
        if read_marker(self.output_dir) != "run":
            raise FileExistsError(
                f"{existing} was not written by a taskprune run (output_dir has no {MARKER} marker of a run), so "
                "overwrite does not replace it; choose another output_dir, or remove that spec.json yourself"
            )

    def _unfinished_exports(self, spec_file: Path) -> list[str]:
        """For each of export_dir / onnx_dir: why it holds no export of ``spec_file`` (missing: a run stopped during
        its export leaves the spec and no folder; or a folder of another spec), with the hidden partial copies a
        killed export left beside it."""
        from taskprune.export import SPEC_FILE

        try:
            spec = PruneSpec.load(spec_file).to_dict()
        except Exception:
            return []  # not a readable spec: the plain refusal says enough
        found = []
        for folder, what in ((self.export_dir, "export_dir"), (self.onnx_dir, "onnx_dir")):
            if folder is None:
                continue
            try:
                if PruneSpec.load(folder / SPEC_FILE).to_dict() == spec:
                    continue  # finished
            except Exception:
                pass
            state = ("the folder is missing: that run stopped before its export finished, or had no export"
                     if not folder.exists() else "it holds an export of another spec")
            partial = partial_dirs(folder)
            left = (f"; it left the partial copy {', '.join(repr(str(p)) for p in partial)} beside it, which no loader "
                    "reads: remove it, or the next export into that folder removes it" if partial else "")
            found.append(f"{what} {str(folder)!r} holds no export of it ({state}{left})")
        return found

    def _mark_output_dir(self) -> None:
        """Rank zero, before the first output: the marker that says taskprune writes this folder."""
        if read_marker(self.output_dir) != "run":
            write_marker(self.output_dir, "run")

    def _release(self) -> None:
        """Drop the lock; remove output_dir again if this run created it and wrote nothing else into it."""
        if self._lock is None:
            return
        release_lock(self._lock)
        self._lock = None
        if self._created_dir and self.output_dir.is_dir():
            left = {p.name for p in self.output_dir.iterdir()}
            if left <= {MARKER}:
                (self.output_dir / MARKER).unlink(missing_ok=True)
                try:
                    self.output_dir.rmdir()
                except OSError:
                    pass

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        self._release()
        if isinstance(exception, SIGTERMException):
            # Lightning ends a SIGTERMed fit with SystemExit(None): exit status 0 and no spec. Make it a failure.
            exception.code = 143  # 128 + SIGTERM, what a shell reports for a process killed by it
            ckpt = self.output_dir / "calibration.ckpt"
            hint = (f"resume it with --ckpt_path {ckpt} (same settings)" if ckpt.exists() else
                    "run it again; with --pruning.checkpoint_every N a stopped calibration resumes from "
                    f"{ckpt} (--ckpt_path)")
            if not self._calibrated:
                log.error("taskprune: calibration stopped by SIGTERM before it finished; no spec was written. %s", hint)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._calibrated:
            raise ValueError(
                "fit ended without calibrating: Lightning ran no training batch (an empty train dataloader, "
                "limit_train_batches=0, or a checkpoint whose epochs were already done), so no spec was written. "
                "Check the calibration data (--data.calib_samples, limit_train_batches, max_epochs), or start "
                "again without ckpt_path"
            )

    def _apply_existing(self, pl_module, model, required: bool, task: str | None = None) -> None:
        path = self._spec_file()
        if self.spec is None:
            problem = file_problem(path)
            if problem is not None and problem != "does not exist":
                what = "spec_path" if self.spec_path is not None else "the spec in output_dir"
                raise ValueError(f"{what} {str(path)!r} {problem}; point spec_path at a spec.json written by fit "
                                 "(--pruning.spec_path), or fix the link")
            if problem is not None:
                if required:
                    raise FileNotFoundError(f"spec_path {path} does not exist; run `fit` first to write it, or "
                                            "point spec_path at an existing spec.json")
                rank_zero_info(f"taskprune: no spec at {path}; evaluating the dense model only")
                return
            self.spec = PruneSpec.load(path)
        state = self.spec.validate(model)  # raises for a spec of another model
        self._check_foreign(path, model, state, task)
        if state == "shrunk" or self.apply == "none":
            return
        if getattr(pl_module, "spec", None) is not None and getattr(pl_module, "spec_mode", None):
            return  # already applied (e.g. right after fit in the same process)
        self._apply(pl_module, model)

    def _check_foreign(self, path: Path, model, state: str, task: str | None) -> None:
        """Refuse a spec recorded for another task or other weights (``spec.meta``), unless allow_foreign_spec."""
        meta = self.spec.meta
        made_task, made_weights = meta.get("task"), meta.get("weights")
        problems = []
        if made_task and task and made_task != task:
            problems.append(f"task {made_task!r} (this run's task is {task!r})")
        if made_weights and state == "dense" and made_weights != weights_fingerprint(model):
            problems.append(f"other weights (fingerprint {made_weights}, this model's "
                            f"{weights_fingerprint(model)})")
        if not problems:
            self.foreign = None
            return
        what = " and ".join(problems)
        if not self.allow_foreign_spec:
            raise ValueError(
                f"spec {str(path)!r} was made for {what}: its units were chosen for something else. Fit a spec for "
                "this task and model (into another output_dir), or pass allow_foreign_spec=True "
                "(--pruning.allow_foreign_spec true) to apply it anyway"
            )
        self.foreign = f"made for {what}"
        log.warning("taskprune: applying spec %s %s (allow_foreign_spec=True)", path, self.foreign)

    def _apply(self, pl_module, model) -> None:
        if hasattr(pl_module, "keep_dense_copy"):
            pl_module.keep_dense_copy()
        spec = self.spec
        if spec.scales or spec.columns or spec.biases:  # tuning goes into the weights: no scale hook needed
            spec = fold_scales_(model, spec)
        if self.apply == "shrink":
            shrink_(model, spec)
        elif self.apply == "mask":
            apply_mask(model, spec)
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
        spec = None
        if trainer.is_global_zero:
            pipeline = self.pipeline()
            if self.budget.seq_len == "mean":
                pipeline = pipeline.resolve(list(self._batches(trainer, pl_module)[1]))
            forward = getattr(pl_module, "forward_fn", None) or default_forward
            held_out = self._held_out(trainer, pl_module) if self.budget.split != "score" else None
            spec = pipeline.allocate(model, scores, held_out, forward)
            batches = list(self._batches(trainer, pl_module)[1]) if self.tuning.active else []
            spec = pipeline.finish(model, spec, scores, batches, held_out, forward)
            achieved = spec.budget["achieved"]
            rank_zero_info(f"taskprune: pipeline {pipeline.name}: {scores.method} scores on {scores.count:g} "
                           f"calibration samples (all processes); scope {spec.budget['scope']}, allocation "
                           f"{spec.budget['allocation'] or spec.budget['scope']}; cut {100 * achieved['macs']:.1f} % "
                           f"of prunable MACs at seq_len {spec.budget['seq_len']} "
                           f"({spec.n_kept('heads')} heads, {spec.n_kept('neurons')} neurons kept)"
                           + (f"; tuning {self.tuning.to_dict()}" if self.tuning.active else ""))
            made_for = {**self._identity, "data": self._data_fingerprint(trainer)}
            spec.meta.update({k: v for k, v in made_for.items() if v is not None})  # what it was made for
        spec_dict, columns, biases = trainer.strategy.broadcast(
            (spec.to_dict(), spec.columns, spec.biases) if spec is not None else (None, None, None), src=0)
        self.spec = replace(PruneSpec.from_dict(spec_dict), columns=columns or {}, biases=biases or {})  # tensors
        self._calibrated = True
        if trainer.is_global_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._mark_output_dir()
            scores.save(self.output_dir / "scores.safetensors")
            self.spec.save(self.output_dir / "spec.json")
            rank_zero_info(f"taskprune: wrote {self.output_dir / 'spec.json'} ({scores.count} samples, "
                           f"method {scores.method})")
            ckpt = self.output_dir / "calibration.ckpt"
            if ckpt.exists() and not self.keep_checkpoint:
                ckpt.unlink()  # the spec is written: the checkpoint would only resume a finished run
                rank_zero_info(f"taskprune: removed {ckpt} (keep it with keep_checkpoint=True)")
        trainer.strategy.barrier("taskprune_spec_written")
        if self.apply != "none":
            self._apply(pl_module, model)
        if self.export_dir is not None:
            if trainer.is_global_zero:
                from taskprune.export import save_pruned

                tokenizer = getattr(pl_module, "tokenizer", None) or getattr(pl_module, "tokenizer_path", None)
                save_pruned(model, self.spec, self.export_dir, tokenizer=tokenizer, overwrite=self.overwrite)
                rank_zero_info(f"taskprune: exported the shrunk model to {self.export_dir}")
            trainer.strategy.barrier("taskprune_exported")
        if self.onnx_dir is not None:
            if trainer.is_global_zero:
                from taskprune.deploy import save_onnx

                tokenizer = getattr(pl_module, "tokenizer", None) or getattr(pl_module, "tokenizer_path", None)
                batches = self._batches(trainer, pl_module)[1]
                first = next(iter(batches), None)
                example = None if first is None else {k: v[:8] for k, v in first.items()
                                                      if k in ("input_ids", "attention_mask", "token_type_ids")}
                o = self.onnx
                save_onnx(model, self.onnx_dir, tokenizer=tokenizer, spec=self.spec, opset=o.opset,
                          optimize=o.optimize, quantize=o.quantize, example=example, overwrite=self.overwrite)
                rank_zero_info(f"taskprune: exported the shrunk model to ONNX in {self.onnx_dir} ({o})")
            trainer.strategy.barrier("taskprune_onnx_exported")

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
            self._mark_output_dir()
            os.replace(tmp, path)
        trainer.strategy.barrier("taskprune_calibration_checkpoint")
        return path

    def _batches(self, trainer: L.Trainer, pl_module):
        """``(loader, batches)``: the first ``calib_batches`` train batches, converted by the module's
        ``pruning_batch`` and moved to its device."""
        loaders = trainer.train_dataloader
        loader = loaders if not isinstance(loaders, (list, tuple)) else loaders[0]
        convert = getattr(pl_module, "pruning_batch", None)
        return loader, loader_batches(loader, self.calib_batches, convert, pl_module.device)

    @staticmethod
    def _holdout_loader(trainer: L.Trainer, pl_module):
        for owner in (getattr(trainer, "datamodule", None), pl_module):
            make = getattr(owner, "holdout_dataloader", None)
            if callable(make):
                return make()
        return None

    def _held_out(self, trainer: L.Trainer, pl_module) -> list[dict] | None:
        """Batches of the rows held out from calibration (converted and moved like the calibration batches)."""
        loader = self._holdout_loader(trainer, pl_module)
        if loader is None:
            return None
        return list(loader_batches(loader, None, getattr(pl_module, "pruning_batch", None), pl_module.device))

    def _calibrate(self, trainer: L.Trainer, pl_module, model) -> UnitScores:
        """Score units on the train dataloader (for modules without ``unit_scores()``), summed over ranks."""
        att = Attributor(model, self._config or self._resolve_attribution(pl_module),
                         forward=getattr(pl_module, "forward_fn", None))
        if att.data_free:
            return att.result()
        loader, batches = self._batches(trainer, pl_module)
        total, count, _ = calibrate(att, batches, loader)
        total = trainer.strategy.reduce(total.to(pl_module.device), reduce_op="sum").cpu()
        count = float(trainer.strategy.reduce(torch.tensor(count, device=pl_module.device), reduce_op="sum"))
        return att.result(total, count)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"spec_path": str(self._spec_file()), "applied": self.applied, "foreign": self.foreign}

    @staticmethod
    def _data_fingerprint(trainer: L.Trainer) -> str | None:
        """The datamodule's ``calibration_fingerprint()`` (``TaskDataModule`` has it), else None."""
        make = getattr(getattr(trainer, "datamodule", None), "calibration_fingerprint", None)
        return make() if callable(make) else None

    def run_record(self, trainer: L.Trainer, pl_module) -> dict:
        """What a calibration's sums belong to: ``task``, ``weights`` (fingerprint of the dense model, taken in
        ``setup``), ``data`` (the datamodule's ``calibration_fingerprint()``: the calibration rows' text and labels),
        ``attribution`` (the config in force, less ``alpha_batch``) and ``max_length`` (the datamodule's). Written into
        every calibration checkpoint (``checkpoint["taskprune_run"]``); a resume whose record differs is refused."""
        length = getattr(getattr(trainer, "datamodule", None), "max_length", None)
        config = self._config or self._resolve_attribution(pl_module)
        return {"task": self._identity.get("task"), "weights": self._identity.get("weights"),
                "data": self._data_fingerprint(trainer),
                "attribution": {k: v for k, v in config.to_dict().items() if k not in _FREE_ON_RESUME},
                "max_length": length if isinstance(length, int) and not isinstance(length, bool) else None}

    @staticmethod
    def check_resume(saved: dict | None, now: dict, path=None, warn: bool = True) -> None:
        """Refuse (``ValueError``) to resume from the checkpoint ``path`` when its record ``saved`` differs from
        ``now`` (:meth:`run_record`; a value either side lacks is not compared), naming each difference. A checkpoint
        without a record (an older taskprune's) is resumed unchecked, with one warning (``warn``)."""
        where = repr(str(path)) if path is not None else "the checkpoint"
        if not isinstance(saved, dict):
            if warn:
                log.warning("taskprune: %s holds no record of the model, data and settings its sums belong to "
                            "(written by an older taskprune), so the resume cannot check them: they must be the "
                            "killed run's, or the scores mix two calibrations", where)
            return

        def differs(key: str) -> bool:
            return saved.get(key) is not None and now.get(key) is not None and saved[key] != now[key]

        problems = []
        if differs("weights"):
            problems.append(f"other model weights (fingerprint {saved['weights']} in the checkpoint, {now['weights']} "
                            "now: the model given is not the one the checkpoint's run calibrated)")
        if differs("task"):
            problems.append(f"task {saved['task']!r} (now {now['task']!r})")
        if differs("data"):
            problems.append(f"other calibration rows (data fingerprint {saved['data']} in the checkpoint, "
                            f"{now['data']} now: the train file changed, or calib_samples / calib_per_class / "
                            "calib_seed)")
        old, new = saved.get("attribution"), now.get("attribution")
        if isinstance(old, dict) and isinstance(new, dict):
            changed = [f"{k}={v!r} (now {new[k]!r})" for k, v in old.items() if k in new and new[k] != v]
            if changed:
                problems.append("attribution " + ", ".join(changed))
        if differs("max_length"):
            problems.append(f"max_length={saved['max_length']} (now {now['max_length']})")
        if problems:
            raise ValueError(
                f"cannot resume from {where}: its sums belong to {'; '.join(problems)}. Resuming would mix them with "
                "sums of this run's inputs. Resume with the model, data and settings of the run that wrote it, or "
                "start again without --ckpt_path"
            )

    def check_checkpoint(self, ckpt_path, pl_module) -> None:
        """Before Lightning restores ``ckpt_path`` into ``pl_module`` (the CLI calls it before ``fit``): a path that is
        not a file, and a checkpoint recorded for other weights or another task, are refused here, before Lightning
        loads the weights (another architecture's fail there with a size mismatch; another model of the same shapes
        would silently take the checkpoint's weights). The full check runs when Lightning restores this callback."""
        if ckpt_path is None:
            return
        problem = file_problem(ckpt_path)
        if problem == "does not exist":
            return  # Lightning names a missing checkpoint itself
        if problem is not None:
            raise ValueError(f"ckpt_path {str(ckpt_path)!r} {problem}; pass the calibration checkpoint file, e.g. "
                             f"{str(self.output_dir / 'calibration.ckpt')!r}")
        try:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            return  # Lightning reports an unreadable checkpoint when it loads it
        if isinstance(checkpoint, dict):
            task = getattr(getattr(pl_module, "task", None), "name", None)
            self.check_record(checkpoint, self._model(pl_module), task if isinstance(task, str) else None, ckpt_path)

    @classmethod
    def check_record(cls, checkpoint: dict, model: torch.nn.Module, task: str | None, path=None) -> None:
        """Refuse a checkpoint whose run record names other weights or another task than ``model`` / ``task``, before
        its weights are loaded (the CLI before ``fit``, :class:`AttributionModule` in ``on_load_checkpoint``)."""
        if isinstance(checkpoint.get(RUN_KEY), dict):
            cls.check_resume(checkpoint[RUN_KEY], {"weights": weights_fingerprint(model), "task": task}, path,
                             warn=False)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == "fit" and self._identity:
            checkpoint[RUN_KEY] = self.run_record(trainer, pl_module)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Refuse to resume a calibration from a checkpoint of other inputs (:meth:`check_resume`). Lightning calls it
        after the module's weights are restored but before any batch, lock or file."""
        if trainer.state.fn == "fit" and self._identity:
            self.check_resume(checkpoint.get(RUN_KEY), self.run_record(trainer, pl_module), trainer.ckpt_path,
                              warn=trainer.is_global_zero)

    def load_state_dict(self, state_dict: dict) -> None:
        self.applied = state_dict.get("applied")
