"""A multi-task model: one shared encoder, one small linear head per task (MT-DNN style), and its folder format.

    config.json, model.safetensors   the encoder (``save_pretrained``; loadable with ``AutoModel``)
    tokenizer files                  (``AutoTokenizer.from_pretrained(folder)``)
    heads.safetensors                ``<task>.weight [n_labels, hidden]``, ``<task>.bias [n_labels]``
    tasks.json                       pooling + per task: label names, n_labels, head shape, output scale
    build.json                       how it was made (see :mod:`taskprune.zoo`)

Only safetensors and JSON are read back (no pickle, no remote code); a folder is written to a temporary sibling and
renamed into place. :mod:`taskprune.zoo` builds the project's model in this format and finds it by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from taskprune.io import atomic_dir, atomic_write_json
from taskprune.tasks import get_task

POOLINGS = ("mean", "cls")


@dataclass(frozen=True)
class HeadInfo:
    """What ``tasks.json`` records for one head."""

    label_names: tuple[str, ...]
    n_labels: int
    regression: bool = False
    output_scale: float = 1.0  # logits = scale * head(pooled): STS-B predicts 0..5 from a head trained on 0..1

    @classmethod
    def for_task(cls, name: str) -> HeadInfo:
        t = get_task(name)
        return cls(tuple(t.label_names), t.n_labels, t.regression, 5.0 if t.regression else 1.0)


def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``hidden [batch, seq, d]`` -> ``[batch, d]``: masked mean, or the first ([CLS]) token."""
    if pooling == "cls":
        return hidden[:, 0]
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class TaskModel(nn.Module):
    """One task's view of a :class:`MultiTaskModel`: the shared encoder (same object, not a copy) and one head.

    Deliberately has no ``config`` attribute: tools find the Hugging Face model by walking to ``encoder``.
    """

    def __init__(self, encoder: nn.Module, head: nn.Linear, task: str, info: HeadInfo, pooling: str = "mean",
                 dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.task = task
        self.info = info
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **ignored) -> SequenceClassifierOutput:
        """``input_ids [batch, seq]`` -> ``logits [batch, n_labels]``; other batch keys (labels, idx) are ignored."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        pooled = self.dropout(_pool(hidden, attention_mask, self.pooling))
        logits = self.head(pooled)
        if self.info.output_scale != 1.0:
            logits = logits * self.info.output_scale
        return SequenceClassifierOutput(logits=logits)


class MultiTaskModel(nn.Module):
    """A shared encoder (``encoder``: a transformers ``BertModel``) and one linear head per task (``heads``).

    Args:
        encoder: the Hugging Face encoder.
        tasks: task name -> :class:`HeadInfo` (label names, n_labels...).
        heads: optional task name -> ``nn.Linear(hidden, n_labels)``; new random heads when missing.
        pooling: ``"mean"`` (masked mean of the last layer) or ``"cls"``.
        tokenizer_path: folder of the tokenizer that goes with the encoder (``None`` if unknown).
    """

    def __init__(self, encoder: nn.Module, tasks: dict[str, HeadInfo], heads: dict[str, nn.Linear] | None = None,
                 pooling: str = "mean", tokenizer_path: str | None = None, dropout: float = 0.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}; allowed: {POOLINGS}")
        if not tasks:
            raise ValueError("a MultiTaskModel needs at least one task")
        hidden = encoder.get_input_embeddings().weight.shape[1]
        self.encoder = encoder
        heads = heads or {}
        self.heads = nn.ModuleDict(
            {t: heads[t] if t in heads else nn.Linear(hidden, info.n_labels) for t, info in tasks.items()}
        )
        self.tasks = dict(tasks)
        self.pooling = pooling
        self.tokenizer_path = tokenizer_path
        self.dropout = dropout

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def for_task(self, task: str) -> TaskModel:
        """A :class:`TaskModel` for ``task`` sharing this model's encoder and head modules."""
        if task not in self.tasks:
            raise ValueError(f"this multi-task model has no head for task {task!r}; its tasks: {self.task_names}")
        return TaskModel(self.encoder, self.heads[task], task, self.tasks[task], self.pooling, self.dropout)

    def forward(self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **ignored) -> SequenceClassifierOutput:
        return self.for_task(task)(input_ids, attention_mask, token_type_ids)


# ----------------------------------------------------------------------------------------------- save / load
def heads_state(model: MultiTaskModel) -> dict[str, torch.Tensor]:
    """The heads as a flat state dict: ``<task>.weight [n_labels, hidden]``, ``<task>.bias [n_labels]`` (float32, CPU)."""
    out = {}
    for t, h in model.heads.items():
        out[f"{t}.weight"] = h.weight.detach().float().contiguous().cpu()
        out[f"{t}.bias"] = h.bias.detach().float().contiguous().cpu()
    return out


def tasks_json(model: MultiTaskModel) -> dict:
    """The content of ``tasks.json``: pooling, and per task its :class:`HeadInfo` and head shape."""
    return {
        "format": 1,
        "pooling": model.pooling,
        "tasks": {
            t: {**asdict(info), "label_names": list(info.label_names),
                "head_shape": list(model.heads[t].weight.shape)}
            for t, info in model.tasks.items()
        },
    }


def read_build_info(path: str | os.PathLike) -> dict | None:
    """``build.json`` of a saved model folder, or ``None`` if there is none."""
    p = Path(path) / "build.json"
    return json.loads(p.read_text()) if p.is_file() else None


def save_multitask(model: MultiTaskModel, path: str | os.PathLike, build_info: dict | None = None,
                   tokenizer=None, force: bool = False) -> Path:
    """Save ``model`` to the folder ``path`` atomically (temporary sibling folder, then rename).

    If ``path`` already holds a model whose ``build_info["recipe_hash"]`` differs, refuses unless ``force``.
    ``tokenizer`` (a transformers tokenizer) is saved with it; else the one at ``model.tokenizer_path`` if any.
    """
    path = Path(path)
    build_info = dict(build_info or {})
    if path.exists():
        old = read_build_info(path)
        if not force and (old is None or old.get("recipe_hash") != build_info.get("recipe_hash")):
            raise FileExistsError(
                f"{path} already holds a different build (recipe hash {None if old is None else old.get('recipe_hash')}"
                f" != {build_info.get('recipe_hash')}); pass --force (force=True) to replace it or choose another "
                "--out folder."
            )
    with atomic_dir(path, overwrite=True) as tmp:  # the recipe check above decided whether to replace
        model.encoder.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is None and model.tokenizer_path is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.tokenizer_path, trust_remote_code=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(heads_state(model), str(tmp / "heads.safetensors"))
        atomic_write_json(tmp / "tasks.json", tasks_json(model))
        atomic_write_json(tmp / "build.json", build_info)
    return path


def head_from_state(state: dict[str, torch.Tensor], task: str, source: str | os.PathLike) -> nn.Linear:
    """The ``Linear`` head of ``task`` from a heads state dict (``<task>.weight``, ``<task>.bias``)."""
    try:
        w, b = state[f"{task}.weight"], state[f"{task}.bias"]
    except KeyError:
        raise ValueError(f"{str(source)!r} has no head for task {task!r} (keys {sorted(state)[:4]})") from None
    head = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    return head



def load_dir(path: str | os.PathLike) -> MultiTaskModel:
    """Load the :class:`MultiTaskModel` saved in the folder ``path`` offline (safetensors + JSON only), in eval mode.

    ``ValueError`` naming the file when a ``*.safetensors`` file is truncated or corrupt (an interrupted copy)."""
    from safetensors import SafetensorError
    from transformers import AutoModel

    from taskprune.models import corrupt_weights

    path = Path(path)
    meta = json.loads((path / "tasks.json").read_text())
    try:
        encoder = AutoModel.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        state = load_file(str(path / "heads.safetensors"))
    except SafetensorError as e:
        try:
            name = (read_build_info(path) or {}).get("name")
        except ValueError:  # build.json unreadable too
            name = None
        rebuild = f"python -m taskprune.zoo build {name} --force" if name else "save_multitask(model, folder)"
        raise corrupt_weights(path, e, f"copy the model folder again, or rebuild it ({rebuild})") from None
    tasks, heads = {}, {}
    for t, d in meta["tasks"].items():
        info = HeadInfo(tuple(d["label_names"]), int(d["n_labels"]), bool(d["regression"]), float(d["output_scale"]))
        tasks[t], heads[t] = info, head_from_state(state, t, path / "heads.safetensors")
    has_tok = (path / "tokenizer_config.json").is_file()
    model = MultiTaskModel(encoder, tasks, heads, meta.get("pooling", "mean"), str(path) if has_tok else None)
    return model.eval()
