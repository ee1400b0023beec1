"""Deploy benchmark (issue #23): what ships, dense and pruned, PyTorch and ONNX Runtime (fp32, dynamic int8), on CPU.

    python -m benchmarks.deploy                       # demo model, SST-2, 40 / 60 % MAC cuts, 1 and 2 threads
    python -m benchmarks.deploy --cuts 0.4 --threads 1 --reps 1 --eval-rows 16 --calib 32 \\
        --out /tmp/deploy_smoke.md                    # smoke run (numbers meaningless)

One command, one results file: ``benchmarks/results/deploy.json`` (raw) and ``deploy.md`` (the tables), written
atomically; the header names the command, commit, CPU and its instruction set (AVX2 / AVX-512 / VNNI), torch threads
and the wall time.

What it does, in order:

1. the demo model ``minilm-glue`` (built on first use, minutes), its SST-2 head; calibration: ``--calib`` train rows
   through :class:`taskprune.lightning.data.TaskDataModule` (batches of 32), evaluation: SST-2 dev and the task's
   unseen domains (IMDB, Yelp, Amazon), each capped at ``--eval-rows`` seeded rows;
2. the library's default pipeline, ``Pipeline().at(cut).prune(...)`` (one scoring reused by every cut), scales folded
   if any, then ``shrink_`` on a copy;
3. the artifacts, each written to a temporary folder by the library's own savers and read back by its loaders:
   PyTorch fp32 = :func:`taskprune.export.save_pruned` / :func:`~taskprune.export.load_pruned` (the dense model with a
   keep-everything spec); ONNX = :func:`taskprune.deploy.save_onnx` (default options: opset 17, saved at ``basic``,
   the session adds the rest online) / :func:`~taskprune.deploy.load_onnx`. Variants: dense PyTorch fp32 (the
   reference of every ratio), dense ONNX int8, and per cut pruned PyTorch fp32, pruned ONNX fp32, pruned ONNX int8;
4. per variant: weights on disk, load time (loader + tokenizer, ready to run; median of ``--reps``), accuracy of the
   loaded artifact on every evaluation set (batches of 32, dynamic padding, at the largest ``--threads``);
5. per thread count (``torch.set_num_threads`` for PyTorch, the session's intra-op threads for ONNX Runtime, sessions
   created anew for each count): latency at batch 1 (``--latency-calls`` calls per variant per repeat; p50 / p95 over
   all calls) and throughput at batch 32, seq 128, random token ids (seeded, no padding), one warm-up call per
   variant and shape, then ``--reps`` repeats in which every variant runs once, in an order rotated by one each
   repeat. Throughput ratio: median over repeats of dense time / variant time within the repeat.

Targets of issue #23 (judged at every thread count; the issue's machine: AMD EPYC, 2 cores): pruned 40 % + int8
≥ 3× dense PyTorch fp32 throughput at batch 32 and ≥ 2.5× lower p50 latency at batch 1; pruned 60 % + int8 ≥ 4×
throughput; int8 accuracy within 1 point of the pruned fp32 model (PyTorch) on SST-2 dev and each unseen domain.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import cpu_name, git_commit, header, write_text
from taskprune.io import atomic_write_json

TASK = "sst2"
SEQ = 128
BIG = 32  # throughput batch
RESULTS = Path("benchmarks/results")
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")
TARGETS = {0.4: {"throughput": 3.0, "latency": 2.5}, 0.6: {"throughput": 4.0}}
ACC_TOLERANCE = 1.0  # points: int8 vs pruned fp32


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- machine
def cpu_isa() -> dict:
    """The instruction-set flags of /proc/cpuinfo that decide the int8 kernels, and torch's CPU dispatch level."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    out = {f: f in flags for f in ISA_FLAGS}
    out["source"] = "/proc/cpuinfo" if flags else "unknown (no /proc/cpuinfo flags)"
    try:
        out["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        out["torch_capability"] = "unknown"
    return out


def isa_text(isa: dict) -> str:
    have = [f for f in ISA_FLAGS if isa.get(f)]
    miss = [f for f in ISA_FLAGS if f in isa and not isa[f]]
    return (f"{', '.join(have) or 'none of ' + '/'.join(ISA_FLAGS)}"
            + (f"; no {', '.join(miss)}" if miss else "") + f" (torch dispatch: {isa.get('torch_capability')})")


def has_vnni(isa: dict) -> bool:
    return bool(isa.get("avx512_vnni") or isa.get("avx_vnni"))


# ---------------------------------------------------------------------------------------------- data and model
def prepare(args):
    """The task model, the tokenizer path, calibration batches, and the evaluation sets as lists of batches."""
    from taskprune.lightning.data import TaskDataModule
    from taskprune.zoo import ensure_multitask

    t0 = time.perf_counter()
    model = ensure_multitask(args.model, data_dir=args.data_dir)
    load_s = time.perf_counter() - t0
    tm = model.for_task(TASK).eval()
    dm = TaskDataModule(TASK, data_dir=args.data_dir, tokenizer=model.tokenizer_path, calib_samples=args.calib,
                        batch_size=32, eval_samples=args.eval_rows)
    dm.fit_to(tm)
    calib = list(dm.train_dataloader())
    evals = {name: list(loader) for name, loader in zip(dm.eval_names, dm.test_dataloader())}
    return tm, model.tokenizer_path, calib, evals, load_s


def speed_inputs(vocab: int, batch: int, seed: int) -> dict:
    """Random token ids ``[batch, SEQ]`` (seeded, above the first 1000 ids where BERT keeps its special tokens),
    every token real; token types 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, vocab - 1), vocab, (batch, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def weights_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of the weight files: *.onnx, *.safetensors, external data; bytes of the whole folder)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    weights = sum(p.stat().st_size for p in files if p.suffix in (".onnx", ".safetensors", ".data"))
    return weights, sum(p.stat().st_size for p in files)


# ---------------------------------------------------------------------------------------------- artifacts
class Variant:
    """One artifact: its folder, how to load it, and what it is."""

    def __init__(self, key: str, label: str, cut: float | None, runtime: str, precision: str, folder: Path):
        self.key, self.label, self.cut, self.runtime, self.precision, self.folder = (key, label, cut, runtime,
                                                                                  precision, folder)
        self.info: dict = {}

    def load(self, threads: int):
        """The runner (``runner(**batch).logits``) from the folder, with its tokenizer (what a user loads)."""
        if self.runtime == "onnx":
            from taskprune.deploy import load_onnx

            runner, _tokenizer = load_onnx(self.folder, threads=threads)
            return runner
        from transformers import AutoTokenizer

        from taskprune.export import load_pruned

        runner = load_pruned(self.folder)
        AutoTokenizer.from_pretrained(self.folder, trust_remote_code=False, local_files_only=True)
        return runner


def build_artifacts(tm, tokenizer_path: str, calib: list[dict], cuts: list[float], work: Path) -> list[Variant]:
    from transformers import AutoTokenizer

    from taskprune.arch import get_architecture
    from taskprune.deploy import save_onnx
    from taskprune.export import save_pruned
    from taskprune.flops import count_macs
    from taskprune.pipeline import Pipeline
    from taskprune.spec import PruneSpec
    from taskprune.surgery import shrink_

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=False)
    example = {k: v for k, v in calib[0].items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    fingerprint = get_architecture(tm).fingerprint()
    dense_macs = count_macs(fingerprint, SEQ)
    n_dense = sum(p.numel() for p in tm.parameters())
    variants: list[Variant] = []

    def add(v: Variant, save, model, extra: dict) -> None:
        t0 = time.perf_counter()
        save()
        v.info.update(extra, export_s=time.perf_counter() - t0, params=sum(p.numel() for p in model.parameters()),
                      params_of_dense=sum(p.numel() for p in model.parameters()) / n_dense)
        v.info["weights_bytes"], v.info["folder_bytes"] = weights_bytes(v.folder)
        if v.runtime == "onnx":
            v.info["check"] = json.loads((v.folder / "onnx.json").read_text()).get("check", {})
        variants.append(v)
        log(f"  saved {v.label}: {v.info['weights_bytes'] / 1e6:.1f} MB in {v.info['export_s']:.1f} s")

    dense_spec = PruneSpec(keep={}, fingerprint=fingerprint, meta={"note": "keeps every unit (the dense model)"})
    dense_extra = {"macs_kept": 1.0, "heads_kept": dense_spec.n_kept("heads"),
                   "neurons_kept": dense_spec.n_kept("neurons")}
    v = Variant("dense/pt-fp32", "dense, PyTorch fp32", None, "pytorch", "fp32", work / "dense-pt")
    add(v, lambda: save_pruned(tm, dense_spec, v.folder, tokenizer=tokenizer), tm, dense_extra)
    v = Variant("dense/ort-int8", "dense, ONNX int8", None, "onnx", "int8", work / "dense-int8")
    add(v, lambda: save_onnx(tm, v.folder, tokenizer=tokenizer, quantize="int8", example=example), tm, dense_extra)

    log(f"scoring {sum(b['input_ids'].shape[0] for b in calib)} calibration rows with the default pipeline")
    t0 = time.perf_counter()
    scores = Pipeline().score(tm, calib)
    score_s = time.perf_counter() - t0
    for cut in cuts:
        t0 = time.perf_counter()
        spec = Pipeline().at(cut).prune(tm, calib, scores=scores)
        pruned = copy.deepcopy(tm)
        shrink_(pruned, spec)  # its tuning folded in
        extra = {"macs_kept": count_macs(fingerprint, SEQ, spec) / dense_macs, "heads_kept": spec.n_kept("heads"),
                 "neurons_kept": spec.n_kept("neurons"), "score_s": score_s,
                 "allocate_s": time.perf_counter() - t0, "spec_budget": spec.budget}
        tag = f"{round(100 * cut)}%"
        log(f"  cut {tag}: {extra['macs_kept']:.3f} of the MACs kept, heads {extra['heads_kept']}/"
            f"{spec.n_total('heads')}, neurons {extra['neurons_kept']}/{spec.n_total('neurons')}")
        for key, label, runtime, precision in ((f"{tag}/pt-fp32", f"pruned {tag}, PyTorch fp32", "pytorch", "fp32"),
                                               (f"{tag}/ort-fp32", f"pruned {tag}, ONNX fp32", "onnx", "fp32"),
                                               (f"{tag}/ort-int8", f"pruned {tag}, ONNX int8", "onnx", "int8")):
            v = Variant(key, label, cut, runtime, precision, work / key.replace("/", "-").replace("%", "pct"))
            if runtime == "pytorch":
                save = lambda v=v: save_pruned(pruned, spec, v.folder, tokenizer=tokenizer)  # noqa: E731
            else:
                save = lambda v=v, q=(precision if precision == "int8" else None): save_onnx(  # noqa: E731
                    pruned, v.folder, tokenizer=tokenizer, spec=spec, quantize=q, example=example)
            add(v, save, pruned, extra)
    return variants


# ---------------------------------------------------------------------------------------------- measurements
def measure_loads(variants: list[Variant], threads: int, reps: int) -> dict:
    """Load every artifact ``reps`` times (order rotated each repeat); the runners of the last repeat."""
    runners: dict = {}
    times: dict[str, list[float]] = {v.key: [] for v in variants}
    for r in range(reps):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            t0 = time.perf_counter()
            runners[v.key] = v.load(threads)
            times[v.key].append(time.perf_counter() - t0)
    for v in variants:
        v.info["load_s"] = times[v.key]
        v.info["load_s_median"] = statistics.median(times[v.key])
    return runners


@torch.inference_mode()
def accuracy(runner, evals: dict) -> tuple[dict, dict]:
    """``({set: {metric: value, "rows": n}}, {set: predictions [n]})`` of ``runner`` on every evaluation set."""
    from taskprune.tasks import get_task

    task = get_task(TASK)
    out, preds = {}, {}
    for name, batches in evals.items():
        metrics = task.make_metrics()
        p = []
        for b in batches:
            p.append(task.predictions(runner(**b).logits))
            metrics.update(p[-1], b["labels"])
        out[name] = {**{k: float(v) for k, v in metrics.compute().items()},
                     "rows": sum(int(b["labels"].shape[0]) for b in batches)}
        preds[name] = torch.cat(p)
    return out, preds


def reference(key: str) -> str:
    """The fp32 PyTorch variant of the same width: ``dense/pt-fp32`` or ``<cut>/pt-fp32``."""
    return key.split("/")[0] + "/pt-fp32"


def timed(fn, inputs: dict) -> float:
    t0 = time.perf_counter()
    fn(**inputs)
    return time.perf_counter() - t0


@torch.inference_mode()
def measure_speed(variants: list[Variant], threads: int, reps: int, calls: int, vocab: int) -> list[dict]:
    torch.set_num_threads(threads)
    runners = {v.key: v.load(threads) for v in variants}  # sessions with this many intra-op threads
    one, big = speed_inputs(vocab, 1, seed=1), speed_inputs(vocab, BIG, seed=2)
    for v in variants:  # warm-up: first-call allocations, ORT's arena, oneDNN / MLAS kernel selection
        runners[v.key](**one)
        runners[v.key](**big)
    lat: dict[str, list[float]] = {v.key: [] for v in variants}
    thr: dict[str, list[float]] = {v.key: [] for v in variants}
    for r in range(reps):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            lat[v.key] += [timed(runners[v.key], one) for _ in range(calls)]
        for v in order[::-1]:
            thr[v.key].append(timed(runners[v.key], big))
        log(f"  threads {threads}, repeat {r + 1}/{reps}: " + ", ".join(
            f"{v.key} {1e3 * statistics.median(lat[v.key][-calls:]):.1f} ms / {BIG / thr[v.key][-1]:.1f}/s"
            for v in variants))
    ref = variants[0].key
    rows = []
    for v in variants:
        p50, p95 = percentile(lat[v.key], 50), percentile(lat[v.key], 95)
        ratios = [d / t for d, t in zip(thr[ref], thr[v.key])]
        rows.append({"threads": threads, "variant": v.key, "latency_s": lat[v.key], "batch32_s": thr[v.key],
                     "p50_ms": 1e3 * p50, "p95_ms": 1e3 * p95,
                     "latency_ratio": percentile(lat[ref], 50) / p50,
                     "samples_per_s": BIG / statistics.median(thr[v.key]),
                     "throughput_ratio": statistics.median(ratios)})
    return rows


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default)."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------------- targets
def judge(res: dict) -> list[dict]:
    """Every target of issue #23 that this run's cuts and threads allow: value, verdict, margin and why."""
    isa = res["cpu"]["isa"]
    speed = {(r["threads"], r["variant"]): r for r in res["speed"]}
    out = []
    for cut, goals in TARGETS.items():
        tag = f"{round(100 * cut)}%"
        if f"{tag}/ort-int8" not in res["variants"]:
            continue
        for threads in res["settings"]["threads"]:
            q, pt, f32 = (speed.get((threads, f"{tag}/{k}")) for k in ("ort-int8", "pt-fp32", "ort-fp32"))
            for what, goal in goals.items():
                key = "throughput_ratio" if what == "throughput" else "latency_ratio"
                value = q[key]
                bound = 1 / res["variants"][f"{tag}/pt-fp32"]["macs_kept"]
                parts = (f"pruning {pt[key]:.2f}× (MAC bound {bound:.2f}×) · ONNX Runtime fp32 over PyTorch "
                         f"{f32[key] / pt[key]:.2f}× · int8 over fp32 {value / f32[key]:.2f}×")
                why = parts + ("" if value >= goal else
                               ("; no VNNI on this CPU (int8 dot products without avx512_vnni / avx_vnni)"
                                if not has_vnni(isa) else ""))
                name = (f"pruned {tag} + int8: ≥ {goal:g}× dense PyTorch fp32 throughput at batch {BIG}"
                        if what == "throughput" else
                        f"pruned {tag} + int8: ≥ {goal:g}× lower p50 latency at batch 1")
                out.append({"target": name, "threads": threads, "value": value, "goal": goal,
                            "met": value >= goal, "by": value - goal, "why": why, "unit": "×"})
    for cut in res["settings"]["cuts"]:
        tag = f"{round(100 * cut)}%"
        ref, q = res["accuracy"].get(f"{tag}/pt-fp32"), res["accuracy"].get(f"{tag}/ort-int8")
        if not ref or not q:
            continue
        for name in ref:
            d = 100 * (q[name]["accuracy"] - ref[name]["accuracy"])
            out.append({"target": f"pruned {tag} int8 accuracy within {ACC_TOLERANCE:g} point of pruned fp32 "
                                  f"({name}, {ref[name]['rows']} rows)",
                        "threads": None, "value": d, "goal": ACC_TOLERANCE, "met": abs(d) <= ACC_TOLERANCE,
                        "by": ACC_TOLERANCE - abs(d), "unit": "points",
                        "why": f"{q[name]['changed_vs_fp32']} of {q[name]['rows']} predictions changed by int8"})
    return out


# ---------------------------------------------------------------------------------------------- report
def report(res: dict, argv: list[str]) -> str:
    s = res["settings"]
    out = ["# Deploy: dense and pruned, PyTorch and ONNX Runtime (fp32, int8), on CPU\n\n", header("deploy", argv)]
    out.append(f"- CPU: {res['cpu']['name']}; instruction set: {isa_text(res['cpu']['isa'])}\n"
               f"- torch threads: {res['torch_threads']} by default; scoring, export and accuracy at "
               f"{max(s['threads'])}, speed at {s['threads']} (torch `set_num_threads` / ONNX Runtime intra-op "
               "threads); load average (1 min) at start "
               f"{res['load_avg'][0]:.2f}, at end {res['load_avg_end'][0]:.2f}\n"
               f"- versions: {', '.join(f'{k} {v}' for k, v in res['versions'].items())}\n"
               f"- wall time: **{res['wall_s'] / 60:.1f} min** ("
               + ", ".join(f"{k} {v:.0f} s" for k, v in res["phases_s"].items()) + ")\n"
               f"- model `{s['model']}`, task {TASK}; calibration {s['calib_rows']} train rows (TaskDataModule, "
               f"batches of 32); data: {s['data']}; evaluation rows per set: "
               f"{', '.join(f'{k} {v}' for k, v in s['eval_rows'].items())}\n"
               f"- pruning: `Pipeline().at(cut).prune(...)` (the library default), MACs counted at seq {SEQ}\n"
               f"- speed: seq {SEQ}, random token ids (no padding), batch 1 ({s['latency_calls']} calls per variant "
               f"per repeat) and batch {BIG}; one warm-up per variant and shape; {s['reps']} repeats, every variant "
               "once per repeat, order rotated (both runtimes share the process: the threads of the one that just ran "
               "may spin briefly, and the rotation spreads that over every variant); wall clock "
               "(`time.perf_counter`)\n\n")

    out.append("## Artifacts\n\nSizes are the weight files (`model.onnx`; `model.safetensors` + `heads.safetensors`); "
               "load time: the library's loader plus the tokenizer, ready for the first call, median of "
               f"{s['reps']} (ONNX: session at {max(s['threads'])} thread(s), optimisation `all` online).\n\n"
               "| variant | MACs kept | heads / neurons kept | parameters | weights (MB) | size vs dense | "
               "load (s) | export (s) | check vs PyTorch |\n|---|---|---|---|---|---|---|---|---|\n")
    ref = res["variants"]["dense/pt-fp32"]
    for key, v in res["variants"].items():
        c = v.get("check") or {}
        check = "—"
        if "max_abs_diff_fp32" in c:
            check = f"fp32 max \\|Δlogit\\| {c['max_abs_diff_fp32']:.1e}"
            if "int8_argmax_agreement" in c:
                check += f"; int8 argmax agrees on {100 * c['int8_argmax_agreement']:.0f} % of {c['int8_rows']} rows"
        out.append(f"| {v['label']} | {v['macs_kept']:.3f} | {v['heads_kept']} / {v['neurons_kept']} | "
                   f"{v['params'] / 1e6:.2f} M | {v['weights_bytes'] / 1e6:.1f} | "
                   f"{v['weights_bytes'] / ref['weights_bytes']:.2f}× | {v['load_s_median']:.2f} | "
                   f"{v['export_s']:.1f} | {check} |\n")

    out.append("\n## Speed\n\nRatios vs dense PyTorch fp32 at the same thread count: latency = dense p50 / variant "
               "p50 (higher is better); throughput = median over repeats of dense time / variant time.\n\n"
               f"| threads | variant | p50 (ms), batch 1 | p95 (ms), batch 1 | p50 × lower | samples/s, batch {BIG} "
               "| throughput × |\n|---|---|---|---|---|---|---|\n")
    for r in res["speed"]:
        out.append(f"| {r['threads']} | {res['variants'][r['variant']]['label']} | {r['p50_ms']:.1f} | "
                   f"{r['p95_ms']:.1f} | {r['latency_ratio']:.2f}× | {r['samples_per_s']:.1f} | "
                   f"{r['throughput_ratio']:.2f}× |\n")

    names = list(next(iter(res["accuracy"].values())))
    out.append("\n## Accuracy of the loaded artifacts\n\nAccuracy (%), in brackets the change in points vs the "
               "fp32 PyTorch model of the same width (dense or the same cut) and the number of rows whose prediction "
               "differs from it.\n\n"
               "| variant | " + " | ".join(f"{n} ({res['accuracy']['dense/pt-fp32'][n]['rows']} rows)" for n in names)
               + " |\n|---|" + "---|" * len(names) + "\n")
    for key, acc in res["accuracy"].items():
        v = res["variants"][key]
        base = res["accuracy"][reference(key)]
        cells = []
        for n in names:
            a = 100 * acc[n]["accuracy"]
            d = a - 100 * base[n]["accuracy"]
            cells.append(f"{a:.1f}" + ("" if key == reference(key) else
                                       f" ({d:+.1f}; {acc[n]['changed_vs_fp32']} changed)"))
        out.append(f"| {v['label']} | " + " | ".join(cells) + " |\n")

    out.append("\n## Targets (issue #23)\n\n| target | threads | result | verdict |\n|---|---|---|---|\n")
    for t in res["targets"]:
        if t["unit"] == "×":
            result = f"{t['value']:.2f}×"
            verdict = (f"met (+{t['by']:.2f}×)" if t["met"] else f"**missed by {-t['by']:.2f}×**") + f"; {t['why']}"
        else:
            result = f"{t['value']:+.2f} points"
            verdict = ("met" if t["met"] else f"**missed by {-t['by']:.2f} points**") + f"; {t['why']}"
        out.append(f"| {t['target']} | {t['threads'] or '—'} | {result} | {verdict} |\n")
    missed = [t for t in res["targets"] if not t["met"]]
    out.append(f"\n{len(res['targets']) - len(missed)} of {len(res['targets'])} targets met. The speed factors "
               "multiply: (pruned PyTorch / dense PyTorch) · (pruned ONNX fp32 / pruned PyTorch) · (int8 / fp32) = "
               "the pruned int8 ratio; the issue's setting is 2 threads.")
    if not has_vnni(res["cpu"]["isa"]):
        out.append(" This CPU has no VNNI (neither avx512_vnni nor avx_vnni): ONNX Runtime's int8 matrix products "
                   "run without the fused int8 dot-product instruction, which is where dynamic quantisation gains "
                   "most on recent Xeons.")
    if s.get("smoke"):
        out.append("\n\n**Smoke settings** (fewer rows, cuts, threads or repeats than the defaults): not a result.")
    return "".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- main
DEFAULTS = {"cuts": [0.4, 0.6], "threads": [1, 2], "reps": 5, "latency_calls": 20, "eval_rows": None, "calib": 512}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.deploy", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm-glue", help="zoo name or folder of a multi-task model")
    p.add_argument("--data-dir", default="../shared/data",
                   help="GLUE-layout data folder; '' (or a missing folder) = the embedded subsets")
    p.add_argument("--cuts", type=float, nargs="+", default=DEFAULTS["cuts"], help="MAC fractions removed")
    p.add_argument("--threads", type=int, nargs="+", default=DEFAULTS["threads"], help="thread counts measured")
    p.add_argument("--reps", type=int, default=DEFAULTS["reps"], help="timed repeats (and loads per artifact)")
    p.add_argument("--latency-calls", type=int, default=DEFAULTS["latency_calls"],
                   help="batch-1 calls per variant per repeat")
    p.add_argument("--eval-rows", type=int, default=DEFAULTS["eval_rows"],
                   help="cap on rows per evaluation set (seeded subset); default all")
    p.add_argument("--calib", type=int, default=DEFAULTS["calib"], help="calibration train rows")
    p.add_argument("--out", default=str(RESULTS / "deploy.md"), help="the .md; the .json is written beside it")
    args = p.parse_args(argv)
    for name in ("reps", "latency_calls", "calib"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_rows is not None and args.eval_rows < 1:
        p.error(f"--eval-rows must be >= 1, got {args.eval_rows}")
    if any(t < 1 for t in args.threads):
        p.error(f"--threads must be >= 1, got {args.threads}")
    if any(not 0 < c < 1 for c in args.cuts):
        p.error(f"--cuts must lie in (0, 1), got {args.cuts}")
    from taskprune.deploy import require_extra

    try:
        onnx, ort = require_extra()
    except ImportError as e:
        p.error(str(e))
    if not args.data_dir or not Path(args.data_dir).is_dir():
        if args.data_dir:
            log(f"no data folder at {args.data_dir!r}: using the embedded subsets")
        args.data_dir = None
    args.cuts = sorted(set(args.cuts))
    default_threads = torch.get_num_threads()
    torch.set_num_threads(max(args.threads))  # scoring, export and accuracy run at the largest count
    out = Path(args.out)
    t_start = time.perf_counter()
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()

    res: dict = {"command": "python -m benchmarks.deploy " + shlex.join(argv), "commit": git_commit(),
                 "cpu": {"name": cpu_name(), "isa": cpu_isa(), "cores": os.cpu_count()},
                 "torch_threads": default_threads, "load_avg": list(os.getloadavg()),
                 "versions": {"python": platform.python_version(), "torch": torch.__version__,
                              "transformers": transformers.__version__, "onnx": onnx.__version__,
                              "onnxruntime": ort.__version__}}
    log(f"CPU {res['cpu']['name']}: {isa_text(res['cpu']['isa'])}")
    phases = res["phases_s"] = {}
    t0 = time.perf_counter()
    tm, tokenizer_path, calib, evals, phases["model load or build"] = prepare(args)
    phases["data"] = time.perf_counter() - t0 - phases["model load or build"]
    res["settings"] = {"model": args.model, "cuts": args.cuts, "threads": args.threads, "reps": args.reps,
                       "latency_calls": args.latency_calls, "calib_rows": sum(int(b["input_ids"].shape[0])
                                                                              for b in calib),
                       "data": args.data_dir or "embedded subsets", "eval_rows_cap": args.eval_rows,
                       "eval_rows": {k: sum(int(b["labels"].shape[0]) for b in v) for k, v in evals.items()},
                       "seq": SEQ, "batch": BIG}
    res["settings"]["smoke"] = any(getattr(args, k) != v for k, v in DEFAULTS.items())
    vocab = tm.encoder.get_input_embeddings().weight.shape[0]
    with tempfile.TemporaryDirectory(prefix="taskprune-deploy-") as tmp:
        log("building the artifacts")
        t0 = time.perf_counter()
        variants = build_artifacts(tm, tokenizer_path, calib, args.cuts, Path(tmp))
        phases["prune + export"] = time.perf_counter() - t0
        del tm
        eval_threads = max(args.threads)
        torch.set_num_threads(eval_threads)
        log(f"loading every artifact {args.reps} time(s)")
        t0 = time.perf_counter()
        runners = measure_loads(variants, eval_threads, args.reps)
        phases["loads"] = time.perf_counter() - t0
        t_acc = time.perf_counter()
        res["accuracy"], preds = {}, {}
        for v in variants:
            t0 = time.perf_counter()
            res["accuracy"][v.key], preds[v.key] = accuracy(runners[v.key], evals)
            if v.key != reference(v.key):  # predictions that differ from the fp32 PyTorch model of the same width
                for name, p in preds[v.key].items():
                    res["accuracy"][v.key][name]["changed_vs_fp32"] = int((p != preds[reference(v.key)][name]).sum())
            log(f"  accuracy {v.label}: " + ", ".join(f"{k} {100 * a['accuracy']:.1f}"
                                                      for k, a in res["accuracy"][v.key].items())
                + f" ({time.perf_counter() - t0:.0f} s)")
        del runners
        phases["accuracy"] = time.perf_counter() - t_acc
        res["speed"] = []
        for threads in args.threads:
            log(f"speed at {threads} thread(s)")
            t0 = time.perf_counter()
            res["speed"] += measure_speed(variants, threads, args.reps, args.latency_calls, vocab)
            phases[f"speed at {threads} thread(s)"] = time.perf_counter() - t0
        res["variants"] = {v.key: {"label": v.label, "cut": v.cut, "runtime": v.runtime, "precision": v.precision,
                                   **v.info} for v in variants}
    res["targets"] = judge(res)
    res["load_avg_end"] = list(os.getloadavg())
    res["wall_s"] = time.perf_counter() - t_start
    atomic_write_json(out.with_suffix(".json"), res)
    write_text(out.with_suffix(".md"), report(res, argv))
    log(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')} in {res['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
