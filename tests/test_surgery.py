"""Surgery: masked and shrunk models agree, on every tiny architecture; masks switch; bad specs change nothing."""

from __future__ import annotations

import copy
import logging
import random

import pytest
import torch
from tiny import ARCHS, tiny_batch, tiny_model
from torch import nn

from taskprune.arch import get_architecture, in_features, out_features
from taskprune.gates import Gates
from taskprune.spec import PruneSpec
from taskprune.surgery import MASK_ATTR, active_mask, apply_mask, remove_mask, shrink_

TOL = dict(atol=1e-5, rtol=1e-5)


def model_of(name: str, seed: int = 0) -> nn.Module:
    """A tiny model whose logits react to single units (BERT's 0.02-std init leaves its logits ~1e-4 apart)."""
    model = tiny_model(name, seed=seed)
    if name == "bert":
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, 0.3, generator=g)
    return model


def random_spec(model: nn.Module, seed: int = 0) -> PruneSpec:
    """Keep a random subset (>= 1 unit, < all) of each block; every third block untouched."""
    rng = random.Random(seed)
    arch = get_architecture(model)
    keep = {}
    for kind in ("heads", "neurons"):
        keep[kind] = {}
        for i, block in enumerate(arch.blocks(kind)):
            if i % 3 == 2 or block.n_units < 2:
                continue
            keep[kind][block.name] = sorted(rng.sample(range(block.n_units), rng.randint(1, block.n_units - 1)))
    return PruneSpec(keep, arch.fingerprint(), method="random")


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def removed_params(model: nn.Module, spec: PruneSpec) -> int:
    """Parameters that removing ``spec``'s units takes out of the dense ``model`` (weights and sliced biases)."""
    base = model.base_model
    arch = get_architecture(model)

    def rows(path: str) -> int:  # parameters per output channel
        m = base.get_submodule(path)
        return in_features(m) + (m.bias is not None)

    def cols(path: str) -> int:  # parameters per input channel (the output bias stays)
        return out_features(base.get_submodule(path))

    n = 0
    for b in arch.attention:
        per_unit = b.unit_width * cols(b.out)
        if b.fused_qkv:
            per_unit += (b.unit_width + 2 * b.head_dim) * rows(b.q)
        else:
            per_unit += b.unit_width * rows(b.q) + b.head_dim * (rows(b.k) + rows(b.v))
        n += per_unit * len(spec.drop("heads", b.name))
    for b in arch.ffn:
        per_unit = sum(rows(u) for u in b.up) + cols(b.down)
        n += per_unit * len(spec.drop("neurons", b.name))
    return n


def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("name", ARCHS)
def test_mask_equals_shrink(name):
    model, batch = model_of(name), tiny_batch(name)
    spec = random_spec(model)
    dense = logits(model, batch)
    apply_mask(model, spec)
    masked = logits(model, batch)
    assert (masked - dense).abs().max() > 100 * TOL["atol"]  # the spec changes the output: the check means something
    remove_mask(model)
    shrink_(model, spec)
    torch.testing.assert_close(logits(model, batch), masked, **TOL)
    assert spec.validate(model) == "shrunk"


@pytest.mark.parametrize("name", ARCHS)
def test_gate_zero_equals_removed_unit(name):
    model, batch = model_of(name, seed=1), tiny_batch(name)
    arch = get_architecture(model)
    att, ffn = arch.attention[-1], arch.ffn[0]
    dense = logits(model, batch)
    with Gates(model) as gates:
        flat = torch.ones(gates.n_units)
        g = gates.split(flat)  # views into flat
        g["heads"][att.name][0] = 0.0
        g["neurons"][ffn.name][[2, 5]] = 0.0
        gates.set(flat)
        gated = logits(model, batch)
    assert (gated - dense).abs().max() > 100 * TOL["atol"]
    spec = PruneSpec({"heads": {att.name: list(range(1, att.n_units))},
                      "neurons": {ffn.name: [i for i in range(ffn.n_units) if i not in (2, 5)]}}, arch.fingerprint())
    shrink_(model, spec)
    torch.testing.assert_close(logits(model, batch), gated, **TOL)


@pytest.mark.parametrize("name", ["t5", "t5_gated"])
def test_t5_disjoint_heads_per_layer(name):
    """Each layer keeps other heads than the first (which computes the shared position bias)."""
    model, batch = model_of(name), tiny_batch(name)
    arch = get_architecture(model)
    heads = {}
    for b in arch.attention:  # encoder self, decoder self and cross attention
        layer = int(b.name.split(".")[2])
        heads[b.name] = [1, 3] if layer == 0 else [0, 2]
    spec = PruneSpec({"heads": heads, "neurons": {arch.ffn[1].name: [0, 1, 2]}}, arch.fingerprint())
    apply_mask(model, spec)
    masked = logits(model, batch)
    remove_mask(model)
    shrink_(model, spec)
    torch.testing.assert_close(logits(model, batch), masked, **TOL)
    emb = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
    assert emb.weight.shape == (8, 4)  # the shared bias keeps every head


@pytest.mark.parametrize("name", ["t5", "llama_gqa", "gpt2"])
def test_generate_with_cache_mask_equals_shrink(name):
    model = model_of(name)
    batch = {k: v[:1] for k, v in tiny_batch(name).items() if k != "decoder_input_ids"}
    spec = random_spec(model, seed=3)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    apply_mask(model, spec)
    masked = model.generate(**batch, **kw)
    remove_mask(model)
    shrink_(model, spec)
    assert torch.equal(model.generate(**batch, **kw), masked)


def test_replay_on_fresh_model_loads_shrunk_weights():
    """The recipe path: a fresh dense model + the spec rebuilds the shrunk shapes; the weights then load."""
    shrunk = shrink_(model_of("t5"), random_spec(model_of("t5"), seed=2))
    fresh = shrink_(tiny_model("t5", seed=5), random_spec(model_of("t5"), seed=2))
    fresh.load_state_dict(shrunk.state_dict())
    batch = tiny_batch("t5")
    torch.testing.assert_close(logits(fresh, batch), logits(shrunk, batch), atol=0, rtol=0)
    copied = copy.deepcopy(shrunk)  # the T5 bias hooks are plain objects: they copy (and pickle) with the model
    torch.testing.assert_close(logits(copied, batch), logits(shrunk, batch), atol=0, rtol=0)


def test_model_inside_a_wrapper():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = model_of("bert")

        def forward(self, **batch):
            return self.encoder(**batch)

    wrapper, batch = Wrapper(), tiny_batch("bert")
    spec = random_spec(wrapper.encoder)
    apply_mask(wrapper, spec)
    masked = logits(wrapper, batch)
    assert active_mask(wrapper.encoder) is not None  # the mask lives on the base model, shared by both views
    remove_mask(wrapper)
    shrink_(wrapper, spec)
    torch.testing.assert_close(logits(wrapper, batch), masked, **TOL)


# ------------------------------------------------------------------ sizes, dtype, config
@pytest.mark.parametrize("name", ARCHS)
def test_param_count_after_shrink(name):
    model = model_of(name)
    spec = random_spec(model)
    expected = numel(model) - removed_params(model, spec)
    shrink_(model, spec)
    assert numel(model) == expected


@pytest.mark.parametrize("name", ["bert", "llama_gqa", "gpt2"])
def test_param_count_agrees_with_flops(name):
    from taskprune.flops import count_params

    model = model_of(name)
    spec = random_spec(model)
    predicted = count_params(model, spec)
    assert count_params(shrink_(model, spec)) == predicted


@pytest.mark.parametrize("name", ARCHS)
def test_bf16_stays_bf16(name):
    model = model_of(name).to(torch.bfloat16)
    spec = random_spec(model)
    shrink_(model, spec)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    assert all(p.requires_grad for p in model.parameters())
    out = logits(model, tiny_batch(name))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_config_records_widths():
    model = model_of("llama_gqa")
    arch = get_architecture(model)
    spec = PruneSpec({"heads": {arch.attention[0].name: [1]}, "neurons": {b.name: [0, 3, 7] for b in arch.ffn}},
                     arch.fingerprint())
    shrink_(model, spec)
    widths = model.config.taskprune_widths
    assert widths == {"heads": {"layers.0.self_attn": 1, "layers.1.self_attn": 2},
                      "neurons": {"layers.0.mlp": 3, "layers.1.mlp": 3}}
    assert model.config.intermediate_size == 3  # same count everywhere: the standard field follows
    assert model.config.num_key_value_heads == 2  # not the same everywhere: left alone
    assert "taskprune_widths" in model.config.to_dict()


def test_config_uniform_heads_llama():
    model = model_of("llama_gqa")
    arch = get_architecture(model)
    spec = PruneSpec({"heads": {b.name: [i] for i, b in enumerate(arch.attention)}}, arch.fingerprint())
    shrink_(model, spec)
    assert (model.config.num_key_value_heads, model.config.num_attention_heads) == (1, 2)
    import transformers as tf

    rebuilt = tf.LlamaForCausalLM(model.config)  # HF builds the same shapes from the updated config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_gpt2_attributes_follow():
    model = model_of("gpt2")
    spec = PruneSpec({"heads": {"h.0.attn": [0, 3]}}, get_architecture(model).fingerprint())
    shrink_(model, spec)
    attn = model.transformer.h[0].attn
    assert (attn.num_heads, attn.split_size, attn.c_attn.nf, attn.c_proj.nx) == (2, 16, 48, 16)


# ------------------------------------------------------------------ masks
def test_mask_switching_and_removal():
    model, batch = model_of("llama_gqa"), tiny_batch("llama_gqa")
    dense = logits(model, batch)
    a, b = random_spec(model, seed=1), random_spec(model, seed=2)
    assert a != b
    apply_mask(model, b)
    only_b = logits(model, batch)
    remove_mask(model)
    gates_a = apply_mask(model, a)
    apply_mask(model, b)  # replaces a
    assert not gates_a.installed
    torch.testing.assert_close(logits(model, batch), only_b, atol=0, rtol=0)
    assert remove_mask(model)
    assert torch.equal(logits(model, batch), dense)
    assert not remove_mask(model) and getattr(model.base_model, MASK_ATTR, None) is None


def test_gates_remove_restores_dense():
    model, batch = model_of("t5"), tiny_batch("t5")
    dense = logits(model, batch)
    gates = apply_mask(model, random_spec(model))
    assert gates.installed and active_mask(model) is gates
    gates.remove()
    assert active_mask(model) is None
    assert torch.equal(logits(model, batch), dense)


# ------------------------------------------------------------------ refusals
def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_spec_for_other_model_leaves_model_untouched():
    model = model_of("bert")
    before = _params(model)
    spec = random_spec(model_of("gpt2"))
    with pytest.raises(ValueError, match="model_type: spec says 'gpt2', model has 'bert'"):
        shrink_(model, spec)
    after = _params(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(model.config, "taskprune_widths")


def test_mask_on_shrunk_model_refused():
    model = model_of("gpt2")
    spec = random_spec(model)
    shrink_(model, spec)
    with pytest.raises(ValueError, match="already shrunk by the spec"):
        apply_mask(model, spec)


def test_shrink_with_active_mask_refused():
    model = model_of("bert")
    spec = random_spec(model)
    apply_mask(model, spec)
    with pytest.raises(ValueError, match="call taskprune.surgery.remove_mask"):
        shrink_(model, spec)


def test_shrink_twice_is_a_noop_with_warning(caplog):
    model, batch = model_of("gpt2"), tiny_batch("gpt2")
    spec = random_spec(model)
    shrink_(model, spec)
    once, n = logits(model, batch), numel(model)
    with caplog.at_level(logging.WARNING, logger="taskprune.surgery"):
        shrink_(model, spec)
    assert "shrink_ does nothing" in caplog.text
    assert numel(model) == n and torch.equal(logits(model, batch), once)


def test_not_a_spec_refused():
    with pytest.raises(TypeError, match="expected a taskprune PruneSpec, got dict"):
        shrink_(model_of("bert"), {"keep": {}})


@pytest.mark.parametrize("name", ["t5_gated", "llama_gqa"])
def test_ffn_block_with_every_neuron_removed(name):
    model, batch = model_of(name), tiny_batch(name)
    arch = get_architecture(model)
    spec = PruneSpec({"neurons": {arch.ffn[0].name: []}}, arch.fingerprint())
    apply_mask(model, spec)
    masked = logits(model, batch)
    remove_mask(model)
    shrink_(model, spec)
    torch.testing.assert_close(logits(model, batch), masked, **TOL)
    assert model.config.taskprune_widths["neurons"][arch.ffn[0].name] == 0


def test_gpt2_ffn_block_with_every_neuron_removed_refused():
    model = model_of("gpt2")
    before = _params(model)
    spec = PruneSpec({"heads": {"h.0.attn": [1]}, "neurons": {"h.1.mlp": []}}, get_architecture(model).fingerprint())
    with pytest.raises(ValueError, match="removes every neuron of 'h.1.mlp'.*keep at least one neuron"):
        shrink_(model, spec)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing sliced before the refusal
