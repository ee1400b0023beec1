"""``python -m taskprune.zoo build|info NAME`` (also the ``taskprune-zoo`` command)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace

from taskprune.models.multitask import read_build_info
from taskprune.zoo.cache import resolve_model_dir
from taskprune.zoo.recipes import RECIPES


def main(argv: list[str] | None = None) -> None:
    """``taskprune-zoo build|info NAME``."""
    from taskprune.lightning.report import print_json, rich_logging
    from taskprune.zoo.build import build_multitask

    rich_logging(logging.INFO)
    p = argparse.ArgumentParser(prog="python -m taskprune.zoo",
                                description="Build or inspect the project's multi-task models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="fine-tune and save a zoo model")
    b.add_argument("name", choices=sorted(RECIPES))
    b.add_argument("--data-dir", default=None,
                   help="GLUE-layout data folder (default: $TASKPRUNE_DATA, else the embedded subsets)")
    b.add_argument("--out", default=None, help="output folder (default: $TASKPRUNE_CACHE or ~/.cache/taskprune)")
    b.add_argument("--force", action="store_true", help="replace an existing build with a different recipe")
    b.add_argument("--rows-per-task", type=int, default=None, help="override the recipe (changes its hash)")
    b.add_argument("--epochs", type=int, default=None, help="override the recipe (changes its hash)")
    i = sub.add_parser("info", help="show a built model's build.json")
    i.add_argument("name")
    args = p.parse_args(argv)
    if args.cmd == "build":
        recipe = RECIPES[args.name]
        if args.rows_per_task is not None:
            recipe = replace(recipe, rows_per_task=args.rows_per_task)
        if args.epochs is not None:
            recipe = replace(recipe, epochs=args.epochs)
        path = build_multitask(args.name, args.data_dir, args.out, args.force, recipe)
        print_json(read_build_info(path), title=f"[bold green]built[/] {path}")
    else:
        print_json(read_build_info(resolve_model_dir(args.name)))


if __name__ == "__main__":
    main()
