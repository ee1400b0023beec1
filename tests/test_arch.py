"""Architecture adapters: a fifth family (DistilBERT) added from this one file works with gates, scoring, surgery,
FLOP counts and export; the weight-layout helpers; ``register``'s checks.

The adapter below is all it takes: nothing in ``taskprune/`` names DistilBERT.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.pytorch_utils import Conv1D

from taskprune.arch import (REGISTRY, Adapter, AttentionBlock, FFNBlock, get_architecture, in_features,
                            out_features, register, weight_in_out)
from taskprune.attribution import score_units
from taskprune.export import load_pruned, save_pruned
from taskprune.flops import count_params
from taskprune.gates import Gates
from taskprune.spec import PruneSpec
from taskprune.surgery import apply_mask, remove_mask, shrink_

TOL = dict(atol=1e-5, rtol=1e-5)


class DistilBertAdapter(Adapter):
    """``transformer.layer.<i>`` with ``attention.{q,k,v,out}_lin`` and ``ffn.lin1`` / ``ffn.lin2``."""

    family = "distilbert"
    model_types = ("distilbert",)
    ffn_width_field = "hidden_dim"

    def discover(self, base):
        att, ffn = [], []
        for i, layer in enumerate(base.transformer.layer):
            p, a = f"transformer.layer.{i}", layer.attention
            hd, n = a.attention_head_size, out_features(a.q_lin) // a.attention_head_size
            att.append(AttentionBlock(f"{p}.attention", f"{p}.attention.q_lin", f"{p}.attention.k_lin",
                                      f"{p}.attention.v_lin", f"{p}.attention.out_lin", n, n, hd,
                                      d_model=in_features(a.q_lin)))
            ffn.append(FFNBlock(f"{p}.ffn", (f"{p}.ffn.lin1",), f"{p}.ffn.lin2", out_features(layer.ffn.lin1),
                                d_model=in_features(layer.ffn.lin1)))
        return att, ffn

    def shrink_attention_(self, attn, block, keep):
        attn.n_heads = len(keep) * block.group_size  # its forward reshapes with -1: the count is informative


@pytest.fixture
def distilbert():
    """Register the adapter for one test, then restore the registry (DistilBERT stays unsupported elsewhere)."""
    saved = dict(REGISTRY)
    register(DistilBertAdapter())
    yield
    REGISTRY.clear()
    REGISTRY.update(saved)


def tiny_distilbert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = tf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                              max_position_embeddings=64, num_labels=3)
    model = tf.DistilBertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # 0.02-std init leaves the logits nearly blind to single units
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.3, generator=g)
    return model


def batch_of(n: int = 4, seq: int = 9) -> dict:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[1, -3:] = 0
    ids = torch.randint(3, 100, (n, seq), generator=g).masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n) % 3}


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_unregistered_family_is_refused():
    with pytest.raises(ValueError, match="unsupported model_type 'distilbert'.*taskprune.arch.register"):
        get_architecture(tiny_distilbert())


def test_fifth_family_gates_score_shrink_and_export(distilbert, tmp_path):
    model, batch = tiny_distilbert(), batch_of()
    arch = get_architecture(model)
    assert [b.n_units for b in arch.attention] == [4, 4] and [b.n_units for b in arch.ffn] == [37, 37]

    dense = logits(model, batch)
    with Gates(model) as gates:  # gates at 1 are the identity
        gates.set(torch.ones(gates.n_units))
        assert torch.equal(logits(model, batch), dense)

    scores = score_units(model, [batch]).mean()
    for kind in ("heads", "neurons"):
        for b in arch.blocks(kind):
            s = scores[kind][b.name]
            assert s.shape == (b.n_units,) and torch.isfinite(s).all() and s.abs().sum() > 0
    keep = {"heads": {b.name: sorted(scores["heads"][b.name].topk(2).indices.tolist()) for b in arch.attention},
            "neurons": {b.name: sorted(scores["neurons"][b.name].topk(20).indices.tolist()) for b in arch.ffn}}
    spec = PruneSpec(keep, arch.fingerprint())

    apply_mask(model, spec)
    masked = logits(model, batch)
    assert (masked - dense).abs().max() > 1e-3
    remove_mask(model)
    predicted = count_params(model, spec)
    shrink_(model, spec)
    torch.testing.assert_close(logits(model, batch), masked, **TOL)
    assert spec.validate(model) == "shrunk"
    assert sum(p.numel() for p in model.parameters()) == predicted
    assert model.config.hidden_dim == 20  # the adapter's uniform FFN width field
    assert all(layer.attention.n_heads == 2 for layer in model.distilbert.transformer.layer)

    save_pruned(model, spec, tmp_path / "pruned")
    again = load_pruned(tmp_path / "pruned")
    torch.testing.assert_close(logits(again, batch), masked, **TOL)


def test_weight_layout_helpers():
    lin, conv = nn.Linear(3, 5), Conv1D(5, 3)  # both map 3 -> 5; Conv1D stores its weight [in, out]
    for m in (lin, conv):
        assert (in_features(m), out_features(m)) == (3, 5)
        assert weight_in_out(m).shape == (3, 5)
    assert torch.equal(weight_in_out(lin), lin.weight.t()) and torch.equal(weight_in_out(conv), conv.weight)
    with pytest.raises(TypeError, match="expected nn.Linear or Conv1D, got Embedding"):
        in_features(nn.Embedding(3, 5))


def test_register_checks_its_argument(distilbert):
    with pytest.raises(TypeError, match=r"register\(DistilBertAdapter\(\)\)"):
        register(DistilBertAdapter)
    with pytest.raises(TypeError, match="expected a taskprune.arch.Adapter, got str"):
        register("distilbert")
    with pytest.raises(ValueError, match=r"'bert'\] are already handled by \['BertAdapter'\]; pass replace=True"):
        register(type("Other", (DistilBertAdapter,), {"model_types": ("bert",)})())
    with pytest.raises(ValueError, match="model_types must be a non-empty tuple"):
        register(type("Empty", (DistilBertAdapter,), {"model_types": ()})())
