"""Multi-task model: save/load round trip, refusal to overwrite, shared encoder (tiny random BERT, offline)."""

from __future__ import annotations

import os

import json

import pytest
import torch
import transformers as tf

from taskprune.arch import find_base
from taskprune.models.multitask import HeadInfo, MultiTaskModel, TaskModel, read_build_info, save_multitask
from taskprune.zoo import load_multitask, resolve_model_dir

TASKS = ("sst2", "mnli", "stsb")


def tiny_multitask(seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    return MultiTaskModel(tf.BertModel(cfg), {t: HeadInfo.for_task(t) for t in TASKS}).eval()


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.zeros(3, dtype=torch.long), "idx": torch.arange(3)}


def test_round_trip_identical_logits(tmp_path):
    model = tiny_multitask()
    out = save_multitask(model, tmp_path / "mt", {"recipe_hash": "abc"})
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "heads.safetensors",
                                                "tasks.json", "build.json"}
    assert not list(tmp_path.glob(".mt.*"))  # temp folder renamed away
    meta = json.loads((out / "tasks.json").read_text())
    assert meta["tasks"]["mnli"]["head_shape"] == [3, 32] and meta["tasks"]["stsb"]["output_scale"] == 5.0
    loaded = load_multitask(out)
    assert isinstance(loaded.encoder, tf.BertModel) and sorted(loaded.task_names) == sorted(TASKS)
    with torch.no_grad():
        for t in TASKS:
            a, b = model.for_task(t)(**batch()).logits, loaded.for_task(t)(**batch()).logits
            assert a.shape == (3, HeadInfo.for_task(t).n_labels)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert read_build_info(out) == {"recipe_hash": "abc"}


def test_refuses_to_overwrite_a_different_build(tmp_path):
    save_multitask(tiny_multitask(), tmp_path / "mt", {"recipe_hash": "abc"})
    with pytest.raises(FileExistsError, match=r"different build.*--force.*--out"):
        save_multitask(tiny_multitask(seed=1), tmp_path / "mt", {"recipe_hash": "xyz"})
    assert read_build_info(tmp_path / "mt")["recipe_hash"] == "abc"
    save_multitask(tiny_multitask(seed=1), tmp_path / "mt", {"recipe_hash": "xyz"}, force=True)
    assert read_build_info(tmp_path / "mt")["recipe_hash"] == "xyz"
    assert [p.name for p in tmp_path.iterdir()] == ["mt"]


def test_for_task_shares_the_encoder():
    model = tiny_multitask()
    sst2, mnli = model.for_task("sst2"), model.for_task("mnli")
    assert isinstance(sst2, TaskModel)
    assert sst2.encoder is model.encoder is mnli.encoder and sst2.head is model.heads["sst2"]
    assert not hasattr(model, "config") and not hasattr(sst2, "config")
    assert find_base(sst2) == (model.encoder, "encoder") and find_base(model) == (model.encoder, "encoder")
    with torch.no_grad():
        model.encoder.embeddings.word_embeddings.weight[5] += 1.0  # a change through one view shows in the other
    assert torch.equal(sst2.encoder.embeddings.word_embeddings.weight, model.encoder.embeddings.word_embeddings.weight)


def test_unknown_task_and_missing_model(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"no head for task 'rte'.*sst2"):
        tiny_multitask().for_task("rte")
    monkeypatch.setenv("TASKPRUNE_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"no multi-task model at 'minilm-glue'.*taskprune.zoo build minilm-glue"):
        resolve_model_dir("minilm-glue")


def test_stsb_output_scale():
    model = tiny_multitask()
    with torch.no_grad():
        raw = model.heads["stsb"](torch.zeros(1, 32))
        out = model.for_task("stsb")(**batch()).logits
    assert out.shape == (3, 1)
    with torch.no_grad():
        model.heads["stsb"].weight.zero_()
        torch.testing.assert_close(model.for_task("stsb")(**batch()).logits, 5.0 * raw.expand(3, 1))


@pytest.mark.slow
def test_real_build_loads_and_scores():
    """Needs a built ``minilm-glue`` (``python -m taskprune.zoo build minilm-glue``)."""
    from taskprune.zoo import evaluate

    model = load_multitask("minilm-glue")
    assert evaluate(model, "sst2", max_rows=200)["accuracy"] > 0.75


def test_build_from_embedded_data_tiny(tmp_path, monkeypatch):
    """The whole build path (embedded data, Lightning fit, save, skip, refuse) on a tiny random BERT."""
    from dataclasses import replace

    from transformers import BertTokenizerFast

    from taskprune.zoo import Recipe, build_multitask, default_out_dir

    base = tmp_path / "base"
    base.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"a the is not good".split()]
    (base / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(vocab_file=str(base / "vocab.txt")).save_pretrained(base)
    tiny_multitask().encoder.save_pretrained(base)
    monkeypatch.setenv("TASKPRUNE_CACHE", str(tmp_path / "cache"))
    recipe = Recipe(base=str(base), tasks=("sst2", "stsb"), rows_per_task=8, batch_size=4, dev_rows=8)
    out = build_multitask("tiny", data_dir=_embedded(), recipe=recipe, progress_bar=False)
    assert out == default_out_dir("tiny") and out.name == "tiny"
    info = read_build_info(out)
    assert info["rows_per_task"] == {"sst2": 8, "stsb": 8} and info["data_source"] == "embedded"
    assert set(info["dev_metrics"]) == {"sst2", "stsb"}
    model = load_multitask(out)
    assert sorted(model.task_names) == ["sst2", "stsb"] and model.tokenizer_path == str(out)
    mtime = (out / "heads.safetensors").stat().st_mtime_ns
    assert build_multitask("tiny", _embedded(), recipe=recipe, progress_bar=False) == out  # same recipe: skipped
    assert (out / "heads.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match=r"different build.*--force"):
        build_multitask("tiny", _embedded(), recipe=replace(recipe, seed=1), progress_bar=False)


def test_recipe_hash_follows_the_rows_not_the_file_bytes(tmp_path):
    """Same train rows in differently written files: one recipe hash; one row fewer: another."""
    import json

    from taskprune.zoo import Recipe, plan

    recipe = Recipe(tasks=("qnli",), rows_per_task=1000)
    src = _embedded() / "qnli" / "train_sample.jsonl"
    lines = [json.loads(x) for x in src.read_text().splitlines()]
    (tmp_path / "a" / "qnli").mkdir(parents=True)
    (tmp_path / "a" / "qnli" / "train_sample.jsonl").write_text(
        "\n".join(json.dumps(dict(reversed(list(r.items()))), indent=None, separators=(", ", ":  ")) for r in lines))
    (tmp_path / "b" / "qnli").mkdir(parents=True)
    (tmp_path / "b" / "qnli" / "train_sample.jsonl").write_text("\n".join(json.dumps(r) for r in lines[:-1]))
    h = {d: plan(recipe, d).recipe_hash for d in (_embedded(), tmp_path / "a", tmp_path / "b")}
    assert h[_embedded()] == h[tmp_path / "a"] != h[tmp_path / "b"]


@pytest.mark.slow
def test_embedded_train_rows_are_the_recipes_rows_of_the_full_data():
    """The embedded train files hold exactly what the default recipe draws from the full GLUE files (benchmark data)."""
    from pathlib import Path

    from taskprune.zoo import RECIPES, plan

    full = Path(os.environ.get("TASKPRUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not full.is_dir():
        pytest.skip("needs the full data folder ($TASKPRUNE_DATA or ../shared/data)")
    recipe = RECIPES["minilm-glue"]
    emb, ful = plan(recipe, _embedded()), plan(recipe, full)
    assert emb.files == ful.files and emb.recipe_hash == ful.recipe_hash
    assert all(len(ds) == recipe.rows_per_task for ds in emb.data.values())


def _embedded():
    from taskprune.lightning.data import EMBEDDED_DATA_DIR

    return EMBEDDED_DATA_DIR
