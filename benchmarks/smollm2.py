"""SmolLM2-135M-Instruct (LLaMA, GQA) as a k-shot prompted classifier, pruned for one task at a time, on CPU.

Per task: a few-shot prompt with contextual calibration (:class:`taskprune.models.fewshot.PromptedLM`, the prefix's KV cache
reused across rows), dense accuracy on >= 500 evaluation rows and the chance level (majority-class share of those
rows); unit scores on labelled calibration rows (time, peak RSS); a MAC budget per cut counted at the real prompt
length (prefix + mean row), allocated by one of :data:`PIPELINES`; physical removal; accuracy, parameters, MACs;
CPU speed of the prompt's prefill (whole prompt, batch 1) and of per-token decoding (KV cache, batch 1), dense and
pruned measured interleaved, best of ``--reps``; the pruned decoder saved, reloaded and compared by greedy
``generate()`` with the in-memory one.

``--select P ...`` runs pipelines on *selection rows* instead (class-balanced train rows, disjoint from the
demonstrations, the calibration rows and the evaluation rows) and writes ``smollm2_selection.md``: the default
``--pipeline`` is the one chosen there, never on the evaluation rows.

Splits (no row is both shown and scored): SST-2 demonstrations and calibration rows from train, evaluation from dev;
AG News and SMS spam (one file each) are split by a seeded permutation: evaluation rows first, demonstrations and
calibration rows from the rest. SMS spam's evaluation rows are class-balanced (its natural majority class, ham, is
86.6 %; with it chance + 20 points cannot be reached).

    python -m benchmarks.smollm2 --data-dir ../shared/data --select ig_rows ig igsq_search igsq_neurons fisher fisher_search
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
import shlex
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import header, write_text
from taskprune.attribution import AttributionConfig
from taskprune.export import load_pruned, save_pruned
from taskprune.models.fewshot import TEMPLATES, PromptedLM, TextCollator, draw_demos
from taskprune.flops import count_macs, count_params
from taskprune.models.gguf import load_smollm2
from taskprune.pipeline import DEFAULT_TUNING, Pipeline
from taskprune.selection import Budget
from taskprune.surgery import shrink_
from taskprune.tuning import TuningConfig, fold_scales_

log = logging.getLogger("benchmarks.smollm2")

# task -> (file under data_dir, how evaluation rows are drawn, shots per class)
TASKS = {
    "sst2": ("sst2/dev.tsv", "file", 8),
    "ag_news": ("ag_news/test.jsonl", "random", 1),
    "sms_spam": ("sms_spam/all.jsonl", "balanced", 4),
}


# scores: how units are scored on the calibration rows (all but ig_rows with gates on the few-shot prefix too)
SCORES = {
    "ig_rows": dict(method="ig", prefix=False),  # IG, mean |per-sample attribution|; prefix from the dense cache
    "ig": dict(method="ig", prefix=True),
    "igsq": dict(method="ig", prefix=True, aggregate="square"),  # mean of squared per-sample attributions
    "fisher": dict(method="fisher", prefix=True),  # Kwon et al.: sum over batches of squared mask gradients
}
# pipeline -> (scores, allocation, kinds pruned, mask tuning[, steps]); allocation per_kind = the same share of attention and
# FFN MACs, search = Kwon et al.'s mask search (units of largest total score under the MAC bound); tuning = Kwon et
# al.'s mask tuning of the kept units' scales (teacher: the dense model, or their schedule), folded before shrinking.
# Each is a taskprune.pipeline.Pipeline (see pipeline_of), run by Pipeline.prune.
PIPELINES = {
    "ig_rows": ("ig_rows", "per_kind", "all", "none"),  # the first run's setting
    "ig": ("ig", "per_kind", "all", "none"),
    "igsq": ("igsq", "per_kind", "all", "none"),
    "igsq_search": ("igsq", "search", "all", "none"),
    "igsq_neurons": ("igsq", "per_kind", "neurons", "none"),
    "fisher": ("fisher", "per_kind", "all", "none"),
    "fisher_search": ("fisher", "search", "all", "none"),
    "fisher_search_tune": ("fisher", "search", "all", "schedule"),
    "igsq_search_tune": ("igsq", "search", "all", "schedule"),
    # K-prune's weight tuning (TuningConfig(fit="columns")): the kept output-projection columns refitted to the dense
    # model's sum after the residual add (pre-norm LLaMA's natural target), issue #24's compensation
    "fisher_search_refit": ("fisher", "search", "all", "refit"),
    "igsq_search_refit": ("igsq", "search", "all", "refit"),
    # iterative pruning (Pipeline(steps=4): the cut in four equal steps, the model as shrunk so far re-scored before
    # each; the first step reuses the dense scores), then the refit on the dense model
    "fisher_search_refit_iter": ("fisher", "search", "all", "refit", 4),
    "igsq_search_refit_iter": ("igsq", "search", "all", "refit", 4),
}
#: the tuning column of PIPELINES -> TuningConfig
TUNINGS = {"none": TuningConfig(), "schedule": TuningConfig(tune="schedule"), "refit": DEFAULT_TUNING}
DEFAULT_PIPELINE = "fisher_search"


def pipeline_of(name: str, steps: int, alpha_batch: int, seq_len: int) -> Pipeline:
    """The :class:`taskprune.pipeline.Pipeline` of a row of :data:`PIPELINES`."""
    score, scope, units, tune, *iterations = PIPELINES[name]
    o = SCORES[score]
    if o["method"] == "fisher":
        att = AttributionConfig(method="fisher", per="batch", units=units)
    else:
        att = AttributionConfig(method="ig", steps=steps, alpha_batch=alpha_batch, units=units,
                                aggregate=o.get("aggregate", "abs"))
    return Pipeline(att, Budget(kind="macs", scope=scope, seq_len=seq_len), TUNINGS[tune], name, *iterations)


class Scorer:
    """Scores per (pipeline scores, kinds) on one task's calibration batches, computed once; ``seconds`` per name."""

    def __init__(self, model: PromptedLM, calib: list[dict], steps: int, alpha_batch: int):
        self.model, self.calib, self.steps, self.alpha_batch = model, calib, steps, alpha_batch
        self.cache, self.seconds = {}, {}

    def __call__(self, pipeline: str, seq_len: int = 128):
        score = PIPELINES[pipeline][0]
        p = pipeline_of(pipeline, self.steps, self.alpha_batch, seq_len)
        key = (score, p.attribution)
        if key not in self.cache:
            t = time.perf_counter()
            self.model.attribute_prefix = SCORES[score]["prefix"]
            try:
                self.cache[key] = p.score(self.model, self.calib)
            finally:
                self.model.attribute_prefix = True
            self.seconds[score] = time.perf_counter() - t
        return p, self.cache[key]


def prune(scorer: Scorer, pipeline: str, cut: float, seq_len: int) -> tuple[PromptedLM, object, float]:
    """``(shrunk copy, spec, seconds of allocation + tuning)`` of ``pipeline`` at a MAC cut."""
    p, scores = scorer(pipeline, seq_len)
    t = time.perf_counter()
    spec = p.at(cut).prune(scorer.model, scorer.calib, scores=scores)
    pruned = copy.deepcopy(scorer.model)
    if spec.scales or spec.columns:
        spec = fold_scales_(pruned, spec)
    return shrink_(pruned, spec), spec, time.perf_counter() - t


def achieved_cut(model: PromptedLM, pruned: PromptedLM, seq_len: int) -> float:
    """Fraction of the decoder blocks' MACs removed (attention + FFN, at ``seq_len``)."""
    return 1.0 - count_macs(pruned.lm, seq_len) / count_macs(model.lm, seq_len)


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


def balanced(rows: list[dict], n: int, n_classes: int) -> list[dict]:
    """The first ``n // n_classes`` rows of each class, in the given order (shorter classes give what they have)."""
    return [r for c in range(n_classes) for r in [r for r in rows if r["label"] == c][: n // n_classes]]


def setup(task: str, args, lm, tok) -> dict:
    """Rows, prompt and calibration of one task: demonstrations, calibration and selection rows from the pool
    (disjoint), evaluation rows never shown nor used for choosing."""
    pool, rows = splits(task, Path(args.data_dir), args.n_eval, args.seed)
    template, shots = TEMPLATES[task], TASKS[task][2]
    demos = draw_demos(pool, shots, template.n_classes, args.seed)
    shown = {d["sentence"] for d in demos}
    rest = [r for r in pool if r["sentence"] not in shown]
    rest = [rest[i] for i in np.random.default_rng(args.seed + 1).permutation(len(rest))]
    calib, select = rest[: args.n_calib], balanced(rest[args.n_calib :], args.n_select, template.n_classes)
    model = PromptedLM(lm, template=template, demos=demos, tokenizer=tok)
    collate = TextCollator(model, args.max_text)
    row_len = float(np.mean([min(len(model.text_ids(r["sentence"])), args.max_text) for r in rows]))
    seq_len = int(round(len(model.prefix_ids) + len(model.pre_ids) + row_len + len(model.post_ids)))

    def by_length(rs):  # less padding
        return sorted(rs, key=lambda r: len(model.text_ids(r["sentence"])))

    return {"model": model, "rows": rows, "shots": shots, "seq_len": seq_len,
            "eval_b": batches(collate, by_length(rows), args.eval_batch),
            "select_b": batches(collate, by_length(select), args.eval_batch), "n_select": len(select),
            "scorer": Scorer(model, batches(collate, calib, args.calib_batch), args.steps, args.alpha_batch),
            "n_calib": len(calib)}


def select_task(task: str, args, lm, tok) -> dict:
    """Accuracy of every pipeline in ``args.select`` at every cut on the task's selection rows (train rows, never
    evaluation rows): what the default pipeline is chosen on."""
    t_task = time.perf_counter()
    s = setup(task, args, lm, tok)
    dense_acc, _ = accuracy(s["model"], s["select_b"])
    log.info("%s selection rows: dense %.3f on %d rows", task, dense_acc, s["n_select"])
    out = {"task": task, "rows": s["n_select"], "dense_accuracy": dense_acc, "n_calib": s["n_calib"],
           "prompt_tokens": s["seq_len"], "pipelines": {}}
    for name in args.select:
        accs = []
        for cut in args.cuts:
            pruned, spec, extra = prune(s["scorer"], name, cut, s["seq_len"])
            accs.append({"cut": cut, "accuracy": accuracy(pruned, s["select_b"])[0],
                         "achieved_macs_cut": achieved_cut(s["model"], pruned, s["seq_len"]),
                         "kv_groups": spec.summary()["heads"]["kept"], "extra_seconds": extra})
            log.info("%s %s cut %.0f%%: selection acc %.3f (%d KV groups kept)", task, name, 100 * cut,
                     accs[-1]["accuracy"], accs[-1]["kv_groups"])
        out["pipelines"][name] = {"cuts": accs, "score_seconds": s["scorer"].seconds[PIPELINES[name][0]]}
    out["task_seconds"] = time.perf_counter() - t_task
    return out


def run_task(task: str, args, lm, tok) -> dict:
    t_task = time.perf_counter()
    s = setup(task, args, lm, tok)
    model, rows, seq_len, eval_b = s["model"], s["rows"], s["seq_len"], s["eval_b"]
    labels = np.asarray([r["label"] for r in rows])
    chance = float(np.bincount(labels).max() / len(labels))

    t = time.perf_counter()
    dense_acc, _ = accuracy(model, eval_b)
    dense_eval_s = time.perf_counter() - t
    log.info("%s dense: acc %.3f (chance %.3f) on %d rows, prompt %d tokens (%d prefix), %.0fs", task, dense_acc,
             chance, len(rows), seq_len, len(model.prefix_ids), dense_eval_s)

    prompts = [model.prompt_ids(r["sentence"]) for r in rows[: args.speed_prompts]]
    out = {"task": task, "rows": len(rows), "chance": chance, "dense_accuracy": dense_acc, "shots_per_class": s["shots"],
           "prefix_tokens": len(model.prefix_ids), "prompt_tokens": seq_len, "n_calib": 0, "pipeline": args.pipeline,
           "calibration_seconds": None, "peak_rss_gib_after_calibration": None,
           "peak_rss_gib_before_calibration": peak_rss_gib(), "dense_eval_seconds": dense_eval_s,
           "params": count_params(model.lm), "macs": count_macs(model.lm, seq_len), "cuts": [],
           "prefill_seconds": None, "decode_seconds_per_token": None}
    if not args.cuts:  # dense accuracy only
        out["task_seconds"] = time.perf_counter() - t_task
        return out
    scorer = s["scorer"]
    scorer(args.pipeline, seq_len)
    out.update({"n_calib": s["n_calib"], "calibration_seconds": scorer.seconds[PIPELINES[args.pipeline][0]],
                "peak_rss_gib_after_calibration": peak_rss_gib()})
    log.info("%s: calibrated on %d rows in %.0fs, peak RSS %.2f GiB", task, s["n_calib"], out["calibration_seconds"],
             out["peak_rss_gib_after_calibration"])

    variants = {"dense": model}
    for cut in args.cuts:
        pruned, spec, extra = prune(scorer, args.pipeline, cut, seq_len)
        t = time.perf_counter()
        acc, _ = accuracy(pruned, eval_b)
        sm = spec.summary()
        row = {"cut": cut, "achieved_macs_cut": achieved_cut(model, pruned, seq_len), "accuracy": acc,
               "retained": acc / dense_acc, "params": count_params(pruned.lm), "macs": count_macs(pruned.lm, seq_len),
               "kv_groups": f"{sm['heads']['kept']}/{sm['heads']['total']}",
               "neurons": f"{sm['neurons']['kept']}/{sm['neurons']['total']}", "allocate_tune_seconds": extra,
               "eval_seconds": time.perf_counter() - t, "export_generate_equal": export_check(pruned, spec, prompts[0])}
        log.info("%s cut %.0f%%: acc %.3f, %.1fM params, export+generate equal: %s", task, 100 * cut, acc,
                 row["params"] / 1e6, row["export_generate_equal"])
        out["cuts"].append(row)
        variants[f"{cut}"] = pruned
    out["peak_rss_gib_end"] = peak_rss_gib()
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
                  f"it with `python -m benchmarks.smollm2 {shlex.join(meta['argv'])} --tasks {' '.join(missing)} "
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
    score, how, units, tune, *steps = PIPELINES[a["pipeline"]]
    lines += ["", f"Settings: pipeline `{a['pipeline']}` (chosen on the selection rows of `smollm2_selection.md`, "
              f"never on the rows above): scores {score} ({SCORES[score]}), IG {a['steps']} steps from gates = 0.5 "
              f"where IG, target = gold label, {a['n_calib']} calibration rows in batches of {a['calib_batch']}, "
              f"alpha_batch {a['alpha_batch']}; allocation {how}, units {units}, mask tuning {tune}"
              f"{f', {steps[0]} pruning steps' if steps else ''}; MACs counted at "
              f"the prompt length; speed = best of {a['reps']} interleaved rounds over {a['speed_prompts']} prompts, "
              f"batch 1, {a['new_tokens']} decoded tokens, {a['threads']} threads; total {meta['seconds']:.0f} s.", ""]
    if meta.get("loaded"):
        lines += [f"**Machine loaded** ({meta['loaded']}): the speed ratios are indicative only (dense and pruned were "
                  "timed interleaved in one process, so a load change hits all alike, but absolute seconds are not "
                  "a measurement).", ""]
    return "\n".join(lines)


def render_selection(results: list[dict], meta: dict, partial: bool) -> str:
    a = meta["args"]
    lines = [header("smollm2", meta["argv"]).rstrip(), ""]
    if partial:
        lines += [f"**PARTIAL: {len(results)} of {len(meta['tasks'])} tasks done.**", ""]
    lines += [f"Accuracy on **selection rows** (class-balanced train rows, disjoint from the demonstrations, the "
              f"{a['n_calib']} calibration rows and every evaluation row), the pruned decoder shrunk; what "
              f"`--pipeline` is chosen on. Pipelines: {', '.join(f'`{k}` = {v}' for k, v in PIPELINES.items() if k in a['select'])} "
              "(scores, allocation, kinds pruned, mask tuning[, pruning steps]).", "",
              "| task | rows | dense | pipeline | " + " | ".join(f"{c:.0%} cut" for c in a["cuts"]) +
              " | mean | KV groups kept | score s |", "|---|---|---|---|" + "---|" * (len(a["cuts"]) + 3)]
    for r in results:
        for name, p in r["pipelines"].items():
            accs = [c["accuracy"] for c in p["cuts"]]
            lines.append(f"| {r['task']} | {r['rows']} | {r['dense_accuracy']:.3f} | {name} | " +
                         " | ".join(f"{x:.3f}" for x in accs) + f" | {np.mean(accs):.3f} | " +
                         "/".join(str(c["kv_groups"]) for c in p["cuts"]) + f" | {p['score_seconds']:.0f} |")
    lines += ["", f"Calibration {a['n_calib']} rows, batch {a['calib_batch']}, IG {a['steps']} steps; total "
              f"{meta['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def write(results, meta, out: Path, partial: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out.with_suffix(".json"), json.dumps({"meta": meta, "partial": partial, "results": results}, indent=1))
    write_text(out, (render_selection if meta["args"]["select"] else render)(results, meta, partial))
    log.info("wrote %s%s", out, " (partial)" if partial else "")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder with the ../shared/data layout")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--cuts", nargs="*", type=float, default=[0.2, 0.4, 0.6],
                   help="fractions of the decoder's MACs; none = dense accuracy only (no calibration, no timing)")
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--n-select", type=int, default=128, help="selection rows (train, class-balanced) for --select")
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE, choices=list(PIPELINES),
                   help="scores, allocation, kinds and tuning (see PIPELINES); the default was chosen by --select")
    p.add_argument("--select", nargs="+", choices=list(PIPELINES), default=None,
                   help="instead of the evaluation: these pipelines on the selection rows -> smollm2_selection.md")
    p.add_argument("--loaded", default="", help="a note that the machine was loaded (speed ratios indicative only)")
    p.add_argument("--steps", type=int, default=2, help="IG quadrature nodes")
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--alpha-batch", type=int, default=1)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--max-text", type=int, default=128, help="text tokens per row")
    p.add_argument("--speed-prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/smollm2.md")
    p.add_argument("--merge", action="store_true", help="keep the other tasks' results already in the JSON file")
    args = p.parse_args(argv)
    if args.select and args.out == p.get_default("out"):
        args.out = "benchmarks/results/smollm2_selection.md"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    lm, tok = load_smollm2()
    import sys

    meta = {"loaded": args.loaded, "argv": list(sys.argv[1:] if argv is None else argv), "args": vars(args), "tasks": args.tasks,
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
        results.append((select_task if args.select else run_task)(task, args, lm, tok))
        meta["seconds"] = time.perf_counter() - t0
        done = {r["task"] for r in results}
        write(results, meta, out, partial=(not args.select and (len(results) < len(TASKS) or not args.cuts))
              or (bool(args.select) and not set(args.tasks) <= done))


if __name__ == "__main__":
    main()
