"""Whole pruning pipelines on the benchmarks' multi-task model: taskprune's against Kwon et al. 2022's, end to end.

    python -m benchmarks.pipelines --data-dir ../shared/data --split selection --pipelines <candidates> \\
        --json pipelines_selection.json                   # choose the default (selection reserve, never dev)
    python -m benchmarks.pipelines --data-dir ../shared/data --json pipelines_dev.json --speed   # report on dev
    python -m benchmarks.pipelines --render benchmarks/results/pipelines_dev.json ...   # tables + summary JSON

Model: ``minilm-glue-large`` (``python -m taskprune.zoo build minilm-glue-large --data-dir ../shared/data``; built
here when missing). For each task the shared encoder is pruned for that task's head. A pipeline is
**score → allocate → rearrange → tune** (every stage a taskprune function; :data:`PIPELINES` names the stages):

* scores: ``taskprune.attribution.score_units`` (ig, grad_x_gate, fisher, activation, magnitude, random) or Kwon's
  per-batch mask Fisher (``taskprune.tuning.batch_gradients`` + ``fisher_scores``), on ``--calib`` samples drawn
  (seeded per ``--seeds``) from the task's *training* rows (as Kwon et al. do), never from the selection reserve;
* allocate: ``select_units`` (per_kind), Kwon's mask search (``taskprune.search.search_macs``), or "holdout": the
  search at each of a few model-wide head counts, keeping the one whose masked model has the lowest task loss on
  ``HOLDOUT`` further training rows, disjoint from calibration and the reserve (``taskprune.tuning.search_by_loss``);
* rearrange: ``taskprune.tuning.rearrange`` (per-batch mask gradients, block-diagonal Fisher);
* tune: ``taskprune.tuning.tune_masks`` against the dense model or Kwon's teacher (the same pipeline at
  ``sqrt`` of the kept MAC fraction), then ``fold_scales_``;
* apply: ``shrink_`` (physical removal): every accuracy is the shrunk model's, and ``--speed`` times it against
  the dense one at batch 32, seq 128 on the threads torch has, as a ratio to its MAC bound.

Splits: ``--split dev`` reports the dev sets (QNLI and MNLI: seeded 2000-row subsets; QQP: its held-out sample) and
the unseen domains (SST-2: IMDB, Yelp, Amazon, 300 seeded rows each; MNLI: SNLI, 1000; QQP: MRPC, all 408);
``--split selection`` evaluates
on the rows the model's build set aside (``taskprune.zoo.selection_rows``), where defaults are chosen.

Raw results are appended to ``--json`` under ``benchmarks/results/`` as the run goes (a rerun skips what is there).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import cpu_name, git_commit, header
from taskprune.attribution import score_units
from taskprune.lightning.data import Collator, load_split, load_tokenizer, random_subset
from taskprune.flops import count_macs
from taskprune.io import atomic_write_json
from taskprune.search import search_macs
from taskprune.selection import select_units
from taskprune.surgery import shrink_
from taskprune.tasks import get_task
from taskprune.tuning import (batch_gradients, fisher_scores, fold_scales_, rearrange, search_by_loss, teacher_keep,
                              tune_masks)
from taskprune.models.multitask import read_build_info
from taskprune.zoo import ensure_multitask, resolve_model_dir, selection_rows

log = logging.getLogger("pipelines")

MODEL = "minilm-glue-large"
HEADLINE = ("sst2", "mrpc", "qnli", "mnli", "qqp", "stsb")
TASKS = (*HEADLINE, "rte", "cola")
CUTS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
SEQ = 128
DEV_ROWS = {"qnli": 2000, "mnli": 2000}
OOD_ROWS = {"imdb": 300, "yelp": 300, "amazon": 300, "snli": 1000}  # seeded subsets (long reviews are costly)

#: name -> (score, allocation, rearrange, tune). Scores: taskprune methods; "ig0" is the paper's all-off IG path;
#: "fisher_batch" Kwon's per-batch mask Fisher; "igsq" / "ig0sq" IG with squared per-sample attributions. Tune: "none", "dense" (teacher = dense) or "schedule" (Kwon's).
PIPELINES: dict[str, tuple[str, str, bool, str]] = {
    "kwon": ("fisher_batch", "search", True, "schedule"),
    "kwon_notune": ("fisher_batch", "search", True, "none"),
    "ig": ("ig0", "per_kind", False, "none"),
    "ig05": ("ig", "per_kind", False, "none"),
    "grad_x_gate": ("grad_x_gate", "per_kind", False, "none"),
    "fisher": ("fisher", "per_kind", False, "none"),
    "activation": ("activation", "per_kind", False, "none"),
    "magnitude": ("magnitude", "per_kind", False, "none"),
    "random": ("random", "per_kind", False, "none"),
    # candidates for taskprune's default (chosen on the selection reserve)
    "ig_search": ("ig", "search", False, "none"),
    "ig_search_tune": ("ig", "search", False, "schedule"),
    "ig_search_rearrange_tune": ("ig", "search", True, "schedule"),
    "ig_tune": ("ig", "per_kind", False, "schedule"),
    "gxg_search_tune": ("grad_x_gate", "search", False, "schedule"),
    "gxg_tune": ("grad_x_gate", "per_kind", False, "schedule"),
    "ig0_search_tune": ("ig0", "search", False, "schedule"),
    # squared per-sample attributions (Fisher's scale: heads and neurons compare in the search)
    "igsq_search_tune": ("igsq", "search", False, "schedule"),
    "igsq_search": ("igsq", "search", False, "none"),
    "igsq_search_rearrange_tune": ("igsq", "search", True, "schedule"),
    "ig0sq_search_tune": ("ig0sq", "search", False, "schedule"),
    "fisher_search_tune": ("fisher", "search", False, "schedule"),
    # heads / neurons split by held-out loss instead of the score sum (igsq_holdout: taskprune's opt-in holdout_samples=256)
    "igsq_holdout": ("igsq", "holdout", False, "none"),
    "fisher_holdout": ("fisher_batch", "holdout", False, "none"),
    # iterative attribution: R rounds, each re-scoring the model masked by the previous round's spec
    "gxg_iter3_search_tune": ("grad_x_gate@3", "search", False, "schedule"),
    "ig_iter2_search_tune": ("ig@2", "search", False, "schedule"),
    "igsq_iter2_search_tune": ("igsq@2", "search", False, "schedule"),
    "igsq_search_dense": ("igsq", "search", False, "dense"),
    "igsq_iter2_search": ("igsq@2", "search", False, "none"),
    "igsq_iter3_search": ("igsq@3", "search", False, "none"),
}
#: training rows after the calibration rows of a seed's permutation, for the "holdout" allocation's loss
HOLDOUT = 256


# ----------------------------------------------------------------------------------------------------- data
def batches_of(tok, task: str, ds, batch_size: int = 32) -> list[dict]:
    t = get_task(task)
    collate = Collator(tok, t.text_fields, SEQ, t.regression)
    rows = sorted(ds.to_list(), key=lambda r: sum(len(r[f]) for f in t.text_fields))
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def calibration_rows(task: str, data_dir: str, reserve: list[int], n: int, seed: int, skip: int = 0):
    """``n`` training rows (seeded), never from the selection reserve; ``skip`` > 0 gives the ``n`` rows after the
    first ``skip`` of the same permutation (disjoint from ``calibration_rows(..., skip, seed)``)."""
    train = load_split(task, "train", data_dir)
    allowed = np.setdiff1d(np.arange(len(train)), np.asarray(reserve, dtype=np.int64))
    pick = np.random.default_rng([seed, 11]).permutation(allowed)[skip : skip + n]
    return train.select(sorted(int(i) for i in pick))


def eval_sets(task: str, data_dir: str, split: str) -> dict:
    """``selection``: the build's reserve; ``dev``: dev + unseen domains; ``both``: all of them (one scoring and one
    tuning per spec, evaluated on every set; defaults are chosen on the selection columns only)."""
    t = get_task(task)
    out = {}
    if split in ("selection", "both"):
        out["selection"] = selection_rows(MODEL, task, data_dir)
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


# ------------------------------------------------------------------------------------------------ pipelines
class Scorer:
    """Scores per (task, seed, method), computed once and reused by every cut and pipeline."""

    def __init__(self, tm, calib: list[dict], steps: int, holdout: Callable[[], list[dict]] | None = None):
        self.tm, self.calib, self.steps = tm, calib, steps
        self.holdout = holdout  # () -> batches of held-out training rows (loaded on first use)
        self.cache: dict = {}
        self.seconds: dict[str, float] = {}

    def __call__(self, method: str):
        if method not in self.cache:
            t0 = time.perf_counter()
            if method == "fisher_batch":
                grads, n = self.grads()
                self.cache[method] = fisher_scores(grads, self.tm, n)
                self.seconds[method] = self.seconds["grads"]
            else:
                self.cache[method] = score_units(self.tm, self.calib, **self.options(method))
                self.seconds[method] = time.perf_counter() - t0
        return self.cache[method]

    def options(self, method: str) -> dict:
        # every option pinned: the rows keep their meaning when the library's defaults move (|.| = the earlier
        # default aggregation of ig and grad_x_gate; "igsq" / "ig0sq" the squared one)
        return {"ig": dict(method="ig", steps=self.steps, baseline=0.5, aggregate="abs"),
                "ig0": dict(method="ig", steps=self.steps, baseline=0.0, aggregate="abs"),
                "grad_x_gate": dict(method="grad_x_gate", aggregate="abs"),
                "igsq": dict(method="ig", steps=self.steps, baseline=0.5, aggregate="square"),
                "ig0sq": dict(method="ig", steps=self.steps, baseline=0.0, aggregate="square"),
                }.get(method, {"method": method})

    def grads(self):
        if "grads" not in self.cache:
            t0 = time.perf_counter()
            self.cache["grads"] = batch_gradients(self.tm, self.calib)
            self.seconds["grads"] = time.perf_counter() - t0
        return self.cache["grads"]


def allocate(scores, how: str, cut: float, scorer: "Scorer | None" = None):
    if how == "search":
        return search_macs(scores, cut, seq_len=SEQ)
    if how == "holdout":
        return holdout_search(scores, cut, scorer)
    return select_units(scores, macs=cut, seq_len=SEQ, scope="per_kind", normalize="l1")


def holdout_search(scores, cut: float, scorer: "Scorer"):
    """``taskprune.tuning.search_by_loss`` on the seed's held-out training rows (loaded once per scorer)."""
    if "holdout" not in scorer.cache:
        scorer.cache["holdout"] = scorer.holdout()
    return search_by_loss(scorer.tm, scores, cut, scorer.cache["holdout"], seq_len=SEQ)


def iterative(scorer: Scorer, method: str, rounds: int, how: str, cut: float):
    """Prune in ``rounds`` steps of equal kept-MAC ratio, re-scoring the model masked by the previous step's spec;
    units removed once stay removed. Returns ``(scores of the last round, spec, seconds)``."""
    from dataclasses import replace as dc_replace

    from taskprune.surgery import apply_mask, remove_mask

    t0 = time.perf_counter()
    scores, spec = scorer(method), None
    for r in range(1, rounds + 1):
        if spec is not None:
            apply_mask(scorer.tm, spec)
            try:
                fresh = score_units(scorer.tm, scorer.calib, **scorer.options(method))
            finally:
                remove_mask(scorer.tm)
            sums = {k: {n: v.clone() for n, v in d.items()} for k, d in fresh.sums.items()}
            for k, d in sums.items():
                for n, v in d.items():
                    v[spec.drop(k, n)] = -float("inf")  # removed units stay removed
            scores = dc_replace(fresh, sums=sums)
        spec = allocate(scores, how, 1.0 - (1.0 - cut) ** (r / rounds), scorer)
    return scores, spec, time.perf_counter() - t0


def run_pipeline(name: str, scorer: Scorer, cut: float):
    """The spec of pipeline ``name`` at a MAC cut, with scales folded later; ``(spec, seconds per stage)``."""
    score, how, rearr, tune = PIPELINES[name]
    sec = {}
    if "@" in score:
        method, rounds = score.split("@")
        scores, spec, sec["score"] = iterative(scorer, method, int(rounds), how, cut)
        sec["allocate"] = 0.0
    else:
        scores = scorer(score)
        sec["score"] = scorer.seconds.get(score, 0.0)
        t0 = time.perf_counter()
        spec = allocate(scores, how, cut, scorer)
        sec["allocate"] = time.perf_counter() - t0
    if rearr:
        grads, _ = scorer.grads()
        sec["score"] += scorer.seconds["grads"] if score != "fisher_batch" else 0.0
        t0 = time.perf_counter()
        spec = rearrange(spec, grads)
        sec["rearrange"] = time.perf_counter() - t0
    if tune != "none":
        t0 = time.perf_counter()
        teacher = None
        if tune == "schedule":
            teacher = allocate(scores, how, 1.0 - teacher_keep(1.0 - cut), scorer)
        spec = tune_masks(scorer.tm, spec, scorer.calib, teacher=teacher)
        sec["tune"] = time.perf_counter() - t0
    return spec, sec


def pruned_copy(model, task: str, spec):
    m = copy.deepcopy(model)
    tm = m.for_task(task).eval()
    spec = fold_scales_(tm, spec) if spec.scales else spec
    shrink_(tm, spec)
    return tm


# -------------------------------------------------------------------------------------------------- speed
def time_forward(models: dict, reps: int = 3) -> dict[str, float]:
    """Median seconds of one forward at batch 32, seq 128 per model (rotated order, one warm-up each)."""
    g = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(1000, 20000, (32, SEQ), generator=g),
         "attention_mask": torch.ones(32, SEQ, dtype=torch.long)}
    times = {k: [] for k in models}
    names = list(models)
    with torch.inference_mode():
        for m in models.values():
            m(**x)
        for r in range(reps):
            for k in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                models[k](**x)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------------- run
def run(args) -> None:
    model = ensure_multitask(MODEL, data_dir=args.data_dir)
    tok = load_tokenizer(model.tokenizer_path)
    info = read_build_info(resolve_model_dir(MODEL))
    path = Path(args.out) / args.json
    raw = json.loads(path.read_text()) if path.exists() else {}
    settings = {"model": MODEL, "recipe_hash": info["recipe_hash"], "calib": args.calib, "steps": args.steps,
                "split": args.split, "seq": SEQ, "dev_rows": DEV_ROWS, "ood_rows": OOD_ROWS}
    if raw.get("_settings", settings) != settings:
        sys.exit(f"{path} was made with other settings {raw['_settings']}; use another --json")
    raw["_settings"] = settings
    raw.setdefault("_commands", [])
    cmd = "python -m benchmarks.pipelines " + " ".join(sys.argv[1:])
    raw["_commands"].append(f"{cmd}  # commit {git_commit()} on {cpu_name()}, {torch.get_num_threads()} threads")
    raw.setdefault("_cpu", cpu_name())

    def save():
        atomic_write_json(path, raw)

    for task in args.tasks:
        t_raw = raw.setdefault(task, {})
        sets = {k: batches_of(tok, task, ds, 64) for k, ds in eval_sets(task, args.data_dir, args.split).items()}
        dense = model.for_task(task).eval()
        if "dense" not in t_raw:
            t_raw["dense"] = {k: evaluate(dense, task, b) for k, b in sets.items()}
            if args.speed:
                t_raw["dense_forward_s"] = time_forward({"dense": dense})["dense"]
            save()
        log.info("%s dense: %s", task, t_raw["dense"])
        for seed in args.seeds:
            calib_ds = calibration_rows(task, args.data_dir, info["selection_reserve"][task], args.calib, seed)
            scorer = Scorer(dense, batches_of(tok, task, calib_ds, 32), args.steps,
                            holdout=lambda task=task, seed=seed: batches_of(tok, task, calibration_rows(
                                task, args.data_dir, info["selection_reserve"][task], HOLDOUT, seed, skip=args.calib), 64))
            for name in args.pipelines:
                for cut in args.cuts:
                    key = f"{name}|{seed}|{cut}"
                    if key in t_raw:
                        continue
                    spec, sec = run_pipeline(name, scorer, cut)
                    spec.save(spec_path(args, task, key))
                    tm = pruned_copy(model, task, spec)
                    rec = {"pipeline": name, "seed": seed, "cut": cut, "seconds": sec,
                           "macs_kept": count_macs(spec.fingerprint, SEQ, spec) / count_macs(spec.fingerprint, SEQ),
                           "heads_kept": spec.n_kept("heads"), "neurons_kept": spec.n_kept("neurons"),
                           "metrics": {k: evaluate(tm, task, b) for k, b in sets.items()}}
                    if args.speed and seed == args.seeds[0]:
                        tt = time_forward({"dense": dense, "pruned": tm})
                        speedup = tt["dense"] / tt["pruned"]
                        rec["speedup"] = speedup
                        rec["speedup_of_bound"] = speedup * rec["macs_kept"]
                    t_raw[key] = rec
                    save()
                    log.info("%s %s seed %d cut %.1f: %s (%.0f s) %s", task, name, seed, cut,
                             {k: round(v[main_key(task)], 4) for k, v in rec["metrics"].items()},
                             sum(sec.values()), f"speedup {rec.get('speedup', 0):.2f}" if "speedup" in rec else "")


def spec_path(args, task: str, key: str) -> Path:
    """Where a run's spec (with its scales) is kept for the speed pass: ``<spec-dir>/<json stem>/<task>/<key>.json``."""
    folder = Path(args.spec_dir) / Path(args.json).stem / task
    folder.mkdir(parents=True, exist_ok=True)
    return folder / (key.replace("|", "_") + ".json")


def speed_pass(args) -> None:
    """Time every first-seed spec of ``--json`` that has no speed yet against the dense model (nothing else should
    run: the ratio of two timings in one process, at batch 32, seq 128, on the threads torch has)."""
    from taskprune.spec import PruneSpec

    model = ensure_multitask(MODEL, data_dir=args.data_dir)
    path = Path(args.out) / args.json
    raw = json.loads(path.read_text())
    raw.setdefault("_speed", f"batch 32, seq {SEQ}, {torch.get_num_threads()} threads, {cpu_name()}")
    raw.setdefault("_commands", []).append("python -m benchmarks.pipelines " + " ".join(sys.argv[1:])
                                           + f"  # commit {git_commit()} on {cpu_name()}, speed pass")
    for task in [t for t in raw if not t.startswith("_") and t in args.tasks]:
        dense = model.for_task(task).eval()
        seeds = sorted({r["seed"] for k, r in raw[task].items() if "|" in k})
        for key, rec in raw[task].items():
            if "|" not in key or "speedup" in rec or rec["seed"] != seeds[0] or rec["pipeline"] not in args.pipelines:
                continue
            tm = pruned_copy(model, task, PruneSpec.load(spec_path(args, task, key)))
            tt = time_forward({"dense": dense, "pruned": tm}, reps=5)
            rec["speedup"] = tt["dense"] / tt["pruned"]
            rec["speedup_of_bound"] = rec["speedup"] * rec["macs_kept"]
            atomic_write_json(path, raw)
            log.info("%s %s: speedup %.2f, %.2f of the MAC bound", task, key, rec["speedup"], rec["speedup_of_bound"])


def main_key(task: str) -> str:
    """The task's headline metric: MRPC F1, STS-B Pearson, CoLA MCC, accuracy elsewhere."""
    return MAIN_METRIC.get(task, "accuracy")


MAIN_METRIC = {"mrpc": "f1", "stsb": "pearson", "cola": "matthews"}


def main(argv: list[str] | None = None) -> None:
    from benchmarks.pipelines_report import render_files

    p = argparse.ArgumentParser(prog="python -m benchmarks.pipelines", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--tasks", nargs="+", default=list(HEADLINE), choices=TASKS)
    p.add_argument("--pipelines", nargs="+", default=["kwon", "kwon_notune", "ig", "grad_x_gate", "fisher",
                                                      "activation", "magnitude", "random"], choices=list(PIPELINES))
    p.add_argument("--cuts", nargs="+", type=float, default=list(CUTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--steps", type=int, default=4, help="IG steps")
    p.add_argument("--split", choices=("dev", "selection", "both"), default="both")
    p.add_argument("--speed", action="store_true", help="time each pruned model against the dense one (seed 0)")
    p.add_argument("--speed-only", action="store_true", help="only time the specs of --json that have no speed yet")
    p.add_argument("--spec-dir", default="runs/pipelines", help="where each run's spec is kept (for --speed-only)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--json", default="pipelines_dev.json")
    p.add_argument("--render", nargs="+", default=None, help="raw files to render into tables and the summary")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    if args.render:
        render_files(args.render, args.out, header("pipelines", sys.argv[1:] if argv is None else argv))
        return
    if args.speed_only:
        speed_pass(args)
        return
    run(args)


if __name__ == "__main__":
    main()
