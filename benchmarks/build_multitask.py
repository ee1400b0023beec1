"""Build (if needed) the zoo's multi-task model and tabulate its metrics on every task's full dev set.

    python -m benchmarks.build_multitask --data-dir ../shared/data \
        --out benchmarks/results/multitask_minilm.md

Writes a Markdown table (dev + out-of-domain metrics per task head) with the command, git commit, machine and the
build time recorded in the model's build.json.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import cpu_name, git_commit
from taskprune.io import atomic_write_bytes
from taskprune.tasks import get_task
from taskprune.models.multitask import read_build_info
from taskprune.zoo import build_multitask, load_multitask, resolve_model_dir


def recipe_dev_rows(info: dict) -> int:
    return int(info.get("recipe", {}).get("dev_rows", 0))


def _compare(a: Path, b: Path) -> list[str]:
    """Markdown lines: do two builds hold the same weights (sha256 of the safetensors files, then max |diff|)?"""
    import hashlib

    from safetensors.torch import load_file

    ia, ib = read_build_info(a) or {}, read_build_info(b) or {}
    out = [f"* compared with `{b}` (recipe hash `{ib.get('recipe_hash')}`, data: {ib.get('data_source')} "
           f"`{ib.get('data_dir')}`, built {ib.get('build_seconds')} s):"]
    for f in ("model.safetensors", "heads.safetensors"):
        ha, hb = (hashlib.sha256((d / f).read_bytes()).hexdigest() for d in (a, b))
        if ha == hb:
            out.append(f"  * `{f}`: byte-identical (sha256 `{ha[:16]}`)")
            continue
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        diff = max(((ta[k] - tb[k]).abs().max().item() for k in ta if k in tb and ta[k].shape == tb[k].shape),
                   default=float("nan"))
        out.append(f"  * `{f}`: differ (sha256 `{ha[:16]}` vs `{hb[:16]}`), max |difference| {diff:.3g}")
    if ia.get("recipe_hash") == ib.get("recipe_hash"):
        out.append("  * same recipe hash")
    return out


def _reserve_and_curve(info: dict) -> list[str]:
    """Markdown lines: the selection reserve (rows kept out of training) and the per-epoch learning curve."""
    out = []
    if info.get("selection_reserve"):
        out.append("* selection reserve (train rows never trained on; defaults are chosen on them): "
                   + ", ".join(f"{t} {len(v)}" for t, v in info["selection_reserve"].items()))
    curve = info.get("learning_curve") or []
    if curve:
        tasks = list(curve[-1]["dev"])
        out += ["", "## Learning curve (build-time dev check after each epoch; main metric x100)", "",
                "| epoch | wall s | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
        for c in curve:
            cells = []
            for t in tasks:
                m = c["dev"].get(t, {})
                key = {"mrpc": "f1", "stsb": "pearson", "cola": "matthews"}.get(t, "accuracy")
                cells.append(f"{100 * m[key]:.1f}" if key in m else "")
            out.append(f"| {c['epoch']} | {c['seconds']:.0f} | " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="minilm-glue")
    p.add_argument("--data-dir", default=os.environ.get("TASKPRUNE_DATA", "../shared/data"),
                   help="data for the build and the evaluation (default: $TASKPRUNE_DATA, else ../shared/data)")
    p.add_argument("--model", default=None, help="evaluate this model folder instead of building --name")
    p.add_argument("--out", default="benchmarks/results/multitask_minilm.md")
    p.add_argument("--no-ood", action="store_true", help="skip the out-of-domain sets")
    p.add_argument("--max-rows", type=int, default=None, help="cap rows per dev set (seeded; default: all)")
    p.add_argument("--ood-max-rows", type=int, default=2000, help="cap rows per out-of-domain set (seeded)")
    p.add_argument("--from-build-json", action="store_true",
                   help="tabulate the build-time dev check recorded in build.json (seeded subsets) instead")
    p.add_argument("--compare-with", default=None, metavar="FOLDER",
                   help="another build of the same recipe (e.g. from the other data folder): are the weights equal?")
    args = p.parse_args(argv)
    console = Console()

    from taskprune.zoo import evaluate

    path = Path(args.model) if args.model else build_multitask(args.name, args.data_dir)
    path = resolve_model_dir(path)
    info = read_build_info(path) or {}
    model = load_multitask(path)
    rows, t0 = [], time.time()
    if args.from_build_json:  # quick table: the build-time check on seeded dev subsets, no evaluation
        for t, m in info["dev_metrics"].items():
            m = dict(m)
            n = m.pop("rows")
            spec = get_task(t).dev
            metrics = ", ".join(f"{k} {100 * v:.1f}" for k, v in m.items())
            sub = f", seeded subset of {recipe_dev_rows(info)}" if n >= recipe_dev_rows(info) else ""
            rows.append(f"| {t} | in-domain | `{spec.path}` ({spec.split}{sub}) | {n} | {metrics} |")
    for t in [] if args.from_build_json else model.task_names:
        task = get_task(t)
        sets = [("dev", task.dev)] + ([] if args.no_ood else [(s.name, s.file) for s in task.ood])
        for split, spec in sets:
            cap = args.max_rows if split == "dev" else args.ood_max_rows
            m = evaluate(model, t, args.data_dir, split, cap, batch_size=128)
            n = m.pop("rows")
            metrics = ", ".join(f"{k} {100 * v:.1f}" for k, v in m.items())
            label = "in-domain" if split == "dev" else "out-of-domain"
            sub = "" if cap is None or n < cap else f", seeded subset of {cap}"
            rows.append(f"| {t} | {label} | `{spec.path}` ({spec.split}{sub}) | {n} | {metrics} |")
            console.print(rows[-1])
    eval_s = time.time() - t0
    same = [] if args.compare_with is None else _compare(path, Path(args.compare_with))

    order = {t: i for i, t in enumerate(("sst2", "mrpc", "qnli", "mnli", "qqp", "rte", "cola", "stsb"))}
    rows.sort(key=lambda r: (order.get(r.split("|")[1].strip(), 99), "out-of" in r))
    rpt = info.get("rows_per_task", {})
    lines = [
        f"# Multi-task MiniLM ({info.get('name', args.name)}): dev metrics per task head",
        "",
        "One all-MiniLM-L6-v2 encoder (mean pooling) fine-tuned jointly with one `Linear(384, n_labels)` head per "
        "GLUE task (MT-DNN style, single-task batches shuffled across tasks); this is the dense model that taskprune "
        "prunes for one task. Metrics x100; accuracy, F1 of the positive class (MRPC, QQP), Matthews correlation "
        "(CoLA), Pearson/Spearman (STS-B). Out-of-domain rows use the same head through the label maps of "
        "`taskprune/tasks.py` (Yelp/Amazon 5-star binarised: 1-2 stars negative, 4-5 positive, 3 stars dropped).",
        "",
        ("**These numbers are the build-time check on seeded dev subsets** (`--from-build-json`); run the command "
         "below without it for full dev sets. " if args.from_build_json else "")
        + "**QQP has no dev set here**: its row is a 1000-row held-out sample of QQP *train* (disjoint from the train "
        "sample). MNLI is dev-matched."
        + ("" if args.from_build_json else " Every other in-domain row is the full official GLUE dev set."),
        "",
        "| task head | set | file | rows | metrics |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "## Build",
        "",
        f"* model folder: `{path}` (recipe hash `{info.get('recipe_hash')}`, data: {info.get('data_source')} "
        f"`{info.get('data_dir')}`)",
        f"* recipe: `{info.get('recipe')}`",
        f"* train rows per task: {rpt}",
        f"* build time: {info.get('build_seconds')} s wall ({info.get('train_seconds')} s training incl. "
        f"loading), {info.get('torch_threads')} torch threads",
        f"* evaluation time for this table: {eval_s:.0f} s",
        *same,
        *_reserve_and_curve(info),
        "",
        "## Reproduce",
        "",
        "```",
        f"python -m taskprune.zoo build {info.get('name', args.name)}"
        + ("   # the embedded data; --data-dir ../shared/data: same rows, same hash"
           if info.get("name", args.name) == "minilm-glue" else " --data-dir ../shared/data"),
        " ".join(["python -m benchmarks.build_multitask", *(argv if argv is not None else sys.argv[1:])]),
        "```",
        "",
        f"* git commit: {git_commit()}",
        f"* machine: {cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__}; build times depend on "
        "what else runs on the CPU",
        f"* date: {datetime.date.today().isoformat()}",
        "",
    ]
    atomic_write_bytes(args.out, "\n".join(lines).encode())
    console.print(f"[bold green]wrote[/] {args.out}")


if __name__ == "__main__":
    main()
