"""The project's multi-task models: one shared encoder, one small head per GLUE task (MT-DNN style).

    recipes.py   how each zoo model is trained (:class:`Recipe`, ``RECIPES``)
    cache.py     where built models live, finding and loading them, their selection split
    build.py     planning the rows, batching, fine-tuning (Lightning), build-time evaluation, saving
    __main__.py  ``python -m taskprune.zoo build|info NAME``

``python -m taskprune.zoo build minilm-glue`` fine-tunes all-MiniLM-L6-v2 (mean pooling, as the sentence
transformer does) with a ``Linear(384, n_labels)`` head per task, and saves the folder format of
:mod:`taskprune.models.multitask` under :func:`cache_dir` (``build.json``: recipe, its hash, data fingerprint, rows per task,
build time, dev metrics). Data comes from ``--data-dir``, else ``$TASKPRUNE_DATA``, else the embedded subsets. The
embedded train files hold exactly the rows the ``minilm-glue`` recipe draws from the full GLUE files (seeded, 1000
per task), and the recipe hash covers the *rows trained on*, not the files: a build from the embedded data and one
from the full data are the same recipe, the same cache folder and (on the same torch build and thread count) the
same weights. ``minilm-glue-large`` (the benchmarks' model) trains on every train row of the full data except a
seeded per-task selection reserve (:func:`selection_rows`), with size-aware sampling over several epochs.

    model = load_multitask("minilm-glue")          # MultiTaskModel: .encoder (BertModel), .heads, .tasks
    sst2 = model.for_task("sst2")                  # TaskModel sharing the encoder
    sst2(**batch).logits                           # [batch, 2]
"""

from taskprune.zoo.cache import cache_dir, default_out_dir, load_multitask, resolve_model_dir, selection_rows
from taskprune.zoo.recipes import RECIPES, Recipe, get_recipe

_BUILD = ("build_multitask", "ensure_multitask", "evaluate", "plan", "base_path")

__all__ = ["RECIPES", "Recipe", "cache_dir", "default_out_dir", "get_recipe", "load_multitask", "resolve_model_dir",
           "selection_rows", *_BUILD, "main"]


def _ensure(name: str):
    from taskprune.zoo.build import ensure_multitask

    return ensure_multitask(name)


#: the zoo as a named-model source of :func:`taskprune.models.load_task_model` (entry point ``taskprune.models``)
SOURCE = {"names": lambda: sorted(RECIPES), "load": _ensure}


def __getattr__(name: str):
    """The build (Lightning, training) loads only when asked for: loading a model does not import it."""
    if name in _BUILD:
        from taskprune.zoo import build

        return getattr(build, name)
    if name == "main":
        from taskprune.zoo.__main__ import main

        return main
    raise AttributeError(f"module 'taskprune.zoo' has no attribute {name!r}")
