"""The headline: whole pruning pipelines on the benchmarks' multi-task model, taskprune's against its peers.

    python -m benchmarks.headline                # the README table: six tasks + RTE, 3 seeds, the default at 20-70 %,
                                                 # Kwon et al. with / without tuning and the baselines at 40 / 60 %
    python -m benchmarks.headline --name repro_sst2_mnli --tasks sst2 mnli --pipelines taskprune kwon \\
        --compare benchmarks/results/archive/pipelines_{a,b,c}.json     # today's path against the earlier cells

One command, one results file: ``benchmarks/results/<name>.json`` (raw rows, appended as each finishes) and
``<name>.md`` (the tables), both naming the command, commit, CPU, threads and wall time. A killed run resumes: rows
already in the file with the same settings and the same library code (the git tree hash of ``taskprune/``) are
skipped; rows made by other code are re-run (to finish a run after the library changed, run the same command in a
``git worktree`` at the commit its runs table names, then copy the two files back).

Every pipeline is a preset of :class:`taskprune.pipeline.Pipeline` (``taskprune`` is the library's default, ``kwon``
Kwon et al. 2022's pipeline, the rest baselines) run by :meth:`Pipeline.prune` — the code the callback and the CLI
run. Around it, this script only prepares data and measures:

* model ``minilm-glue-large`` (``../shared/models`` holds it prebuilt; see its README), each task's head;
* calibration: ``--calib`` training rows per seed (never from the selection reserve the build set aside), in
  length-sorted batches of 32; ``--holdout`` further rows of the same draw for pipelines that split by loss; the kwon
  presets get their own sampling (``--kwon-calib`` rows with replacement, unsorted batches of 32);
* evaluation of the shrunk model (scales folded, ``shrink_``): ``--split dev`` the dev sets (QNLI / MNLI: seeded
  2000-row subsets, QQP 5000) and unseen domains (SST-2 → IMDB / Yelp / Amazon, 300 seeded rows each; MNLI → SNLI, 1000;
  QQP → MRPC); ``--split selection`` the reserve, where defaults are chosen, and as many unseen-domain rows again
  from outside the reported subsets (``imdb (reserve)``...); ``both`` all of them;
* speed (``--speed after``, the default; ``only`` for rows already pruned): every row keeps its per-block widths, and
  each distinct shape is shrunk and timed against the dense model at batch 32 x 128 tokens, beside its MAC bound.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import code_hash, cpu_name, git_commit, wait_while_paused, write_text
from taskprune.lightning.data import Collator, load_split, load_tokenizer, random_subset
from taskprune.arch import get_architecture
from taskprune.flops import count_macs
from taskprune.io import atomic_write_json
from taskprune.models.multitask import read_build_info
from taskprune.pipeline import PRESETS, Pipeline
from taskprune.spec import PruneSpec
from taskprune.surgery import shrink_
from taskprune.tasks import get_task
from taskprune.zoo import ensure_multitask, resolve_model_dir, selection_rows

log = logging.getLogger("headline")

MODEL = "minilm-glue-large"
HEADLINE = ("sst2", "mrpc", "qnli", "mnli", "qqp", "stsb")
TASKS = (*HEADLINE, "rte", "cola")
SEQ = 128
DEV_ROWS = {"qnli": 2000, "mnli": 2000, "qqp": 5000}  # seeded subsets of the large dev sets (pairs share them)
#: the README table: the default, it without its tuning, Kwon et al. with and without theirs, the baselines
HEADLINE_PIPELINES = ("taskprune", "taskprune_notune", "kwon", "kwon_notune", "ig_paper", "grad_x_gate", "fisher", "activation",
                      "magnitude", "random")
OOD_ROWS = {"imdb": 300, "yelp": 300, "amazon": 300, "snli": 1000}  # seeded subsets (long reviews are costly)
MAIN_METRIC = {"mrpc": "f1", "stsb": "pearson", "cola": "matthews"}


def main_key(task: str) -> str:
    return MAIN_METRIC.get(task, "accuracy")


# ----------------------------------------------------------------------------------------------------- data
def batches_of(tok, task: str, ds, batch_size: int) -> list[dict]:
    t = get_task(task)
    collate = Collator(tok, t.text_fields, SEQ, t.regression)
    rows = sorted(ds.to_list(), key=lambda r: sum(len(r[f]) for f in t.text_fields))
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def kwon_batches(tok, task: str, data_dir: str, reserve: list[int], n: int, seed: int) -> list[dict]:
    """Kwon et al.'s calibration: ``n`` training rows drawn *with replacement* (never from the reserve), in random,
    unsorted batches of 32 (their sampler), the same rows for gradients and tuning."""
    t = get_task(task)
    train = load_split(task, "train", data_dir)
    allowed = np.setdiff1d(np.arange(len(train)), np.asarray(reserve, dtype=np.int64))
    pick = np.random.default_rng([seed, 13]).choice(allowed, size=n, replace=True)
    rows = train.select([int(i) for i in pick]).to_list()
    collate = Collator(tok, t.text_fields, SEQ, t.regression)
    return [collate(rows[i : i + 32]) for i in range(0, len(rows), 32)]


def calibration_rows(task: str, data_dir: str, reserve: list[int], n: int, seed: int, skip: int = 0):
    """``n`` training rows (seeded), never from the selection reserve; ``skip`` > 0: the ``n`` rows after the first
    ``skip`` of the same permutation (disjoint from the calibration rows)."""
    train = load_split(task, "train", data_dir)
    allowed = np.setdiff1d(np.arange(len(train)), np.asarray(reserve, dtype=np.int64))
    pick = np.random.default_rng([seed, 11]).permutation(allowed)[skip : skip + n]
    return train.select(sorted(int(i) for i in pick))


def eval_sets(task: str, data_dir: str, split: str) -> dict:
    t = get_task(task)
    out = {}
    if split in ("selection", "both"):
        out["selection"] = selection_rows(MODEL, task, data_dir)
        for o in t.ood_names:  # unseen-domain rows no published table reads: the next ones of the same permutation
            n = OOD_ROWS.get(o, 10**9)
            rest = random_subset(load_split(t, o, data_dir), n, seed=0, skip=n) if n < 10**9 else []
            if len(rest):
                out[f"{o} (reserve)"] = rest
    if split == "selection":
        return out
    out["dev"] = random_subset(load_split(t, "dev", data_dir), DEV_ROWS.get(task, 10**9), seed=0)
    for o in t.ood_names:
        out[o] = random_subset(load_split(t, o, data_dir), OOD_ROWS.get(o, 10**9), seed=0)
    return out


@torch.inference_mode()
def evaluate(tm, task: str, batches: list[dict]) -> dict:
    t = get_task(task)
    metrics = t.make_metrics()
    for b in batches:
        metrics.update(t.predictions(tm(**b).logits), b["labels"])
    return {k: float(v) for k, v in metrics.compute().items()}


def widths_of(spec) -> dict:
    """``{kind: {block: kept units}}``: the shapes of the shrunk model (its speed depends on nothing else)."""
    fp = spec.shrunk_fingerprint()
    return {kind: fp[kind] for kind in ("heads", "neurons")}


def pruned_copy(model, task: str, spec):
    tm = copy.deepcopy(model).for_task(task).eval()
    shrink_(tm, spec)  # its tuning folded in
    return tm


# ---------------------------------------------------------------------------------------------------- run
def run(args, path: Path) -> dict:
    model = ensure_multitask(MODEL, data_dir=args.data_dir)
    tok = load_tokenizer(model.tokenizer_path)
    info = read_build_info(resolve_model_dir(MODEL))
    raw = json.loads(path.read_text()) if path.exists() else {}
    settings = {"model": MODEL, "recipe_hash": info["recipe_hash"], "calib": args.calib, "holdout": args.holdout,
                "kwon_calib": args.kwon_calib,
                "split": args.split, "seq": SEQ, "dev_rows": DEV_ROWS, "ood_rows": OOD_ROWS}
    if raw.get("_settings", settings) != settings:
        sys.exit(f"{path} was made with other settings {raw['_settings']}; use another --name")
    code = code_hash()
    raw["_settings"] = settings
    raw.setdefault("_runs", []).append({"command": command(), "commit": git_commit(), "code": code,
                                        "cpu": cpu_name(), "threads": torch.get_num_threads(), "wall_s": None})
    t_start = time.perf_counter()

    def save():
        raw["_runs"][-1]["wall_s"] = round(time.perf_counter() - t_start, 1)
        atomic_write_json(path, raw)

    for seed in args.seeds:  # seed-major: a killed run leaves whole seeds of every task
        for task in args.tasks:
            t_raw = raw.setdefault(task, {})
            todo = [(name, cut) for name in args.pipelines for cut in cuts_of(name, args)
                    if t_raw.get(f"{name}|{seed}|{cut}", {}).get("code") != code]
            if not todo and "dense" in t_raw:
                continue
            sets = {k: batches_of(tok, task, ds, 64) for k, ds in eval_sets(task, args.data_dir, args.split).items()}
            dense = model.for_task(task).eval()
            if "dense" not in t_raw:
                t_raw["dense"] = {k: evaluate(dense, task, b) for k, b in sets.items()}
                save()
            reserve = info["selection_reserve"][task]
            calib = batches_of(tok, task, calibration_rows(task, args.data_dir, reserve, args.calib, seed), 32)
            kwon_calib = None  # their sampling, for the kwon presets (--kwon-calib rows; 0: the same rows as the rest)
            held_out = None
            scores: dict = {}  # one scoring per (seed, attribution), reused by every cut
            for name, cut in todo:
                wait_while_paused(path)
                key = f"{name}|{seed}|{cut}"
                pipeline = Pipeline.preset(name)
                pipeline = pipeline.at(cut, **({} if pipeline.budget.seq_len == "mean" else {"seq_len": SEQ}))
                if pipeline.budget.split == "loss" and held_out is None:
                    held_out = batches_of(tok, task, calibration_rows(task, args.data_dir, reserve, args.holdout,
                                                                      seed, skip=args.calib), 64)
                rows = calib
                if name.startswith("kwon") and args.kwon_calib:
                    if kwon_calib is None:
                        kwon_calib = kwon_batches(tok, task, args.data_dir, reserve, args.kwon_calib, seed)
                    rows = kwon_calib
                pipeline = pipeline.resolve(rows)
                att = (pipeline.attribution, id(rows))
                if att not in scores:
                    t0 = time.perf_counter()
                    scores[att] = (pipeline.score(dense, rows), time.perf_counter() - t0)
                t0 = time.perf_counter()
                spec = pipeline.prune(dense, rows, held_out if pipeline.budget.split == "loss" else None,
                                      scores=scores[att][0])
                seconds = {"score": round(scores[att][1], 1), "allocate_tune": round(time.perf_counter() - t0, 1)}
                tm = pruned_copy(model, task, spec)
                t_raw[key] = {"pipeline": name, "seed": seed, "cut": cut, "code": code,
                              "seconds": seconds,
                              "macs_kept": count_macs(spec.fingerprint, SEQ, spec) / count_macs(spec.fingerprint,
                                                                                                 SEQ),
                              "seq_len": spec.budget["seq_len"],  # where the pipeline counted its MACs
                              "heads_kept": spec.n_kept("heads"), "neurons_kept": spec.n_kept("neurons"),
                              "widths": widths_of(spec),  # per-block kept units: all --speed needs
                              "metrics": {k: evaluate(tm, task, b) for k, b in sets.items()}}
                save()
                log.info("%s %s seed %d cut %.1f: %s (%.0f s)", task, name, seed, cut,
                         {k: round(v[main_key(task)], 4) for k, v in t_raw[key]["metrics"].items()}, sum(seconds.values()))
    save()
    return raw


# ---------------------------------------------------------------------------------------------------- speed
SPEED_BATCH = 32


def shape_spec(fingerprint: dict, widths: dict) -> PruneSpec:
    """A spec keeping the first ``widths`` units of every block: a row's shrunk shapes (which units does not matter)."""
    keep = {kind: {name: list(range(n)) for name, n in blocks.items() if n < fingerprint[kind][name]}
            for kind, blocks in widths.items()}
    return PruneSpec(keep=keep, fingerprint=fingerprint)


@torch.inference_mode()
def measure_speed(args, path: Path, raw: dict) -> None:
    """Throughput of every row's shrunk model against the dense one at batch 32 x seq 128 (``--speed-repeats``
    interleaved repeats, order rotating, medians of the per-repeat ratio), beside the MAC bound (dense / kept MACs of
    the prunable layers at 128). Each distinct shape is measured once; rows already measured are skipped. Time it on an
    idle machine: the run records the load average."""
    rows = [r for t in raw if not t.startswith("_") for k, r in raw[t].items() if "|" in k and "widths" in r]
    todo = [r for r in rows if "speed" not in r]
    if not todo:
        return
    model = ensure_multitask(MODEL, data_dir=args.data_dir)
    dense = model.for_task("sst2").eval()
    fp = get_architecture(dense).fingerprint()
    gen = torch.Generator().manual_seed(0)
    vocab = dense.encoder.get_input_embeddings().num_embeddings
    inputs = {"input_ids": torch.randint(1000, vocab, (SPEED_BATCH, SEQ), generator=gen),
              "attention_mask": torch.ones(SPEED_BATCH, SEQ, dtype=torch.long)}
    raw.setdefault("_speed_runs", []).append({"command": command(), "commit": git_commit(), "cpu": cpu_name(),
                                              "threads": torch.get_num_threads(), "load_1min": os.getloadavg()[0],
                                              "batch": SPEED_BATCH, "seq": SEQ, "repeats": args.speed_repeats})
    done: dict[str, dict] = {}
    dense_macs = count_macs(fp, SEQ)
    for r in todo:
        key = json.dumps(r["widths"], sort_keys=True)
        if key not in done:
            spec = shape_spec(fp, r["widths"])
            small = shrink_(copy.deepcopy(dense), spec)
            for m in (dense, small):
                m(**inputs)  # warm-up
            ratios = []
            for i in range(args.speed_repeats):
                t = {}
                for name, m in ((("dense", dense), ("pruned", small)) if i % 2 == 0 else
                                (("pruned", small), ("dense", dense))):
                    t0 = time.perf_counter()
                    m(**inputs)
                    t[name] = time.perf_counter() - t0
                ratios.append(t["dense"] / t["pruned"])
            bound = dense_macs / count_macs(fp, SEQ, spec)
            speedup = statistics.median(ratios)
            done[key] = {"speedup": round(speedup, 3), "mac_bound": round(bound, 3), "of_bound": round(speedup / bound, 3)}
            log.info("speed %s %s cut %.1f: %.2fx (bound %.2fx, %.2f of it)", r["pipeline"], r["seed"], r["cut"],
                     speedup, bound, speedup / bound)
        r["speed"] = done[key]
        atomic_write_json(path, raw)


def cuts_of(name: str, args) -> list[float]:
    """The cuts a pipeline runs at: ``--cuts``, plus ``--sweep-cuts`` for the ``--sweep`` pipelines."""
    return sorted({*args.cuts, *(args.sweep_cuts if name in args.sweep else ())})


def command() -> str:
    return "python -m benchmarks.headline " + " ".join(sys.argv[1:])


# -------------------------------------------------------------------------------------------------- render
def render(raw: dict, tasks: list[str], pipelines: list[str]) -> str:
    """Markdown: retained % of dense (mean ± std over seeds) per pipeline, task and cut; unseen domains; the paired
    difference taskprune - kwon per seed."""
    codes = collections.Counter(r.get("code") for t in tasks for k, r in raw.get(t, {}).items() if "|" in k)
    runs = [r for r in raw["_runs"] if r["code"] in codes] or raw["_runs"][-1:]  # the runs whose rows are shown
    lines = [f"<!-- generated by `{runs[-1]['command']}`; do not edit by hand -->", "",
             "| run | command | commit | library tree | CPU | threads | wall (paused time included) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {i + 1} | `{r['command']}` | `{r['commit']}` | `{r['code']}` | {r['cpu']} | {r['threads']} | "
              f"{(r['wall_s'] or 0) / 60:.1f} min |" for i, r in enumerate(runs)]
    if len(codes) > 1:  # a run resumed after the library changed: say which rows are whose until all are re-run
        lines += ["", "Rows by library tree: " + ", ".join(f"`{c}` {n}" for c, n in codes.most_common()) +
                  " (rows of other code are re-run by the same command)."]
    s = raw["_settings"]
    kwon = (f"; the kwon presets: {s['kwon_calib']} rows drawn with replacement, unsorted batches (their sampling), "
            "MACs searched at those rows' mean length" if s.get("kwon_calib") else "")
    lines += ["", f"Model `{s['model']}` (recipe `{s['recipe_hash']}`), {s['calib']} calibration rows per seed in "
              f"length-sorted batches{kwon}; reported MAC cuts at seq {s['seq']}. Cells: % of the dense metric kept "
              "(mean ± std over seeds, n seeds).", ""]
    split_names = [k for k in ("selection", "dev") if any(k in raw.get(t, {}).get("dense", {}) for t in tasks)]
    cuts = sorted({r["cut"] for t in tasks for k, r in raw.get(t, {}).items() if "|" in k})
    for split in split_names:
        lines += [f"### {split}", "", "| pipeline | cut | " + " | ".join(
            f"{t} ({100 * raw[t]['dense'][split][main_key(t)]:.1f})" for t in tasks if t in raw) +
            " | mean of the headline tasks |", "|---|---|" + "---|" * (sum(t in raw for t in tasks) + 1)]
        for p in pipelines:
            for cut in cuts:
                cells = [_cell(raw, t, p, cut, split) for t in tasks if t in raw]
                if any(cells):
                    lines.append(f"| {p} | {cut:.0%} | " + " | ".join(c or "–" for c in cells) +
                                 f" | {_task_mean(raw, p, cut, split)} |")
        lines.append("")
    ood = [(t, o) for t in tasks if t in raw for o in raw[t]["dense"] if o not in ("selection", "dev")]
    if ood:
        lines += ["### unseen domains", "", "| pipeline | cut | " + " | ".join(f"{t} → {o}" for t, o in ood) + " |",
                  "|---|---|" + "---|" * len(ood)]
        for p in pipelines:
            for cut in cuts:
                cells = [_cell(raw, t, p, cut, o) for t, o in ood]
                if any(cells):
                    lines.append(f"| {p} | {cut:.0%} | " + " | ".join(c or "–" for c in cells) + " |")
        lines.append("")
    paired_on = "dev" if "dev" in split_names else (split_names or ["dev"])[0]
    lines += _glance(raw, pipelines, paired_on)
    for a, b in PAIRS:
        if a not in pipelines or b not in pipelines:
            continue
        lines += [f"### paired by seed: {a} − {b} (points of % retained, {paired_on})", "",
                  "| task | cut | per seed | mean | beyond the seed std? |", "|---|---|---|---|---|"]
        per_task: dict = {}
        for t in tasks:
            for cut in cuts:
                d = _paired(raw, t, cut, a, b, paired_on)
                if d:
                    per_task.setdefault(cut, []).append(statistics.mean(d))
                    m = statistics.mean(d)
                    sd = statistics.stdev(d) if len(d) > 1 else 0.0
                    verdict = "no" if len(d) < 2 or abs(m) <= sd else (f"yes ({a} ahead)" if m > 0 else f"yes ({b} ahead)")
                    lines.append(f"| {t} | {cut:.0%} | {', '.join(f'{x:+.1f}' for x in d)} | {m:+.2f} | {verdict} |")
        for cut, ms in sorted(per_task.items()):
            lines.append(f"| **mean of {len(ms)} tasks** | {cut:.0%} | | **{statistics.mean(ms):+.2f}** | |")
        lines.append("")
    lines += _cost_table(raw, tasks, pipelines)
    lines += _speed_table(raw, tasks, pipelines, cuts)
    lines += _targets(raw, paired_on)
    return "\n".join(lines) + "\n"


def _values(raw: dict, task: str, pipeline: str, cut: float, split: str) -> list[float]:
    """% of dense retained on ``split``, one value per seed with a row of ``pipeline`` at ``cut``."""
    return [v for k, r in raw.get(task, {}).items() if "|" in k and r["pipeline"] == pipeline and r["cut"] == cut
            for v in [_retained(raw, task, r, split)] if v is not None]


def _means(raw: dict, pipeline: str, cut: float, split: str) -> dict[str, float]:
    """Per headline task with rows: the mean over seeds of % retained."""
    out = {}
    for t in HEADLINE:
        vals = _values(raw, t, pipeline, cut, split)
        if vals:
            out[t] = statistics.mean(vals)
    return out


def _targets(raw: dict, split: str) -> list[str]:
    """Issue #21's targets on the six headline tasks, each with what was measured, met or missed and by how much
    (computed on the tasks and seeds done so far, said in the row while any is missing)."""
    rows = []

    def verdict(margin: float, unit: str = "points") -> str:
        return "met" if margin >= 0 else f"**missed by {-margin:.{0 if unit == 'tasks' else 2}f} {unit}**".replace(" **", "**")

    def over(ms: dict) -> str:
        seeds = {r["seed"] for t in ms for k, r in raw[t].items() if "|" in k}
        return f"{len(ms)} / {len(HEADLINE)} tasks" + ("" if len(ms) == len(HEADLINE) and len(seeds) >= 3 else
                                                        f", seeds {sorted(seeds)}: not final")

    for cut in (0.4, 0.6):
        pair = [statistics.mean(d) for t in HEADLINE for d in [_paired(raw, t, cut, "kwon", "kwon_notune", split)] if d]
        if pair:
            m = statistics.mean(pair)
            rows.append(f"| faithful Kwon: tuning ≥ no tuning on the mean, {cut:.0%} (paired) | {m:+.2f} points "
                        f"({len(pair)} / {len(HEADLINE)} tasks) | {verdict(m)} |")
    for cut, want in ((0.4, 99.3), (0.6, 97.0)):
        ms = _means(raw, "taskprune", cut, split)
        if ms:
            m = statistics.mean(ms.values())
            rows.append(f"| default ≥ {want} % of dense on the mean, {cut:.0%} | {m:.2f} % ({over(ms)}) | "
                        f"{verdict(m - want)} |")
    for cut in sorted({r["cut"] for t in HEADLINE for k, r in raw.get(t, {}).items()
                       if "|" in k and r["pipeline"] == "kwon" and r["cut"] >= 0.4}):
        pair = [statistics.mean(d) for t in HEADLINE for d in [_paired(raw, t, cut, "taskprune", "kwon", split)] if d]
        if pair:
            m = statistics.mean(pair)
            rows.append(f"| default ≥ faithful Kwon on the mean, {cut:.0%} (paired) | {m:+.2f} points ({len(pair)} / "
                        f"{len(HEADLINE)} tasks) | {verdict(m)} |")
    ahead = [t for t in HEADLINE for d in [_paired(raw, t, 0.6, "taskprune", "kwon", split)]
             if len(d) > 1 and statistics.mean(d) > statistics.stdev(d)]
    n_pairs = sum(bool(_paired(raw, t, 0.6, "taskprune", "kwon", split)) for t in HEADLINE)
    if n_pairs:
        rows.append(f"| default ahead of Kwon beyond the seed std on ≥ 4 of 6 tasks, 60 % | {len(ahead)} of {n_pairs} "
                    f"({', '.join(ahead) or 'none'}) | {verdict(len(ahead) - 4, 'tasks')} |")
    ob = [r["speed"]["of_bound"] for t in HEADLINE for k, r in raw.get(t, {}).items() if "|" in k and "speed" in r]
    if ob:
        rows.append(f"| speed / MAC bound ≥ 0.9 at batch 32, every reported spec | min {min(ob):.2f} "
                    f"({sum(v >= 0.9 for v in ob)} / {len(ob)} specs ≥ 0.9) | {verdict(min(ob) - 0.9, '')} |")
    if not rows:
        return []
    return [f"### targets (issue #21; {split}, % of dense)", "", "| target | measured | verdict |", "|---|---|---|",
            *rows, ""]


def _cost_table(raw: dict, tasks: list[str], pipelines: list[str]) -> list[str]:
    """Seconds per pipeline run (the row's process, ``threads`` of the runs table): scoring (once per seed, shared by
    the cuts) and allocation + tuning per cut, medians over tasks and seeds; the calibration rows are the pipeline's."""
    lines = []
    for p in pipelines:
        runs = [(t, r) for t in tasks for k, r in raw.get(t, {}).items() if "|" in k and r["pipeline"] == p]
        recs = [r for _, r in runs]
        if not recs or not all({"score", "allocate_tune"} <= r.get("seconds", {}).keys() for r in recs):
            continue
        score = statistics.median(r["seconds"]["score"] for r in recs)
        rest = {c: statistics.median(r["seconds"]["allocate_tune"] for r in recs if r["cut"] == c)
                for c in sorted({r["cut"] for r in recs})}
        lines.append(f"| {p} | {score:.0f} | " + ", ".join(f"{c:.0%}: {v:.0f}" for c, v in rest.items()) +
                     f" | {len({(t, r['seed']) for t, r in runs})} |")
    if not lines:
        return []
    return ["### cost (seconds; medians over tasks and seeds)", "",
            "| pipeline | scoring (once per seed) | allocation + tuning, per cut | task × seed runs |",
            "|---|---|---|---|", *lines, ""]


def _speed_table(raw: dict, tasks: list[str], pipelines: list[str], cuts: list[float]) -> list[str]:
    runs = raw.get("_speed_runs")
    if not runs:
        return []
    r0 = runs[-1]
    lines = [f"### speed (batch {r0['batch']} × {r0['seq']} tokens, shrunk vs dense, {r0['threads']} threads)", "",
             "Each row's shrunk shapes timed against the dense model, interleaved "
             f"({r0['repeats']} repeats, median of the per-repeat ratio); bound: dense / kept MACs of the prunable "
             "layers. " + "; ".join(f"run {i + 1}: `{r['commit']}`, {r['cpu']}, load {r['load_1min']:.2f}"
                                     for i, r in enumerate(runs)) + ".", "",
             "| pipeline | cut | rows | speedup (mean) | MAC bound (mean) | speed / bound (min, mean) | rows ≥ 0.9 of the bound |",
             "|---|---|---|---|---|---|---|"]
    for p in pipelines:
        for cut in cuts:
            rs = [r["speed"] for t in tasks for k, r in raw.get(t, {}).items()
                  if "|" in k and r["pipeline"] == p and r["cut"] == cut and "speed" in r]
            if rs:
                ob = [x["of_bound"] for x in rs]
                lines.append(f"| {p} | {cut:.0%} | {len(rs)} | {statistics.mean(x['speedup'] for x in rs):.2f}× | "
                             f"{statistics.mean(x['mac_bound'] for x in rs):.2f}× | {min(ob):.2f}, "
                             f"{statistics.mean(ob):.2f} | {sum(v >= 0.9 for v in ob)} / {len(ob)} |")
    return lines + [""]


def _retained(raw: dict, task: str, rec: dict, split: str) -> float | None:
    if split not in rec["metrics"]:
        return None
    k = main_key(task)
    return 100.0 * rec["metrics"][split][k] / raw[task]["dense"][split][k]


def _task_mean(raw: dict, pipeline: str, cut: float, split: str) -> str:
    """Mean over the six headline tasks of the per-task mean over seeds ("–" unless every task has the cell)."""
    means = _means(raw, pipeline, cut, split)
    return f"**{statistics.mean(means.values()):.1f}**" if len(means) == len(HEADLINE) else "–"


def _mean_sd(vals: list[float]) -> str:
    return f"{statistics.mean(vals):.1f}" + (f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else "")


def _cell(raw: dict, task: str, pipeline: str, cut: float, split: str) -> str | None:
    vals = _values(raw, task, pipeline, cut, split)
    return f"{_mean_sd(vals)} ({len(vals)})" if vals else None


#: the README's table: the default and Kwon et al., each with and without its tuning, and Yang et al.'s IG
GLANCE = ("taskprune", "taskprune_notune", "kwon", "kwon_notune", "ig_paper")


def _glance(raw: dict, pipelines: list[str], split: str) -> list[str]:
    """The README's table: per headline task the 40 / 60 % cells (mean ± std over seeds), and their mean."""
    shown = [p for p in GLANCE if p in pipelines and all(_cell(raw, t, p, c, split) for t in HEADLINE if t in raw
                                                         for c in (0.4, 0.6))]
    if not shown or not all(t in raw for t in HEADLINE):
        return []
    dense = " | ".join(f"{t} ({100 * raw[t]['dense'][split][main_key(t)]:.1f})" for t in HEADLINE)
    lines = [f"### at a glance: 40 / 60 % ({split}; the README's table)", "", f"| pipeline | {dense} | mean |",
             "|---|" + "---|" * (len(HEADLINE) + 1)]
    for p in shown:
        cells = [" / ".join(_mean_sd(_values(raw, t, p, c, split)) for c in (0.4, 0.6)) for t in HEADLINE]
        means = [_task_mean(raw, p, c, split).strip("*") for c in (0.4, 0.6)]
        lines.append(f"| {p} | " + " | ".join(cells) + f" | **{means[0]} / {means[1]}** |")
    return lines + [""]


#: pairs compared seed by seed: the default against the peer, the peer's tuning against none
PAIRS = (("taskprune", "kwon"), ("kwon", "kwon_notune"), ("taskprune", "taskprune_notune"),
         ("taskprune_tuned", "taskprune_notune"))


def _paired(raw: dict, task: str, cut: float, first: str = "taskprune", second: str = "kwon",
            split: str = "dev") -> list[float]:
    recs = raw.get(task, {})
    out = []
    for seed in sorted({r["seed"] for k, r in recs.items() if "|" in k}):
        a, b = recs.get(f"{first}|{seed}|{cut}"), recs.get(f"{second}|{seed}|{cut}")
        if a and b and split in a["metrics"] and split in b["metrics"]:
            out.append(_retained(raw, task, a, split) - _retained(raw, task, b, split))
    return out


#: pipeline names of the pre-0.2 raw files (benchmarks/results/archive) -> presets
OLD_NAMES = {"igsq_search": "taskprune_notune", "kwon": "kwon", "kwon_notune": "kwon_notune", "igsq_holdout": "taskprune_holdout"}


def compare(raw: dict, paths: list[str]) -> str:
    """Markdown: every metric this file shares with earlier raw files (same task, preset, seed, cut, calibration size
    and eval set; a later file wins on a shared key), equal to 4 decimals or listed with both values."""
    old: dict = {}
    for path in paths:
        o = json.loads(Path(path).read_text())
        if (o.get("_settings") or {}).get("calib") != raw["_settings"]["calib"]:
            continue
        for task, recs in o.items():
            for key, r in (recs.items() if not task.startswith("_") else ()):
                if "|" in key and r["pipeline"] in OLD_NAMES:
                    old[(task, f"{OLD_NAMES[r['pipeline']]}|{r['seed']}|{r['cut']}")] = r
    same, differ = 0, []
    for task in [t for t in raw if not t.startswith("_")]:
        for key, r in raw[task].items():
            o = old.get((task, key))
            if "|" not in key or o is None:
                continue
            for split, metrics in r["metrics"].items():
                for m, v in metrics.items():
                    w = o["metrics"].get(split, {}).get(m)
                    if w is None:
                        continue
                    if round(v, 4) == round(w, 4):
                        same += 1
                    else:
                        differ.append(f"| {task} | {key} | {split} | {m} | {w:.4f} | {v:.4f} | {v - w:+.4f} |")
    lines = ["### compared with the earlier raw files", "",
             f"Files: {', '.join(f'`{Path(p).name}`' for p in paths)}. {same} metrics equal to 4 decimals, "
             f"{len(differ)} different" + (":" if differ else "."), ""]
    if differ:
        lines += ["| task | row | set | metric | before | now | Δ |", "|---|---|---|---|---|---|---|", *differ, ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.headline", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="headline", help="results file stem under --out")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--tasks", nargs="+", default=[*HEADLINE, "rte"], choices=TASKS)
    p.add_argument("--pipelines", nargs="+", default=list(HEADLINE_PIPELINES), choices=list(PRESETS))
    p.add_argument("--cuts", nargs="+", type=float, default=[0.4, 0.6], help="cuts of every pipeline")
    p.add_argument("--sweep", nargs="*", default=["taskprune"], choices=list(PRESETS),
                   help="pipelines also run at --sweep-cuts")
    p.add_argument("--sweep-cuts", nargs="*", type=float, default=[0.2, 0.3, 0.5, 0.7])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--holdout", type=int, default=256, help="held-out rows for pipelines that split by loss")
    p.add_argument("--kwon-calib", type=int, default=2048,
                   help="rows for the kwon presets, drawn with replacement in unsorted batches (their sampling); 0: "
                        "the same --calib rows as the other pipelines")
    p.add_argument("--split", choices=("dev", "selection", "both"), default="dev")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--render-only", action="store_true", help="re-render <name>.md from <name>.json")
    p.add_argument("--speed", choices=("after", "only", "off"), default="after",
                   help="measure every row's shrunk shapes against dense at batch 32 (after the run, only that, or "
                        "not); on an idle machine")
    p.add_argument("--speed-repeats", type=int, default=7)
    p.add_argument("--compare", nargs="+", default=None, help="earlier raw files to compare every shared metric with")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    path = Path(args.out) / f"{args.name}.json"
    raw = json.loads(path.read_text()) if args.render_only or args.speed == "only" else run(args, path)
    if args.speed != "off" and not args.render_only:
        measure_speed(args, path, raw)
    tasks = [t for t in TASKS if t in raw]
    pipelines = [q for q in PRESETS if any(r.get("pipeline") == q for t in tasks for r in raw[t].values()
                                          if isinstance(r, dict))]
    text = render(raw, tasks, pipelines)
    if args.compare:
        text += "\n" + compare(raw, args.compare)
    write_text(path.with_suffix(".md"), text)


if __name__ == "__main__":
    main()
