"""SmolLM2-135M-Instruct (LLaMA, GQA) as a k-shot prompted classifier, pruned for one task at a time, on CPU.

Per task: a few-shot prompt with contextual calibration (:class:`taskprune.fewshot.PromptedLM`, the prefix's KV cache
reused across rows), dense accuracy on >= 500 evaluation rows and the chance level (majority-class share of those
rows); integrated gradients of KV groups and gated-MLP neurons on labelled calibration rows (time, peak RSS); a MAC
budget per cut counted at the real prompt length (prefix + mean row); physical removal; accuracy, parameters, MACs;
CPU speed of the prompt's prefill (whole prompt, batch 1) and of per-token decoding (KV cache, batch 1), dense and
pruned measured interleaved, best of ``--reps``; the pruned decoder saved, reloaded and compared by greedy
``generate()`` with the in-memory one.

Splits (no row is both shown and scored): SST-2 demonstrations and calibration rows from train, evaluation from dev;
AG News and SMS spam (one file each) are split by a seeded permutation: evaluation rows first, demonstrations and
calibration rows from the rest. SMS spam's evaluation rows are class-balanced (its natural majority class, ham, is
86.6 %; with it chance + 20 points cannot be reached).

    python -m benchmarks.smollm2 --data-dir ../shared/data

Writes benchmarks/results/smollm2.md and smollm2.json after every task (``"partial": true`` until all are done).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import header, write_text
from taskprune.attribution import score_units
from taskprune.export import load_pruned, save_pruned
from taskprune.fewshot import TEMPLATES, PromptedLM, TextCollator, draw_demos
from taskprune.flops import count_macs, count_params
from taskprune.gguf import load_smollm2
from taskprune.selection import select_units
from taskprune.surgery import shrink_

log = logging.getLogger("benchmarks.smollm2")

# task -> (file under data_dir, how evaluation rows are drawn, shots per class)
TASKS = {
    "sst2": ("sst2/dev.tsv", "file", 8),
    "ag_news": ("ag_news/test.jsonl", "random", 1),
    "sms_spam": ("sms_spam/all.jsonl", "balanced", 4),
}


def read_rows(data_dir: Path, path: str) -> list[dict]:
    """``[{"sentence", "label"}]`` from a GLUE TSV (``csv.QUOTE_NONE``, header) or a JSONL file."""
    f = data_dir / path
    if f.suffix == ".tsv":
        with open(f, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
        return [{"sentence": r[0], "label": int(r[1])} for r in rows if r]
    with open(f, encoding="utf-8") as fh:
        return [{"sentence": o["sentence"], "label": int(o["label"])} for o in map(json.loads, fh) if o]


def splits(task: str, data_dir: Path, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``(pool, eval_rows)``: demonstrations and calibration rows come from the pool, never from eval_rows."""
    path, how, _ = TASKS[task]
    rows = read_rows(data_dir, path)
    rng = np.random.default_rng(seed)
    if how == "file":  # separate files: the pool is the train split
        pool = read_rows(data_dir, path.replace("dev.tsv", "train.tsv"))
        return pool, [rows[i] for i in sorted(rng.permutation(len(rows))[:n_eval])]
    perm = rng.permutation(len(rows))
    if how == "random":
        return [rows[i] for i in perm[n_eval:]], [rows[i] for i in sorted(perm[:n_eval])]
    labels = np.asarray([r["label"] for r in rows])
    n_classes = int(labels.max()) + 1
    chosen = np.concatenate([perm[labels[perm] == c][: n_eval // n_classes] for c in range(n_classes)])
    rest = np.setdiff1d(perm, chosen, assume_unique=True)
    return [rows[i] for i in rest], [rows[i] for i in sorted(chosen)]


def batches(collate, rows, size):
    return [collate(rows[i : i + size]) for i in range(0, len(rows), size)]


@torch.inference_mode()
def accuracy(model: PromptedLM, bs) -> tuple[float, list[int]]:
    preds, labels = [], []
    for b in bs:
        preds += model(**b).argmax(-1).tolist()
        labels += b["labels"].tolist()
    return float(np.mean(np.asarray(preds) == np.asarray(labels))), preds


@torch.inference_mode()
def speed(lm, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(seconds per prompt prefill, seconds per decoded token), batch 1, mean over ``prompts``."""
    prefill, decode = [], []
    for p in prompts:
        ids = torch.tensor([p])
        t = time.perf_counter()
        out = lm(input_ids=ids, use_cache=True)
        prefill.append(time.perf_counter() - t)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        kw = "cache" if hasattr(out, "cache") else "past_key_values"
        nxt = out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(new_tokens):
            out = lm(input_ids=nxt, use_cache=True, **{kw: cache})
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        decode.append((time.perf_counter() - t) / new_tokens)
    return statistics.mean(prefill), statistics.mean(decode)


def export_check(pruned: PromptedLM, spec, prompt: list[int]) -> bool:
    """Save the pruned decoder, reload it, and compare greedy generate() with the in-memory model."""
    with tempfile.TemporaryDirectory() as tmp:
        save_pruned(pruned, spec, Path(tmp) / "pruned", tokenizer=pruned.tokenizer)
        reloaded = load_pruned(Path(tmp) / "pruned")
        kw = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": pruned.pad_id}
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            a, b = pruned.lm.generate(ids, **kw), reloaded.generate(ids, **kw)
    return bool(torch.equal(a, b))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run_task(task: str, args, lm, tok) -> dict:
    t_task = time.perf_counter()
    pool, rows = splits(task, Path(args.data_dir), args.n_eval, args.seed)
    template, shots = TEMPLATES[task], TASKS[task][2]
    demos = draw_demos(pool, shots, template.n_classes, args.seed)
    shown = {d["sentence"] for d in demos}
    rest = [r for r in pool if r["sentence"] not in shown]
    calib = [rest[i] for i in np.random.default_rng(args.seed + 1).permutation(len(rest))[: args.n_calib]]
    model = PromptedLM(lm, template=template, demos=demos, tokenizer=tok, attribute_prefix=args.attribute_prefix)
    collate = TextCollator(model, args.max_text)
    order = sorted(range(len(rows)), key=lambda i: len(model.text_ids(rows[i]["sentence"])))  # less padding
    eval_rows = [rows[i] for i in order]
    eval_b = batches(collate, eval_rows, args.eval_batch)
    row_len = float(np.mean([min(len(model.text_ids(r["sentence"])), args.max_text) for r in rows]))
    seq_len = int(round(len(model.prefix_ids) + len(model.pre_ids) + row_len + len(model.post_ids)))
    labels = np.asarray([r["label"] for r in rows])
    chance = float(np.bincount(labels).max() / len(labels))

    t = time.perf_counter()
    dense_acc, _ = accuracy(model, eval_b)
    dense_eval_s = time.perf_counter() - t
    log.info("%s dense: acc %.3f (chance %.3f) on %d rows, prompt %d tokens (%d prefix), %.0fs", task, dense_acc,
             chance, len(rows), seq_len, len(model.prefix_ids), dense_eval_s)

    prompts = [model.prompt_ids(r["sentence"]) for r in rows[: args.speed_prompts]]
    out = {"task": task, "rows": len(rows), "chance": chance, "dense_accuracy": dense_acc, "shots_per_class": shots,
           "prefix_tokens": len(model.prefix_ids), "prompt_tokens": seq_len, "n_calib": 0,
           "calibration_seconds": None, "peak_rss_gib_after_calibration": None,
           "peak_rss_gib_before_calibration": peak_rss_gib(), "dense_eval_seconds": dense_eval_s,
           "params": count_params(model.lm), "macs": count_macs(model.lm, seq_len), "cuts": [],
           "prefill_seconds": None, "decode_seconds_per_token": None}
    if not args.cuts:  # dense accuracy only
        out["task_seconds"] = time.perf_counter() - t_task
        return out
    t = time.perf_counter()
    scores = score_units(model, batches(collate, calib, args.calib_batch), "ig", "label", steps=args.steps,
                         alpha_batch=args.alpha_batch)
    out.update({"n_calib": len(calib), "calibration_seconds": time.perf_counter() - t,
                "peak_rss_gib_after_calibration": peak_rss_gib()})
    log.info("%s: calibrated on %d rows in %.0fs, peak RSS %.2f GiB", task, len(calib), out["calibration_seconds"],
             out["peak_rss_gib_after_calibration"])

    variants = {"dense": model}
    for cut in args.cuts:
        spec = select_units(scores, macs=cut, seq_len=seq_len)
        pruned = shrink_(copy.deepcopy(model), spec)
        t = time.perf_counter()
        acc, _ = accuracy(pruned, eval_b)
        s = spec.summary()
        row = {"cut": cut, "achieved_macs_cut": spec.budget["achieved"]["macs"], "accuracy": acc,
               "retained": acc / dense_acc, "params": count_params(pruned.lm), "macs": count_macs(pruned.lm, seq_len),
               "kv_groups": f"{s['heads']['kept']}/{s['heads']['total']}",
               "neurons": f"{s['neurons']['kept']}/{s['neurons']['total']}",
               "eval_seconds": time.perf_counter() - t, "export_generate_equal": export_check(pruned, spec, prompts[0])}
        log.info("%s cut %.0f%%: acc %.3f, %.1fM params, export+generate equal: %s", task, 100 * cut, acc,
                 row["params"] / 1e6, row["export_generate_equal"])
        out["cuts"].append(row)
        variants[f"{cut}"] = pruned
    timings = {name: [] for name in variants}
    for _ in range(args.reps):  # interleaved, so a load change on the shared CPU hits every variant alike
        for name, m in variants.items():
            timings[name].append(speed(m.lm, prompts, args.new_tokens))
    best = {name: (min(t[0] for t in ts), min(t[1] for t in ts)) for name, ts in timings.items()}
    out["prefill_seconds"], out["decode_seconds_per_token"] = best["dense"]
    for row in out["cuts"]:
        p, d = best[f"{row['cut']}"]
        row.update({"prefill_seconds": p, "decode_seconds_per_token": d, "prefill_speedup": best["dense"][0] / p,
                    "decode_speedup": best["dense"][1] / d})
    out["task_seconds"] = time.perf_counter() - t_task
    return out


def render(results: list[dict], meta: dict, partial: bool) -> str:
    lines = [header("smollm2", meta["argv"]).rstrip(), ""]
    if not meta["args"]["cuts"]:
        lines += ["**Dense accuracy only** (`--cuts` empty: no calibration, no pruning, no timing).", ""]
    elif partial:
        missing = [t for t in TASKS if t not in {r["task"] for r in results}]
        lines += [f"**PARTIAL: {len(results)} of {len(TASKS)} tasks done; missing: {', '.join(missing)}.** Complete "
                  f"it with `python -m benchmarks.smollm2 {' '.join(meta['argv'])} --tasks {' '.join(missing)} "
                  "--merge` (same settings).", ""]
    if meta.get("merged_from"):
        lines += [f"Tasks run by an earlier command were kept: `{' '.join(meta['merged_from'])}`.", ""]
    lines += ["| task | rows | chance | dense acc | MAC cut (req / got) | acc | retained | KV groups | neurons | "
              "params (M) | prefill speedup | decode speedup | export = in-memory |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['task']} | {r['rows']} | {r['chance']:.3f} | {r['dense_accuracy']:.3f} | dense | "
                     f"{r['dense_accuracy']:.3f} | 100 % | all | all | {r['params'] / 1e6:.1f} | 1.00× | 1.00× | |")
        for c in r["cuts"]:
            lines.append(f"| {r['task']} | | | | {c['cut']:.0%} / {c['achieved_macs_cut']:.1%} | {c['accuracy']:.3f} | "
                         f"{100 * c['retained']:.1f} % | {c['kv_groups']} | {c['neurons']} | {c['params'] / 1e6:.1f} | "
                         f"{c['prefill_speedup']:.2f}× | {c['decode_speedup']:.2f}× | "
                         f"{'yes' if c['export_generate_equal'] else 'NO'} |")
    lines += ["", "| task | demos / class | prompt tokens (prefix) | calibration rows | calibration s | peak RSS after "
              "calibration (GiB) | dense prefill s | dense decode s/token |", "|---|---|---|---|---|---|---|---|"]
    def num(x, fmt):
        return "–" if x is None else format(x, fmt)

    for r in results:
        lines.append(f"| {r['task']} | {r['shots_per_class']} | {r['prompt_tokens']} ({r['prefix_tokens']}) | "
                     f"{r['n_calib']} | {num(r['calibration_seconds'], '.0f')} | "
                     f"{num(r['peak_rss_gib_after_calibration'], '.2f')} | {num(r['prefill_seconds'], '.3f')} | "
                     f"{num(r['decode_seconds_per_token'], '.4f')} |")
    a = meta["args"]
    lines += ["", f"Settings: IG {a['steps']} steps (path from gates = 0.5), target = gold label, calibration batch "
              f"{a['calib_batch']}, alpha_batch {a['alpha_batch']}, gates on the prefix too: {a['attribute_prefix']}; "
              f"scope per_kind (the same share of attention and FFN MACs); MACs counted at the prompt length; "
              f"speed = best of {a['reps']} interleaved rounds over {a['speed_prompts']} prompts, batch 1, "
              f"{a['new_tokens']} decoded tokens, {a['threads']} threads; total {meta['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def write(results, meta, out: Path, partial: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out.with_suffix(".json"), json.dumps({"meta": meta, "partial": partial, "results": results}, indent=1))
    write_text(out, render(results, meta, partial))
    log.info("wrote %s%s", out, " (partial)" if partial else "")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder with the ../shared/data layout")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--cuts", nargs="*", type=float, default=[0.2, 0.4, 0.6],
                   help="fractions of the decoder's MACs; none = dense accuracy only (no calibration, no timing)")
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="IG quadrature nodes")
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--alpha-batch", type=int, default=1)
    p.add_argument("--attribute-prefix", action="store_true", help="gates act on the prefix too (costs p+r per row)")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--max-text", type=int, default=128, help="text tokens per row")
    p.add_argument("--speed-prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/smollm2.md")
    p.add_argument("--merge", action="store_true", help="keep the other tasks' results already in the JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    lm, tok = load_smollm2()
    import sys

    meta = {"argv": list(sys.argv[1:] if argv is None else argv), "args": vars(args), "tasks": args.tasks,
            "model": {"name": "SmolLM2-135M-Instruct", "weights": "GGUF Q4_1 dequantized to float32",
                      "layers": lm.config.num_hidden_layers, "heads": lm.config.num_attention_heads,
                      "kv_heads": lm.config.num_key_value_heads, "intermediate": lm.config.intermediate_size}}
    out = Path(args.out)
    kept = []
    if args.merge and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        kept = [r for r in old["results"] if r["task"] not in args.tasks]
        meta["merged_from"] = old["meta"]["argv"]
    meta["tasks"] = [r["task"] for r in kept] + args.tasks
    results = list(kept)
    for task in args.tasks:
        results.append(run_task(task, args, lm, tok))
        meta["seconds"] = time.perf_counter() - t0
        write(results, meta, out, partial=len(results) < len(TASKS) or not args.cuts)


if __name__ == "__main__":
    main()
