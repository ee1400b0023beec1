"""Tables and the machine-readable summary of :mod:`benchmarks.pipelines` raw files.

Writes ``quality.md`` (dev tables) or ``quality_selection.md`` (the selection-split choice of the default) and,
for dev files, ``quality_summary.json``: ``{"model", "dense": {task: metric}, "retained": {pipeline: {task:
{"<cut>": percent}}}}`` with ``"default"`` (taskprune's default pipeline) and ``"kwon"`` (Kwon et al. 2022 in full).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks.common import write_text
from benchmarks.quality_report import save_figure
from taskprune.io import atomic_write_json

HEADLINE = ("sst2", "mrpc", "qnli", "mnli", "qqp", "stsb")
MAIN_METRIC = {"mrpc": "f1", "stsb": "pearson", "cola": "matthews"}
NAMES = {"sst2": "SST-2", "mrpc": "MRPC (F1)", "qnli": "QNLI", "mnli": "MNLI-m", "qqp": "QQP", "stsb": "STS-B (r)",
         "rte": "RTE", "cola": "CoLA (MCC)"}
ORDER = ("default", "kwon", "kwon_notune", "ig", "ig05", "grad_x_gate", "fisher", "activation", "magnitude", "random")
#: taskprune's default pipeline: what AttributionConfig(), Budget(), TuningConfig() and TaskDataModule() do (ig from
#: gates = 0.5, 4 steps, squared per-sample attributions, Kwon et al.'s mask search through scope="auto", no held-out
#: rows so the split by total score, no tuning) = the benchmark's "igsq_search". "default" in the tables and in
#: quality_summary.json. ("igsq_holdout" = the same with TaskDataModule(holdout_samples=256): opt-in.)
DEFAULT = "igsq_search"
#: calibration samples of the headline rows; files made with another ``--calib`` give rows named ``<pipeline>@<n>``.
CALIB = 512


def main_key(task: str) -> str:
    return MAIN_METRIC.get(task, "accuracy")


def merge(paths: list[str]) -> dict:
    out: dict = {"_sources": []}
    for p in paths:
        raw = json.loads(Path(p).read_text())
        out["_sources"].append({"file": Path(p).name, "settings": raw.get("_settings"), "cpu": raw.get("_cpu"),
                                "commands": raw.get("_commands", [])})
        calib = (raw.get("_settings") or {}).get("calib", CALIB)
        for task, recs in raw.items():
            if task.startswith("_"):
                continue
            if calib != CALIB:  # another calibration size is another row, "<pipeline>@<calib>" (same dense model)
                recs = {(f"{r['pipeline']}@{calib}|{k.split('|', 1)[1]}" if "|" in k else k):
                        ({**r, "pipeline": f"{r['pipeline']}@{calib}"} if "|" in k else r) for k, r in recs.items()}
            out.setdefault(task, {}).update(recs)
    return out


def runs(raw: dict, task: str, split: str) -> dict[str, dict[float, list[dict]]]:
    """``{pipeline: {cut: [records over seeds]}}`` for one task (``default`` = a copy of :data:`DEFAULT`)."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for key, rec in raw.get(task, {}).items():
        if "|" not in key or split not in rec["metrics"]:
            continue
        out[rec["pipeline"]][rec["cut"]].append(rec)
        if rec["pipeline"] == DEFAULT:
            out["default"][rec["cut"]].append(rec)
    return out


def retained(rec: dict, dense: dict, task: str, split: str) -> float:
    k = main_key(task)
    return 100.0 * rec["metrics"][split][k] / dense[split][k]


def cell(recs: list[dict], dense: dict, task: str, split: str) -> tuple[float, float, int]:
    vals = [retained(r, dense, task, split) for r in recs]
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def _fmt(m: float, s: float, n: int) -> str:
    return f"{m:.1f}" + (f" ± {s:.1f}" if n > 1 else "")


def _pipelines(raw: dict, tasks: list[str], split: str) -> list[str]:
    seen = {p for t in tasks for p in runs(raw, t, split)}
    return [p for p in ORDER if p in seen] + sorted(seen - set(ORDER))


def _cuts(raw: dict, tasks: list[str], split: str) -> list[float]:
    return sorted({c for t in tasks for p in runs(raw, t, split).values() for c in p})


def table(raw: dict, tasks: list[str], split: str) -> list[str]:
    """% of dense kept, one row per pipeline, one column per task, cuts as ``a / b / c``; mean over tasks."""
    cuts = _cuts(raw, tasks, split)
    lines = [f"% of dense ({split}) kept at MAC cuts {' / '.join(f'{c:.0%}' for c in cuts)} (mean ± std over "
             "calibration seeds where there are several):", "",
             "| pipeline | " + " | ".join(f"{NAMES.get(t, t)} ({100 * raw[t]['dense'][split][main_key(t)]:.1f})"
                                         for t in tasks) + " | mean |",
             "|---" * (len(tasks) + 2) + "|"]
    for p in _pipelines(raw, tasks, split):
        cells, means = [], defaultdict(list)
        for t in tasks:
            r = runs(raw, t, split).get(p, {})
            parts = []
            for c in cuts:
                if c in r:
                    m, s, n = cell(r[c], raw[t]["dense"], t, split)
                    parts.append(_fmt(m, s, n))
                    means[c].append(m)
                else:
                    parts.append("–")
            cells.append(" / ".join(parts))
        mean = " / ".join(f"{statistics.mean(means[c]):.1f}" if len(means[c]) == len(tasks) else "–" for c in cuts)
        label = f"**default** (= {DEFAULT})" if p == "default" else p
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
    return lines + [""]


def speed_table(raw: dict, tasks: list[str]) -> list[str]:
    cuts = _cuts(raw, tasks, "dev")
    lines = ["Measured speedup of the shrunk model at batch 32, seq 128 as a fraction of its MAC bound (median over "
             "tasks; min in brackets):", "", "| pipeline | " + " | ".join(f"{c:.0%}" for c in cuts) + " |",
             "|---" * (len(cuts) + 1) + "|"]
    for p in _pipelines(raw, tasks, "dev"):
        row = []
        for c in cuts:
            v = [r["speedup_of_bound"] for t in tasks for r in runs(raw, t, "dev").get(p, {}).get(c, [])
                 if "speedup_of_bound" in r]
            row.append(f"{statistics.median(v):.2f} ({min(v):.2f})" if v else "–")
        lines.append(f"| {p} | " + " | ".join(row) + " |")
    return lines + [""]


def ood_table(raw: dict) -> list[str]:
    lines = ["Unseen domains: % of dense kept on each set vs in-domain (dev), mean over seeds:", "",
             "| task | pipeline | cut | in-domain | unseen domains |", "|---|---|---|---|---|"]
    for t in ("sst2", "mnli", "qqp"):
        if t not in raw:
            continue
        ood = [k for k in raw[t]["dense"] if k not in ("dev", "selection")]
        for p, by_cut in sorted(runs(raw, t, "dev").items(), key=lambda x: _rank(x[0])):
            for c, recs in sorted(by_cut.items()):
                ind = cell(recs, raw[t]["dense"], t, "dev")[0]
                parts = [f"{o} {cell(recs, raw[t]['dense'], t, o)[0]:.1f}" for o in ood if o in recs[0]["metrics"]]
                lines.append(f"| {NAMES[t]} | {p} | {c:.0%} | {ind:.1f} | {', '.join(parts)} |")
    return lines + [""]


def _rank(p: str) -> int:
    return ORDER.index(p) if p in ORDER else len(ORDER)


def cost_table(raw: dict, tasks: list[str]) -> list[str]:
    lines = ["Wall time per pipeline run (seconds, mean over tasks and cuts; scoring is shared by the cuts of one "
             "task and counted once per run here):", "", "| pipeline | score | allocate | rearrange | tune | total |",
             "|---|---|---|---|---|---|"]
    for p in _pipelines(raw, tasks, "dev"):
        recs = [r for t in tasks for rs in runs(raw, t, "dev").get(p, {}).values() for r in rs]
        if not recs:
            continue
        mean = {k: statistics.mean(r["seconds"].get(k, 0.0) for r in recs)
                for k in ("score", "allocate", "rearrange", "tune")}
        lines.append(f"| {p} | " + " | ".join(f"{mean[k]:.1f}" for k in mean) + f" | {sum(mean.values()):.1f} |")
    return lines + [""]


def paired(raw: dict, tasks: list[str], a: str = "default", b: str = "kwon") -> list[str]:
    """Per task and cut: mean retained of a and b over the seeds both have, the difference and the seed std."""
    lines = [f"Paired: {a} (= {DEFAULT}) minus {b}, points of % of dense, per task and cut (same calibration samples "
             "per seed):", "", "| task | cut | " + f"{a} | {b} | diff | seeds | beyond the seed std |",
             "|---|---|---|---|---|---|---|"]
    for t in tasks:
        r = runs(raw, t, "dev")
        for c in sorted(set(r.get(a, {})) & set(r.get(b, {}))):
            sa = {x["seed"]: retained(x, raw[t]["dense"], t, "dev") for x in r[a][c]}
            sb = {x["seed"]: retained(x, raw[t]["dense"], t, "dev") for x in r[b][c]}
            seeds = sorted(set(sa) & set(sb))
            if not seeds:
                continue
            d = [sa[s] - sb[s] for s in seeds]
            std = max(statistics.stdev(sa[s] for s in seeds) if len(seeds) > 1 else 0.0,
                      statistics.stdev(sb[s] for s in seeds) if len(seeds) > 1 else 0.0)
            md = statistics.mean(d)
            if len(seeds) == 1:
                verdict = "n/a (1 seed)"
            else:  # which side leads matters: a lead of b beyond the std is not a win of a
                verdict = "no" if abs(md) <= std else (f"yes ({a} ahead)" if md > 0 else f"yes ({b} ahead)")
            lines.append(f"| {NAMES.get(t, t)} | {c:.0%} | {statistics.mean(sa[s] for s in seeds):.1f} | "
                         f"{statistics.mean(sb[s] for s in seeds):.1f} | {md:+.1f} | {len(seeds)} | {verdict} |")
    return lines + [""]


def summary(raw: dict, tasks: list[str]) -> dict:
    out = {"model": (raw["_sources"][0]["settings"] or {}).get("model"),
           "dense": {t: raw[t]["dense"]["dev"][main_key(t)] for t in tasks if t in raw},
           "main_metric": {t: main_key(t) for t in tasks if t in raw},
           "default_pipeline": DEFAULT, "retained": {}}
    for t in tasks:
        for p, by_cut in runs(raw, t, "dev").items():
            for c, recs in by_cut.items():
                out["retained"].setdefault(p, {}).setdefault(t, {})[f"{c:g}"] = round(
                    cell(recs, raw[t]["dense"], t, "dev")[0], 2)
    return out


PLOTTED = ("default", "kwon", "kwon_notune", "ig", "grad_x_gate", "fisher", "activation", "magnitude", "random")


def plot(raw: dict, tasks: list[str], split: str, out_dir: Path) -> list[str]:
    """``quality_vs_macs.png``: % of dense kept vs MAC cut, one panel per task and one for the mean over tasks
    (pipelines of :data:`PLOTTED` measured on every task; mean over seeds, std as error bars)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["", "(plot skipped: matplotlib is not installed; `pip install matplotlib`)", ""]
    cols = 4
    rows = -(-(len(tasks) + 2) // cols)  # task panels, the mean, the legend
    fig, grid = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False, sharey=True)
    axes = [ax for row in grid for ax in row]
    mean_ax, legend_ax = axes[len(tasks)], axes[len(tasks) + 1]
    for p in PLOTTED:
        style = dict(marker="o", ms=3, label=p, lw=2.2 if p in ("default", "kwon") else 1)
        per_task = {t: runs(raw, t, split).get(p, {}) for t in tasks}
        for ax, t in zip(axes, tasks):
            cuts = sorted(per_task[t])
            if cuts:
                cells = [cell(per_task[t][c], raw[t]["dense"], t, split) for c in cuts]
                ax.errorbar([100 * c for c in cuts], [m for m, _, _ in cells], yerr=[s for _, s, _ in cells],
                            capsize=2, **style)
        common = sorted(set.intersection(*(set(per_task[t]) for t in tasks))) if tasks else []
        if common:
            means = [statistics.mean(cell(per_task[t][c], raw[t]["dense"], t, split)[0] for t in tasks) for c in common]
            mean_ax.plot([100 * c for c in common], means, **style)
    for ax, title in zip(axes, [*(NAMES.get(t, t) for t in tasks), f"mean of {len(tasks)} tasks"]):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("MAC cut (%)", fontsize=8)
        ax.grid(alpha=0.3)
    for row in grid:
        row[0].set_ylabel(f"% of dense kept ({split})", fontsize=8)
    handles = {h.get_label(): h for ax in axes[: len(tasks) + 1] for h in ax.get_legend_handles_labels()[0]}
    legend_ax.legend(list(handles.values()), list(handles.keys()), loc="center", fontsize=8)
    for ax in axes[len(tasks) + 1 :]:
        ax.axis("off")
    name = save_figure(plt, fig, out_dir / "quality_vs_macs.png")
    return ["", f"Plot: [{name}]({name}) (default = {DEFAULT})", ""]


def _sets(raw: dict, tasks: list[str], split: str) -> list[str]:
    """The evaluation sets of a report: the selection reserve alone, or dev and the unseen domains."""
    found = sorted({k for t in tasks for k in raw[t]["dense"] if k != "selection"})
    return ["selection"] if split == "selection" else ["dev"] + [k for k in found if k != "dev"]


def render_files(paths: list[str], out_dir: str, head: str) -> None:
    raw = merge(paths)
    splits = {k for t, recs in raw.items() if not t.startswith("_") for k in recs.get("dense", {})}
    for split in ("selection", "dev"):
        if split in splits:
            _render_split(raw, split, out_dir, head)


def _render_split(raw: dict, split: str, out_dir: str, head: str) -> None:
    tasks = [t for t in (*HEADLINE, "rte", "cola") if t in raw and split in raw[t]["dense"]]
    headline = [t for t in HEADLINE if t in tasks]
    md = [head, f"# Pruning pipelines on {(raw['_sources'][0]['settings'] or {}).get('model')} ({split} split)", "",
          "Sources: " + "; ".join(f"`{s['file']}` ({s['cpu']})" for s in raw["_sources"]), "",
          "Commands:", "", *[f"    {c}" for s in raw["_sources"] for c in s["commands"]], "",
          "## Dense", "", "| task | metric | " + " | ".join(_sets(raw, tasks, split)) + " |",
          "|---|---|" + "---|" * len(_sets(raw, tasks, split))]
    for t in tasks:
        sets = _sets(raw, tasks, split)
        md.append(f"| {NAMES.get(t, t)} | {main_key(t)} | " + " | ".join(
            f"{100 * raw[t]['dense'][s][main_key(t)]:.1f}" if s in raw[t]["dense"] else "" for s in sets) + " |")
    md += ["", "## Retained", "", *table(raw, headline, split)]
    extra = [t for t in tasks if t not in headline]
    if extra:
        md += table(raw, extra, split)
    if split == "dev":
        md += ["## Default vs Kwon et al.", "", *paired(raw, headline), "## Speed", "", *speed_table(raw, tasks),
               "## Unseen domains", "", *ood_table(raw), "## Cost", "", *cost_table(raw, tasks)]
        atomic_write_json(Path(out_dir) / "quality_summary.json", summary(raw, tasks))
        md += plot(raw, headline, split, Path(out_dir))
    write_text(Path(out_dir) / ("quality.md" if split == "dev" else "quality_selection.md"), "\n".join(md) + "\n")
