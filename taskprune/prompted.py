"""A decoder-only LM as a prompted multi-task classifier: one prompt template per task, label words scored at the
answer position.

A sample becomes a prompt whose last token is the *answer position*: the model's next-token distribution there is
read at the first token of each class's label words (several spellings per class are pooled by ``logsumexp``), giving
class logits ``[batch, n_classes]`` (log-probabilities under the full vocabulary). :func:`prompted_forward` has the
``forward(model, batch)`` signature of :func:`taskprune.attribution.score_units`, so the default ``"label"`` /
``"pseudo"`` targets work unchanged (they take ``log_softmax`` over the class logits, i.e. renormalise over classes).

Only the answer position goes through the LM head (``[batch, d] @ [d, vocab]``), not every position. Position ids are
built from the attention mask, so left padding leaves a sample's logits unchanged.

Batch keys made by :class:`PromptCollator`: ``input_ids``, ``attention_mask`` ``[B, seq]``; ``answer_pos`` ``[B]``;
``label_ids`` ``[B, n_classes, n_variants]`` (first tokens of the label words, ``-1`` = unused slot); ``labels``,
``idx`` ``[B]``.

The SmolLM2 loader (:func:`load_smollm2`) lives in :mod:`taskprune.gguf`; it is importable from here too.

These zero-shot prompts leave SmolLM2-135M-Instruct near chance (``benchmarks/results/smollm2.md`` before the few-shot
protocol); :class:`taskprune.fewshot.PromptedLM` (k-shot demonstrations, contextual calibration, a reused prefix KV
cache) is the path the benchmark uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from taskprune.gguf import SMOLLM2_GGUF, SMOLLM2_NAME, load_smollm2, smollm2_dir  # moved; importable from here too

STYLES = ("plain", "chat")
PADDING_SIDES = ("left", "right")


@dataclass(frozen=True)
class Prompt:
    """A prompt template for one task.

    Args:
        instruction: text with ``{field}`` placeholders for the sample's text fields.
        label_words: per class (in label order), the spellings whose first token scores that class.
        answer_prefix: text after the instruction in a plain prompt (the answer is the next token).
    """

    instruction: str
    label_words: tuple[tuple[str, ...], ...]
    fields: tuple[str, ...]
    answer_prefix: str = "\nAnswer:"

    @property
    def n_classes(self) -> int:
        return len(self.label_words)


_SENTIMENT = Prompt(
    "Is the sentiment of this movie review positive or negative?\nReview: {sentence}",
    (("negative", "Negative"), ("positive", "Positive")), ("sentence",))
_NLI = Prompt(
    "Premise: {sentence1}\nHypothesis: {sentence2}\nDoes the premise entail the hypothesis? Answer yes, maybe or no.",
    (("yes", "Yes"), ("maybe", "Maybe"), ("no", "No")), ("sentence1", "sentence2"))

# keyed by taskprune task / evaluation-set names; label order as in taskprune.tasks
PROMPTS: dict[str, Prompt] = {"sst2": _SENTIMENT, "imdb": _SENTIMENT, "mnli": _NLI, "snli": _NLI}


def get_prompt(name: str | Prompt) -> Prompt:
    if isinstance(name, Prompt):
        return name
    if name not in PROMPTS:
        raise ValueError(f"no prompt for task {name!r}; known: {sorted(PROMPTS)}; pass a taskprune.prompted.Prompt "
                         "for another task")
    return PROMPTS[name]


def label_word_ids(label_words, tokenize) -> Tensor:
    """``[n_classes, n_variants]`` first-token ids of each class's label words (``-1`` pads short rows).

    ``tokenize(word) -> list[int]`` (with the prompt's leading space where it has one). A word that tokenizes to
    nothing, or two classes sharing a first token, is a ``ValueError``.
    """
    per_class = []
    for words in label_words:
        ids = []
        for w in words:
            t = tokenize(w)
            if not t:
                raise ValueError(f"label word {w!r} tokenizes to nothing")
            if t[0] not in ids:
                ids.append(t[0])
        per_class.append(ids)
    flat = [i for ids in per_class for i in ids]
    if len(flat) != len(set(flat)):
        raise ValueError(f"label words {tuple(label_words)} share a first token; choose words whose first "
                         "tokens differ between classes")
    width = max(len(ids) for ids in per_class)
    return torch.tensor([ids + [-1] * (width - len(ids)) for ids in per_class], dtype=torch.long)


class PromptCollator:
    """Rows ``{field: text, "label": int, "idx": int}`` -> a padded prompted batch (see the module doc).

    Args:
        tokenizer: a Hugging Face tokenizer of the model.
        prompt: a :class:`Prompt` or a task name in :data:`PROMPTS`.
        style: ``"plain"`` (instruction + ``answer_prefix``; label words scored with a leading space) or ``"chat"``
            (the tokenizer's chat template with the instruction as the user turn and the generation prompt; label
            words scored as the first token of the assistant's reply).
        max_length: prompt length cap in tokens; the text fields are truncated (equally) to fit, never the template.
        padding_side: ``"left"`` (answer position is the last column) or ``"right"``.
    """

    def __init__(self, tokenizer, prompt: str | Prompt, style: Literal["plain", "chat"] = "plain",
                 max_length: int = 128, padding_side: Literal["left", "right"] = "left") -> None:
        if style not in STYLES:
            raise ValueError(f"unknown prompt style {style!r}; allowed: {list(STYLES)}")
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"unknown padding_side {padding_side!r}; allowed: {list(PADDING_SIDES)}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 8:
            raise ValueError(f"max_length must be an int >= 8, got {max_length!r}")
        if style == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("style='chat' needs a tokenizer with a chat_template; use style='plain'")
        self.tokenizer = tokenizer
        self.prompt = get_prompt(prompt)
        self.style = style
        self.max_length = max_length
        self.padding_side = padding_side
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        self.label_ids = self._label_ids()  # [n_classes, n_variants]
        empty = {f: "" for f in self.prompt.fields}
        self._overhead = len(self._encode(empty))

    def _label_ids(self) -> Tensor:
        lead = " " if self.style == "plain" else ""
        return label_word_ids(self.prompt.label_words,
                              lambda w: self.tokenizer(lead + w, add_special_tokens=False)["input_ids"])

    def _text(self, fields: dict) -> str:
        body = self.prompt.instruction.format(**fields)
        if self.style == "plain":
            return body + self.prompt.answer_prefix
        return self.tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                                  add_generation_prompt=True)

    def _encode(self, fields: dict) -> list[int]:
        return self.tokenizer(self._text(fields), add_special_tokens=self.style == "plain")["input_ids"]

    def encode(self, row: dict) -> list[int]:
        """Token ids of one row's prompt, text fields truncated so the whole prompt fits ``max_length``."""
        budget = max(1, (self.max_length - self._overhead) // len(self.prompt.fields))
        fields = {}
        for f in self.prompt.fields:
            ids = self.tokenizer(str(row[f]), add_special_tokens=False)["input_ids"]
            fields[f] = self.tokenizer.decode(ids[:budget]) if len(ids) > budget else str(row[f])
        ids = self._encode(fields)
        return ids[-self.max_length:] if len(ids) > self.max_length else ids

    def __call__(self, rows: Sequence[dict]) -> dict[str, Tensor]:
        seqs = [self.encode(r) for r in rows]
        n, width = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.long)
        pos = torch.empty(n, dtype=torch.long)
        for i, s in enumerate(seqs):
            if self.padding_side == "left":
                ids[i, width - len(s):] = torch.tensor(s)
                mask[i, width - len(s):] = 1
                pos[i] = width - 1
            else:
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
                pos[i] = len(s) - 1
        batch = {"input_ids": ids, "attention_mask": mask, "answer_pos": pos,
                 "label_ids": self.label_ids.unsqueeze(0).expand(n, -1, -1).contiguous()}
        if all("label" in r for r in rows):
            batch["labels"] = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
        if all("idx" in r for r in rows):
            batch["idx"] = torch.tensor([int(r["idx"]) for r in rows], dtype=torch.long)
        return batch


def prompted_forward(model: nn.Module, batch: dict) -> Tensor:
    """Class logits ``[B, n_classes]``: log p(first token of a label word) at ``batch["answer_pos"]``.

    ``model`` is a causal LM (``...ForCausalLM``). Several spellings of one class are pooled by ``logsumexp``.
    """
    for key in ("input_ids", "answer_pos", "label_ids"):
        if key not in batch:
            raise ValueError(f"a prompted batch needs {key!r}; build batches with taskprune.prompted.PromptCollator")
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
    pos = batch["answer_pos"].to(hidden.device)
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]  # [B, d]
    logp = torch.log_softmax(model.get_output_embeddings()(h).float(), dim=-1)  # [B, vocab]
    label_ids = batch["label_ids"].to(logp.device)  # [B, C, V]
    picked = logp.gather(1, label_ids.clamp(min=0).flatten(1)).view(label_ids.shape)
    picked = picked.masked_fill(label_ids < 0, float("-inf"))
    return torch.logsumexp(picked, dim=-1)


@torch.inference_mode()
def predict(model: nn.Module, batches) -> tuple[Tensor, Tensor]:
    """``(predictions [N], labels [N])`` over prompted batches (labels empty if the batches have none)."""
    preds, labels = [], []
    for b in batches:
        preds.append(prompted_forward(model, b).argmax(-1).cpu())
        if "labels" in b:
            labels.append(b["labels"])
    return torch.cat(preds), (torch.cat(labels) if labels else torch.empty(0, dtype=torch.long))


__all__ = ["Prompt", "PROMPTS", "PromptCollator", "prompted_forward", "predict", "load_smollm2", "get_prompt",
           "smollm2_dir", "SMOLLM2_GGUF", "SMOLLM2_NAME"]
