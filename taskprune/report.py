"""Rich tables (and, for benchmarks, matplotlib plots): the only module that imports them."""

from __future__ import annotations

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
    for r in rows:
        dense, pruned = r["dense"], r["pruned"]
        delta = None if dense is None else pruned - dense
        kept = None if not dense else 100 * pruned / dense
        name = r["set"] if r["kind"] == "in-domain" else f"{r['set']} (OOD)"
        table.add_row(name, r["metric"], _fmt(dense), _fmt(pruned), _fmt(delta, 4) if delta is not None else "—",
                      "—" if kept is None else f"{kept:.1f}")
    if size:
        table.add_section()
        for key, label, scale, unit in (("params", "parameters", 1e6, "M"), ("macs", "MACs (seq 128)", 1e9, "G"),
                                        ("throughput", "throughput", 1, " samples/s")):
            d, p = size.get(f"{key}_dense"), size.get(f"{key}_pruned")
            if p is None:
                continue
            ratio = "—" if not d else f"{p / d:.2f}×"
            table.add_row(label, "", "—" if d is None else f"{d / scale:.2f}{unit}", f"{p / scale:.2f}{unit}", "",
                          ratio)
    return table


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
