"""taskprune.pipeline: the one composition of the stages, its presets, and what it resolves from the data."""

import pytest
import torch
from tiny import tiny_batch, tiny_model, widen_

from taskprune.arch import get_architecture
from taskprune.flops import count_macs
from taskprune.pipeline import PRESETS, Pipeline, prune
from taskprune.selection import Budget, select_units


def labelled(n, seed=0):
    out = []
    for i in range(n):
        b = tiny_batch("bert", batch_size=8, seq_len=12, seed=seed + i)
        b["labels"] = torch.arange(8) % 3
        out.append(b)
    return out


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_prunes_to_its_budget_and_records_itself(name):
    model = widen_(tiny_model("bert", seed=0)).eval()
    batches, held_out = labelled(3), labelled(2, seed=20)
    pipeline = Pipeline.preset(name).at(0.4) if Pipeline.preset(name).budget.seq_len == "mean" else \
        Pipeline.preset(name).at(0.4, seq_len=12)
    spec = pipeline.prune(model, batches, held_out=held_out if pipeline.budget.split == "loss" else None)
    seq = spec.budget["seq_len"]
    assert count_macs(model, seq, spec) <= 0.6 * count_macs(model, seq) + 1e-6
    assert spec.meta["pipeline"] == name
    assert bool(spec.scales or spec.columns) == (pipeline.tuning.tune != "none")
    assert bool(spec.columns) == (pipeline.tuning.tune != "none" and pipeline.tuning.fit == "columns")


def test_mean_seq_len_is_the_batches_mean_real_length():
    batches = labelled(2)
    mean = float(torch.cat([b["attention_mask"].sum(-1).double() for b in batches]).mean())
    assert Pipeline.preset("kwon").resolve(batches).budget.seq_len == round(mean)
    assert Pipeline().resolve(batches) == Pipeline()  # a number stays
    with pytest.raises(ValueError, match="seq_len='mean' is the calibration batches' mean length"):
        select_units(Pipeline().score(tiny_model("bert"), batches), Budget(seq_len="mean"))


def test_prune_function_and_bad_presets():
    model = tiny_model("bert").eval()
    spec = prune(model, labelled(2), "magnitude", amount=0.3)
    assert spec.meta["pipeline"] == "magnitude" and spec.budget["request"] == {"macs": 0.3}
    with pytest.raises(ValueError, match=r"unknown preset 'kwan'; allowed: \['taskprune'"):
        Pipeline.preset("kwan")
    with pytest.raises(TypeError, match="budget must be a taskprune.selection.Budget"):
        Pipeline(budget={"amount": 0.4})


def test_iterative_pruning_rescores_the_shrunk_model_and_returns_a_spec_of_the_dense_one(monkeypatch):
    model = widen_(tiny_model("bert", seed=0)).eval()
    batches = labelled(2)
    seen = []
    score = Pipeline.score

    def counting(self, m, b, forward=None):
        seen.append(count_macs(m, 12))
        return score(self, m, b, forward)

    monkeypatch.setattr(Pipeline, "score", counting)
    pipeline = Pipeline(steps=3).at(0.5, seq_len=12)
    spec = pipeline.prune(model, batches)
    dense = count_macs(model, 12)
    assert len(seen) == 3 and seen[0] == dense and seen[0] > seen[1] > seen[2]  # each step scores the shrunk model
    assert spec.fingerprint == get_architecture(model).fingerprint()  # the dense model's
    assert 0.5 <= spec.budget["achieved"]["macs"] < 0.6 and spec.budget["steps"] == 3
    assert count_macs(model, 12, spec) <= 0.5 * dense + 1e-6
    assert spec.columns  # the default refit runs on the dense model with the final units


def test_iterative_pruning_with_scores_that_do_not_change_keeps_the_one_shot_units():
    """Weight magnitudes do not depend on what was removed: without per-block normalisation, three steps must remove
    exactly the neurons one step removes (what is checked: the composition of the steps' indices, the amounts)."""
    from taskprune.attribution import AttributionConfig
    from taskprune.tuning import TuningConfig

    model = widen_(tiny_model("bert", seed=0)).eval()
    att = AttributionConfig(method="magnitude", units="neurons")  # one kind: every step ranks the same neurons
    budget = Budget(amount=0.2, scope="per_kind", normalize="none", seq_len=12)
    one = Pipeline(att, budget, TuningConfig()).prune(model, labelled(1))
    three = Pipeline(att, budget, TuningConfig(), steps=3).prune(model, labelled(1))
    assert three.keep == one.keep and one.budget["achieved"]["neurons"] > 0.3


def test_iterative_pruning_refuses_what_it_cannot_split():
    from taskprune.tuning import TuningConfig

    with pytest.raises(ValueError, match=r"steps=0 must be a positive integer"):
        Pipeline(steps=0)
    with pytest.raises(ValueError, match=r"steps=2 splits a MAC or parameter budget .* kind='heads'"):
        Pipeline(budget=Budget(kind="heads", scope="per_kind"), steps=2)
    with pytest.raises(ValueError, match=r"tune='schedule' selects its teacher from the dense model's scores"):
        Pipeline(budget=Budget(), tuning=TuningConfig(tune="schedule"), steps=2)
