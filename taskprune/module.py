"""AttributionModule: calibration as a Lightning ``fit`` loop, and a test loop that compares dense and pruned models.

``fit`` never updates a weight: each ``training_step`` scores the batch's units (integrated gradients by default) and
adds the detached per-unit sums to a :class:`~taskprune.scores.UnitScoreMetric`, which sums across processes once at
the end. The :class:`~taskprune.callback.TaskPruning` callback turns the scores into a spec and applies it.

Distributed calibration. Under ``strategy="ddp"`` Lightning wraps the module in ``DistributedDataParallel`` during
``fit``. The module keeps its parameters trainable (so DDP accepts it), but attribution runs with every parameter
frozen and asks autograd only for the gradient of the *gates* (:func:`torch.autograd.grad`), so DDP's gradient hooks
never fire and nothing is averaged: each process sums the attributions of its own samples and the metric adds the
processes' sums at the end. ``DistributedSampler`` pads the last round with duplicates of the first samples; those
get weight 0 (see :meth:`AttributionModule._real`), so 1 and N processes give the same sums.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from taskprune.attribution import (AGGREGATIONS, DEFAULT_BASELINE, METHODS, QUADRATURES, TARGETS, Attributor,
                                   default_forward)
from taskprune.scores import UnitScoreMetric
from taskprune.unitscores import UnitScores

log = logging.getLogger(__name__)

SPEC_KEY = "taskprune_spec"
CALIB_KEY = "taskprune_calibration"
# settings a resumed calibration must share with the run that wrote its checkpoint (the sums would mix otherwise)
RESUME_HPARAMS = ("task", "method", "target", "units", "steps", "quadrature", "baseline", "aggregate", "seed")


def load_task_model(name_or_path: str, task: str, trust_remote_code: bool = False) -> tuple[nn.Module, str]:
    """``(model, tokenizer_path)`` for a task: a taskprune multi-task model (name or folder) picks the task's head;
    any other folder or hub id is loaded as ``AutoModelForSequenceClassification`` (local files work offline)."""
    from pathlib import Path

    from taskprune import zoo

    folder = Path(name_or_path)
    if name_or_path in zoo.RECIPES or (folder / "tasks.json").is_file():
        multitask = zoo.ensure_multitask(name_or_path) if name_or_path in zoo.RECIPES else \
            zoo.load_multitask(name_or_path)
        return multitask.for_task(task), str(multitask.tokenizer_path)
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ValueError(
            f"cannot load model {name_or_path!r}: {e}. Pass a local folder (config.json + safetensors), a "
            f"taskprune multi-task model ({sorted(zoo.RECIPES)}), or a hub id when online."
        ) from e
    return model, name_or_path


def head_size(model: nn.Module) -> int | None:
    """Number of outputs of the model's task head, when it can be read without running the model."""
    for attr in ("num_labels",):
        n = getattr(model, attr, None)
        if isinstance(n, int):
            return n
    cfg = getattr(model, "config", None)
    return getattr(cfg, "num_labels", None)


def max_positions(model: nn.Module) -> int | None:
    """Longest input (tokens) the model's position embeddings take, or ``None`` when unbounded (relative positions).

    RoBERTa-style embeddings number positions from ``padding_idx + 1``, so they take ``padding_idx + 1`` fewer.
    """
    from taskprune.arch import find_base

    base = find_base(model)[0]
    n = getattr(base.config, "max_position_embeddings", None)
    if not isinstance(n, int):
        return None
    offset = getattr(getattr(base, "embeddings", None), "padding_idx", None)
    return n - (offset + 1) if isinstance(offset, int) else n


def check_data_fits_model(dm, model: nn.Module) -> None:
    """Before any work: refuse a tokenizer whose vocabulary is larger than the model's embedding (a tokenizer of
    another model), and lower ``dm.max_length`` (with a warning) to the model's position limit."""
    from taskprune.arch import find_base

    try:
        tokenizer = dm.tokenizer
    except (ValueError, AttributeError):
        return  # no tokenizer (yet): the datamodule raises its own error when it needs one
    if not hasattr(tokenizer, "__len__"):
        return
    try:
        n_rows = getattr(find_base(model)[0].get_input_embeddings(), "num_embeddings", None)
    except (NotImplementedError, AttributeError):
        n_rows = None
    if isinstance(n_rows, int) and len(tokenizer) > n_rows:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"the tokenizer {name!r} has a vocabulary of {len(tokenizer)} tokens but the model's input embedding has "
            f"{n_rows} rows: token ids >= {n_rows} would index past it. The tokenizer belongs to another model; "
            "pass the model's own tokenizer (data.tokenizer, or the tokenizer saved with the model)"
        )
    limit = max_positions(model)
    if limit is not None and isinstance(dm.max_length, int) and dm.max_length > limit:
        log.warning("max_length=%d is longer than the model's %d positions; inputs are truncated to %d tokens",
                    dm.max_length, limit, limit)
        dm.max_length = limit
        dm._collator = None  # rebuilt with the new length


class AttributionModule(L.LightningModule):
    """Calibrates (``fit``) and evaluates (``test`` / ``validate``) a model for one task.

    Args:
        model: a taskprune multi-task model name (``minilm-glue``) or folder, a local HF sequence-classification
            folder, or an ``nn.Module`` (Python use).
        task: the task name (its head, labels and metrics; see :mod:`taskprune.tasks`).
        method: attribution method (``ig``, ``grad_x_gate``, ``fisher``, ``activation``, ``magnitude``, ``random``).
        target: ``label`` (gold labels), ``pseudo`` (the dense model's predictions: unsupervised), ``neg_loss``.
        units: ``all``, ``heads`` or ``neurons``.
        steps: IG quadrature nodes.
        quadrature: IG quadrature rule.
        alpha_batch: IG nodes per forward pass (memory ∝ alpha_batch × batch size).
        baseline: gate value where the IG path starts, in [0, 1) (default 0.5, measured; 0: all units off, the
            paper's path).
        aggregate: ``abs`` or ``signed`` mean of per-sample attributions.
        seed: seed of the ``random`` method.
        compare_dense: evaluate the dense model beside the pruned one in ``test`` / ``validate`` (keeps a copy).
        trust_remote_code: passed to transformers when loading a model by name; off unless you turn it on.
    """

    def __init__(
        self,
        model: str | nn.Module = "minilm-glue",
        task: str = "sst2",
        method: Literal["ig", "grad_x_gate", "fisher", "activation", "magnitude", "random"] = "ig",
        target: Literal["label", "pseudo", "neg_loss"] = "label",
        units: Literal["all", "heads", "neurons"] = "all",
        steps: int = 4,
        quadrature: Literal["riemann_left", "riemann_right", "riemann_middle", "trapezoid",
                            "gauss_legendre"] = "riemann_middle",
        alpha_batch: int = 1,
        baseline: float = DEFAULT_BASELINE,
        aggregate: Literal["abs", "signed"] = "abs",
        seed: int = 0,
        compare_dense: bool = True,
        trust_remote_code: bool = False,
        forward: Callable | None = None,
    ) -> None:
        super().__init__()
        from taskprune.tasks import get_task

        for name, value, allowed in (("method", method, METHODS), ("target", target, TARGETS),
                                     ("quadrature", quadrature, QUADRATURES), ("aggregate", aggregate, AGGREGATIONS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; allowed: {list(allowed)}")
        self.task = get_task(task)
        self.save_hyperparameters(ignore=["model", "forward"])
        if isinstance(model, nn.Module):
            self.model, self.tokenizer_path = model, None
        else:
            self.model, self.tokenizer_path = load_task_model(model, self.task.name, trust_remote_code)
        n_out = head_size(self.model)
        if n_out is not None and n_out != self.task.n_labels:
            raise ValueError(
                f"the model's head has {n_out} outputs but task {self.task.name!r} has {self.task.n_labels} "
                f"labels {list(self.task.label_names)}; load the head trained for this task"
            )
        self.attributor = Attributor(self.model, method, target, units, steps=steps, quadrature=quadrature,
                                     alpha_batch=alpha_batch, baseline=baseline, aggregate=aggregate, seed=seed,
                                     forward=forward)
        self.forward_fn = forward or default_forward
        self.scores = UnitScoreMetric(self.attributor.gates.n_units)
        self.compare_dense = compare_dense
        self.dense_model: nn.Module | None = None
        self.spec = None  # set by TaskPruning when a spec is applied
        self.spec_mode: str | None = None
        self.eval_names: list[str] = [self.task.name]
        self.results: list[dict] = []
        self.automatic_optimization = False

    # ------------------------------------------------------------------------------------------ protocol
    @property
    def pruning_model(self) -> nn.Module:
        """The model that :class:`~taskprune.callback.TaskPruning` prunes (protocol)."""
        return self.model

    def unit_scores(self) -> UnitScores:
        """Scores summed over all processes (protocol): collective, call on every rank."""
        sums, count = self.scores.compute()
        self.scores._computed = None
        scores = self.attributor.to_scores(sums.cpu(), int(round(float(count))))
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
            if self.tokenizer_path is not None and hasattr(dm, "set_tokenizer") and dm._tokenizer is None:
                from taskprune.data import load_tokenizer

                dm.set_tokenizer(load_tokenizer(self.tokenizer_path))
            if hasattr(dm, "set_tokenizer") and hasattr(dm, "max_length"):
                check_data_fits_model(dm, self.model)

    def _real(self, batch: dict, batch_idx: int, loader) -> Tensor:
        """Weights 1 for real samples, 0 for the duplicates that ``DistributedSampler`` pads the last round with.

        The sampler gives rank ``r`` the global positions ``r, r + W, r + 2W, ...`` of its (possibly shuffled,
        padded) index list; positions ``>= len(dataset)`` are padding. A batch's local positions follow from
        ``batch_idx`` and the loader's batch size (Lightning keeps ``batch_idx`` across a resume).
        """
        n = next(v for v in batch.values() if isinstance(v, Tensor)).shape[0]
        ones = torch.ones(n, dtype=torch.float64)
        world = self.trainer.world_size if self._trainer is not None else 1
        sampler = getattr(loader, "sampler", None)
        if world == 1 or not isinstance(sampler, DistributedSampler) or sampler.drop_last:
            return ones
        local = batch_idx * loader.batch_size + torch.arange(n)
        return (sampler.rank + local * sampler.num_replicas < len(loader.dataset)).double()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if self.attributor.data_free:
            self.scores.update(torch.zeros(self.scores.n_units, dtype=torch.float64), 0.0)
            return None
        batch = {**batch, "sample_weight": self._real(batch, batch_idx, self.trainer.train_dataloader)}
        if self.attributor.target_name == "label" and "labels" not in batch:
            raise ValueError("target='label' needs labelled batches (batch['labels']); use target='pseudo' for "
                             "unlabelled calibration data")
        sums, count = self.attributor.batch_sums(batch)
        self.scores.update(sums.detach(), count)
        self.log("calib/samples", float(self.scores.count), prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=1)
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        if hasattr(loader, "mark_done"):
            loader.mark_done()
        return None

    # ------------------------------------------------------------------------------------------ evaluation
    def _setup_eval(self) -> None:
        names = self.eval_names
        variants = ["pruned", "dense"] if self.dense_model is not None else ["pruned"]
        self.eval_metrics = nn.ModuleDict({
            v: nn.ModuleList([self.task.make_metrics() for _ in names]) for v in variants
        }).to(self.device)
        self._timing = {v: [0.0, 0] for v in variants}

    def on_test_epoch_start(self) -> None:
        self._setup_eval()

    def on_validation_epoch_start(self) -> None:
        self._setup_eval()

    def _eval_step(self, batch: dict, batch_idx: int, dataloader_idx: int) -> None:
        labels = batch["labels"]
        loaders = self.trainer.test_dataloaders if self.trainer.testing else self.trainer.val_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        keep = self._real(batch, batch_idx, loader).bool().to(labels.device)
        models = {"pruned": self.model, "dense": self.dense_model}
        for variant, metrics in self.eval_metrics.items():
            model = models[variant]
            start = time.perf_counter()
            with torch.inference_mode():
                out = self.forward_fn(model, batch)
            self._timing[variant][0] += time.perf_counter() - start
            self._timing[variant][1] += int(labels.shape[0])
            logits = out.logits if hasattr(out, "logits") else out
            metrics[dataloader_idx].update(self.task.predictions(logits)[keep], labels[keep])

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, dataloader_idx)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, dataloader_idx)

    def _end_eval(self) -> None:
        rows = []
        for i, name in enumerate(self.eval_names):
            prefix = f"test/{name}" if i == 0 else f"ood/{name}"
            values = {v: {k: float(x) for k, x in ms[i].compute().items()} for v, ms in self.eval_metrics.items()}
            for metric, pruned in values["pruned"].items():
                dense = values.get("dense", {}).get(metric)
                self.log(f"{prefix}/{metric}", pruned, sync_dist=False, add_dataloader_idx=False)
                if dense is not None:
                    self.log(f"{prefix}/{metric}_dense", dense, sync_dist=False, add_dataloader_idx=False)
                rows.append({"set": name, "kind": "in-domain" if i == 0 else "ood", "metric": metric,
                             "dense": dense, "pruned": pruned})
        for variant, (seconds, n) in self._timing.items():
            if seconds > 0:
                self.log(f"speed/{variant}_samples_per_s", n / seconds, add_dataloader_idx=False)
        self.results = rows
        self.throughput = {v: (n / s if s > 0 else None) for v, (s, n) in self._timing.items()}

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
            **{k: self.hparams.get(k) for k in RESUME_HPARAMS},
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

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Rebuild a shrunk model before Lightning loads its weights (Lightning restores weights before callbacks).

        When ``fit`` resumes a calibration, refuse a checkpoint written with other settings, another number of
        processes or another calibration set: the loader would skip the wrong batches and the sums would mix.
        """
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
