"""Where zoo models live and how they are found and loaded (no training here, no Lightning)."""

from __future__ import annotations

import os
from pathlib import Path

from taskprune.io import cache_dir  # noqa: F401  (re-exported: taskprune.zoo.cache_dir)

from taskprune.models.multitask import MultiTaskModel, load_dir, read_build_info
from taskprune.zoo.recipes import RECIPES


def default_out_dir(name: str) -> Path:
    return cache_dir() / name


def resolve_model_dir(path_or_name: str | os.PathLike) -> Path:
    """A folder as given, else ``<cache>/<name>``; ``ValueError`` if neither holds a model."""
    p = Path(path_or_name)
    if (p / "tasks.json").is_file():
        return p
    name = str(path_or_name)
    if (cache_dir() / name / "tasks.json").is_file():
        return cache_dir() / name
    known = f" Known zoo names: {sorted(RECIPES)}." if name not in RECIPES else ""
    raise ValueError(
        f"no multi-task model at {str(path_or_name)!r} (looked for a folder with tasks.json, then under "
        f"{cache_dir()}).{known} Build it with `python -m taskprune.zoo build {name}` or ensure_multitask({name!r})."
    )


def load_multitask(path_or_name: str | os.PathLike = "minilm-glue") -> MultiTaskModel:
    """Load a saved :class:`MultiTaskModel` (a folder, or a zoo name under :func:`cache_dir`) offline, in eval mode."""
    return load_dir(resolve_model_dir(path_or_name))


def selection_rows(path_or_name: str | os.PathLike, task: str, data_dir: str | os.PathLike):
    """The selection split of ``task``: the train rows the build set aside (``Recipe.reserve``), as a ``Dataset``
    with ``idx`` renumbered 0..n-1. ``ValueError`` when the model was built without a reserve for ``task``."""
    from taskprune.lightning.data import load_split

    info = read_build_info(resolve_model_dir(path_or_name)) or {}
    rows = info.get("selection_reserve", {}).get(task)
    if not rows:
        raise ValueError(f"model {str(path_or_name)!r} has no selection reserve for task {task!r} (its recipe "
                         f"reserves rows for {sorted(info.get('selection_reserve', {}))}); build a recipe with "
                         "reserve=((task, n), ...), e.g. minilm-glue-large.")
    return take_rows(load_split(task, "train", data_dir), rows)


def take_rows(ds, rows):
    """The rows of ``ds`` whose ``idx`` (row number in the file's labelled rows) is in ``rows``, in file order,
    ``idx`` renumbered 0..n-1."""
    out = ds.select(sorted(int(r) for r in rows))
    return out.remove_columns("idx").add_column("idx", list(range(len(out))))
