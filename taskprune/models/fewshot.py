"""A causal LM as a k-shot prompted classifier that taskprune can score, prune, evaluate and export like any other.

:class:`PromptedLM` wraps a causal LM (``...ForCausalLM``, e.g. SmolLM2-135M-Instruct) and a few-shot prompt. It takes
the *text* of one field as token ids (what :class:`TextCollator`, or the CLI's own data module, produces) and returns
class logits ``[batch, n_classes]``, so the default ``model(**inputs)`` forward, the ``"label"`` / ``"pseudo"`` targets,
the Lightning module, the callback and :func:`taskprune.export.save_pruned` work unchanged. A prompt is three token
segments, tokenized separately so that demonstrations and queries are tokenized the same way::

    prefix  = [chat header or nothing] + instruction + k demonstrations ("<pre> text <post> <label word>")
    row     = <pre> + text ids + <post>                      (one per sample; the answer is the next token)

The class score is the log-probability of the first token of each class's label word at the last position (several
spellings pooled by ``logsumexp``), renormalised over the classes. With ``calibrate=True`` (contextual calibration,
Zhao et al. 2021) the class log-probabilities of content-free rows (``"N/A"``, ``"[MASK]"``, ``""``) under the same
prefix are subtracted: the prompt's bias towards some label words is removed.

**Prefix KV cache.** In inference (no gradient, no gate or mask hooks on the LM) the prefix is run once per model state
and its keys / values are reused for every batch: only the rows' own tokens are computed. The cache and the
calibration bias are keyed on the identity, version and shape of every LM parameter, so a shrunk or edited model
recomputes them. With hooks (gates, soft masks) the whole prompt is recomputed per batch, so gates act on the prefix
too; attribution can instead read the prefix from the ungated model's cache (``attribute_prefix=False``: the rows alone
are gated, at a fraction of the cost). Attribution uses the calibration bias of the ungated model (a constant).
Tuning runs in :meth:`PromptedLM.single_pass`: the prefix and the rows' real tokens packed into one sequence with a
block mask, so that each projection is called once per forward with exactly those tokens.

Layout: the prefix, then left padding, then the row; position ids come from the attention mask, so padding changes
nothing and the cached and recomputed paths give the same scores (tested).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn



log = logging.getLogger(__name__)

STYLES = ("plain", "chat")
CONTENT_FREE = ("N/A", "[MASK]", "")
_MARKER = "\x00TEXT\x00"


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


@dataclass(frozen=True)
class FewShotTemplate:
    """How one task is asked.

    Args:
        instruction: the task description, first in the prompt (the system turn in chat style).
        template: one sample, with exactly one ``{text}`` placeholder, ending where the answer starts.
        label_words: per class (in label order), the spellings whose first token scores that class; the first
            spelling is the answer written after each demonstration.
    """

    instruction: str
    template: str
    label_words: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if self.template.count("{text}") != 1:
            raise ValueError(f"template {self.template!r} must hold exactly one '{{text}}' placeholder")
        if len(self.label_words) < 2 or not all(isinstance(w, tuple) and w for w in self.label_words):
            raise ValueError(f"label_words must give at least two classes, each a non-empty tuple of spellings; got "
                             f"{self.label_words!r}")

    @property
    def n_classes(self) -> int:
        return len(self.label_words)


TEMPLATES: dict[str, FewShotTemplate] = {
    "sst2": FewShotTemplate("Classify the sentiment of each movie review as positive or negative.",
                            "Review:\n{text}\nSentiment:", (("negative",), ("positive",))),
    "ag_news": FewShotTemplate("Classify each news article into one of four topics: world, sports, business or "
                               "technology.", "Article:\n{text}\nTopic:",
                               (("World",), ("Sports",), ("Business",), ("Technology",))),
    "sst5": FewShotTemplate("Rate the sentiment of each movie review: terrible, bad, okay, good or great.",
                            "Review:\n{text}\nRating:", (("terrible",), ("bad",), ("okay",), ("good",), ("great",))),
    "sms_spam": FewShotTemplate("Decide whether each text message is spam or not.", "Message:\n{text}\nSpam:",
                                (("no",), ("yes",))),
    "mpqa": FewShotTemplate("Classify the sentiment of each phrase as positive or negative.",
                            "Phrase:\n{text}\nSentiment:", (("negative",), ("positive",))),
    "subj": FewShotTemplate("Decide whether each sentence is a subjective opinion or an objective fact.",
                            "Sentence:\n{text}\nType:", (("opinion",), ("fact",))),
}


def fewshot_template(name: str | FewShotTemplate) -> FewShotTemplate:
    if isinstance(name, FewShotTemplate):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"no few-shot template for task {name!r}; known: {sorted(TEMPLATES)}; pass template=... "
                         "(a taskprune.models.fewshot.FewShotTemplate) for another task")
    return TEMPLATES[name]


def draw_demos(rows: Sequence[dict], shots: int, n_classes: int, seed: int = 0) -> list[dict]:
    """``shots`` rows of each class (seeded), in a seeded shuffled order; ``rows`` need ``sentence`` and ``label``."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise ValueError(f"shots must be an int >= 0 (demonstrations per class), got {shots!r}")
    rng = np.random.default_rng(seed)
    labels = np.asarray([int(r["label"]) for r in rows])
    picked = []
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise ValueError(f"class {c} has {len(members)} rows, fewer than shots={shots}; lower shots")
        picked.extend(rng.permutation(members)[:shots].tolist())
    return [rows[i] for i in rng.permutation(picked).tolist()]


# ------------------------------------------------------------------------------------------------- the model
def load_causal_lm(name_or_path: str):
    """``(model, tokenizer)``: ``"smollm2-135m-instruct"`` (converted once, see :mod:`taskprune.models.gguf`) or a local
    causal-LM folder (offline, no remote code)."""
    from taskprune.models.gguf import SMOLLM2_NAME, load_smollm2

    if name_or_path == SMOLLM2_NAME:
        return load_smollm2()
    if not os.path.isdir(name_or_path):
        raise ValueError(f"lm {name_or_path!r} is neither {SMOLLM2_NAME!r} nor a local folder; pass a folder with a "
                         "causal LM (config.json, safetensors, tokenizer files)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True, trust_remote_code=False)
    lm = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=True, trust_remote_code=False)
    return lm.eval(), tok


class PromptedLM(nn.Module):
    """A causal LM + a k-shot prompt = a classifier ``(input_ids, attention_mask) -> [batch, n_classes]``.

    Args:
        lm: a causal LM module (then pass ``tokenizer``), ``"smollm2-135m-instruct"`` or a local causal-LM folder.
        task: task name: its template (:data:`TEMPLATES`) and, unless ``demos`` is given, the train split of the
            registered task (:mod:`taskprune.tasks`) the demonstrations are drawn from.
        shots: demonstrations per class (0 = zero-shot).
        style: ``plain`` (instruction and demonstrations as text) or ``chat`` (the tokenizer's chat template: the
            instruction as the system turn, each demonstration a user / assistant exchange).
        calibrate: contextual calibration (subtract the class log-probabilities of content-free rows).
        data_dir: folder with the data layout of ``../shared/data``; ``None`` = the embedded subsets.
        seed: seed of the demonstration draw.
        demos: the demonstration rows (``sentence``, ``label``) instead of a draw from the train split.
        tokenizer: the LM's tokenizer, when ``lm`` is a module.
        template: a :class:`FewShotTemplate` instead of the task's registered one.
        prefix_cache: reuse the prefix's keys / values in inference (see the module doc).
        attribute_prefix: under gradients and gates (attribution), recompute the prefix so that gates act on it too
            (``True``), or read it from the cache of the ungated model so that only the rows are recomputed and
            gated (``False``: a prompt of p prefix and r row tokens costs r instead of p + r per sample).
    """

    def __init__(self, lm: str | nn.Module = "smollm2-135m-instruct", task: str = "sst2", shots: int = 4,
                 style: Literal["plain", "chat"] = "plain", calibrate: bool = True, data_dir: str | None = None,
                 seed: int = 0, demos: list[dict] | None = None, tokenizer=None,
                 template: FewShotTemplate | None = None, prefix_cache: bool = True,
                 attribute_prefix: bool = True) -> None:
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"unknown prompt style {style!r}; allowed: {list(STYLES)}")
        if isinstance(lm, str):
            lm, tokenizer = load_causal_lm(lm)
        elif tokenizer is None:
            raise ValueError("a PromptedLM built from a module needs its tokenizer=...; or pass lm as a folder name")
        if style == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("style='chat' needs a tokenizer with a chat_template; use style='plain'")
        self.lm = lm
        self.tokenizer = tokenizer
        self.template = template if template is not None else fewshot_template(task)
        self.num_labels = self.template.n_classes  # read by taskprune.models.head_size
        self.style, self.calibrate, self.prefix_cache = style, bool(calibrate), bool(prefix_cache)
        self.attribute_prefix = bool(attribute_prefix)
        if demos is None:
            from taskprune.lightning.data import load_split

            from taskprune.tasks import get_task

            t = get_task(task)
            if t.is_pair:
                raise ValueError(f"task {t.name!r} has two text fields {t.text_fields}; PromptedLM takes one")
            if t.n_labels != self.template.n_classes:
                raise ValueError(f"task {t.name!r} has {t.n_labels} labels but the template {self.template.n_classes}")
            demos = draw_demos(load_split(t, "train", data_dir).to_list(), shots, t.n_labels, seed) if shots else []
        self.demos = [{"sentence": str(d["sentence"]), "label": int(d["label"])} for d in demos]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.strip_ids = {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
                          if i is not None}
        self.prefix_ids, self.pre_ids, self.post_ids, lead = self._segments()
        self.label_ids = self._label_ids(lead)  # [n_classes, n_variants], -1 = unused
        self._state: tuple | None = None  # (parameter key, prefix keys/values, calibration bias)
        self._packed = False  # see single_pass
        if not self._hooked():
            self.refresh()  # now, so that attribution under gates finds the bias of the model it starts from
        log.info("PromptedLM: %s style, %d demonstrations, prefix of %d tokens", style, len(self.demos),
                 len(self.prefix_ids))

    # ------------------------------------------------------------------------------------------ prompt
    def _tok(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text_ids(self, text: str) -> list[int]:
        """Token ids of one sample's text, as :class:`TextCollator` makes them."""
        return self._tok(str(text).strip())

    def _segments(self) -> tuple[list[int], list[int], list[int], str]:
        t = self.template
        pre, post = t.template.split("{text}")
        if self.style == "plain":
            prefix = self._tok(t.instruction + "\n\n")
            for d in self.demos:
                prefix += self._tok(pre) + self.text_ids(d["sentence"]) + self._tok(post)
                prefix += self._tok(" " + t.label_words[d["label"]][0] + "\n\n")
            return prefix, self._tok(pre), self._tok(post), " "
        apply = self.tokenizer.apply_chat_template
        msgs = [{"role": "system", "content": t.instruction}]
        head = apply(msgs, tokenize=False)
        prefix = self._tok(head)
        for d in self.demos:  # each exchange tokenized piecewise, the text exactly as a query's
            turn = [{"role": "user", "content": pre + _MARKER + post},
                    {"role": "assistant", "content": t.label_words[d["label"]][0]}]
            a, b = apply(msgs + turn, tokenize=False)[len(head):].split(_MARKER)
            prefix += self._tok(a) + self.text_ids(d["sentence"]) + self._tok(b)
        query = apply(msgs + [{"role": "user", "content": pre + _MARKER + post}], tokenize=False,
                      add_generation_prompt=True)
        if not query.startswith(head):
            raise ValueError("the tokenizer's chat template does not render a conversation as a prefix of a longer "
                             "one; use style='plain'")
        a, b = query[len(head):].split(_MARKER)
        return prefix, self._tok(a), self._tok(b), ""

    def _label_ids(self, lead: str) -> Tensor:
        return label_word_ids(self.template.label_words, lambda w: self._tok(lead + w))

    def prompt_ids(self, text: str) -> list[int]:
        """The whole prompt of one sample (prefix + row), e.g. for generation or length statistics."""
        return self.prefix_ids + self.pre_ids + self.text_ids(text) + self.post_ids

    # ------------------------------------------------------------------------------------------ forward
    def _rows(self, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Text ids (any padding) -> left-padded rows ``pre + text + post`` and their mask ``[B, L]``."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        rows = []
        for ids, m in zip(input_ids.tolist(), mask.tolist()):
            text = [i for i, keep in zip(ids, m) if keep and i not in self.strip_ids]
            rows.append(self.pre_ids + text + self.post_ids)
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        out_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            out_mask[i, width - len(r):] = 1
        return out.to(input_ids.device), out_mask.to(input_ids.device)

    def _prefix_kv(self) -> list[tuple[Tensor, Tensor]]:
        """The prefix's keys and values per layer ``[1, ...]``: one pass of the prefix alone, under whatever hooks
        (gates, masks) the LM carries now."""
        device = next(self.lm.parameters()).device
        ids = torch.tensor([self.prefix_ids], dtype=torch.long, device=device)
        out = self.lm.base_model(input_ids=ids, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]

    @contextmanager
    def single_pass(self):
        """Within it, a forward without gradients under hooks runs the prefix and the rows as **one packed sequence**
        (the prefix once, then each row's real tokens, a row attending to the prefix and itself): every projection is
        called once per forward with the batch's tokens and no padding. What :func:`taskprune.tuning.tune_masks` fits
        on; the scores are those of the other paths (tested)."""
        previous, self._packed = self._packed, True
        try:
            yield self
        finally:
            self._packed = previous

    @property
    def shared_prefix_tokens(self) -> int:
        """Leading tokens every forward shares within :meth:`single_pass` (the prefix; 0 outside it): what
        :class:`taskprune.tuning.TuningConfig` ``shared_prefix="once"`` fits in the first batch only."""
        return len(self.prefix_ids) if self._packed else 0

    def _packed_hidden(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Last-position hidden states ``[B, d]`` of ``prefix + row`` for every row, from one sequence ``[1, T]``: the
        prefix, then the rows' real tokens, with a block mask (causal; a row sees the prefix and its own earlier
        tokens) and each row's positions continuing the prefix's."""
        p, device = len(self.prefix_ids), ids.device
        rows = [r[m.bool()] for r, m in zip(ids, mask)]
        lengths = torch.tensor([len(r) for r in rows], device=device)
        seq = torch.cat([torch.tensor(self.prefix_ids, dtype=torch.long, device=device), *rows])[None]
        segment = torch.repeat_interleave(torch.arange(len(rows) + 1, device=device),
                                          torch.cat([lengths.new_tensor([p]), lengths]))
        first = torch.cat([lengths.new_zeros(1), p + lengths.cumsum(0) - lengths])  # each segment's first index
        positions = torch.arange(seq.shape[1], device=device) - first[segment] + (segment > 0).long() * p
        seen = torch.tril(torch.ones(seq.shape[1], seq.shape[1], dtype=torch.bool, device=device))
        seen &= (segment[:, None] == segment[None, :]) | (segment[None, :] == 0)
        dtype = next(self.lm.parameters()).dtype
        blocked = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill(~seen, torch.finfo(dtype).min)
        out = self.lm.base_model(input_ids=seq, attention_mask=blocked[None, None], position_ids=positions[None],
                                 use_cache=False)
        return out.last_hidden_state[0, p + lengths.cumsum(0) - 1]

    def _hidden(self, ids: Tensor, mask: Tensor, kv: list[tuple[Tensor, Tensor]] | None) -> Tensor:
        """Last-position hidden states ``[B, d]`` of ``prefix + rows``, the prefix from ``kv`` or recomputed: once,
        batch 1, without gradients (the same values, a fraction of the cost); under gradients once per row, so that
        per-sample gates see every row's prefix."""
        n, p = ids.shape[0], len(self.prefix_ids)
        base = self.lm.base_model
        if kv is None and self._packed and not torch.is_grad_enabled():
            return self._packed_hidden(ids, mask)
        if kv is None and p and self.prefix_cache and not torch.is_grad_enabled():
            kv = self._prefix_kv()
        full_mask = torch.cat([mask.new_ones(n, p), mask], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        if kv is None:
            prefix = torch.tensor(self.prefix_ids, dtype=torch.long, device=ids.device).expand(n, p)
            out = base(input_ids=torch.cat([prefix, ids], dim=1), attention_mask=full_mask, position_ids=positions,
                       use_cache=False)
        else:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.lm.config)
            for i, (k, v) in enumerate(kv):
                cache.update(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), i)
            out = base(input_ids=ids, attention_mask=full_mask, position_ids=positions[:, p:], use_cache=True,
                       **{_cache_arg(base): cache})
        return out.last_hidden_state[:, -1]

    def _class_logprobs(self, h: Tensor) -> Tensor:
        """``[B, d]`` -> log-probabilities renormalised over the classes ``[B, n_classes]``."""
        logp = torch.log_softmax(self.lm.get_output_embeddings()(h).float(), dim=-1)
        label_ids = self.label_ids.to(logp.device)
        picked = logp[:, label_ids.clamp(min=0)].masked_fill(label_ids < 0, float("-inf"))  # [B, C, V]
        return torch.log_softmax(torch.logsumexp(picked, dim=-1), dim=-1)

    def _key(self) -> tuple:
        """Identity, in-place version and shape of every LM parameter: what the prefix cache and bias depend on."""
        return tuple((p.data_ptr(), 0 if p.is_inference() else p._version, tuple(p.shape))
                     for p in self.lm.parameters())

    def _hooked(self) -> bool:
        return any(m._forward_pre_hooks or m._forward_hooks for m in self.lm.modules())

    def _content_free(self, kv) -> Tensor:
        """Contextual-calibration bias ``[n_classes]``: log of the mean class probabilities of content-free rows."""
        texts = [self.text_ids(t) for t in CONTENT_FREE]
        width = max(1, max(len(t) for t in texts))
        ids = torch.full((len(texts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(texts):
            ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            mask[i, : len(t)] = 1
        device = next(self.lm.parameters()).device
        rows, rmask = self._rows(ids.to(device), mask.to(device))
        return self._class_logprobs(self._hidden(rows, rmask, kv)).exp().mean(0).log()

    @torch.no_grad()
    def refresh(self) -> tuple:
        """(Re)compute the prefix cache and the calibration bias for the LM as it is now (no hooks allowed)."""
        if self._hooked():
            raise ValueError("PromptedLM.refresh needs an LM without gate / mask hooks; remove them first "
                             "(taskprune.surgery.remove_mask) or call refresh before attaching them")
        kv = self._prefix_kv() if self.prefix_cache and self.prefix_ids else None
        bias = self._content_free(kv if self.prefix_ids else None) if self.calibrate else None
        self._state = (self._key(), kv, bias)
        return self._state

    def _fresh_state(self) -> tuple:
        return self._state if self._state is not None and self._state[0] == self._key() else self.refresh()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Tensor) -> Tensor:
        """Class logits ``[B, n_classes]`` (calibrated log-probabilities); other batch keys are ignored."""
        ids, mask = self._rows(input_ids, attention_mask)
        hooked = self._hooked()
        if not hooked and not torch.is_grad_enabled():
            _, kv, bias = self._fresh_state()
            h = self._hidden(ids, mask, kv if self.prefix_ids else None)
        else:
            current = self._state is not None and self._state[0] == self._key()
            kv = self._state[1] if current and torch.is_grad_enabled() and not self.attribute_prefix else None
            h = self._hidden(ids, mask, kv if self.prefix_ids else None)
            bias = None
            if self.calibrate:
                if not torch.is_grad_enabled():  # e.g. a soft mask: the bias of the masked model
                    bias = self._content_free(None)
                elif not hooked:
                    bias = self._fresh_state()[2]
                elif current:
                    bias = self._state[2]  # attribution under gates: the unhooked model's bias, a constant
                else:
                    raise ValueError("PromptedLM has no calibration bias for the LM as it is now and gates are "
                                     "attached; call model.refresh() before attributing")
        logits = self._class_logprobs(h)
        return logits - bias if bias is not None else logits


def _cache_arg(base: nn.Module) -> str:
    """The keyword of the base model's forward for a KV cache (``cache`` in transformers >= 5.2x, earlier
    ``past_key_values``)."""
    import inspect

    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class TextCollator:
    """Rows ``{"sentence": str, "label": int, "idx": int}`` -> ``input_ids`` / ``attention_mask`` of the text alone
    (right-padded, no special tokens, at most ``max_length`` tokens), ``labels``, ``idx``: the input of
    :class:`PromptedLM`."""

    def __init__(self, model: PromptedLM, max_length: int = 128) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.model, self.max_length = model, max_length

    def __call__(self, rows: Sequence[dict]) -> dict[str, Tensor]:
        seqs = [self.model.text_ids(r["sentence"])[: self.max_length] or [self.model.pad_id] for r in rows]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.model.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if all("label" in r for r in rows):
            batch["labels"] = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
        if all("idx" in r for r in rows):
            batch["idx"] = torch.tensor([int(r["idx"]) for r in rows], dtype=torch.long)
        return batch


__all__ = ["FewShotTemplate", "PromptedLM", "TextCollator", "TEMPLATES", "CONTENT_FREE", "draw_demos",
           "fewshot_template", "load_causal_lm"]
