"""Python API faults of issue #22 that gave a silent wrong result or a raw traceback: calibration batches that cannot be
scored, a spec other than the one that shrank the model, hand-edited scales, and a model with a head of its own."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from tiny import tiny_batch, tiny_model
from torch import nn

from taskprune.arch import get_architecture
from taskprune.attribution import score_units
from taskprune.export import OWN_HEAD_FILE, OWN_HEAD_META, SPEC_FILE, load_pruned, save_pruned
from taskprune.spec import PruneSpec
from taskprune.surgery import shrink_
from taskprune.tuning import fold_scales_


def _bert_batches(*labels: list[int]) -> list[dict]:
    """One tiny BERT batch of 4 rows per ``labels`` list (same inputs)."""
    return [{**tiny_batch("bert"), "labels": torch.tensor(y)} for y in labels]


# ------------------------------------------------------------------------------ batches that cannot be scored
def test_fewer_labels_than_input_rows_is_refused():
    """Before: 2 labels for 4 rows scored the first 2 rows and reported count 4."""
    with pytest.raises(ValueError, match=r"batch 0: labels has 2 row\(s\) but the inputs have 4 "
                                         r"\(input_ids: \[4, 9\]\); give one label per input row"):
        score_units(tiny_model("bert"), _bert_batches([0, 1]), "grad_x_gate")


def test_label_out_of_range_of_the_head_names_batch_row_value_and_range():
    """Before: ``RuntimeError: index 5 is out of bounds for dimension 1 with size 3`` from ``gather``."""
    with pytest.raises(ValueError, match=r"batch 1: row 2: label 5 is out of range of the head's 3 outputs "
                                         r"\(allowed: class indices 0\.\.2\); map the labels"):
        score_units(tiny_model("bert"), _bert_batches([0, 1, 2, 0], [0, 1, 5, 0]), "grad_x_gate")


def test_ignore_index_as_a_class_label_is_refused():
    """Before: ``RuntimeError: index -100 is out of bounds ...``."""
    with pytest.raises(ValueError, match=r"batch 0: row 1: label -100 is the ignore index, which a class label cannot "
                                         r"be.*allowed: class indices 0\.\.n_outputs-1.*target='pseudo'"):
        score_units(tiny_model("bert"), _bert_batches([0, -100, 1, 0]), "ig")


def test_token_id_beyond_the_vocabulary_is_refused_before_the_forward():
    """Before: ``IndexError: index out of range in self`` from the embedding."""
    (batch,) = _bert_batches([0, 1, 2, 0])
    batch["input_ids"] = batch["input_ids"].clone()
    batch["input_ids"][3, 1] = 150
    with pytest.raises(ValueError, match=r"batch 0: row 3: input_ids holds token id 150, outside the model's input "
                                         r"embedding \(ids 0\.\.99\).*model's own tokenizer"):
        score_units(tiny_model("bert"), [batch], "grad_x_gate")


# ------------------------------------------------------------------------------ the spec that shrank the model
def _two_specs(model) -> tuple[PruneSpec, PruneSpec]:
    """Two specs of equal widths that keep other heads / neurons."""
    fp = get_architecture(model).fingerprint()
    att, ffn = next(iter(fp["heads"])), next(iter(fp["neurons"]))
    a = PruneSpec(keep={"heads": {att: [0, 2]}, "neurons": {ffn: list(range(20))}}, fingerprint=fp)
    b = PruneSpec(keep={"heads": {att: [1, 3]}, "neurons": {ffn: list(range(17, 37))}}, fingerprint=fp)
    return a, b


SHRUNK_BY_ANOTHER = (r"this model was shrunk by another spec \(sha256:\w+; this one is sha256:\w+\): the widths match "
                     r"but the kept units differ.*Pass the spec given to shrink_")


def test_save_pruned_refuses_a_spec_other_than_the_one_that_shrank_the_model(tmp_path):
    """Before: B's indices were written beside A's weights (equal widths pass ``validate``)."""
    model = tiny_model("bert")
    a, b = _two_specs(model)
    shrink_(model, a)
    with pytest.raises(ValueError, match=SHRUNK_BY_ANOTHER):
        save_pruned(model, b, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    save_pruned(model, PruneSpec.from_dict(json.loads(json.dumps(a.to_dict()))), tmp_path / "out")  # A, via JSON


def test_fold_and_shrink_refuse_a_spec_other_than_the_one_that_shrank_the_model():
    model = tiny_model("bert")
    a, b = _two_specs(model)
    shrink_(model, a)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=SHRUNK_BY_ANOTHER):
        fold_scales_(model, b)
    with pytest.raises(ValueError, match=SHRUNK_BY_ANOTHER):
        shrink_(model, b)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_load_pruned_refuses_a_spec_file_of_another_export(tmp_path):
    """Before: a folder whose taskprune_spec.json came from another export of equal widths loaded silently."""
    model = tiny_model("bert")
    a, b = _two_specs(model)
    save_pruned(model, a, tmp_path / "a")
    b.save(tmp_path / "a" / SPEC_FILE)
    with pytest.raises(ValueError, match=r"config\.json' was written for a model shrunk by spec sha256:\w+, but "
                                         r".*taskprune_spec\.json' is spec sha256:\w+ \(same widths, other units\): "
                                         "the folder mixes files of two exports"):
        load_pruned(tmp_path / "a")


# ------------------------------------------------------------------------------ hand-edited scales
BAD_SCALES = {
    "a string": ("lots", TypeError, r"scales must be a dict .*got str \('lots'\)"),
    "a dict of non-lists": ({"heads": {"@": 0.5}}, TypeError,
                            r"scales\['heads'\]\['encoder\.layer\.0\.attention\.self'\] is a float \(0\.5\), "
                            r"not a list"),
    "a wrong length": ({"heads": {"@": [0.5]}}, ValueError,
                       r"scales\['heads'\]\['encoder\.layer\.0\.attention\.self'\] has 1 value\(s\) for 2 kept unit"),
    "non-numbers": ({"heads": {"@": ["0.5", None]}}, TypeError,
                    r"scales\['heads'\]\['encoder\.layer\.0\.attention\.self'\] holds non-number value\(s\) '0\.5', "
                    r"None; give one finite scale per kept unit \(2, a list in keep order\)"),
    "NaN": ({"heads": {"@": [float("nan"), 1.0]}}, ValueError,
            r"scales\['heads'\]\['encoder\.layer\.0\.attention\.self'\] holds non-finite value\(s\) \[nan\]"),
}


@pytest.mark.parametrize("case", list(BAD_SCALES))
def test_hand_edited_scales_of_the_wrong_type_are_refused_at_load(tmp_path, case):
    """Before: ``AttributeError`` / ``TypeError: 'float' object is not iterable`` / ``could not convert string``."""
    model = tiny_model("bert")
    a, _ = _two_specs(model)
    block = next(iter(a.keep["heads"]))
    scales, error, message = BAD_SCALES[case]
    d = a.to_dict()
    d["scales"] = json.loads(json.dumps(scales).replace('"@"', json.dumps(block)))
    (tmp_path / "spec.json").write_text(json.dumps(d))
    with pytest.raises(error, match=r"spec\.json': " + message):
        PruneSpec.load(tmp_path / "spec.json")


# ------------------------------------------------------------------------------ a head of your own
class OwnClassifier(nn.Module):
    """An encoder plus a head of one's own (not a ``*ForSequenceClassification``): logits ``[batch, n_labels]``."""

    def __init__(self, n_labels: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=64)
        self.encoder = tf.BertModel(cfg)
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(32, n_labels))

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0])


def test_an_own_head_is_saved_beside_the_encoder_and_loaded_into_your_module(tmp_path):
    """Before: the head was dropped (a log warning only) and ``load_pruned`` returned the bare encoder."""
    model = OwnClassifier().eval()
    batch = tiny_batch("bert")
    scores = score_units(model, [{**batch, "labels": torch.tensor([0, 1, 2, 0])}], "grad_x_gate")  # default target
    assert scores.count == 4 and all(v.abs().sum() > 0 for v in scores.sums["heads"].values())
    a, _ = _two_specs(model)
    shrink_(model, a)
    with torch.no_grad():
        expected = model(**batch)
    save_pruned(model, a, tmp_path / "p")
    assert (tmp_path / "p" / OWN_HEAD_FILE).is_file()
    meta = json.loads((tmp_path / "p" / OWN_HEAD_META).read_text())
    assert meta["class"].endswith(":OwnClassifier") and meta["hf_path"] == "encoder"

    with pytest.warns(UserWarning, match=r"load_pruned returns the bare BertModel without your head\. Pass "
                                         r"into=OwnClassifier\(\.\.\.\)"):
        bare = load_pruned(tmp_path / "p")
    assert type(bare) is tf.BertModel

    mine = OwnClassifier(seed=1)  # other random weights: everything comes from the folder
    back = load_pruned(tmp_path / "p", into=mine)
    assert back is mine and not back.training
    with torch.no_grad():
        torch.testing.assert_close(back(**batch), expected, rtol=0, atol=0)

    with pytest.raises(ValueError, match=r"OwnClassifier does not match the head saved in .*: other shapes: "
                                         r"\['head\.1\.bias: file \(3,\), yours \(2,\)'.*Build into= as"):
        load_pruned(tmp_path / "p", into=OwnClassifier(n_labels=2))
    with pytest.raises(ValueError, match=r"holds no own_head\.safetensors.*OwnClassifier's tensors outside it"):
        plain = tiny_model("bert")
        save_pruned(plain, _two_specs(plain)[0], tmp_path / "plain")
        load_pruned(tmp_path / "plain", into=OwnClassifier())
