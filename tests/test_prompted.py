"""Prompted classifier on a tiny random LLaMA (GQA) with a tiny word-level tokenizer: class logits, padding
invariance, attribution through it; the real SmolLM2 (few-shot path, taskprune.fewshot) behind the slow marker."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from taskprune.attribution import score_units
from taskprune.prompted import Prompt, PromptCollator, predict, prompted_forward
from taskprune.selection import select_units
from taskprune.surgery import shrink_

WORDS = ["<pad>", "<s>", "</s>"] + ("review is the sentiment of this movie positive or negative ? answer : good bad "
                                   "film great awful plot yes no maybe premise hypothesis").split()


class WordTokenizer:
    """Whitespace tokenizer over :data:`WORDS` (unknown words map to id 3), the few calls the collator makes."""

    pad_token_id, eos_token_id, chat_template = 0, 2, None

    def __init__(self):
        self.vocab = {w: i for i, w in enumerate(WORDS)}
        self.inv = {i: w for w, i in self.vocab.items()}

    def __call__(self, text: str, add_special_tokens: bool = True):
        ids = [self.vocab.get(w, 3) for w in text.lower().replace(":", " : ").replace("?", " ? ").split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def decode(self, ids):
        return " ".join(self.inv[i] for i in ids)


PROMPT = Prompt("Review: {sentence} is the sentiment positive or negative ?", (("negative", "bad"), ("positive",)),
                ("sentence",))
ROWS = [{"sentence": s, "label": y, "idx": i} for i, (s, y) in enumerate([
    ("good film", 1), ("awful plot awful film is bad", 0), ("great", 1),
    ("the movie is bad bad bad and the plot is awful awful", 0)])]


def model():
    return tiny_model("llama_gqa")  # vocab 100 >= len(WORDS)


@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_gives_class_logits(side):
    batch = PromptCollator(WordTokenizer(), PROMPT, max_length=32, padding_side=side)(ROWS)
    assert batch["label_ids"].shape == (4, 2, 2)
    logits = prompted_forward(model(), batch)
    assert logits.shape == (4, 2)
    assert torch.isfinite(logits).all() and (logits <= 0).all()  # log-probabilities under the full vocabulary


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_class_logits(side):
    m, collate = model(), PromptCollator(WordTokenizer(), PROMPT, max_length=32, padding_side=side)
    together = prompted_forward(m, collate(ROWS))
    alone = torch.cat([prompted_forward(m, collate([r])) for r in ROWS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_truncation_keeps_the_template():
    collate = PromptCollator(WordTokenizer(), PROMPT, max_length=12)
    long = {"sentence": "good " * 50, "label": 1, "idx": 0}
    ids = collate.encode(long)
    assert len(ids) <= 12 and ids[-1] == collate.encode({"sentence": "good", "label": 1})[-1]


@pytest.mark.parametrize("target", ["label", "pseudo"])
def test_score_units_through_the_prompted_forward(target):
    m = model()
    batch = PromptCollator(WordTokenizer(), PROMPT, max_length=32)(ROWS)
    scores = score_units(m, [batch], "ig", target, steps=2, forward=prompted_forward)
    assert scores.count == 4
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for b in scores.mean().values() for v in b.values())
    spec = select_units(scores, sparsity=0.5)
    shrink_(m, spec)
    assert prompted_forward(m, batch).shape == (4, 2)


def test_predict_returns_predictions_and_labels():
    batch = PromptCollator(WordTokenizer(), PROMPT, max_length=32)(ROWS)
    pred, labels = predict(model(), [batch, batch])
    assert pred.shape == labels.shape == (8,)


def test_bad_arguments_raise():
    tok = WordTokenizer()
    with pytest.raises(ValueError, match="unknown prompt style 'xml'"):
        PromptCollator(tok, PROMPT, style="xml")
    with pytest.raises(ValueError, match="unknown padding_side 'middle'"):
        PromptCollator(tok, PROMPT, padding_side="middle")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        PromptCollator(tok, PROMPT, style="chat")
    with pytest.raises(ValueError, match="no prompt for task 'qqp'"):
        PromptCollator(tok, "qqp")
    with pytest.raises(ValueError, match="share a first token"):
        PromptCollator(tok, Prompt("{sentence}", (("good",), ("good",)), ("sentence",)))
    with pytest.raises(ValueError, match="needs 'answer_pos'"):
        prompted_forward(model(), {"input_ids": torch.ones(1, 3, dtype=torch.long)})


@pytest.mark.slow
def test_smollm2_is_llama_with_gqa_and_the_few_shot_prompt_beats_chance_on_sst2():
    from taskprune.data import load_split, random_subset
    from taskprune.fewshot import PromptedLM, TextCollator

    m = PromptedLM("smollm2-135m-instruct", task="sst2", shots=8)  # demonstrations from the embedded train rows
    assert m.lm.config.model_type == "llama"
    assert m.lm.config.num_key_value_heads < m.lm.config.num_attention_heads
    rows = random_subset(load_split("sst2", "dev"), 96, seed=0).to_list()
    collate = TextCollator(m)
    with torch.inference_mode():
        pred = torch.cat([m(**collate(rows[i : i + 16])).argmax(-1) for i in range(0, 96, 16)])
    labels = torch.tensor([r["label"] for r in rows])
    assert (pred == labels).float().mean() > 0.7


def test_gguf_loader_keeps_its_prompted_names():
    import taskprune.gguf as gguf
    import taskprune.prompted as prompted

    assert prompted.load_smollm2 is gguf.load_smollm2 and prompted.smollm2_dir is gguf.smollm2_dir
