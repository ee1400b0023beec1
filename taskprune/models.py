"""Loading the model of one task and reading its limits (head size, position and vocabulary limits).

``load_task_model`` resolves a taskprune multi-task model (zoo name or folder: the task's head) or any local / hub
sequence-classification model. The limits are read from the model's config and embeddings without running it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from taskprune.arch import find_base


def load_task_model(name_or_path: str, task: str, trust_remote_code: bool = False) -> tuple[nn.Module, str]:
    """``(model, tokenizer_path)`` for a task: a taskprune multi-task model (name or folder) picks the task's head;
    any other folder or hub id is loaded as ``AutoModelForSequenceClassification`` (local files work offline)."""
    from taskprune import zoo

    folder = Path(name_or_path)
    if name_or_path in zoo.RECIPES or (folder / "tasks.json").is_file():
        multitask = zoo.ensure_multitask(name_or_path) if name_or_path in zoo.RECIPES else \
            zoo.load_multitask(name_or_path)
        return multitask.for_task(task), str(multitask.tokenizer_path)
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ValueError(
            f"cannot load model {name_or_path!r}: {e}. Pass a local folder (config.json + safetensors), a "
            f"taskprune multi-task model ({sorted(zoo.RECIPES)}), or a hub id when online."
        ) from e
    return model, name_or_path


def head_size(model: nn.Module) -> int | None:
    """Number of outputs of the model's task head, when it can be read without running the model."""
    n = getattr(model, "num_labels", None)
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


__all__ = ["load_task_model", "head_size", "max_positions", "vocab_rows"]
