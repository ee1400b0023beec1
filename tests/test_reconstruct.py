"""Training-free reconstruction: closer to the dense model on held-out inputs, identity for "none", survives shrink_
and a save / rebuild / load round trip, bad input refused."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_batch, tiny_model, widen_
from torch import nn

from taskprune.attribution import score_units
from taskprune.selection import select_units
from taskprune.surgery import apply_mask, remove_mask, shrink_
from taskprune.reconstruct import reconstruct_

ARCHS = ("bert", "llama_gqa", "gpt2")


def model_of(name: str) -> nn.Module:
    model = tiny_model(name, seed=0)
    return widen_(model) if name == "bert" else model  # BERT's 0.02-std init makes every unit negligible


def batches(name: str, n: int, seed: int) -> list[dict]:
    return [tiny_batch(name, batch_size=8, seq_len=12, seed=seed + i) for i in range(n)]


def spec_of(model: nn.Module, sparsity: float = 0.5):
    return select_units(score_units(model, method="magnitude"), sparsity=sparsity)


def final(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return out.hidden_states[-1]


def mse(model: nn.Module, dense: nn.Module, held: list[dict]) -> float:
    errs = []
    for b in held:
        m = b["attention_mask"].bool()
        errs.append((final(model, b) - final(dense, b))[m].pow(2).mean())
    return float(torch.stack(errs).mean())


@pytest.mark.parametrize("name", ARCHS)
def test_reconstruction_brings_pruned_model_closer_to_dense(name):
    dense = model_of(name)
    spec = spec_of(dense)
    calib, held = batches(name, 8, seed=10), batches(name, 4, seed=100)
    err = {}
    for method in ("none", "bias", "scale", "lstsq"):
        model = reconstruct_(copy.deepcopy(dense), spec, calib, method)
        shrink_(model, spec)
        err[method] = mse(model, dense, held)
    assert err["bias"] < err["none"], err
    assert err["lstsq"] < err["none"], err
    assert err["lstsq"] <= err["bias"] * 1.05, err


def test_none_is_identity():
    dense = model_of("llama_gqa")
    model = copy.deepcopy(dense)
    assert reconstruct_(model, spec_of(dense), None, "none") is model
    for (k, a), (_, b) in zip(dense.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", ARCHS)
def test_masked_and_shrunk_agree_after_reconstruction(name):
    model = model_of(name)
    spec = spec_of(model)
    reconstruct_(model, spec, batches(name, 2, seed=10), "lstsq")
    b = tiny_batch(name, batch_size=4, seq_len=12, seed=5)
    apply_mask(model, spec)
    masked = final(model, b)
    remove_mask(model)
    shrink_(model, spec)
    torch.testing.assert_close(final(model, b)[b["attention_mask"].bool()], masked[b["attention_mask"].bool()],
                               atol=1e-5, rtol=1e-5)


def test_llama_bias_is_created_and_round_trips(tmp_path):
    model = model_of("llama_gqa")
    spec = spec_of(model)
    reconstruct_(model, spec, batches("llama_gqa", 2, seed=10), "bias")
    assert model.config.attention_bias and model.config.mlp_bias
    config = copy.deepcopy(model.config)  # the dense config, now with the bias flags
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    assert model.model.layers[0].mlp.down_proj.bias is not None
    shrink_(model, spec)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    fresh = shrink_(type(model)(config).eval(), spec)  # rebuild: dense config + spec, then load
    fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    b = tiny_batch("llama_gqa", seed=3)
    torch.testing.assert_close(fresh(**b).logits, model(**b).logits)
    assert model.config.taskprune_reconstruction["method"] == "bias"


def test_bad_method_raises():
    model = model_of("bert")
    with pytest.raises(ValueError, match="unknown reconstruction method 'mean'"):
        reconstruct_(model, spec_of(model), batches("bert", 1, 0), "mean")


def test_bad_scale_range_raises():
    model = model_of("bert")
    with pytest.raises(ValueError, match="scale_range must contain 1"):
        reconstruct_(model, spec_of(model), batches("bert", 1, 0), "lstsq", scale_range=(1.5, 2.0))


def test_shrunk_model_refused():
    model = model_of("bert")
    spec = spec_of(model)
    shrink_(model, spec)
    with pytest.raises(ValueError, match="before shrink_"):
        reconstruct_(model, spec, batches("bert", 1, 0), "bias")


def test_missing_batches_refused():
    model = model_of("bert")
    with pytest.raises(ValueError, match="needs calibration batches"):
        reconstruct_(model, spec_of(model), None, "bias")


def test_t5_bias_skipped_with_warning(caplog):
    model = tiny_model("t5")
    spec = spec_of(model)
    with caplog.at_level(logging.WARNING, logger="taskprune.reconstruct"):
        reconstruct_(model, spec, [tiny_batch("t5", seed=1)], "lstsq")
    assert "bias compensation skipped" in caplog.text
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
