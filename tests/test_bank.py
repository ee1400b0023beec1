import json

import pytest
import torch

from test_export import logits, random_spec
from tiny import tiny_batch, tiny_model
from taskprune.bank import MaskBank
from taskprune.export import load_pruned
from taskprune.surgery import active_mask


@pytest.fixture
def bank():
    model = tiny_model("bert")
    b = MaskBank(model)
    b.add("sst2", random_spec(model, seed=1))
    b.add("mnli", random_spec(model, seed=2))
    return b


BATCH = tiny_batch("bert")


def test_activate_a_then_b_equals_b_alone(bank):
    bank.activate("sst2")
    bank.activate("mnli")
    after_switch = logits(bank.model, BATCH)
    fresh = MaskBank(tiny_model("bert"))
    fresh.add("mnli", bank.get("mnli"))
    fresh.activate("mnli")
    assert torch.equal(after_switch, logits(fresh.model, BATCH))
    assert bank.active == "mnli"


def test_masks_change_outputs_and_deactivate_restores_dense_bit_for_bit(bank):
    dense = logits(bank.model, BATCH)
    weights = {k: v.clone() for k, v in bank.model.state_dict().items()}
    bank.activate("sst2")
    assert not torch.allclose(logits(bank.model, BATCH), dense)
    bank.deactivate()
    assert torch.equal(logits(bank.model, BATCH), dense)
    assert bank.active is None and active_mask(bank.model) is None
    assert all(torch.equal(weights[k], v) for k, v in bank.model.state_dict().items())


def test_export_equals_masked_outputs_and_leaves_base_untouched(bank, tmp_path):
    bank.activate("sst2")
    masked = logits(bank.model, BATCH)
    bank.export("mnli", tmp_path / "mnli")
    assert bank.active == "sst2" and torch.equal(logits(bank.model, BATCH), masked)  # active mask kept
    bank.activate("mnli")
    exported = load_pruned(tmp_path / "mnli")
    torch.testing.assert_close(logits(exported, BATCH), logits(bank.model, BATCH), rtol=0, atol=1e-5)
    assert sum(p.numel() for p in exported.parameters()) < sum(p.numel() for p in bank.model.parameters())


def test_save_load_round_trip(bank, tmp_path):
    bank.save(tmp_path / "bank")
    assert json.loads((tmp_path / "bank" / "index.json").read_text())["tasks"] == [
        {"task": "sst2", "file": "sst2.json"}, {"task": "mnli", "file": "mnli.json"}]
    loaded = MaskBank.load(tmp_path / "bank", tiny_model("bert"))
    assert loaded.tasks == ["sst2", "mnli"]
    assert all(loaded.get(t) == bank.get(t) for t in bank.tasks)


# ---------------------------------------------------------------------------------------- bad input
def test_unknown_task_lists_known_ones(bank):
    with pytest.raises(ValueError, match=r"unknown task 'qqp'; the bank has \['sst2', 'mnli'\]"):
        bank.activate("qqp")


def test_spec_of_another_model_refused(bank):
    with pytest.raises(ValueError, match="the spec for task 'rte' was made for another model"):
        bank.add("rte", random_spec(tiny_model("gpt2")))


def test_duplicate_task_refused(bank):
    with pytest.raises(ValueError, match="already has a spec for task 'sst2'; pass replace=True"):
        bank.add("sst2", bank.get("mnli"))


def test_task_name_that_is_not_a_file_name_refused(bank):
    with pytest.raises(ValueError, match=r"task name '\.\./evil' is not allowed"):
        bank.add("../evil", bank.get("sst2"))


def test_load_over_another_model_refused(bank, tmp_path):
    bank.save(tmp_path / "bank")
    import transformers as tf

    other = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                                                           num_attention_heads=4, intermediate_size=37))
    with pytest.raises(ValueError, match="was saved for another model"):
        MaskBank.load(tmp_path / "bank", other)


def test_load_with_missing_spec_file_named(bank, tmp_path):
    bank.save(tmp_path / "bank")
    (tmp_path / "bank" / "mnli.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"mnli\.json' is missing"):
        MaskBank.load(tmp_path / "bank", tiny_model("bert"))


def test_load_without_index_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"index\.json' is missing"):
        MaskBank.load(tmp_path, tiny_model("bert"))
