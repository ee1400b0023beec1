"""Tiny random models built from configs, seeded, float32, offline (shared by the tests)."""

from __future__ import annotations

import torch
import transformers as tf

ARCHS = ("bert", "t5", "t5_gated", "llama_gqa", "gpt2")


def tiny_model(name: str, seed: int = 0, n_labels: int = 3):
    """A tiny random model of one of :data:`ARCHS`, in eval mode."""
    torch.manual_seed(seed)
    if name == "bert":
        cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=64, num_labels=n_labels)
        model = tf.BertForSequenceClassification(cfg)
    elif name in ("t5", "t5_gated"):
        cfg = tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2,
                          num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                          feed_forward_proj="gated-gelu" if name == "t5_gated" else "relu")
        model = tf.T5ForConditionalGeneration(cfg)
    elif name == "llama_gqa":
        cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             num_labels=n_labels, pad_token_id=0)
        model = tf.LlamaForCausalLM(cfg)
    elif name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=37,
                            num_labels=n_labels, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown tiny architecture {name!r}; allowed: {ARCHS}")
    return model.eval()


def tiny_batch(name: str, batch_size: int = 4, seq_len: int = 9, seed: int = 1) -> dict:
    """Inputs for :func:`tiny_model` with right padding on some rows (and decoder inputs for T5)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch_size, seq_len), generator=g)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    for i in range(1, batch_size, 2):  # every other row padded
        mask[i, seq_len - 1 - i % seq_len // 2 - 1 :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    batch = {"input_ids": ids, "attention_mask": mask}
    if name.startswith("t5"):
        batch["decoder_input_ids"] = torch.randint(3, 100, (batch_size, 5), generator=g)
    return batch


def widen_(model, std: float = 0.3, seed: int = 0):
    """Redraw every ``nn.Linear`` weight with ``std`` (seeded), in place: at BERT's 0.02-std init every unit is
    negligible, so pruning tests would measure nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, std, generator=g)
    return model
