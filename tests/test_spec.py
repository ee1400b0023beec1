"""PruneSpec: validation of hand-made and loaded specs, JSON round trip, fingerprint checks against models."""

from __future__ import annotations

import json

import pytest
import transformers as tf
from tiny import tiny_model

from taskprune.arch import get_architecture
from taskprune.spec import FORMAT, PruneSpec, fingerprint_diff

L0 = "encoder.layer.0.attention.self"
L1 = "encoder.layer.1.attention.self"
F0 = "encoder.layer.0.intermediate"


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert")


@pytest.fixture(scope="module")
def fp(bert):
    return get_architecture(bert).fingerprint()


def spec_of(fp, heads=None, neurons=None, **kw):
    return PruneSpec(keep={"heads": heads or {}, "neurons": neurons or {}}, fingerprint=fp, **kw)


# ------------------------------------------------------------------ helpers
def test_queries(fp):
    spec = spec_of(fp, heads={L0: [1, 3]}, neurons={F0: list(range(30))})
    assert spec.kept("heads", L0) == [1, 3]
    assert spec.drop("heads", L0) == [0, 2]
    assert spec.kept("heads", L1) == [0, 1, 2, 3]  # absent block: keep all
    assert spec.drop("heads", L1) == []
    assert spec.n_total("heads") == 8 and spec.n_kept("heads") == 6
    assert spec.n_total("neurons") == 74 and spec.n_kept("neurons") == 67
    assert spec.summary() == {"heads": {"kept": 6, "total": 8, "dropped": 2, "blocks_pruned": 1},
                              "neurons": {"kept": 67, "total": 74, "dropped": 7, "blocks_pruned": 1}}
    shrunk = spec.shrunk_fingerprint()
    assert shrunk["heads"] == {L0: 2, L1: 4} and shrunk["neurons"][F0] == 30
    assert shrunk["head_dim"] == fp["head_dim"] and fp["heads"][L0] == 4  # the spec's own fingerprint is untouched


def test_absent_kind_keeps_all(fp):
    spec = PruneSpec(keep={}, fingerprint=fp)
    assert spec.n_kept("heads") == spec.n_total("heads") and spec.n_kept("neurons") == spec.n_total("neurons")
    assert spec.shrunk_fingerprint() == fp


def test_equality(fp):
    assert spec_of(fp, heads={L0: [0]}) == spec_of(fp, heads={L0: [0]})
    assert spec_of(fp, heads={L0: [0]}) != spec_of(fp, heads={L0: [1]})
    assert spec_of(fp, heads={L0: [0]}, method="ig") != spec_of(fp, heads={L0: [0]})


def test_tuple_and_integral_indices_become_int_lists(fp):
    import numpy as np

    spec = spec_of(fp, heads={L0: (np.int64(0), 2)})
    assert spec.keep["heads"][L0] == [0, 2] and all(type(i) is int for i in spec.keep["heads"][L0])


# ------------------------------------------------------------------ bad specs, one per input
def test_duplicate_indices_refused(fp):
    with pytest.raises(ValueError, match=r"duplicate index\(es\) \[1\]"):
        spec_of(fp, heads={L0: [0, 1, 1]})


def test_unsorted_indices_refused(fp):
    with pytest.raises(ValueError, match="not sorted.*increasing order"):
        spec_of(fp, heads={L0: [2, 0]})


def test_out_of_range_index_refused(fp):
    with pytest.raises(ValueError, match=r"\[4\] out of range; this block has 4 heads \(indices 0..3\)"):
        spec_of(fp, heads={L0: [0, 4]})


def test_negative_index_refused(fp):
    with pytest.raises(ValueError, match=r"\[-1\] out of range"):
        spec_of(fp, neurons={F0: [-1, 0]})


def test_all_heads_removed_is_a_valid_spec(fp):
    assert spec_of(fp, heads={L1: []}).kept("heads", L1) == []  # the surgery removes the sub-layer (test_export)


def test_float_index_refused(fp):
    with pytest.raises(TypeError, match=r"non-integer value\(s\) \[1.0\]"):
        spec_of(fp, heads={L0: [0, 1.0]})


def test_bool_index_refused(fp):
    with pytest.raises(TypeError, match="non-integer"):
        spec_of(fp, heads={L0: [True]})


def test_unknown_block_refused(fp):
    with pytest.raises(ValueError, match="names block 'layers.0.self_attn', which the model does not have"):
        spec_of(fp, heads={"layers.0.self_attn": [0]})


def test_unknown_kind_refused(fp):
    with pytest.raises(ValueError, match="unknown unit kind 'layers'"):
        PruneSpec(keep={"layers": {}}, fingerprint=fp)


def test_bad_fingerprint_refused():
    with pytest.raises(ValueError, match="fingerprint lacks field"):
        PruneSpec(keep={}, fingerprint={"model_type": "bert"})


# ------------------------------------------------------------------ JSON
def test_json_round_trip(fp, tmp_path):
    spec = spec_of(fp, heads={L0: [1, 3]}, neurons={F0: [0, 5, 36]}, method="ig",
                   budget={"sparsity": 0.5, "scope": "global"}, meta={"task": "sst2", "n_samples": 64})
    path = tmp_path / "sub" / "spec.json"
    spec.save(path)
    raw = json.loads(path.read_text())
    assert raw["format"] == FORMAT
    assert PruneSpec.load(path) == spec
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left behind


def test_load_missing_file_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no spec file at"):
        PruneSpec.load(tmp_path / "nope.json")


def test_load_truncated_json_refused(fp, tmp_path):
    path = tmp_path / "spec.json"
    spec_of(fp, heads={L0: [1, 3]}).save(path)
    path.write_text(path.read_text()[:50])
    with pytest.raises(ValueError, match="is not valid JSON.*truncated"):
        PruneSpec.load(path)


def test_load_wrong_format_refused(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"format": "other/2", "keep": {}}))
    with pytest.raises(ValueError, match="has format 'other/2'; expected 'taskprune.spec/1'"):
        PruneSpec.load(path)


def test_load_non_object_refused(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list"):
        PruneSpec.load(path)


def test_load_hand_edited_duplicates_refused(fp, tmp_path):
    path = tmp_path / "spec.json"
    spec_of(fp, heads={L0: [1, 3]}).save(path)
    d = json.loads(path.read_text())
    d["keep"]["heads"][L0] = [3, 1, 1]
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="duplicate"):
        PruneSpec.load(path)


def test_save_non_json_meta_refused(fp, tmp_path):
    with pytest.raises(TypeError, match="plain JSON values"):
        spec_of(fp, meta={"x": object()}).save(tmp_path / "spec.json")


# ------------------------------------------------------------------ against models
def test_validate_dense_and_shrunk(bert, fp):
    from taskprune.surgery import shrink_

    spec = spec_of(fp, heads={L0: [1, 3]})
    assert spec.validate(bert) == "dense"
    assert spec_of(fp).validate(bert) == "dense"
    small = tiny_model("bert")
    shrink_(small, spec)
    assert spec.validate(small) == "shrunk"


def test_spec_for_other_widths_refused(fp):
    cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=40, max_position_embeddings=64, num_labels=3)
    other = tf.BertForSequenceClassification(cfg)
    with pytest.raises(ValueError, match="neurons of block 'encoder.layer.0.intermediate': spec says 37, model has 40"):
        spec_of(fp, heads={L0: [1]}).validate(other)


def test_spec_for_other_depth_refused(fp):
    cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    with pytest.raises(ValueError, match="number of blocks with heads.*spec says 2, model has 3"):
        spec_of(fp).validate(tf.BertModel(cfg))


def test_spec_for_other_model_type_refused(fp):
    with pytest.raises(ValueError, match="model_type: spec says 'bert', model has 'gpt2'"):
        spec_of(fp).validate(tiny_model("gpt2"))


def test_spec_for_model_shrunk_by_another_spec_refused(fp):
    from taskprune.surgery import shrink_

    small = shrink_(tiny_model("bert"), spec_of(fp, heads={L0: [0]}))
    with pytest.raises(ValueError, match=f"shrunk by another spec.*heads \\(KV groups\\) of block '{L0}': spec says 4, "
                                         "model has 1"):
        spec_of(fp, heads={L0: [1, 2]}).validate(small)


def test_fingerprint_diff_is_order_insensitive(fp):
    reordered = json.loads(json.dumps(fp, sort_keys=True))
    assert fingerprint_diff(fp, reordered) == []


def test_query_unknown_block_refused(fp):
    with pytest.raises(ValueError, match="no heads block named 'h.0.attn'"):
        spec_of(fp).kept("heads", "h.0.attn")
