"""Prune SmolLM2-135M-Instruct (LLaMA, GQA) as a prompted classifier for one task at a time, on CPU.

For each task (SST-2 -> OOD IMDB, MNLI -> OOD SNLI): IG scores of KV groups and gated-MLP neurons on a few labelled
training samples through :func:`taskprune.prompted.prompted_forward`, a global MAC budget per cut, physical removal,
then accuracy on seeded dev / OOD samples, parameters, prunable MACs at seq_len=128, and CPU throughput (samples/s on
the dev sample, same rows and batches for dense and shrunk).

    python -m benchmarks.smollm2 --out benchmarks/results/smollm2.md

Writes the markdown table and a JSON of every number next to it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import subprocess
import time
from pathlib import Path

import torch

from taskprune.attribution import score_units
from taskprune.data import load_split, random_subset
from taskprune.flops import count_macs, count_params
from taskprune.prompted import PromptCollator, load_smollm2, predict, prompted_forward
from taskprune.selection import select_units
from taskprune.surgery import shrink_

log = logging.getLogger("benchmarks.smollm2")
OOD = {"sst2": "imdb", "mnli": "snli"}


def batches(collate, rows, batch_size):
    rows = sorted(rows, key=lambda r: len(collate.encode(r)))  # less padding; accuracy ignores order
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def accuracy(model, bs) -> tuple[float, float]:
    """(accuracy, samples/s)."""
    t = time.perf_counter()
    pred, labels = predict(model, bs)
    dt = time.perf_counter() - t
    return float((pred == labels).float().mean()), len(labels) / dt


def run_task(task: str, args, model, tok) -> dict:
    collate = PromptCollator(tok, task, style=args.style, max_length=args.max_length)
    train = random_subset(load_split(task, "train"), args.n_calib, seed=args.seed).to_list()
    dev = random_subset(load_split(task, "dev"), args.n_dev, seed=args.seed).to_list()
    ood = random_subset(load_split(task, OOD[task]), args.n_ood, seed=args.seed).to_list()
    calib = [collate(train[i : i + args.batch_size]) for i in range(0, len(train), args.batch_size)]
    dev_b, ood_b = batches(collate, dev, args.eval_batch), batches(collate, ood, args.eval_batch)

    dense_macs, dense_params = count_macs(model, 128), count_params(model)
    acc, sps = accuracy(model, dev_b)
    ood_acc, _ = accuracy(model, ood_b)
    rows = [{"cut": 0.0, "dev_acc": acc, "ood_acc": ood_acc, "params": dense_params, "macs": dense_macs,
             "samples_per_s": sps, "kv_groups": None, "neurons": None}]
    log.info("%s dense: dev %.3f ood %.3f %.1f samples/s", task, acc, ood_acc, sps)

    t = time.perf_counter()
    scores = score_units(model, calib, "ig", "label", steps=args.steps, forward=prompted_forward)
    score_s = time.perf_counter() - t
    log.info("%s: scored in %.0fs", task, score_s)
    for cut in args.cuts:
        spec = select_units(scores, macs=cut, seq_len=128)
        pruned = shrink_(copy.deepcopy(model), spec)
        acc, sps = accuracy(pruned, dev_b)
        ood_acc, _ = accuracy(pruned, ood_b)
        s = spec.summary()
        rows.append({"cut": cut, "achieved_macs_cut": spec.budget["achieved"]["macs"], "dev_acc": acc,
                     "ood_acc": ood_acc, "params": count_params(pruned), "macs": count_macs(pruned, 128),
                     "samples_per_s": sps, "kv_groups": f"{s['heads']['kept']}/{s['heads']['total']}",
                     "neurons": f"{s['neurons']['kept']}/{s['neurons']['total']}"})
        log.info("%s cut %.2f: dev %.3f ood %.3f %.1f samples/s", task, cut, acc, ood_acc, sps)
        del pruned
    return {"task": task, "ood": OOD[task], "n_calib": len(train), "n_dev": len(dev), "n_ood": len(ood),
            "score_seconds": score_s, "rows": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["sst2", "mnli"], choices=sorted(OOD))
    p.add_argument("--cuts", nargs="+", type=float, default=[0.2, 0.3, 0.4], help="fractions of prunable MACs")
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--steps", type=int, default=2, help="IG quadrature nodes")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--n-dev", type=int, default=200)
    p.add_argument("--n-ood", type=int, default=100)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--style", default="plain", choices=["plain", "chat"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/smollm2.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    cfg = model.config
    results = []
    for task in args.tasks:  # written after every task, so a cut-short run keeps what it finished
        results.append(run_task(task, args, model, tok))
        write(results, args, argv, cfg, t0)


def write(results, args, argv, cfg, t0) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"command": "python -m benchmarks.smollm2 " + " ".join(argv or __import__("sys").argv[1:]),
            "commit": commit, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch "
            f"{torch.__version__}, {args.threads} threads (shared CPU)", "args": vars(args),
            "model": {"model_type": cfg.model_type, "layers": cfg.num_hidden_layers,
                      "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                      "intermediate": cfg.intermediate_size, "weights": "GGUF Q4_1 dequantized to float32"},
            "total_seconds": time.perf_counter() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"<!-- generated by benchmarks/smollm2.py; commit {commit} -->", "",
             "| task | MAC cut (req / got) | KV groups | neurons | params (M) | MACs@128 (G) | dev acc | OOD | OOD acc "
             "| CPU samples/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            cut = "dense" if row["cut"] == 0 else f"{row['cut']:.0%} / {row['achieved_macs_cut']:.1%}"
            lines.append(f"| {r['task']} | {cut} | {row['kv_groups'] or 'all'} | {row['neurons'] or 'all'} | "
                         f"{row['params'] / 1e6:.1f} | {row['macs'] / 1e9:.2f} | {row['dev_acc']:.3f} | {r['ood']} | "
                         f"{row['ood_acc']:.3f} | {row['samples_per_s']:.1f} |")
    lines.append("")
    lines.append(f"Sizes: {results[0]['n_calib']} calibration samples, dev {results[0]['n_dev']}, OOD "
                 f"{results[0]['n_ood']} per task; total {meta['total_seconds']:.0f}s.")
    out.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
