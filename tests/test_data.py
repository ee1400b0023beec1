"""Readers, task registry and TaskDataModule on tiny tmp files and the embedded data (offline, seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertTokenizerFast

from taskprune.data import (
    EMBEDDED_DATA_DIR,
    TaskDataModule,
    load_file,
    load_split,
    per_class_subset,
    read_jsonl,
    read_tsv,
)
from taskprune.tasks import STARS_TO_BINARY, TASKS, DataFile, get_task

WORDS = "the a movie is good bad great awful not very it was fun dull , . ? what who why cat dog sat on mat".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True)


def write(path, text: str, bom: bool = False):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


# ------------------------------------------------------------------------------------------------- readers
def test_tsv_bom_and_bare_quotes(tmp_path):
    p = write(tmp_path / "dev.tsv", 'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n'
                                    '1\t1\t2\t" he said " it\tHe "said\n0\t3\t4\tx\ty\n', bom=True)
    header, rows = read_tsv(p)
    assert header[0] == "Quality"  # BOM stripped
    assert rows[0] == (2, ["1", "1", "2", '" he said " it', 'He "said'])  # quotes kept verbatim
    spec = DataFile("dev.tsv", "tsv", ("#1 String", "#2 String"), "Quality", "dev", label_map=(("0", 0), ("1", 1)))
    ds = load_file(spec, ("sentence1", "sentence2"), tmp_path)
    assert ds["sentence1"] == ['" he said " it', "x"] and ds["label"] == [1, 0] and ds["idx"] == [0, 1]


def test_cola_without_header(tmp_path):
    (tmp_path / "cola").mkdir()
    write(tmp_path / "cola" / "dev.tsv", "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")
    ds = load_split("cola", "dev", tmp_path)
    assert ds["sentence"] == ["The cat sat.", "Cat the sat."] and ds["label"] == [1, 0]


def test_malformed_row_names_file_and_line(tmp_path):
    (tmp_path / "sst2").mkdir()
    write(tmp_path / "sst2" / "dev.tsv", "sentence\tlabel\ngood\t1\nno label here\n")
    with pytest.raises(ValueError, match=r"sst2/dev\.tsv:3: malformed row"):
        load_split("sst2", "dev", tmp_path)


def test_unknown_label_names_file_and_line(tmp_path):
    (tmp_path / "rte").mkdir()
    write(tmp_path / "rte" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"rte/dev\.tsv:3: unknown label 'maybe'.*entailment"):
        load_split("rte", "dev", tmp_path)


def test_bad_json_and_missing_label(tmp_path):
    (tmp_path / "mnli").mkdir()
    write(tmp_path / "mnli" / "dev_matched.jsonl", '{"sentence1": "a", "sentence2": "b", "label": "neutral"}\n{oops\n')
    with pytest.raises(ValueError, match=r"dev_matched\.jsonl:2: not valid JSON"):
        load_split("mnli", "dev", tmp_path)
    write(tmp_path / "mnli" / "dev_matched.jsonl", '\n{"sentence1": "a", "sentence2": "b"}\n')
    with pytest.raises(ValueError, match=r"dev_matched\.jsonl:2: label is missing"):
        load_split("mnli", "dev", tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"sst2/train\.tsv' not found.*data_dir"):
        load_split("sst2", "train", tmp_path)


def test_read_jsonl_line_numbers(tmp_path):
    p = write(tmp_path / "x.jsonl", '{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(p) == [(1, {"a": 1}), (3, {"a": 2})]


def test_stars_binarised(tmp_path):
    (tmp_path / "yelp_full").mkdir()
    lines = [json.dumps({"sentence": f"review {s}", "label": s}) for s in (0, 1, 2, 3, 4, 2)]
    write(tmp_path / "yelp_full" / "test_sample.jsonl", "\n".join(lines) + "\n")
    ds = load_split("sst2", "yelp", tmp_path)
    assert ds["sentence"] == ["review 0", "review 1", "review 3", "review 4"]  # 3 stars dropped
    assert ds["label"] == [0, 0, 1, 1] and ds["idx"] == [0, 1, 2, 3]
    assert dict(STARS_TO_BINARY) == {"0": 0, "1": 0, "2": None, "3": 1, "4": 1}


# --------------------------------------------------------------------------------------------------- tasks
def test_task_registry():
    assert set(TASKS) == {"sst2", "mrpc", "qnli", "mnli", "qqp", "rte", "cola", "stsb"}
    assert get_task("mnli").n_labels == 3 and get_task("stsb").n_labels == 1
    assert get_task("sst2").ood_names == ("imdb", "yelp", "amazon")
    assert get_task("qqp").dev.split == "held-out sample"
    assert set(get_task("mrpc").make_metrics().keys()) == {"accuracy", "f1"}
    assert set(get_task("cola").make_metrics().keys()) >= {"matthews"}
    assert set(get_task("stsb").make_metrics().keys()) == {"pearson", "spearman"}
    with pytest.raises(ValueError, match=r"unknown task 'glue'.*known tasks.*sst2"):
        get_task("glue")


def test_metrics_from_logits():
    t = get_task("mrpc")
    m = t.make_metrics()
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    m.update(t.predictions(logits), torch.tensor([0, 1, 0, 0]))
    out = m.compute()
    assert out["accuracy"] == pytest.approx(0.75) and out["f1"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------- datamodule
def test_embedded_data_loads_for_every_task():
    for t in TASKS.values():
        for split in ("train", "dev", *t.ood_names):
            assert len(load_split(t, split)) > 0, (t.name, split)
    assert EMBEDDED_DATA_DIR.joinpath("PROVENANCE.md").is_file()


def test_calib_per_class_deterministic():
    train = load_split("sst2", "train")
    a, b = per_class_subset(train, 5, seed=3), per_class_subset(train, 5, seed=3)
    assert a["sentence"] == b["sentence"] and sorted(a["label"]) == [0] * 5 + [1] * 5
    assert per_class_subset(train, 5, seed=4)["sentence"] != a["sentence"]
    dm = TaskDataModule("mnli", calib_samples=None, calib_per_class=4, calib_seed=1)
    dm.setup()
    assert sorted(dm.calib_set["label"]) == [0] * 4 + [1] * 4 + [2] * 4
    assert dm.calib_set["idx"] == list(range(12))


def test_batches_have_idx_and_padding(tokenizer):
    dm = TaskDataModule("sst2", batch_size=4, calib_samples=10, eval_samples=6, max_length=8)
    dm.set_tokenizer(tokenizer)
    assert dm.eval_names == ["sst2", "imdb", "yelp", "amazon"]
    batches = list(dm.train_dataloader())
    assert [len(b["idx"]) for b in batches] == [4, 4, 2]
    assert torch.cat([b["idx"] for b in batches]).tolist() == list(range(10))
    b = batches[0]
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels", "idx"}
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[1] <= 8
    assert b["labels"].dtype == torch.long and b["idx"].dtype == torch.long
    loaders = dm.test_dataloader()
    assert len(loaders) == 4 and all(len(loader.dataset) == 6 for loader in loaders)
    assert [b["idx"] for b in dm.train_dataloader()][0].tolist() == [0, 1, 2, 3]  # same order every time


def test_regression_labels_are_float(tokenizer):
    dm = TaskDataModule("stsb", batch_size=3, calib_samples=3, ood=[])
    dm.set_tokenizer(tokenizer)
    b = next(iter(dm.train_dataloader()))
    assert b["labels"].dtype == torch.float32 and dm.eval_names == ["stsb"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "nope"}, r"unknown task 'nope'"),
        ({"task": "sst2", "calib_per_class": 4}, r"mutually exclusive.*calib_samples=None"),
        ({"task": "stsb", "calib_samples": None, "calib_per_class": 4}, r"regression"),
        ({"task": "sst2", "ood": ["snli"]}, r"no out-of-domain set 'snli'.*imdb"),
        ({"task": "sst2", "batch_size": 0}, r"batch_size must be an int >= 1, got 0"),
        ({"task": "sst2", "data_dir": "/nonexistent/xyz"}, r"data_dir '/nonexistent/xyz' is not a folder"),
    ],
)
def test_datamodule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskDataModule(**kwargs)


def test_no_tokenizer_is_a_clear_error():
    dm = TaskDataModule("rte", calib_samples=4)
    with pytest.raises(ValueError, match=r"no tokenizer.*set_tokenizer"):
        dm.train_dataloader()


def test_long_inputs_truncated_not_crash(tokenizer, caplog):
    dm = TaskDataModule("sst2", batch_size=2, calib_samples=2, ood=[], max_length=4)
    dm.set_tokenizer(tokenizer)
    with caplog.at_level("WARNING"):
        b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape[1] <= 4 and "truncated" in caplog.text


def test_resume_with_another_calibration_set_refused():
    from taskprune.data import TaskDataModule

    saved = TaskDataModule("sst2", calib_samples=16, calib_seed=0).state_dict()
    TaskDataModule("sst2", calib_samples=16, calib_seed=0).load_state_dict(saved)  # same set: fine
    with pytest.raises(ValueError, match="calib_seed=0 in the checkpoint vs 1 now"):
        TaskDataModule("sst2", calib_samples=16, calib_seed=1).load_state_dict(saved)
