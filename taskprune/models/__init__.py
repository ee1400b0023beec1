"""Loading the model of one task, matching its labels to the task's, and reading its limits.

``load_task_model`` resolves a taskprune multi-task model (zoo name or folder: the head named like the task, or the
one the task's ``head`` names) or any local / hub sequence-classification model. ``label_order`` matches the model's
own label names (``config.id2label``) to the task's. The limits (head size, positions, vocabulary) are read from the
config and embeddings without running it. A truncated or corrupt ``*.safetensors`` file is named in a ``ValueError``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torch import nn

from taskprune.arch import find_base

log = logging.getLogger(__name__)

ENTRY_POINTS = "taskprune.models"
"""Entry-point group of named model sources: ``{"names": () -> list[str], "load": (name) -> MultiTaskModel}``. The
project's zoo registers itself there (pyproject.toml), so loading a model never imports the zoo's code by name."""


def model_sources() -> dict[str, dict]:
    """The installed named-model sources (:data:`ENTRY_POINTS`), by entry-point name."""
    from importlib.metadata import entry_points

    return {ep.name: ep.load() for ep in entry_points(group=ENTRY_POINTS)}


def load_task_model(name_or_path: str, task: str, trust_remote_code: bool = False, head: str | None = None,
                    labels: Sequence[str] | None = None) -> tuple[nn.Module, str | None]:
    """``(model, tokenizer_path)`` for a task: a taskprune multi-task model (a name of an installed model source, e.g.
    the project's zoo, built on first use; or a folder with ``tasks.json``) picks the head ``head`` (default: the head
    named ``task``, see :func:`task_head`; ``labels``, the task's, only for the hint of a missing head); any other folder or hub id is loaded as
    ``AutoModelForSequenceClassification`` (local files work offline), which has one head: a ``head`` is refused.

    ``ValueError`` (one line, with what to do) for a model that cannot be found, a missing head, and a truncated or
    corrupt ``*.safetensors`` file (named)."""
    folder = Path(name_or_path)
    multitask = None
    if (folder / "tasks.json").is_file():
        from taskprune.models.multitask import load_dir

        multitask = load_dir(folder)
    else:
        sources = model_sources()
        source = next((s for s in sources.values() if name_or_path in s["names"]()), None)
        if source is not None:
            multitask = source["load"](name_or_path)
    if multitask is not None:
        tokenizer = None if multitask.tokenizer_path is None else str(multitask.tokenizer_path)
        return task_head(multitask, task, head, repr(name_or_path), labels), tokenizer
    if head is not None:
        raise ValueError(
            f"head {head!r} picks a head of a taskprune multi-task model ({known_names()}, or a folder with "
            f"tasks.json), but {name_or_path!r} is not one: a sequence-classification model has one head, which "
            "reads the task. Remove `head:` from the task definition (and leave out --model.head) for this model."
        )
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ValueError(
            f"cannot load model {name_or_path!r}: {e}. Pass a local folder (config.json + safetensors), a "
            f"taskprune multi-task model ({known_names()}), or a hub id when online."
        ) from e
    except SafetensorError as e:
        raise corrupt_weights(folder, e, "copy the model folder again (or download it again, or save it again with "
                                         "save_pretrained)") from None
    return model, name_or_path


def task_head(multitask: nn.Module, task: str, head: str | None = None, model_name: str = "the model",
              labels: Sequence[str] | None = None) -> nn.Module:
    """The :class:`~taskprune.models.multitask.TaskModel` of ``multitask`` that reads ``task``: the head ``head``,
    else the head named ``task``. ``ValueError`` naming the head asked for, the model's heads and what to set (the
    example is a head whose label names are the task's ``labels`` when there is one)."""
    want = head if head is not None else task
    heads = list(multitask.task_names)
    if want not in heads:
        if head is None:
            same = [h for h in heads if labels is not None and
                    sorted(n.lower() for n in multitask.tasks[h].label_names) == sorted(n.lower() for n in labels)]
            example = f"e.g. head: {same[0]}, whose labels are the task's" if same else f"e.g. head: {heads[0]}"
            raise ValueError(
                f"the multi-task model {model_name} has no head named like task {task!r}; its heads: {heads}. Say "
                f"which head reads this task: `head: <one of them>` in the task definition ({example}), or "
                "--model.head <one of them>."
            )
        raise ValueError(
            f"the multi-task model {model_name} has no head {head!r} (asked for to read task {task!r}); its "
            f"heads: {heads}. Set `head: <one of them>` in the task definition, or --model.head <one of them>."
        )
    if want != task:
        log.info("task %r is read by the head %r of the multi-task model %s (its labels %s)", task, want, model_name,
                 list(multitask.tasks[want].label_names))
    return multitask.for_task(want)


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a ``.safetensors`` file (too short, a header that does not cover the file), or ``None``
    when its header reads and its size is the one the header describes. Reads the header only."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            first = f.read(8)
            if len(first) < 8:
                return f"it holds {size} bytes, fewer than a safetensors header"
            n = int.from_bytes(first, "little")
            if n > size - 8:
                return f"it holds {size} bytes but its header alone says {8 + n}"
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return f"its header cannot be read ({type(e).__name__}: {e})"
    if 8 + n + end != size:
        return f"it holds {size} of the {8 + n + end} bytes its header describes"
    return None


def corrupt_weights(folder: str | os.PathLike, error: Exception, fix: str) -> ValueError:
    """The one-line ``ValueError`` for a safetensors read that failed (``error``) under ``folder``: names the bad
    file(s) when ``folder`` is a local folder, says they are truncated or corrupt, and what to do (``fix``)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    bad = [(f, p) for f in files if (p := safetensors_problem(f)) is not None]
    if bad:
        what = "; ".join(f"{str(f)!r} is truncated or corrupt: {p}" for f, p in bad)
    else:
        what = f"a weights file of {str(folder)!r} is truncated or corrupt"
    return ValueError(f"{what} (safetensors: {error}). {fix[0].upper()}{fix[1:]}.")


def known_names() -> list[str]:
    """Every name the installed model sources know."""
    return sorted(n for s in model_sources().values() for n in s["names"]())


def head_size(model: nn.Module) -> int | None:
    """Number of outputs of the model's task head, when it can be read without running the model."""
    n = getattr(model, "num_labels", None)
    if isinstance(n, int):
        return n
    n = getattr(getattr(model, "info", None), "n_labels", None)  # a multi-task model's head (TaskModel)
    if isinstance(n, int):
        return n
    return getattr(getattr(model, "config", None), "num_labels", None)


def max_positions(model: nn.Module) -> int | None:
    """Longest input (tokens) the model's position embeddings take, or ``None`` when unbounded (relative positions).

    RoBERTa-style embeddings number positions from ``padding_idx + 1``, so they take ``padding_idx + 1`` fewer.
    """
    base = find_base(model)[0]
    n = getattr(base.config, "max_position_embeddings", None)
    if not isinstance(n, int):
        return None
    offset = getattr(getattr(base, "embeddings", None), "padding_idx", None)
    return n - (offset + 1) if isinstance(offset, int) else n


def vocab_rows(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (token ids it can take), or ``None`` when it cannot be read."""
    try:
        n = getattr(find_base(model)[0].get_input_embeddings(), "num_embeddings", None)
    except (NotImplementedError, AttributeError):
        return None
    return n if isinstance(n, int) else None


_GENERIC = re.compile(r"^label_?\d+$", re.IGNORECASE)  # transformers' default id2label: LABEL_0, LABEL_1...


def model_label_names(model: nn.Module) -> list[str] | None:
    """The model's own label names in output order (``config.id2label``, or a taskprune head's), or ``None`` when
    it has none or only transformers' placeholders (``LABEL_0``...)."""
    info = getattr(model, "info", None)
    names = list(getattr(info, "label_names", ()) or ())
    if not names:
        id2label = getattr(getattr(model, "config", None), "id2label", None)
        if isinstance(id2label, Mapping) and id2label:
            try:
                names = [str(id2label[k]) for k in sorted(id2label, key=int)]
            except (TypeError, ValueError):
                return None
    if not names or all(_GENERIC.match(n) for n in names):
        return None
    return names


def label_order(model: nn.Module, labels: Sequence[str], label_map: Mapping[str, str | int] | None = None,
                task: str = "the task") -> list[int] | None:
    """For each of the task's ``labels`` (in order), the index of the model's output that predicts it; ``None``
    when that is the identity (nothing to reorder).

    ``label_map`` (task label name -> model label name or output index) decides when given. Otherwise the model's
    own label names are matched to ``labels`` case-insensitively; a model without names (``LABEL_0``...) is taken in
    the task's order. ``ValueError`` before any work when the names or counts do not match.
    """
    names = model_label_names(model)
    n_out = head_size(model)
    if n_out is None and names is not None:
        n_out = len(names)
    if label_map is not None:
        if not isinstance(label_map, Mapping) or {str(k) for k in label_map} != set(labels):
            raise ValueError(f"label_map must map each label of {task} {list(labels)} to a model label or output "
                             f"index, got {dict(label_map) if isinstance(label_map, Mapping) else label_map!r}")
        lower = [n.lower() for n in names] if names is not None else []
        order = []
        for lab in labels:
            v = label_map[lab]
            if isinstance(v, int) and not isinstance(v, bool):
                i = v
            elif isinstance(v, str) and v.lower() in lower:
                i = lower.index(v.lower())
            elif isinstance(v, str) and v.isdigit():
                i = int(v)
            else:
                raise ValueError(f"label_map maps {lab!r} to {v!r}, which is neither a label of the model "
                                 f"({names or 'it has no label names'}) nor an output index")
            if n_out is not None and not 0 <= i < n_out:
                raise ValueError(f"label_map maps {lab!r} to output {i}, but the model has {n_out} outputs")
            order.append(i)
        if len(set(order)) != len(order):
            raise ValueError(f"label_map maps two labels to the same model output: {dict(label_map)}")
        return None if order == list(range(n_out if n_out is not None else len(order))) else order
    if names is None:
        return None
    lower = [n.lower() for n in names]
    if len(names) != len(labels) or sorted(lower) != sorted(lab.lower() for lab in labels):
        raise ValueError(
            f"the model's labels {names} (config.id2label) do not match the labels of {task} {list(labels)}; "
            "pass --model.label_map (task label -> model label or output index), e.g. "
            + "{" + ", ".join(f"{lab}: {names[i] if i < len(names) else i}" for i, lab in enumerate(labels)) + "}"
        )
    order = [lower.index(lab.lower()) for lab in labels]
    return None if order == list(range(len(names))) else order


def reorder_logits(forward: Callable, order: Sequence[int]) -> Callable:
    """``forward`` whose outputs' logits are ``logits[..., order]``: the model's outputs in the task's label order."""
    index = list(order)

    def forward_in_task_order(model: nn.Module, batch: dict):
        out = forward(model, batch)
        if hasattr(out, "logits"):
            out.logits = out.logits[..., index]
            return out
        return out[..., index]

    return forward_in_task_order


__all__ = ["load_task_model", "task_head", "safetensors_problem", "corrupt_weights", "head_size", "max_positions",
           "vocab_rows", "model_label_names", "label_order", "reorder_logits"]
