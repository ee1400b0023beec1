import math

import pytest
import torch

from taskprune.arch import get_architecture
from taskprune.flops import count_macs, prunable_params, unit_costs
from taskprune.selection import select_units
from taskprune.spec import PruneSpec
from taskprune.unitscores import UnitScores, empty_scores
from tiny import tiny_model

SEQ = 64


def _fingerprint(n_layers=3, n_heads=6, n_neurons=40, d=48, dh=8, group=1, gated=False):
    att = [f"layers.{i}.attn" for i in range(n_layers)]
    ffn = [f"layers.{i}.mlp" for i in range(n_layers)]
    return {
        "model_type": "synthetic",
        "heads": {n: n_heads for n in att},
        "neurons": {n: n_neurons for n in ffn},
        "head_dim": {n: dh for n in att},
        "group_size": {n: group for n in att},
        "d_model": {n: d for n in (*att, *ffn)},
        "gated": {n: gated for n in ffn},
    }


def _scores(fp=None, seed=0, scale=None) -> UnitScores:
    """Random positive scores; ``scale[i]`` multiplies the scores of layer ``i``."""
    fp = fp or _fingerprint()
    s = empty_scores(fp, ("heads", "neurons"), "ig")
    g = torch.Generator().manual_seed(seed)
    for kind, blocks in s.sums.items():
        for i, name in enumerate(blocks):
            v = torch.rand(fp[kind][name], generator=g, dtype=torch.float64)
            s.sums[kind][name] = v * (scale[i] if scale else 1.0)
    return s


def _dropped(spec: PruneSpec, kind: str) -> dict[str, int]:
    return {n: len(spec.drop(kind, n)) for n in spec.fingerprint[kind]}


# ------------------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("budget", [{"heads": 0.3}, {"neurons": 0.45}, {"sparsity": 0.2},
                                    {"heads": 0.5, "neurons": 0.1}])
def test_count_budgets_reach_target(budget, scope):
    s = _scores()
    spec = select_units(s, scope=scope, **budget)
    achieved = spec.budget["achieved"]
    for kind in ("heads", "neurons"):
        f = budget.get(kind, budget.get("sparsity", 0.0))
        n_total = spec.n_total(kind)
        n_blocks = len(spec.fingerprint[kind]) if scope == "layerwise" else 1
        assert f <= achieved[kind] < f + n_blocks / n_total + 1e-12  # at least the target, < 1 unit (per block)
        assert achieved[kind] == (n_total - spec.n_kept(kind)) / n_total


@pytest.mark.parametrize("name", ["macs", "params"])
@pytest.mark.parametrize("fraction", [0.1, 0.37, 0.7])
def test_cost_budgets_reach_target_within_one_unit(name, fraction):
    fp = _fingerprint(group=2, gated=True)
    spec = select_units(_scores(fp), seq_len=SEQ, **{name: fraction})
    col = 0 if name == "macs" else 1
    costs = unit_costs(fp, SEQ)
    total = count_macs(fp, SEQ) if name == "macs" else prunable_params(fp)
    biggest = max(c[col] for blocks in costs.values() for c in blocks.values())
    assert fraction <= spec.budget["achieved"][name] < fraction + biggest / total
    if name == "macs":  # the recorded cut is what count_macs says of the spec
        assert math.isclose(spec.budget["achieved"]["macs"], 1 - count_macs(fp, SEQ, spec) / total)


def test_cost_budget_greedy_is_score_per_cost():
    # equal scores: a head costs far more MACs than a neuron, so it has the lowest score per MAC and goes first
    s = _scores()
    for blocks in s.sums.values():
        for name in blocks:
            blocks[name].fill_(1.0)
    spec = select_units(s, macs=0.1, seq_len=SEQ, scope="global", normalize="none")
    assert spec.budget["removed"]["heads"] > 0 and spec.budget["removed"]["neurons"] == 0


def test_layerwise_removes_same_count_per_block():
    spec = select_units(_scores(scale=[1.0, 100.0, 0.01]), neurons=0.3, heads=0.5, scope="layerwise")
    assert set(_dropped(spec, "neurons").values()) == {12}
    assert set(_dropped(spec, "heads").values()) == {3}


def test_layerwise_cost_budget_same_count_per_block():
    spec = select_units(_scores(scale=[1.0, 100.0, 0.01]), macs=0.3, scope="layerwise", seq_len=SEQ)
    assert len(set(_dropped(spec, "neurons").values())) == 1
    assert len(set(_dropped(spec, "heads").values())) == 1
    assert spec.budget["achieved"]["macs"] >= 0.3


def test_layerwise_keeps_lowest_scores_out():
    s = _scores()
    spec = select_units(s, neurons=0.25, scope="layerwise")
    for name, v in s.mean()["neurons"].items():
        dropped = spec.drop("neurons", name)
        assert v[dropped].max() < v[spec.kept("neurons", name)].min()


def test_global_ranks_across_blocks_and_normalize_evens_scales():
    s = _scores(scale=[1.0, 1000.0, 1000.0])
    plain = select_units(s, neurons=0.2, normalize="none")
    assert _dropped(plain, "neurons") == {"layers.0.mlp": 24, "layers.1.mlp": 0, "layers.2.mlp": 0}
    for how in ("l1", "l2", "max"):
        normed = select_units(s, neurons=0.2, normalize=how)
        assert all(n > 0 for n in _dropped(normed, "neurons").values()), how
        assert sum(_dropped(normed, "neurons").values()) == 24


def test_floors_respected():
    s = _scores(scale=[0.001, 1.0, 1.0])  # every lowest score is in layer 0
    spec = select_units(s, heads=0.5, neurons=0.2, min_heads=2, min_neurons=30, normalize="none")
    assert min(len(spec.kept("heads", n)) for n in spec.fingerprint["heads"]) >= 2
    assert len(spec.kept("neurons", "layers.0.mlp")) == 30
    assert spec.budget["removed"]["neurons"] == 24  # what the floor saved in layer 0 came from the others


def test_signed_scores_most_negative_first():
    s = _scores()
    s.sums["heads"]["layers.2.attn"][4] = -5.0
    s.sums["heads"]["layers.1.attn"][3] = -0.5
    spec = select_units(s, heads=2 / 18, units="heads")
    assert spec.drop("heads", "layers.2.attn") == [4] and spec.drop("heads", "layers.1.attn") == [3]
    assert spec.budget["removed"]["neurons"] == 0  # units="heads" leaves neurons whole


def test_ties_are_deterministic_by_block_then_index():
    s = empty_scores(_fingerprint(), ("heads", "neurons"), "random")  # all zero
    a = select_units(s, heads=0.25)  # ceil(4.5) = 5 heads, block 0 may lose 5 of 6
    assert a.drop("heads", "layers.0.attn") == [0, 1, 2, 3, 4]
    assert a.drop("heads", "layers.1.attn") == []
    assert select_units(s, heads=0.25).keep == a.keep


def test_spec_records_request_and_method(tmp_path):
    spec = select_units(_scores(), macs=0.25, seq_len=SEQ, normalize="l2")
    assert spec.method == "ig"
    assert spec.budget["request"] == {"macs": 0.25}
    assert spec.budget["normalize"] == "l2" and spec.budget["seq_len"] == SEQ
    assert set(spec.budget["achieved"]) == {"heads", "neurons", "macs", "params"}
    spec.save(tmp_path / "spec.json")  # JSON-serialisable
    assert PruneSpec.load(tmp_path / "spec.json").keep == spec.keep


def test_dict_scores_with_fingerprint_on_tiny_model():
    model = tiny_model("llama_gqa")
    fp = get_architecture(model).fingerprint()
    values = {"heads": {n: [1.0, 0.0] for n in fp["heads"]}}
    spec = select_units(values, fingerprint=fp, heads=0.5, method="manual")
    assert all(spec.kept("heads", n) == [0] for n in fp["heads"])
    assert spec.n_kept("neurons") == spec.n_total("neurons") and spec.validate(model) == "dense"


# ------------------------------------------------------------------------------------------------ bad input
def test_unreachable_budget_raises():
    with pytest.raises(ValueError, match=r"heads=0.9 cannot be reached .* at most 0.8333 .* lower the budget or the fl"):
        select_units(_scores(), heads=0.9)


def test_unreachable_cost_budget_raises():
    with pytest.raises(ValueError, match=r"macs=0.9 cannot be reached .*lower the budget or the floor"):
        select_units(_scores(), macs=0.9, min_heads=3, min_neurons=20)


@pytest.mark.parametrize("value", [1.0, -0.1])
def test_sparsity_outside_unit_interval_raises(value):
    with pytest.raises(ValueError, match=r"sparsity=.* is not a fraction in \[0, 1\)"):
        select_units(_scores(), sparsity=value)


def test_two_budgets_raise():
    with pytest.raises(ValueError, match=r"conflicting budgets \['macs', 'sparsity'\]"):
        select_units(_scores(), sparsity=0.2, macs=0.2)


def test_no_budget_raises():
    with pytest.raises(ValueError, match="no budget given"):
        select_units(_scores())


def test_nan_scores_raise_with_hint():
    s = _scores()
    s.sums["neurons"]["layers.1.mlp"][3] = float("nan")
    with pytest.raises(ValueError, match="non-finite score.*float32"):
        select_units(s, neurons=0.2)


def test_bad_scope_raises():
    with pytest.raises(ValueError, match="scope='per_layer' is not allowed"):
        select_units(_scores(), heads=0.2, scope="per_layer")


def test_bad_normalize_raises():
    with pytest.raises(ValueError, match="normalize='l3' is not allowed"):
        select_units(_scores(), heads=0.2, normalize="l3")


def test_negative_head_floor_raises_and_zero_lets_a_block_lose_every_head():
    with pytest.raises(ValueError, match="min_heads must be an int >= 0"):
        select_units(_scores(), heads=0.2, min_heads=-1)
    spec = select_units(_scores(), heads=0.9, min_heads=0, scope="global")
    assert any(not spec.kept("heads", n) for n in spec.keep["heads"])


def test_budget_for_unpruned_kind_raises():
    with pytest.raises(ValueError, match="heads=0.2 budget was given but heads are not pruned"):
        select_units(_scores(), heads=0.2, units="neurons")


def test_dict_scores_without_fingerprint_raise():
    with pytest.raises(ValueError, match="need fingerprint="):
        select_units({"heads": {}}, heads=0.2)


def test_scores_of_another_model_raise():
    s = _scores()
    s.sums["heads"]["layers.0.attn"] = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="have 4 values but the block has 6 units"):
        select_units(s, heads=0.2)


def test_per_kind_cuts_the_same_fraction_of_attention_and_ffn_macs():
    s = _scores()
    spec = select_units(s, macs=0.4, scope="per_kind")
    costs = unit_costs(spec.fingerprint, 128)
    for kind in ("heads", "neurons"):
        total = sum(spec.fingerprint[kind][n] * costs[kind][n][0] for n in spec.fingerprint[kind])
        cut = sum(len(spec.drop(kind, n)) * costs[kind][n][0] for n in spec.fingerprint[kind])
        assert 0.4 <= cut / total < 0.4 + max(c[0] for c in costs[kind].values()) / total + 1e-9
    assert spec.budget["achieved"]["macs"] >= 0.4


def test_bad_scope_names_per_kind():
    with pytest.raises(ValueError, match="per_kind"):
        select_units(_scores(), macs=0.4, scope="kindwise")


def _squared(s: UnitScores) -> UnitScores:
    s.options = {**s.options, "aggregate": "square"}
    return s


def test_auto_scope_searches_fisher_scale_scores_under_a_mac_budget():
    """The default scope runs Kwon et al.'s search where heads and neurons share a scale, per_kind elsewhere."""
    from taskprune.search import search_macs

    fp = _fingerprint()
    sq = _squared(_scores(fp, seed=4, scale=[1.0, 5.0, 0.2]))
    spec = select_units(sq, macs=0.4, seq_len=SEQ)
    assert spec.budget["scope"] == "search"
    assert spec.keep == search_macs(sq, 0.4, seq_len=SEQ).keep
    plain = _scores(fp, seed=4, scale=[1.0, 5.0, 0.2])  # abs/signed attributions: kinds are not on one scale
    assert select_units(plain, macs=0.4, seq_len=SEQ).budget["scope"] == "per_kind"
    assert select_units(plain, macs=0.4, seq_len=SEQ).keep == select_units(plain, macs=0.4, seq_len=SEQ,
                                                                            scope="per_kind").keep
    for budget in ({"params": 0.4}, {"heads": 0.5}, {"sparsity": 0.3}):  # not a MAC budget: per_kind
        assert select_units(sq, seq_len=SEQ, **budget).budget["scope"] == "per_kind"
    assert select_units(sq, macs=0.05, seq_len=SEQ, units="neurons").budget["scope"] == "per_kind"
    fisher = _scores(fp, seed=4)
    fisher.method = "fisher"
    assert select_units(fisher, macs=0.4, seq_len=SEQ).budget["scope"] == "search"
    for method in ("activation", "magnitude", "random"):  # their options carry aggregate too; they ignore it
        other = _squared(_scores(fp, seed=4))
        other.method = method
        assert select_units(other, macs=0.4, seq_len=SEQ).budget["scope"] == "per_kind"
