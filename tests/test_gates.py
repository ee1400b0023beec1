import pytest
import torch

from taskprune.gates import Gates
from tiny import ARCHS, tiny_batch, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_gates_at_one_are_bit_identical(arch):
    model, batch = tiny_model(arch), tiny_batch(arch)
    with torch.no_grad():
        dense = model(**batch).logits
        with Gates(model) as gates:
            gates.set(torch.ones(gates.n_units))
            shared = model(**batch).logits
            gates.set(torch.ones(batch["input_ids"].shape[0], gates.n_units))
            per_sample = model(**batch).logits
        after = model(**batch).logits
    assert torch.equal(dense, shared) and torch.equal(dense, per_sample) and torch.equal(dense, after)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_gate_per_unit_of_every_block(arch):
    model = tiny_model(arch)
    gates = Gates(model)
    arch_ = gates.arch
    assert gates.n_units == sum(b.n_units for b in (*arch_.attention, *arch_.ffn))
    if arch == "llama_gqa":  # GQA: a unit is a KV group (2 query heads each here)
        assert all(b.n_units == 2 and b.group_size == 2 for b in arch_.attention)


def test_gate_rows_must_match_the_batch():
    model, batch = tiny_model("bert"), tiny_batch("bert", batch_size=4)
    with Gates(model) as gates, pytest.raises(ValueError, match="per-sample gates have 3 rows but the input"):
        gates.set(torch.ones(3, gates.n_units))
        model(**batch)


def test_gate_values_of_the_wrong_width():
    with Gates(tiny_model("bert")) as gates, pytest.raises(ValueError, match="do not fit this model"):
        gates.set(torch.ones(gates.n_units + 1))
