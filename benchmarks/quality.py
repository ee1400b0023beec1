"""Accuracy vs budget for every scoring method, low-resource, unsupervised, unseen domains, and the IG ablation.

    python -m benchmarks.quality --data-dir ../shared/data            # full run: 1.5-2 h on 2 cores (see below)
    python -m benchmarks.quality --data-dir ../shared/data --quick    # minutes: SST-2 and RTE, fewer budgets

Model: the project's multi-task MiniLM (``python -m taskprune.zoo build minilm-glue``). For each task, the shared
encoder is pruned for that task's head: scores on a calibration subset of the task's *train* split, units removed
physically (``shrink_``) at each encoder MAC cut (seq 128), metric on the dev set (QQP: a held-out sample of train,
labelled as such). The IG ablation that picks the defaults is scored on a *selection* split drawn from train,
disjoint from calibration, never on the dev sets reported here.

Cost: the published method comparison (six tasks, 512 calibration samples) took about 85 min in two parallel
processes with ``OMP_NUM_THREADS=1`` each (``--tasks sst2 mrpc rte`` and ``--tasks qnli mnli qqp``, separate
``--json`` files; each file records its settings and refuses a resumed run with other ones). Evaluation of the ~80
pruned models per task dominates, not attribution; ``--eval-rows 300`` cuts it by 40 %. On the faster Intel Xeon
of a later session one method (ig, with its unsupervised run) on all six tasks took 19 min in one process with
``OMP_NUM_THREADS=1``; the IG ablation of one task 9 min (SST-2) to 29 min (QNLI).

Results go to ``benchmarks/results/quality.json`` (raw, appended as the run goes: an interrupted run resumes where it
stopped) and ``quality_demo_model.md`` (tables) plus PNG plots when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import cpu_name, header, write_text
from taskprune.attribution import DEFAULT_BASELINE as IG_BASELINE
from taskprune.attribution import METHODS as taskprune_methods
from taskprune.attribution import score_units
from taskprune.lightning.data import Collator, load_split, load_tokenizer, per_class_subset, random_subset
from taskprune.io import atomic_write_json
from taskprune.selection import select_units
from taskprune.surgery import shrink_
from taskprune.tasks import get_task
from taskprune.zoo import ensure_multitask

log = logging.getLogger("quality")

TASKS = ("sst2", "mrpc", "qnli", "mnli", "qqp", "rte", "cola", "stsb")
METHODS = taskprune_methods  # every scoring method taskprune has (taskprune.attribution.METHODS)
MAC_CUTS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
SWEEP = (0.3, 0.6)  # heads-only and neurons-only fractions


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.model = ensure_multitask(args.model)
        self.tok = load_tokenizer(self.model.tokenizer_path)
        self.path = Path(args.out) / args.json
        self.results = json.loads(self.path.read_text()) if self.path.exists() and not args.fresh else {}
        self.ig = dict(steps=args.steps, quadrature="riemann_middle", aggregate="abs", baseline=IG_BASELINE)
        self.select = dict(scope=args.scope, normalize=args.normalize)  # selection of the method comparison

    # -------------------------------------------------------------------------------------- data
    def batches(self, task, ds, batch_size=32):
        t = get_task(task)
        collate = Collator(self.tok, t.text_fields, 128, t.regression)
        rows = sorted(ds.to_list(), key=lambda r: sum(len(r[f]) for f in t.text_fields))
        return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]

    def splits(self, task):
        """calibration pool (train), selection split (train, disjoint), dev (or QQP held-out), OOD sets."""
        t = get_task(task)
        train = load_split(t, "train", self.args.data_dir)
        pool = random_subset(train, min(len(train), self.args.calib + self.args.select_rows), seed=0)
        idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0)).tolist()
        calib = pool.select(sorted(idx[: self.args.calib]))
        select = pool.select(sorted(idx[self.args.calib :]))
        dev = random_subset(load_split(t, "dev", self.args.data_dir), self.args.eval_rows, seed=0)
        ood = {o: random_subset(load_split(t, o, self.args.data_dir), self.args.ood_rows, seed=0)
               for o in t.ood_names}
        return train, calib, select, dev, ood

    # -------------------------------------------------------------------------------------- eval
    @torch.inference_mode()
    def metric(self, model, task, batches) -> float:
        t = get_task(task)
        metrics = t.make_metrics()
        for b in batches:
            metrics.update(t.predictions(model(**b).logits), b["labels"])
        values = {k: float(v) for k, v in metrics.compute().items()}
        return values[t.metrics[0]]

    def pruned_metric(self, tm, task, scores, eval_sets, **budget) -> dict:
        spec = select_units(scores, seq_len=128, **{**self.select, **budget})
        pruned = copy.deepcopy(tm)
        shrink_(pruned, spec)
        out = {name: self.metric(pruned, task, b) for name, b in eval_sets.items()}
        out["achieved_macs"] = spec.budget["achieved"]["macs"]
        fp = spec.fingerprint
        out["kept_heads"] = {n: [len(k), fp["heads"][n]] for n, k in spec.keep.get("heads", {}).items()}
        out["kept_neurons"] = {n: [len(k), fp["neurons"][n]] for n, k in spec.keep.get("neurons", {}).items()}
        return out

    def done(self, key) -> bool:
        return key in self.results

    def save(self, key, value) -> None:
        self.results[key] = value
        atomic_write_json(self.path, self.results)

    # -------------------------------------------------------------------------------------- runs
    def run_task(self, task) -> None:
        a = self.args
        tm = self.model.for_task(task).eval()
        _, calib, select, dev, ood = self.splits(task)
        calib_b = self.batches(task, calib)
        eval_sets = {"dev": self.batches(task, dev, 64), **{o: self.batches(task, s, 64) for o, s in ood.items()}}
        key = f"{task}/dense"
        if not self.done(key):
            self.save(key, {n: self.metric(tm, task, b) for n, b in eval_sets.items()})
        cuts = MAC_CUTS if not a.quick else (0.2, 0.4, 0.6)
        chosen = a.methods or (("ig", "grad_x_gate", "fisher", "magnitude", "random") if a.quick else METHODS)
        methods = [(m, s) for m in chosen for s in ((0, 1, 2) if m == "random" and not a.quick else (0,))]
        for method, seed in methods:
            name = method if method != "random" else f"random{seed}"
            variant = method == "ig" and a.ig_baseline is not None and a.ig_baseline != IG_BASELINE
            if variant:  # another path start than taskprune's default: its own row, beside the default's
                name = f"ig@baseline={a.ig_baseline:g}"
            key = f"{task}/supervised/{name}"
            if self.done(key):
                continue
            t0 = time.perf_counter()
            opts = {**self.ig, **({"baseline": a.ig_baseline} if variant else {})} if method == "ig" else {}
            scores = score_units(tm, calib_b, method, target="label", seed=seed, **opts)
            seconds = time.perf_counter() - t0
            sets = eval_sets if method == "ig" else {"dev": eval_sets["dev"]}  # unseen domains: ig (the method)
            rows = {f"macs={c}": self.pruned_metric(tm, task, scores, sets, macs=c) for c in cuts}
            if method != "random" or seed == 0:
                rows |= {f"heads={f}": self.pruned_metric(tm, task, scores, {"dev": eval_sets["dev"]}, heads=f,
                                                          units="heads") for f in SWEEP}
                rows |= {f"neurons={f}": self.pruned_metric(tm, task, scores, {"dev": eval_sets["dev"]}, neurons=f,
                                                            units="neurons") for f in SWEEP}
            self.save(key, {"seconds": seconds, "n_samples": scores.count, "budgets": rows})
            log.info("%s %s: %.0fs", task, name, seconds)
        key = f"{task}/unsupervised/ig"
        if not self.done(key) and "ig" in chosen and (a.ig_baseline is None or a.ig_baseline == IG_BASELINE):
            unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in calib_b]
            scores = score_units(tm, unlabelled, "ig", target="pseudo", **self.ig)
            self.save(key, {"budgets": {f"macs={c}": self.pruned_metric(tm, task, scores, eval_sets, macs=c)
                                        for c in cuts}})

    def run_low_resource(self, task) -> None:
        a = self.args
        tm = self.model.for_task(task).eval()
        dev = self.batches(task, random_subset(load_split(get_task(task), "dev", a.data_dir), a.eval_rows, seed=0), 64)
        eval_sets = {"dev": dev}
        if not self.done(f"{task}/dense"):  # the % retained of this file's tables is relative to it
            self.save(f"{task}/dense", {"dev": self.metric(tm, task, dev)})
        if not get_task(task).regression:
            train = load_split(get_task(task), "train", a.data_dir)
            for k in a.k_per_class if not a.quick else (8, 32):
                for seed in (0, 1, 2) if not a.quick else (0,):
                    for method in ("ig", "grad_x_gate"):  # data-free methods do not depend on k
                        key = f"{task}/lowres/k={k}/seed={seed}/{method}"
                        if self.done(key):
                            continue
                        b = self.batches(task, per_class_subset(train, k, seed, get_task(task).n_labels))
                        scores = score_units(tm, b, method, target="label", **(self.ig if method == "ig" else {}))
                        self.save(key, {"budgets": {f"macs={c}": self.pruned_metric(
                            tm, task, scores, {"dev": eval_sets["dev"]}, macs=c) for c in (0.4, 0.6)}})

    def run_ablation(self, task) -> None:
        tm = self.model.for_task(task).eval()
        _, calib, select, _, _ = self.splits(task)
        self.ablation(task, tm, self.batches(task, calib), self.batches(task, select, 64))

    def ablation(self, task, tm, calib_b, select_b) -> None:
        """IG options scored on the selection split (train, disjoint from calibration): picks the defaults."""
        sel = {"select": select_b}
        variants = [("steps", {"steps": s}) for s in self.args.ablation_steps]
        variants += [("quadrature", {"quadrature": q, "steps": 4}) for q in
                     ("riemann_left", "riemann_right", "riemann_middle", "trapezoid", "gauss_legendre")]
        variants += [("aggregate", {"aggregate": "signed", "steps": 8})]  # "abs" is the steps=8 row
        variants += [("baseline", {"baseline": b, "steps": 4})  # where the path starts; the default's is steps=4
                     for b in self.args.ablation_baselines if b != IG_BASELINE]
        variants += [("reference", {"method": m}) for m in ("grad_x_gate", "fisher")]  # one-step methods, same split
        groups = self.args.ablation_groups
        for group, opts in [(g, o) for g, o in variants if groups is None or g in groups]:
            key = f"{task}/ablation/{group}/" + ",".join(f"{k}={v}" for k, v in opts.items())
            if self.done(key):
                continue
            opts = dict(opts)
            method = opts.pop("method", "ig")
            full = {**self.ig, **opts} if method == "ig" else {}
            t0 = time.perf_counter()
            scores = score_units(tm, calib_b, method, target="label", **full)
            seconds = time.perf_counter() - t0
            rows = {f"macs={c}": self.pruned_metric(tm, task, scores, sel, macs=c) for c in (0.4, 0.6)}
            scope_rows = group == "steps" and opts["steps"] == 8 and (groups is None or "scope" in groups)
            if scope_rows:  # selection scope / normalisation on the steps=8 scores
                for scope, norm in (("layerwise", "none"), ("global", "none"), ("global", "l1"), ("global", "l2"),
                                    ("global", "max")):
                    rows |= {f"macs={c},scope={scope},normalize={norm}": self.pruned_metric(
                        tm, task, scores, sel, macs=c, scope=scope, normalize=norm) for c in (0.4, 0.6)}
                # the same share of attention and of FFN MACs, ranked globally within a kind
                rows |= {f"macs={c},scope=per_kind,normalize=l1": self.pruned_metric(
                    tm, task, scores, sel, macs=c, scope="per_kind", normalize="l1") for c in (0.4, 0.6)}
            self.save(key, {"seconds": seconds, "budgets": rows})
        key = f"{task}/dense_select"
        if not self.done(key):
            self.save(key, {"select": self.metric(tm, task, select_b)})


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--model", default="minilm-glue")
    p.add_argument("--tasks", nargs="*", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--calib", type=int, default=512, help="calibration samples (supervised / unsupervised)")
    p.add_argument("--select-rows", type=int, default=500, help="selection split for the ablation")
    p.add_argument("--eval-rows", type=int, default=1000, help="cap on rows per dev / OOD set (seeded)")
    p.add_argument("--ood-rows", type=int, default=500, help="cap on rows per out-of-domain set (seeded)")
    p.add_argument("--steps", type=int, default=4, help="IG steps of the method comparison (taskprune's default)")
    p.add_argument("--scope", default="per_kind", choices=["per_kind", "global", "layerwise"],
                   help="selection scope of the method comparison and low-resource runs (taskprune's default)")
    p.add_argument("--normalize", default="l1", help="per-block score normalisation before ranking")
    p.add_argument("--low-resource-tasks", nargs="*", default=["sst2", "rte"])
    p.add_argument("--k-per-class", type=int, nargs="*", default=[4, 8, 16, 32, 64])
    p.add_argument("--ablation-steps", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--ablation-tasks", nargs="*", default=["sst2", "mrpc"])
    p.add_argument("--ablation-baselines", type=float, nargs="*", default=[0.0, 0.5, 0.75],
                   help="IG path starts (gate values) of the ablation's baseline group")
    p.add_argument("--methods", nargs="*", default=None, choices=METHODS,
                   help="only these methods in the comparison (default all six; --quick: five)")
    p.add_argument("--ig-baseline", type=float, default=None,
                   help="IG path start of the comparison (default: taskprune's); another value than taskprune's "
                        "default is stored as its own row 'ig@baseline=<b>' (no unsupervised run), beside the 'ig' row")
    p.add_argument("--ablation-groups", nargs="*", default=None,
                   help="only these ablation groups (steps quadrature aggregate baseline reference scope; default all)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--fresh", action="store_true", help="ignore results already in the JSON file")
    p.add_argument("--json", default="quality.json", help="raw results file under --out (parallel runs: one each)")
    p.add_argument("--phases", nargs="*", default=["methods", "ablation", "low_resource"])
    p.add_argument("--render", nargs="+", metavar="JSON", default=None,
                   help="only merge these raw results files and write quality_demo_model.md")
    args = p.parse_args(argv)
    if args.render:
        from benchmarks.quality_report import merge_raw, render

        write_text(Path(args.out) / "quality_demo_model.md", header("quality", argv) + render(merge_raw(args.render), args.out))
        return
    if args.quick:
        args.calib, args.eval_rows, args.select_rows, args.ood_rows = 256, 300, 300, 200
        args.tasks = args.tasks or ["sst2", "rte"]
        args.low_resource_tasks, args.ablation_tasks = ["sst2"], ["sst2"]
    torch.manual_seed(0)
    bench = Bench(args)
    bench.results.setdefault("_commands", []).append(  # the raw file names the runs that filled it, and where
        " ".join(["python -m benchmarks.quality", *(sys.argv[1:] if argv is None else argv)]) + f"   # on {cpu_name()}")
    settings = {"steps": args.steps, "ig_baseline": IG_BASELINE, "scope": args.scope, "normalize": args.normalize,
                "calib": args.calib, "eval_rows": args.eval_rows, "ood_rows": args.ood_rows}
    old = bench.results.setdefault("_settings", settings)
    if old != settings:  # one file, one setting: a resumed run must not mix selection rules in a table
        raise SystemExit(f"{bench.path} was filled with {old}, this run asks for {settings}; use another --json "
                         "or the same options.")
    for task in (args.tasks or ("sst2", "rte", "mrpc", "mnli", "qnli", "qqp", "cola", "stsb")) \
            if "methods" in args.phases else ():
        log.info("task %s: methods", task)
        bench.run_task(task)
    for task in args.ablation_tasks if "ablation" in args.phases else ():
        log.info("task %s: IG ablation", task)
        bench.run_ablation(task)
    for task in args.low_resource_tasks if "low_resource" in args.phases else ():
        log.info("task %s: low-resource", task)
        bench.run_low_resource(task)
    from benchmarks.quality_report import render, source

    results = dict(bench.results)
    results["_sources"] = [source(args.json, results)]
    write_text(Path(args.out) / "quality_demo_model.md", header("quality", argv) + render(results, args.out))


if __name__ == "__main__":
    main()
