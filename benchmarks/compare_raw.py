"""Reproducibility check: the cells two raw quality files share, compared exactly.

    python -m benchmarks.compare_raw NEW.json OLD.json [OLD2.json ...] --out benchmarks/results/repro.md

``NEW`` is a raw file of ``benchmarks.quality`` (for example a rerun of some methods on another machine); the ``OLD``
files are merged in order (a later one wins on a shared key), plainly: unlike ``--render`` no row is renamed, so
compare files made under the same taskprune defaults. Every metric that both hold (dense and pruned, every budget,
dev and out-of-domain sets) is compared; the report lists how many are equal and every one that is not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import header, write_text

SKIP = {"achieved_macs", "kept_heads", "kept_neurons"}  # spec facts, not metrics (equal specs give equal metrics)


def cells(raw: dict) -> dict[tuple, float]:
    """(result key, budget, eval set) -> metric, for every metric in a raw file."""
    out = {}
    for key, v in raw.items():
        if key.startswith("_") or not isinstance(v, dict):
            continue
        if "budgets" in v:
            for budget, sets in v["budgets"].items():
                out |= {(key, budget, s): x for s, x in sets.items() if s not in SKIP}
        else:  # dense metrics: {set: value}
            out |= {(key, "", s): x for s, x in v.items() if isinstance(x, (int, float))}
    return out


def compare(new: dict, old: dict) -> tuple[int, list[tuple]]:
    a, b = cells(new), cells(old)
    shared = sorted(set(a) & set(b))
    return len(shared), [(k, b[k], a[k]) for k in shared if a[k] != b[k]]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("new")
    p.add_argument("old", nargs="+")
    p.add_argument("--out", default=None, help="Markdown report (default: print only)")
    args = p.parse_args(argv)
    old: dict = {}
    made_by = []
    for f in args.old:
        raw = json.loads(Path(f).read_text())
        made_by += raw.get("_commands", [])
        old |= raw
    new = json.loads(Path(args.new).read_text())
    n, diff = compare(new, old)
    if n == 0:
        raise SystemExit(f"{args.new} shares no result with {args.old}: nothing to compare; rerun the same tasks, "
                         "methods and settings as the old files")
    lines = [f"# Reproducibility: `{Path(args.new).name}` vs `{', '.join(Path(f).name for f in args.old)}`\n",
             "New file made by: " + "; ".join(f"`{c}`" for c in new.get("_commands", [])) + "\n",
             "Old files made by: " + "; ".join(f"`{c}`" for c in made_by) + "\n",
             f"**{n - len(diff)} of {n}** shared metric cells are exactly equal "
             f"({len({k[0] for k in cells(new)} & {k[0] for k in cells(old)})} results compared).\n"]
    if diff:
        lines += ["| result | budget | set | old | new |", "|---|---|---|---|---|"]
        lines += [f"| {k[0]} | {k[1] or 'dense'} | {k[2]} | {o:.4f} | {x:.4f} |" for k, o, x in diff]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_text(args.out, header("compare_raw", argv) + text)


if __name__ == "__main__":
    main()
