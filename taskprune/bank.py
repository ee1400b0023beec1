"""MaskBank: one dense base model and one :class:`~taskprune.spec.PruneSpec` per task.

Storing a pruned copy per task costs a model per task; a spec costs a few kilobytes of JSON. The bank keeps one base
in memory and switches tasks by swapping soft masks (:func:`~taskprune.surgery.apply_mask`: gate hooks, no weight is
copied or changed); when a task needs real speed, :meth:`MaskBank.export` writes a physically shrunk copy.

Example::

    bank = MaskBank(model)
    bank.add("sst2", PruneSpec.load("runs/sst2/spec.json"))
    bank.add("mnli", PruneSpec.load("runs/mnli/spec.json"))
    bank.activate("sst2")      # model(**batch) now runs with sst2's units only
    bank.deactivate()          # the dense model again, bit for bit
    bank.save("bank/")         # index.json + one <task>.json per spec
    bank = MaskBank.load("bank/", model)
    bank.export("mnli", "mnli-pruned/")   # a shrunk copy; reload with taskprune.export.load_pruned
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from pathlib import Path

from torch import nn

from taskprune.arch import get_architecture
from taskprune.export import atomic_dir, save_pruned
from taskprune.io import atomic_write_json
from taskprune.spec import PruneSpec, fingerprint_diff
from taskprune.surgery import active_mask, apply_mask, remove_mask, shrink_

log = logging.getLogger(__name__)

FORMAT = "taskprune.bank/1"
INDEX_FILE = "index.json"
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a task name is also a file name in a saved bank


class MaskBank:
    """One dense base model and one spec per task; at most one task's mask is active at a time.

    Args:
        model: the dense Hugging Face model (or a module holding one, e.g. a :class:`taskprune.models.multitask.TaskModel`)
            that every spec was made for. The bank installs and removes masks on it; it never changes a weight.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch nn.Module holding a Hugging Face model, got {type(model).__name__}")
        if active_mask(model) is not None:
            raise ValueError("the model already carries a mask (apply_mask); call taskprune.surgery.remove_mask(model) "
                             "first so the bank starts from the dense model")
        self.model = model
        self.fingerprint = get_architecture(model).fingerprint()
        self.specs: dict[str, PruneSpec] = {}
        self._active: str | None = None

    # ------------------------------------------------------------------ tasks
    @property
    def tasks(self) -> list[str]:
        return list(self.specs)

    @property
    def active(self) -> str | None:
        """The task whose mask is on the model, or None (dense)."""
        return self._active

    def __len__(self) -> int:
        return len(self.specs)

    def __contains__(self, task: str) -> bool:
        return task in self.specs

    def add(self, task: str, spec: PruneSpec, replace: bool = False) -> None:
        """Add ``task``'s spec, checked against the base model (``ValueError`` for a spec of another model)."""
        if not isinstance(task, str) or not _TASK_NAME.match(task):
            raise ValueError(f"task name {task!r} is not allowed; use letters, digits, '_', '.', '-' (it becomes a "
                             "file name when the bank is saved)")
        if not isinstance(spec, PruneSpec):
            raise TypeError(f"expected a taskprune PruneSpec for task {task!r}, got {type(spec).__name__}; load one "
                            "with PruneSpec.load")
        if spec.columns or spec.biases:
            raise ValueError(f"the spec for task {task!r} holds refitted weight columns or biases (TuningConfig(fit="
                             f"{spec.meta.get('tuned', {}).get('fit', 'columns')!r})), "
                             "which masks on the bank's one shared model cannot express (the default pipeline refits "
                             "them); prune with preset 'taskprune_notune' (or tuning fit='scales') for a bank, or "
                             "export that task's model with save_pruned")
        if task in self.specs and not replace:
            raise ValueError(f"the bank already has a spec for task {task!r}; pass replace=True to replace it")
        diffs = fingerprint_diff(spec.fingerprint, self.fingerprint)
        if diffs:
            raise ValueError(f"the spec for task {task!r} was made for another model: {'; '.join(diffs[:3])}. A bank "
                             "holds specs of its one base model only")
        self.specs[task] = spec
        if self._active == task:  # replaced the active task's spec: show the new mask
            self.activate(task)

    def get(self, task: str) -> PruneSpec:
        """The spec of ``task`` (``ValueError`` listing the known tasks if there is none)."""
        if task not in self.specs:
            raise ValueError(f"unknown task {task!r}; the bank has {self.tasks or 'no tasks'}. Add it with "
                             "bank.add(task, spec)")
        return self.specs[task]

    def remove(self, task: str) -> None:
        """Drop ``task``'s spec (deactivating it first if it is active)."""
        self.get(task)
        if self._active == task:
            self.deactivate()
        del self.specs[task]

    # ------------------------------------------------------------------ masks
    def activate(self, task: str) -> None:
        """Switch the model to ``task``: its spec's mask replaces the active one (no weight is copied)."""
        spec = self.get(task)
        apply_mask(self.model, spec)  # replaces any earlier mask
        self._active = task
        log.info("mask bank: %s active", task)

    def deactivate(self) -> None:
        """Remove the active mask: the model is the dense base again, bit for bit."""
        remove_mask(self.model)
        self._active = None

    # ------------------------------------------------------------------ export / persistence
    def export(self, task: str, path: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
        """Write a physically shrunk copy of the base for ``task`` to the folder ``path``
        (:func:`taskprune.export.save_pruned`); the base model and the active mask are left as they are."""
        spec = self.get(task)
        active = self._active
        remove_mask(self.model)  # copy the dense weights, not the gate hooks
        try:
            pruned = copy.deepcopy(self.model)
        finally:
            if active is not None:
                apply_mask(self.model, self.specs[active])
        shrink_(pruned, spec)
        return save_pruned(pruned, spec, path, tokenizer=tokenizer, overwrite=overwrite)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the specs to the folder ``path`` (atomically): ``<task>.json`` per task and ``index.json``
        (format, the base model's fingerprint, the tasks in order with their files). ``overwrite`` replaces only an
        empty folder or an earlier bank (its ``.taskprune`` marker), never a folder with other files."""
        with atomic_dir(path, overwrite, marker="bank") as tmp:
            for task, spec in self.specs.items():
                spec.save(tmp / f"{task}.json")
            atomic_write_json(tmp / INDEX_FILE, {"format": FORMAT, "fingerprint": self.fingerprint,
                                                 "tasks": [{"task": t, "file": f"{t}.json"} for t in self.specs]})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module) -> MaskBank:
        """A bank over ``model`` with the specs saved in ``path`` by :meth:`save` (each checked against ``model``)."""
        folder = Path(path)
        index_file = folder / INDEX_FILE
        if not index_file.is_file():
            raise FileNotFoundError(f"{str(index_file)!r} is missing; pass a folder written by MaskBank.save")
        try:
            index = json.loads(index_file.read_text())
            if index.get("format") != FORMAT:
                raise ValueError(f"format {index.get('format')!r}, expected {FORMAT!r}")
            tasks = [(str(e["task"]), str(e["file"])) for e in index["tasks"]]  # a list: keeps the tasks' order
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{str(index_file)!r} is not a mask bank index ({e}); write it with MaskBank.save") \
                from None
        bank = cls(model)
        diffs = fingerprint_diff(index.get("fingerprint", {}), bank.fingerprint)
        if diffs:
            raise ValueError(f"the bank in {str(folder)!r} was saved for another model: {'; '.join(diffs[:3])}")
        for task, name in tasks:
            file = folder / Path(name).name  # never outside the folder
            if not file.is_file():
                raise FileNotFoundError(f"{str(file)!r} is missing; {str(index_file)!r} lists it for task {task!r}")
            bank.add(task, PruneSpec.load(file))
        return bank

    def __repr__(self) -> str:
        return f"MaskBank({self.fingerprint['model_type']}, tasks={self.tasks}, active={self._active!r})"


__all__ = ["MaskBank"]
