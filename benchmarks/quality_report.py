"""Markdown tables and PNG plots from ``quality.json`` (see ``benchmarks/quality.py``)."""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

from taskprune.attribution import DEFAULT_BASELINE as IG_BASELINE

METHOD_ORDER = ("ig", "grad_x_gate", "fisher", "activation", "magnitude", "random")


def _label_ig_rows(raw: dict, settings: dict | None) -> dict:
    """Name each IG row by its path start, so files made under another default merge without ambiguity.

    The ``ig`` row of a file is taskprune's default *of that run* (``_settings["ig_baseline"]``; files made before it
    was recorded used 0). In the merged report ``ig`` is today's default; a row with another start becomes
    ``ig@baseline=<b>``; the IG ablation's steps / quadrature / aggregate rows gain their ``baseline=<b>``.
    """
    b = (settings or {}).get("ig_baseline", 0.0)
    out = {}
    for key, v in raw.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[1] in ("supervised", "unsupervised") and parts[2] == "ig" and b != IG_BASELINE:
            key = f"{key}@baseline={b:g}"
        elif len(parts) == 3 and parts[2] == f"ig@baseline={IG_BASELINE:g}":
            key = "/".join(parts[:2] + ["ig"])
        elif len(parts) == 4 and parts[1] == "ablation" and parts[2] in ("steps", "quadrature", "aggregate"):
            key = f"{key},baseline={b:g}"
        out[key] = v
    return out


def source(name: str, raw: dict) -> dict:
    """Pop a raw file's ``_settings`` / ``_commands`` into the report's description of where results came from."""
    return {"file": name, "settings": raw.pop("_settings", None), "commands": raw.pop("_commands", []),
            "keys": len(raw)}


def merge_raw(paths: list[str]) -> dict:
    """Raw files of ``benchmarks.quality`` as one results dict; a later file wins on a shared key.

    Dense metrics of one task merge set by set (a low-resource file holds only ``dev``); IG rows are named by their
    path start (:func:`_label_ig_rows`); a selection split that differs from one seen before keeps its own tables,
    tagged ``<task> [<file>]``.
    """
    merged, sources, splits = {}, [], {}
    for f in paths:
        raw = json.loads(Path(f).read_text())
        raw.pop("_settings_note", None)
        for key in [k for k in raw if k.endswith("/dense_select")]:  # another selection split: keep both
            task = key.split("/")[0]
            tag = splits.setdefault((task, json.dumps(raw[key])),
                                    task if not any(t == task for t, _ in splits) else f"{task} [{Path(f).stem}]")
            if tag != task:
                raw = {(tag + k[len(task):] if k.startswith(f"{task}/ablation/") or k == key else k): v
                       for k, v in raw.items()}
        sources.append(source(Path(f).name, raw))
        for key, value in _label_ig_rows(raw, sources[-1]["settings"]).items():
            merged[key] = {**merged[key], **value} if key.endswith("/dense") and key in merged else value
    merged["_sources"] = sources
    return merged


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _retained(value: float, dense: float) -> float | None:
    return None if not dense else value / dense


def _methods(results: dict, task: str) -> dict[str, list[dict]]:
    """method -> list of runs (random: one per seed)."""
    out: dict[str, list[dict]] = {}
    for key, v in results.items():
        m = re.fullmatch(rf"{task}/supervised/(.+)", key)
        if m:  # random0, random1, ... are seeds of one method; ig@baseline=0.5 is a variant of its own
            out.setdefault(re.sub(r"^random\d+$", "random", m.group(1)), []).append(v)
    return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def _summary(results: dict, tasks: list[str], cuts=("macs=0.2", "macs=0.4", "macs=0.6")) -> list[str]:
    """One row per task, one column per method: % of dense retained at three MAC cuts (the README's table)."""
    per_task = {t: _methods(results, t) for t in tasks}
    methods = sorted({m for ms in per_task.values() for m in ms}, key=_order)
    if not methods:
        return []
    out = ["\n## Summary: % of the dense metric retained at " + " / ".join(f"{float(c[5:]):.0%}" for c in cuts)
           + " MAC cuts\n", "| task (dense) | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for t, ms in per_task.items():
        dense = results[f"{t}/dense"]["dev"]
        cells = [" / ".join(_cell(ms[m], c, dense) for c in cuts) if m in ms else "—" for m in methods]
        out.append(f"| {t} ({100 * dense:.1f}) | " + " | ".join(cells) + " |")
    means = []  # per method and cut: the mean over tasks of the (seed-mean) % retained, where every task has it
    for m in methods:
        per_cut = []
        for c in cuts:
            vals = [statistics.mean(r["budgets"][c]["dev"] for r in ms[m]) / results[f"{t}/dense"]["dev"]
                    for t, ms in per_task.items() if m in ms and all(c in r["budgets"] for r in ms[m])]
            per_cut.append(f"{100 * statistics.mean(vals):.1f}" if len(vals) == len(per_task) else "—")
        means.append(" / ".join(per_cut))
    return out + ["| **mean over tasks** | " + " | ".join(means) + " |"]


def _order(method: str) -> tuple[int, str]:
    """METHOD_ORDER, a variant (``ig@baseline=0.5``) right after its method."""
    base = method.split("@")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), method)


def _cell(runs: list[dict], budget: str, dense: float, split: str = "dev") -> str:
    vals = [r["budgets"][budget][split] for r in runs if budget in r["budgets"] and split in r["budgets"][budget]]
    if not vals:
        return "—"
    kept = [100 * v / dense for v in vals] if dense else vals
    if len(kept) == 1:
        return f"{kept[0]:.1f}"
    return f"{statistics.mean(kept):.1f} ± {statistics.stdev(kept):.1f}"


def _budgets(runs: list[dict], prefix: str) -> list[str]:
    seen = []
    for r in runs:
        for b in r["budgets"]:
            if b.startswith(prefix + "=") and "," not in b and b not in seen:
                seen.append(b)
    return sorted(seen, key=lambda b: float(b.split("=")[1]))


def _sources(sources: list[dict]) -> list[str]:
    """Which raw file (settings, commands) the tables come from; a later file wins where two hold the same key."""
    if not sources:
        return []
    out = ["Raw results (merged in this order; a later file wins on a shared key):\n"]
    for s in sources:
        st = s.get("settings") or {}
        desc = ", ".join(f"{k} {v}" for k, v in st.items()) if st else "settings not recorded"
        out.append(f"- `{s['file']}` ({s['keys']} results; {desc}), made by:")
        out += [f"  - `{c}`" for c in s.get("commands", [])]
    return out + [""]


def render(results: dict, plot_dir: str | Path | None = "benchmarks/results") -> str:
    tasks = [k.split("/")[0] for k in results if k.endswith("/dense")]
    lines = ["# Quality: metric retained (% of the dense multi-task model) vs budget\n",
             *_sources(results.get("_sources", [])),
             "Encoder units removed physically; MAC cut of the prunable encoder at seq 128. Cells are % of the dense "
             "model's metric on the dev set (QQP: held-out train sample); random is mean ± std over 3 seeds.\n"]
    lines += _summary(results, tasks)
    best99 = {}
    for task in tasks:
        dense = results[f"{task}/dense"]
        methods = _methods(results, task)
        if not methods:
            continue
        any_runs = [r for rs in methods.values() for r in rs]
        cuts = _budgets(any_runs, "macs")
        lines.append(f"\n## {task} (dense dev {dense['dev']:.4f})\n")
        lines.append("| method | " + " | ".join(c.replace("macs=", "") for c in cuts) + " | s to score |")
        lines.append("|---" * (len(cuts) + 2) + "|")
        for m, runs in methods.items():
            secs = statistics.mean(r["seconds"] for r in runs)
            lines.append(f"| {m} | " + " | ".join(_cell(runs, c, dense["dev"]) for c in cuts) + f" | {secs:.0f} |")
            ok = [float(c.split("=")[1]) for c in cuts
                  if all(r["budgets"].get(c, {}).get("dev", 0) >= 0.99 * dense["dev"] for r in runs)]
            best99.setdefault(task, {})[m] = max(ok) if ok else 0.0
        unsup = {k.split("/", 2)[2]: v for k, v in results.items() if k.startswith(f"{task}/unsupervised/")}
        for m in sorted(unsup, key=_order):
            lines.append(f"| {m}, unsupervised (pseudo-labels) | " + " | ".join(
                _cell([unsup[m]], c, dense["dev"]) for c in cuts) + " | |")
        for kind in ("heads", "neurons"):
            sweep = _budgets(any_runs, kind)
            if sweep:
                lines.append(f"\n{kind}-only sweep (fraction of {kind} removed):\n")
                lines.append("| method | " + " | ".join(s.split("=")[1] for s in sweep) + " |")
                lines.append("|---" * (len(sweep) + 1) + "|")
                for m, runs in methods.items():
                    lines.append(f"| {m} | " + " | ".join(_cell(runs, s, dense["dev"]) for s in sweep) + " |")
        oods = [k for k in dense if k != "dev"]
        if oods and "ig" in methods:
            lines.append("\nUnseen domains (ig): % retained in-domain vs out-of-domain\n")
            lines.append("| MAC cut | dev | " + " | ".join(f"{o} (dense {dense[o]:.3f})" for o in oods) + " |")
            lines.append("|---" * (len(oods) + 2) + "|")
            for c in cuts:
                row = results[f"{task}/supervised/ig"]["budgets"].get(c, {})
                lines.append(f"| {c.split('=')[1]} | {_pct(_retained(row.get('dev', 0), dense['dev']))} | " +
                             " | ".join(_pct(_retained(row.get(o, 0), dense[o])) for o in oods) + " |")
    if best99:
        methods = sorted({m for v in best99.values() for m in v}, key=_order)
        lines.append("\n## Largest MAC cut keeping ≥ 99 % of the dense metric (of the cuts tried)\n")
        lines.append("| task | " + " | ".join(methods) + " |")
        lines.append("|---" * (len(methods) + 1) + "|")
        for task, v in best99.items():
            lines.append(f"| {task} | " + " | ".join(_pct(v.get(m)) if m in v else "—" for m in methods) + " |")
    lines += _low_resource(results)
    lines += _ablation(results)
    if plot_dir is not None:
        lines += _plots(results, Path(plot_dir), tasks)
    return "\n".join(lines) + "\n"


def _low_resource_rows(results: dict) -> dict[tuple, list[float]]:
    """(task, method, budget, k) -> % of dense per sampling seed."""
    rows: dict[tuple, list[float]] = {}
    for key, v in results.items():
        m = re.fullmatch(r"(\w+)/lowres/k=(\d+)/seed=(\d+)/(\w+)", key)
        if not m:
            continue
        task, k, _, method = m.groups()
        dense = results[f"{task}/dense"]["dev"]
        for b, r in v["budgets"].items():
            rows.setdefault((task, method, b, int(k)), []).append(100 * r["dev"] / dense)
    return rows


def _low_resource(results: dict) -> list[str]:
    rows = _low_resource_rows(results)
    if not rows:
        return []
    out = ["\n## Low-resource calibration (k labelled samples per class; mean ± std over sampling seeds)\n",
           "| task | method | MAC cut | " + " | ".join(f"k={k}" for k in sorted({r[3] for r in rows})) + " |"]
    ks = sorted({r[3] for r in rows})
    out.append("|---" * (len(ks) + 3) + "|")
    for task, method, b in sorted({r[:3] for r in rows}):
        cells = []
        for k in ks:
            v = rows.get((task, method, b, k))
            cells.append("—" if not v else f"{statistics.mean(v):.1f}" + (
                f" ± {statistics.stdev(v):.1f}" if len(v) > 1 else ""))
        out.append(f"| {task} | {method} | {b.split('=')[1]} | " + " | ".join(cells) + " |")
    return out


def _path_start_summary(results: dict) -> list[str]:
    """Where the IG path starts (``baseline``) vs the one-step methods, every task with that group, one table."""
    found: dict[str, dict[str, tuple[float, float]]] = {}  # split tag -> variant -> (40 %, 60 %) retained
    for key, v in results.items():
        m = re.fullmatch(r"(.+)/ablation/(?:steps/steps=4,baseline=|baseline/baseline=)([\d.]+)(?:,steps=4)?"
                         r"|(.+)/ablation/reference/method=(\w+)", key)
        if not m:
            continue
        tag, label = (m.group(1), f"ig, baseline {float(m.group(2)):g}") if m.group(1) else (m.group(3), m.group(4))
        dense = results.get(f"{tag}/dense_select", {}).get("select")
        if dense:
            found.setdefault(tag, {})[label] = tuple(100 * v["budgets"][f"macs={c}"]["select"] / dense
                                                     for c in (0.4, 0.6))
    best: dict[str, str] = {}  # task -> the split with the most path-start rows
    for tag, rows in found.items():
        task = tag.split(" ")[0]
        if sum(r.startswith("ig, baseline") for r in rows) > 1 and (
                task not in best or len(rows) > len(found[best[task]])):
            best[task] = tag
    if not best:
        return []
    variants = sorted({r for t in best.values() for r in found[t]}, key=lambda r: (not r.startswith("ig"), r))
    out = ["\n## IG path start (`baseline`) vs the one-step methods, selection splits (% retained at 40 / 60 % MAC cut)\n",
           "| variant | " + " | ".join(best) + " | mean |", "|---" * (len(best) + 2) + "|"]
    for r in variants:
        cells = [found[t].get(r) for t in best.values()]
        mean = "—" if None in cells else " / ".join(f"{statistics.mean(c[i] for c in cells):.1f}" for i in (0, 1))
        out.append(f"| {r} | " + " | ".join("—" if c is None else f"{c[0]:.1f} / {c[1]:.1f}" for c in cells)
                   + f" | {mean} |")
    return out


def _ablation(results: dict) -> list[str]:
    out = _path_start_summary(results)
    for key in [k for k in results if k.endswith("/dense_select")]:
        task = key.split("/")[0]
        dense = results[key]["select"]
        out += [f"\n## IG ablation on {task} (selection split from train, disjoint from calibration; dense "
                f"{dense:.4f}): % retained\n", "| variant | MAC cut 0.4 | MAC cut 0.6 | s to score |",
                "|---|---|---|---|"]
        for k, v in results.items():
            if not k.startswith(f"{task}/ablation/"):
                continue
            variant = k.split("/", 2)[2]
            b = v["budgets"]
            out.append(f"| {variant} | {_pct(b['macs=0.4']['select'] / dense)} | "
                       f"{_pct(b['macs=0.6']['select'] / dense)} | {v['seconds']:.0f} |")
            for extra in sorted({x.split(",", 1)[1] for x in b if "," in x}):
                out.append(f"| {variant}, {extra} | {_pct(b[f'macs=0.4,{extra}']['select'] / dense)} | "
                           f"{_pct(b[f'macs=0.6,{extra}']['select'] / dense)} | |")
    return out


def _style(ax, title: str, xlabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("% of dense metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def save_figure(plt, fig, path: Path) -> str:
    """Write a figure atomically (a temporary file in the same folder, then a rename); returns its file name."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)
    return path.name


def _plots(results: dict, out_dir: Path, tasks: list[str]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["\n(plots skipped: matplotlib is not installed; `pip install matplotlib`)"]
    made = []
    n = len(tasks)
    if n:
        fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.5), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            dense = results[f"{task}/dense"]["dev"]
            for m, runs in _methods(results, task).items():
                cuts = _budgets(runs, "macs")
                ys = [statistics.mean(r["budgets"][c]["dev"] for r in runs if c in r["budgets"]) / dense * 100
                      for c in cuts]
                ax.plot([float(c.split("=")[1]) * 100 for c in cuts], ys, marker="o", label=m)
            _style(ax, task, "encoder MAC cut (%)")
        made.append(save_figure(plt, fig, out_dir / "demo_model_vs_macs.png"))
    heat = [(task, kind, [k / n for k, n in results[f"{task}/supervised/ig"]["budgets"]["macs=0.4"][f"kept_{kind}"]
                          .values()])
            for task in tasks if "macs=0.4" in results.get(f"{task}/supervised/ig", {}).get("budgets", {})
            for kind in ("heads", "neurons")]
    if heat:  # tasks x layers: which layers each task keeps (ig, 40 % MAC cut)
        grid = [row for _, _, row in heat]
        fig, ax = plt.subplots(figsize=(1.2 + 0.7 * max(map(len, grid)), 0.8 + 0.32 * len(heat)))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(heat)), [f"{t} {k}" for t, k, _ in heat], fontsize=7)
        ax.set_xticks(range(len(grid[0])), [str(i) for i in range(len(grid[0]))])
        ax.set_xlabel("layer")
        ax.set_title("fraction of units kept (ig, 40 % MAC cut)", fontsize=9)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
        fig.colorbar(im, ax=ax)
        made.append(save_figure(plt, fig, out_dir / "demo_model_kept_per_layer.png"))
    low = _low_resource_rows(results)
    if low:
        panels = sorted({(t, b) for t, _, b, _ in low})
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
        for ax, (task, b) in zip(axes[0], panels):
            for method in sorted({m for t, m, bb, _ in low if (t, bb) == (task, b)}):
                ks = sorted(k for t, m, bb, k in low if (t, m, bb) == (task, method, b))
                vals = [low[(task, method, b, k)] for k in ks]
                ax.errorbar(ks, [statistics.mean(v) for v in vals],
                            yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], marker="o", capsize=3,
                            label=method)
            ax.set_xscale("log", base=2)
            _style(ax, f"{task}, {b.replace('macs=', 'MAC cut ')}", "labelled samples per class")
        made.append(save_figure(plt, fig, out_dir / "demo_model_low_resource.png"))
    return ["\nPlots: " + ", ".join(f"[{m}]({m})" for m in made)] if made else []
