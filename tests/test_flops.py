import pytest
import torch

from taskprune.arch import get_architecture
from taskprune.flops import count_macs, count_params, macs_breakdown, prunable_params, unit_costs
from taskprune.spec import PruneSpec
from taskprune.surgery import shrink_
from tiny import ARCHS, tiny_model


def _fp(name):
    return get_architecture(tiny_model(name)).fingerprint()


def _spec(fp, drop_heads=1, drop_neurons=5):
    """Drop the first units of every block (the last head for variety)."""
    keep = {
        "heads": {n: list(range(c - drop_heads)) for n, c in fp["heads"].items()},
        "neurons": {n: list(range(drop_neurons, c)) for n, c in fp["neurons"].items()},
    }
    return PruneSpec(keep=keep, fingerprint=fp)


def test_mha_head_cost_is_kwon_formula():
    s, d, dh = 128, 32, 8
    costs = unit_costs(_fp("bert"), seq_len=s)
    for macs, params in costs["heads"].values():
        assert macs == 4 * s * d * dh + 2 * s * s * dh
        assert params == 4 * d * dh


def test_gqa_group_cost():
    s, d, dh, g = 16, 32, 8, 2
    fp = _fp("llama_gqa")
    assert set(fp["group_size"].values()) == {g}
    for macs, params in unit_costs(fp, seq_len=s)["heads"].values():
        assert macs == g * 2 * s * d * dh + 2 * s * d * dh + g * 2 * s * s * dh
        assert params == (2 * g + 2) * d * dh
    for macs, params in unit_costs(fp, seq_len=s)["neurons"].values():  # gated: gate + up + down
        assert (macs, params) == (3 * s * d, 3 * d)


def test_unit_cost_biases():
    fp = _fp("bert")
    plain, biased = unit_costs(fp), unit_costs(fp, biases=True)
    name = next(iter(fp["heads"]))
    assert biased["heads"][name][1] - plain["heads"][name][1] == 3 * 8  # q, k, v biases of one head
    name = next(iter(fp["neurons"]))
    assert biased["neurons"][name][1] - plain["neurons"][name][1] == 1


def test_count_macs_bert_by_hand():
    # BERT tiny: 2 layers, d=32, 4 heads of 8, 37 intermediate neurons (ungated)
    s, d, n_layers, d_ff = 64, 32, 2, 37
    attention = 4 * s * d * d + 2 * s * s * d  # q, k, v, o projections + QK^T + AV (4 heads of 8: d = 32)
    ffn = 2 * s * d * d_ff
    assert count_macs(tiny_model("bert"), seq_len=s) == n_layers * (attention + ffn)
    assert count_macs(_fp("bert"), seq_len=s) == n_layers * (attention + ffn)
    bd = macs_breakdown(_fp("bert"), seq_len=s)
    assert set(bd["heads"].values()) == {attention} and set(bd["neurons"].values()) == {ffn}


def test_count_macs_with_spec_counts_kept_units():
    fp = _fp("t5_gated")
    spec = _spec(fp)
    costs = unit_costs(fp, seq_len=32)
    expected = sum((c - 1) * costs["heads"][n][0] for n, c in fp["heads"].items())
    expected += sum((c - 5) * costs["neurons"][n][0] for n, c in fp["neurons"].items())
    assert count_macs(fp, seq_len=32, spec=spec) == expected
    assert prunable_params(fp, spec) < prunable_params(fp)


@pytest.mark.parametrize("name", ARCHS)
def test_count_params_is_numel_sum(name):
    model = tiny_model(name)
    assert count_params(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ARCHS)
def test_predicted_params_match_shrunk_model(name):
    model = tiny_model(name)
    fp = get_architecture(model).fingerprint()
    spec = _spec(fp)
    predicted = count_params(model, spec)
    predicted_macs = count_macs(model, seq_len=16, spec=spec)
    shrink_(model, spec)
    assert predicted == sum(p.numel() for p in model.parameters()) < count_params(tiny_model(name))
    assert count_macs(model, seq_len=16) == predicted_macs  # the shrunk model's own fingerprint agrees


def test_spec_for_another_model_rejected():
    spec = _spec(_fp("bert"))
    with pytest.raises(ValueError, match="spec was made for a model with heads"):
        count_macs(_fp("gpt2"), spec=spec)


def test_bad_seq_len_rejected():
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        count_macs(_fp("bert"), seq_len=0)


def test_incomplete_fingerprint_rejected():
    with pytest.raises(ValueError, match="fingerprint is missing key"):
        count_macs({"heads": {}, "neurons": {}})


def test_count_params_needs_model():
    with pytest.raises(TypeError, match="count_params needs the model"):
        count_params(_fp("bert"))


def test_count_macs_rejects_other_types():
    with pytest.raises(TypeError, match="expected a model"):
        count_macs(torch.zeros(3))
