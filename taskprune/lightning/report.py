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
    """``rows``: ``{"set", "kind", "metric", "dense", "pruned"}``; ``size``: params / MACs / throughput per model."""
    table = Table(title=title)
    for col, just in (("task / dataset", "left"), ("metric", "left"), ("dense", "right"), ("pruned", "right"),
                      ("Δ", "right"), ("% retained", "right")):
        table.add_column(col, justify=just)
    for r in report_rows(rows):
        name = r["set"] if r["kind"] == "in-domain" else f"{r['set']} (OOD)"
        kept = r["retained_pct"]
        table.add_row(name, r["metric"], _fmt(r["dense"]), _fmt(r["pruned"]), _fmt(r["delta"]),
                      "—" if kept is None else f"{kept:.1f}")
    if size:
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


REPORT_COLUMNS = ("set", "kind", "metric", "dense", "pruned", "delta", "retained_pct")


def report_rows(rows: list[dict]) -> list[dict]:
    """The table's rows as plain records: :data:`REPORT_COLUMNS` (``delta`` / ``retained_pct`` ``None`` when there
    is no dense value)."""
    out = []
    for r in rows:
        dense, pruned = r["dense"], r["pruned"]
        out.append({"set": r["set"], "kind": r["kind"], "metric": r["metric"], "dense": dense, "pruned": pruned,
                    "delta": None if dense is None else pruned - dense,
                    "retained_pct": None if not dense else 100 * pruned / dense})
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
