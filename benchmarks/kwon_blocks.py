"""Where Kwon et al.'s mask tuning helps or hurts, block by block (issue #21: "show where it loses").

For each task, seed and cut: the faithful ``kwon`` preset on its own calibration (2048 rows with replacement, unsorted
batches, as in ``benchmarks.headline``), the spec with its tuned scales, then, in forward order, the dev metric with
the scales of the sub-layers *up to* each one folded in (the rest at scale 1): the first sub-layer whose scales cost
metric is where tuning starts to lose. Beside it, per layer, the relative error of the hidden state against the dense
model on the calibration rows (|h_S - h_T| / |h_T|, real tokens) without and with all the scales, the scales' range,
and which sub-layers got none (layer-0 attention by their rule; later ones when LSMR or the scale bound stopped the
tuning there).

    python -m benchmarks.kwon_blocks --tasks sst2 mrpc qnli mnli qqp stsb --seeds 0 --cuts 0.4 0.6

Writes benchmarks/results/kwon_blocks.{json,md}; resumes (a (task, seed, cut) already in the JSON with the same
library code is skipped).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import code_hash, cpu_name, git_commit, header, write_text
from benchmarks.headline import MODEL, batches_of, eval_sets, evaluate, kwon_batches, main_key
from taskprune.arch import get_architecture
from taskprune.lightning.data import load_tokenizer
from taskprune.models.multitask import read_build_info
from taskprune.pipeline import Pipeline
from taskprune.surgery import shrink_
from taskprune.zoo import ensure_multitask, resolve_model_dir

log = logging.getLogger("benchmarks.kwon_blocks")


def sublayers(model) -> list[tuple[str, str]]:
    """``[(kind, block name)]`` in forward order: each layer's attention, then its feed-forward block."""
    arch = get_architecture(model)
    return [s for a, f in zip(arch.blocks("heads"), arch.blocks("neurons")) for s in (("heads", a.name),
                                                                                     ("neurons", f.name))]


def pruned(tm, spec):
    small = copy.deepcopy(tm)
    return shrink_(small, spec).eval()  # its scales folded in


@torch.inference_mode()
def hidden_errors(dense, small, batches: list[dict]) -> list[float]:
    """Per layer: |h_S - h_T| / |h_T| over the real tokens of ``batches`` (the encoder's hidden states)."""
    num, den = None, None
    for b in batches:
        kw = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in b}
        hs_t = dense.encoder(**kw, output_hidden_states=True).hidden_states[1:]
        hs_s = small.encoder(**kw, output_hidden_states=True).hidden_states[1:]
        real = b["attention_mask"].bool()
        n = torch.stack([(s - t)[real].pow(2).sum() for s, t in zip(hs_s, hs_t)]).double()
        d = torch.stack([t[real].pow(2).sum() for t in hs_t]).double()
        num, den = (n, d) if num is None else (num + n, den + d)
    return (num / den).sqrt().tolist()


def one(dense, task: str, seed: int, cut: float, rows: list[dict], dev: list[dict], scores: dict) -> dict:
    """One (task, seed, cut); ``scores`` caches the Fisher scores of ``rows`` across cuts (one scoring per seed)."""
    pipeline = Pipeline.preset("kwon").at(cut).resolve(rows)
    t0 = time.perf_counter()
    if "scores" not in scores:
        scores["scores"] = pipeline.score(dense, rows)
    spec = pipeline.prune(dense, rows, scores=scores["scores"])
    seconds = time.perf_counter() - t0
    key = main_key(task)
    order = sublayers(dense)
    none = replace(spec, scales={})
    metric = {"none": evaluate(pruned(dense, none), task, dev)[key]}
    steps = []
    for i, (kind, name) in enumerate(order):
        if name not in spec.scales.get(kind, {}):
            steps.append({"kind": kind, "block": name, "kept": len(spec.kept(kind, name)), "scales": None})
            continue
        upto = {}
        for k, n in order[: i + 1]:
            if n in spec.scales.get(k, {}):
                upto.setdefault(k, {})[n] = spec.scales[k][n]
        s = spec.scales[kind][name]
        steps.append({"kind": kind, "block": name, "kept": len(spec.kept(kind, name)), "scales": [min(s), max(s)],
                      "metric_upto": evaluate(pruned(dense, replace(spec, scales=upto)), task, dev)[key]})
    calib = rows[: max(1, 256 // 32)]  # 256 calibration rows for the hidden-state errors
    err_none = hidden_errors(dense, pruned(dense, none), calib)
    err_tuned = hidden_errors(dense, pruned(dense, spec), calib)
    metric["tuned"] = evaluate(pruned(dense, spec), task, dev)[key]
    metric["dense"] = evaluate(dense, task, dev)[key]
    return {"task": task, "seed": seed, "cut": cut, "metric": key, "values": metric, "sublayers": steps,
            "hidden_error": {"none": err_none, "tuned": err_tuned},
            "prune_seconds": seconds}  # the Fisher scoring included on a seed's first cut


def render(data: dict) -> str:
    lines = [header("kwon_blocks", data["runs"][-1]["argv"], data["runs"][-1]["commit"]).rstrip(), "",
             "| run | command | commit | library tree | CPU | threads | wall |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {i + 1} | `python -m benchmarks.kwon_blocks {' '.join(r['argv'])}` | `{r['commit']}` | `{r['code']}` | "
              f"{r['cpu']} | {r['threads']} | {r['seconds'] / 60:.0f} min |" for i, r in enumerate(data["runs"])]
    lines += ["", "Per (task, seed, cut): the dev metric as % of dense with the tuned scales of the sub-layers up to "
              "each one (the rest at 1), the scales' range, and per layer the hidden-state error against dense on "
              "256 calibration rows without / with all the scales. '–': no scales (layer-0 attention by their rule; "
              "a sub-layer after the one where LSMR or the scale bound stopped the tuning).", ""]
    for r in data["rows"]:
        v = r["values"]
        pct = lambda x: 100 * x / v["dense"]  # noqa: E731
        lines += [f"### {r['task']}, seed {r['seed']}, {r['cut']:.0%} cut: {r['metric']} no tuning "
                  f"{pct(v['none']):.1f} %, tuned {pct(v['tuned']):.1f} % of dense ({v['tuned'] - v['none']:+.4f})", "",
                  "| sub-layer | kept | scales (min, max) | tuned up to here, % of dense | step Δ (points) |",
                  "|---|---|---|---|---|"]
        prev = pct(v["none"])
        for s in r["sublayers"]:
            if s["scales"] is None:
                lines.append(f"| {s['block']} | {s['kept']} | – | | |")
                continue
            now = pct(s["metric_upto"])
            lines.append(f"| {s['block']} | {s['kept']} | {s['scales'][0]:.2f}, {s['scales'][1]:.2f} | {now:.1f} | "
                         f"{now - prev:+.1f} |")
            prev = now
        lines += ["", "| layer | hidden-state error, no tuning | with tuning |", "|---|---|---|"]
        lines += [f"| {i} | {a:.3f} | {b:.3f} |" for i, (a, b) in enumerate(zip(r["hidden_error"]["none"],
                                                                                r["hidden_error"]["tuned"]))]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kwon_blocks", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "qnli", "mnli", "qqp", "stsb"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--cuts", nargs="+", type=float, default=[0.4, 0.6])
    p.add_argument("--kwon-calib", type=int, default=2048)
    p.add_argument("--out", default="benchmarks/results/kwon_blocks.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    out = Path(args.out)
    code = code_hash()
    data = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {"runs": [], "rows": []}
    data["rows"] = [r for r in data["rows"] if r.get("code") == code]
    run = {"argv": list(sys.argv[1:] if argv is None else argv), "commit": git_commit(), "code": code,
           "cpu": cpu_name(), "threads": torch.get_num_threads(), "seconds": 0.0}
    data["runs"].append(run)
    t0 = time.perf_counter()
    model = ensure_multitask(MODEL, data_dir=args.data_dir)
    tok = load_tokenizer(model.tokenizer_path)
    info = read_build_info(resolve_model_dir(MODEL))
    for task in args.tasks:
        dense = model.for_task(task).eval()
        dev = batches_of(tok, task, eval_sets(task, args.data_dir, "dev")["dev"], 64)
        for seed in args.seeds:
            rows = kwon_batches(tok, task, args.data_dir, info["selection_reserve"][task], args.kwon_calib, seed)
            scores: dict = {}
            for cut in args.cuts:
                if any((r["task"], r["seed"], r["cut"]) == (task, seed, cut) for r in data["rows"]):
                    continue
                row = one(dense, task, seed, cut, rows, dev, scores)
                row["code"] = code
                data["rows"].append(row)
                run["seconds"] = time.perf_counter() - t0
                write_text(out.with_suffix(".json"), json.dumps(data, indent=1))
                write_text(out, render(data))
                log.info("%s seed %d cut %.1f: %s", task, seed, cut, row["values"])


if __name__ == "__main__":
    main()
