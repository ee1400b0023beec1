"""Rich tables (and, for benchmarks, matplotlib plots): the only module that imports them; report files for scripts."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _fmt(x, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def comparison_table(rows: list[dict], size: dict | None = None, title: str = "taskprune: dense vs pruned") -> Table:
    """``rows``: ``{"set", "kind", "metric", "dense", "pruned"[, "note"]}``; ``size``: params / MACs / throughput per
    model. When no row has a pruned value (no spec was applied) only the dense column is shown, and the caption says
    so; a row's ``note`` (e.g. MCC undefined on a set of one class) goes to the caption."""
    records = report_rows(rows)
    dense_only = bool(records) and all(r["pruned"] is None for r in records)
    notes = sorted({r["note"] for r in records if r["note"] and not r["note"].startswith("no spec applied")})
    caption = ["no spec was applied: the dense model only (run fit first, or point pruning.output_dir at a fit's "
               "spec)"] if dense_only else []
    table = Table(title=title, caption="\n".join(caption + notes) or None)
    columns = (("task / dataset", "left"), ("metric", "left"), ("dense", "right"))
    if not dense_only:
        columns += (("pruned", "right"), ("Δ", "right"), ("% retained", "right"))
    for col, just in columns:
        table.add_column(col, justify=just)
    for r in records:
        name = r["set"] if r["kind"] == "in-domain" else f"{r['set']} (OOD)"
        kept = r["retained_pct"]
        cells = [name, r["metric"], _fmt(r["dense"])]
        if not dense_only:
            cells += [_fmt(r["pruned"]), _fmt(r["delta"]), "—" if kept is None else f"{kept:.1f}"]
        table.add_row(*cells)
    if size and dense_only:
        table.add_section()
        for key, label, scale, unit in (("params", "parameters", 1e6, "M"),
                                        ("macs", f"MACs (seq {size.get('seq_len', 128)})", 1e9, "G"),
                                        ("throughput", "throughput", 1, " samples/s")):
            v = size.get(f"{key}_pruned")  # without a spec the model evaluated is the dense one
            if v is not None:
                table.add_row(label, "", f"{v / scale:.2f}{unit}")
    elif size:
        table.add_section()
        for key, label, scale, unit in (("params", "parameters", 1e6, "M"), ("macs", f"MACs (seq {size.get('seq_len', 128)})", 1e9, "G"),
                                        ("throughput", "throughput", 1, " samples/s")):
            d, p = size.get(f"{key}_dense"), size.get(f"{key}_pruned")
            if p is None:
                continue
            ratio = "—" if not d else f"{p / d:.2f}×"
            table.add_row(label, "", "—" if d is None else f"{d / scale:.2f}{unit}", f"{p / scale:.2f}{unit}", "",
                          ratio)
    return table


REPORT_COLUMNS = ("set", "kind", "metric", "dense", "pruned", "delta", "retained_pct", "note")


def report_rows(rows: list[dict]) -> list[dict]:
    """The table's rows as plain records: :data:`REPORT_COLUMNS` (``delta`` / ``retained_pct`` ``None`` when a
    dense or pruned value is missing; ``pruned`` ``None`` when no spec was applied; ``note`` says why)."""
    out = []
    for r in rows:
        dense, pruned = r["dense"], r["pruned"]
        both = dense is not None and pruned is not None
        out.append({"set": r["set"], "kind": r["kind"], "metric": r["metric"], "dense": dense, "pruned": pruned,
                    "delta": pruned - dense if both else None,
                    "retained_pct": 100 * pruned / dense if both and dense else None, "note": r.get("note", "")})
    return out


def write_report(rows: list[dict], size: dict | None, folder: str | os.PathLike, stage: str = "test",
                 meta: dict | None = None) -> list[Path]:
    """Write the rows of :func:`comparison_table` to ``<folder>/<stage>_report.json`` (rows, sizes, ``meta``) and
    ``<folder>/<stage>_report.csv`` (one line per set and metric), each atomically. Returns the two paths."""
    from taskprune.io import atomic_write_bytes

    folder = Path(folder)
    records = report_rows(rows)
    json_path, csv_path = folder / f"{stage}_report.json", folder / f"{stage}_report.csv"
    doc = {**(meta or {}), "rows": records, "size": dict(size or {})}
    atomic_write_bytes(json_path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in records)
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    return [json_path, csv_path]


def print_table(table: Table) -> None:
    Console().print(table)


def rich_logging(level: int = 20) -> None:
    """Root logging through rich (for command-line entry points; library code only logs)."""
    import logging

    from rich.logging import RichHandler

    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(show_path=False)])


def print_json(data, title: str | None = None) -> None:
    """``title`` (rich markup) then ``data`` as highlighted JSON."""
    console = Console()
    if title:
        console.print(title)
    console.print_json(data=data)
