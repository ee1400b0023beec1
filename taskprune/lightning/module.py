"""AttributionModule: calibration as a Lightning ``fit`` loop, and a test loop that compares dense and pruned models.

``fit`` never updates a weight: each ``training_step`` scores the batch's units (integrated gradients by default) and
adds the detached per-unit sums to a :class:`~taskprune.lightning.scores.UnitScoreMetric`, which sums across processes once at
the end. The :class:`~taskprune.lightning.callback.TaskPruning` callback turns the scores into a spec and applies it.

Distributed calibration. Under ``strategy="ddp"`` Lightning wraps the module in ``DistributedDataParallel`` during
``fit``. The module keeps its parameters trainable (so DDP accepts it), but attribution runs with every parameter
frozen and asks autograd only for the gradient of the *gates* (:func:`torch.autograd.grad`), so DDP's gradient hooks
never fire and nothing is averaged: each process sums the attributions of its own samples and the metric adds the
processes' sums at the end. ``DistributedSampler`` pads the last round with duplicates of the first samples; those
get weight 0 (:mod:`taskprune.calibration`, the loop the callback and ``score_units`` share), so 1 and N processes
give the same sums. Model loading lives in :mod:`taskprune.models`; evaluation results are
:class:`~taskprune.lightning.evaluation.Evaluation` rows.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from taskprune.attribution import AGGREGATED, PSEUDO_REGRESSION, AttributionConfig, Attributor, default_forward
from taskprune.calibration import calibration_step, real_samples
from taskprune.lightning.evaluation import Evaluation, MetricRow, Stopwatch
from taskprune.models import head_size, label_order, load_task_model, reorder_logits, task_head
from taskprune.models.multitask import MultiTaskModel, TaskModel
from taskprune.lightning.scores import UnitScoreMetric
from taskprune.unitscores import UnitScores

log = logging.getLogger(__name__)

# calibration is a fit with no optimizer step on a model in eval mode: Lightning's warnings about both are expected
for _message in (r".*configure_optimizers` returned `None`.*", r".*module\(s\) in eval mode at the start of training.*"):
    warnings.filterwarnings("ignore", message=_message)

SPEC_KEY = "taskprune_spec"
CALIB_KEY = "taskprune_calibration"
# settings a resumed calibration must share with the run that wrote its checkpoint (the sums would mix otherwise)
RESUME_KEYS = ("method", "target", "units", "steps", "quadrature", "baseline", "aggregate", "per", "seed")


class AttributionModule(L.LightningModule):
    """Calibrates (``fit``) and evaluates (``test`` / ``validate``) a model for one task.

    Args:
        model: a taskprune multi-task model name (``minilm-glue``) or folder, a local HF sequence-classification
            folder, or an ``nn.Module`` (Python use).
        task: the task (its labels, problem type and metrics): a shipped name, a task definition file or an inline
            definition (see :mod:`taskprune.tasks`). The CLI links it from ``data.task``.
        head: the head of a multi-task model that reads the task (``--model.head``; e.g. ``sst2`` for reviews);
            overrides the task definition's ``head``; default: that, else the head named like the task. Metric keys,
            reports and the spec keep the task's own name. Refused for a model that is not a multi-task model.
        label_map: task label name -> the model's label name or output index. Without it the model's own label
            names (``config.id2label``) are matched to the task's case-insensitively (a model with only
            ``LABEL_0``... names is taken in the task's order); a mismatch is an error before any work.
        attribution: how units are scored (method, target, units, IG steps...); a dict of its fields works too.
        compare_dense: evaluate the dense model beside the pruned one in ``test`` / ``validate`` (keeps a copy).
        trust_remote_code: passed to transformers when loading a model by name; off unless you turn it on.
        forward: ``fn(model, batch) -> outputs`` (Python use); default calls ``model(**inputs)``.
    """

    def __init__(
        self,
        model: str | nn.Module = "minilm-glue",
        task: str | dict = "sst2",
        label_map: dict[str, str | int] | None = None,
        head: str | None = None,
        attribution: AttributionConfig = AttributionConfig(),
        compare_dense: bool = True,
        trust_remote_code: bool = False,
        forward: Callable | None = None,
    ) -> None:
        super().__init__()
        from taskprune.tasks import get_task

        self.attribution = AttributionConfig.of(attribution)
        self.task = get_task(task)
        # plain values only, so checkpoints load with weights_only and hand them back to __init__
        plain_task = task if isinstance(task, (str, dict)) else (self.task.definition or self.task.name)
        self.save_hyperparameters({"task": plain_task, "label_map": label_map, "head": head,
                                   "attribution": self.attribution.to_dict(), "compare_dense": compare_dense,
                                   "trust_remote_code": trust_remote_code})
        self.head = head if head is not None else self.task.head
        if isinstance(model, MultiTaskModel):
            self.model = task_head(model, self.task.name, self.head, labels=self.task.label_names)
            self.tokenizer_path = model.tokenizer_path
        elif isinstance(model, nn.Module):
            if self.head is not None:
                raise ValueError(f"head {self.head!r} picks a head of a taskprune MultiTaskModel, but the model given "
                                 f"is a {type(model).__name__} (one head); remove `head:` from the task definition "
                                 "(and leave out head=)")
            self.model, self.tokenizer_path = model, None
        else:
            self.model, self.tokenizer_path = load_task_model(model, self.task.name, trust_remote_code, self.head,
                                                              self.task.label_names)
        n_out = head_size(self.model)
        if label_map is None and n_out is not None and n_out != self.task.n_labels:
            raise ValueError(
                f"the model's head has {n_out} outputs but task {self.task.name!r} has {self.task.n_labels} "
                f"labels {list(self.task.label_names)}; load the head trained for this task"
                + (f" (this is the multi-task model's head {self.model.task!r}: pick another with `head:` in the task "
                   "definition or --model.head)" if isinstance(self.model, TaskModel) else "")
                + ", or pass --model.label_map to pick the outputs that predict the task's labels"
            )
        if self.attribution.target_name == "pseudo" and self.attribution.method in AGGREGATED and \
                (self.task.regression or n_out == 1):
            raise ValueError(f"task {self.task.name!r}: {PSEUDO_REGRESSION}")
        try:
            self.label_order = None if self.task.regression else \
                label_order(self.model, self.task.label_names, label_map, f"task {self.task.name!r}")
        except ValueError as e:
            if isinstance(self.model, TaskModel):  # a multi-task model's head: another head may fit
                raise ValueError(f"{e} (the labels of the multi-task model's head {self.model.task!r}); or read the "
                                 "task with another head: `head:` in the task definition or --model.head") from None
            raise
        if self.label_order is not None:
            log.info("model outputs %s predict the task's labels %s", self.label_order, list(self.task.label_names))
            forward = reorder_logits(forward or default_forward, self.label_order)
        self.attributor = Attributor(self.model, self.attribution, forward=forward)
        self.forward_fn = self.attributor.forward
        self.scores = UnitScoreMetric(self.attributor.gates.n_units)
        self.compare_dense = compare_dense
        self.dense_model: nn.Module | None = None
        self.spec = None  # set by TaskPruning when a spec is applied
        self.runtime_model = None  # set by TaskPruning(runtime="onnx"): the exported session, evaluated as "pruned"
        self.spec_mode: str | None = None
        self.eval_names: list[str] = [self.task.name]
        self.evaluation: Evaluation | None = None
        self.automatic_optimization = False

    # ------------------------------------------------------------------------ protocol (taskprune.lightning.protocol)
    @property
    def pruning_model(self) -> nn.Module:
        """The model that :class:`~taskprune.lightning.callback.TaskPruning` prunes (protocol)."""
        return self.model

    def pruning_batch(self, batch: dict) -> dict:
        """Batches are already the model's keyword arguments plus ``labels`` (protocol)."""
        return batch

    def unit_scores(self) -> UnitScores:
        """Scores summed over all processes (protocol): collective, call on every rank."""
        sums, count = self.scores.compute()
        scores = self.attributor.result(sums.cpu(), float(count))
        scores.options["batches"] = int(self.scores.batches.item())
        return scores

    # ------------------------------------------------------------------------------------------ calibration
    def configure_optimizers(self):
        return None  # calibration updates no weight

    def setup(self, stage: str) -> None:
        if stage == "fit":
            from lightning.pytorch.strategies import FSDPStrategy

            if isinstance(self.trainer.strategy, FSDPStrategy):
                raise ValueError(
                    "strategy='fsdp' is not supported for calibration: FSDP shards the weights of each layer, while "
                    "the unit gates hook whole projection layers. Use strategy='ddp' (calibration is inference-only, "
                    "so each process needs the frozen weights, activations and one batch), or lower the batch size "
                    "and alpha_batch to fit memory."
                )
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:
            if hasattr(dm, "eval_names"):
                self.eval_names = list(dm.eval_names)
            if hasattr(dm, "fit_to"):
                dm.fit_to(self.model, self.tokenizer_path)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        sums, count = calibration_step(self.attributor, batch, batch_idx, loader)
        self.scores.update(sums, count)
        if not self.attributor.data_free:
            self.log("calib/samples", float(self.scores.count), prog_bar=True, on_step=True, on_epoch=False,
                     batch_size=1)
        if hasattr(loader, "mark_done"):
            loader.mark_done()
        return None

    # ------------------------------------------------------------------------------------------ evaluation
    @property
    def results(self) -> list[dict]:
        """The last evaluation's rows as dicts (see :class:`~taskprune.lightning.evaluation.MetricRow`); ``[]`` before one."""
        return self.evaluation.as_rows() if self.evaluation is not None else []

    @property
    def throughput(self) -> dict[str, float | None]:
        """Samples per second of the last evaluation per variant (``"pruned"``, ``"dense"``)."""
        return dict(self.evaluation.throughput) if self.evaluation is not None else {}

    def _setup_eval(self) -> None:
        names = self.eval_names
        variants = ["pruned", "dense"] if self.dense_model is not None else ["pruned"]
        self.eval_metrics = nn.ModuleDict({
            v: nn.ModuleList([self.task.make_metrics() for _ in names]) for v in variants
        }).to(self.device)
        self._stopwatch = Stopwatch(variants)

    def on_test_epoch_start(self) -> None:
        self._setup_eval()

    def on_validation_epoch_start(self) -> None:
        self._setup_eval()

    def _eval_step(self, batch: dict, batch_idx: int, dataloader_idx: int) -> None:
        labels = batch["labels"]
        loaders = self.trainer.test_dataloaders if self.trainer.testing else self.trainer.val_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        keep = real_samples(batch, batch_idx, loader).to(labels.device)
        models = {"pruned": self.model, "dense": self.dense_model}
        for variant, metrics in self.eval_metrics.items():
            runner = self.runtime_model if variant == "pruned" else None
            with self._stopwatch.time(variant, labels.shape[0], self.device), torch.inference_mode():
                out = runner(**batch) if runner is not None else self.forward_fn(models[variant], batch)
            logits = out.logits if hasattr(out, "logits") else out
            if runner is not None:  # the session's logits: on the CPU, in the model's output order
                logits = logits.to(labels.device)
                logits = logits[..., self.label_order] if self.label_order is not None else logits
            metrics[dataloader_idx].update(self.task.predictions(logits)[keep], labels[keep])

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, dataloader_idx)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, dataloader_idx)

    def _one_class_sets(self) -> dict[int, str]:
        """Evaluation sets (by dataloader index) whose rows hold one class, with that class's name: their MCC is
        undefined (torchmetrics returns a number). Read from the datamodule's sets when it has them."""
        sets = getattr(getattr(self.trainer, "datamodule", None), "eval_sets", None)
        if self.task.regression or not sets:
            return {}
        out = {}
        for i, s in enumerate(sets):
            present = set(s["label"]) if "label" in getattr(s, "column_names", ()) else None
            if present is not None and len(present) == 1:
                out[i] = self.task.label_names[int(next(iter(present)))]
        return out

    def _end_eval(self) -> None:
        rows = []
        applied = self.spec is not None  # without a spec the model evaluated is the dense one
        one_class = self._one_class_sets()
        for i, name in enumerate(self.eval_names):
            prefix = f"test/{name}" if i == 0 else f"ood/{name}"
            values = {v: {k: float(x) for k, x in ms[i].compute().items()} for v, ms in self.eval_metrics.items()}
            for metric, pruned in values["pruned"].items():
                dense = values.get("dense", {}).get(metric)
                kind = "in-domain" if i == 0 else "ood"
                if metric == "matthews" and i in one_class:
                    rows.append(MetricRow(name, kind, metric, None, None, f"MCC undefined: every row of {name!r} is "
                                          f"{one_class[i]!r} (one class); see accuracy"))
                    continue
                self.log(f"{prefix}/{metric}", pruned, sync_dist=False, add_dataloader_idx=False)
                if dense is not None:
                    self.log(f"{prefix}/{metric}_dense", dense, sync_dist=False, add_dataloader_idx=False)
                rows.append(MetricRow(name, kind, metric, pruned, dense) if applied
                            else MetricRow(name, kind, metric, None, pruned, "no spec applied: the dense model"))
        throughput = self._stopwatch.throughput()
        for variant, rate in throughput.items():
            if rate is not None:
                self.log(f"speed/{variant}_samples_per_s", rate, add_dataloader_idx=False)
        self.evaluation = Evaluation(tuple(rows), throughput)

    def on_test_epoch_end(self) -> None:
        self._end_eval()

    def on_validation_epoch_end(self) -> None:
        self._end_eval()

    def keep_dense_copy(self) -> None:
        """Keep an independent dense copy for side-by-side evaluation (called before a spec is applied)."""
        if self.compare_dense and self.dense_model is None:
            self.dense_model = copy.deepcopy(self.model).eval()
            for p in self.dense_model.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _calibration_identity(self, loader=None) -> dict:
        """What a calibration checkpoint must agree on to be resumed: settings, world size, calibration set size."""
        dm = getattr(self.trainer, "datamodule", None)
        calib = getattr(dm, "calib_set", None)
        return {
            "task": self.task.name,
            **{k: v for k, v in self.attribution.to_dict().items() if k in RESUME_KEYS},
            "world_size": self.trainer.world_size,
            "batch_size": getattr(loader, "batch_size", None) if loader is not None else getattr(dm, "batch_size", None),
            "samples": len(loader.dataset) if hasattr(loader, "dataset") else (len(calib) if calib is not None else None),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None and self.trainer.training:
            checkpoint[CALIB_KEY] = self._calibration_identity(self.trainer.train_dataloader)
        if self.spec is not None:
            checkpoint[SPEC_KEY] = {"spec": self.spec.to_dict(), "mode": self.spec_mode}
        for key in [k for k in checkpoint.get("state_dict", {}) if k.startswith("dense_model.")]:
            del checkpoint["state_dict"][key]  # the dense copy is the base model: never store it twice

    def _check_run_record(self, checkpoint: dict) -> None:
        """Before Lightning loads the checkpoint's weights into this module (a resumed ``fit`` from Python): refuse a
        checkpoint recorded for other weights or another task, as the CLI does before ``fit`` (another architecture
        would otherwise end in a size mismatch, another model of the same shapes silently take its weights)."""
        from taskprune.lightning.callback import TaskPruning

        TaskPruning.check_record(checkpoint, self.model, self.task.name, getattr(self.trainer, "ckpt_path", None))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Rebuild a shrunk model before Lightning loads its weights (Lightning restores weights before callbacks).

        When ``fit`` resumes a calibration, refuse a checkpoint written with other settings, another number of
        processes or another calibration set: the loader would skip the wrong batches and the sums would mix.
        """
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self._check_run_record(checkpoint)
        saved = checkpoint.get(CALIB_KEY)
        if saved and self._trainer is not None and self.trainer.state.fn == "fit":
            now = self._calibration_identity()
            diffs = [f"{k}={saved[k]!r} (now {now[k]!r})" for k in saved
                     if saved[k] is not None and now.get(k) is not None and saved[k] != now[k]]
            if diffs:
                raise ValueError(
                    f"cannot resume calibration from this checkpoint: it was written with {', '.join(diffs)}. "
                    "Resume with the settings, number of processes and calibration set of the killed run, or start "
                    "again without ckpt_path"
                )
        saved = checkpoint.get(SPEC_KEY)
        if saved and saved.get("mode") == "shrink" and self.spec is None:
            from taskprune.spec import PruneSpec
            from taskprune.surgery import shrink_

            self.spec = PruneSpec.from_dict(saved["spec"])
            shrink_(self.model, self.spec)
            self.spec_mode = "shrink"
