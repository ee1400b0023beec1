"""Readers, task registry and TaskDataModule on tiny tmp files and the embedded data (offline, seconds)."""

from __future__ import annotations

import os

import hashlib
import json
from pathlib import Path

import pytest
import yaml
import torch
from transformers import BertTokenizerFast

from taskprune.lightning.data import EMBEDDED_DATA_DIR, TaskDataModule, load_split, per_class_subset, random_subset
from taskprune.tasks import TASKS, get_task, task_from_dict

FULL_DATA = Path(os.environ.get("TASKPRUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

WORDS = "the a movie is good bad great awful not very it was fun dull , . ? what who why cat dog sat on mat".split()
GOLDEN = json.loads((Path(__file__).parent / "data" / "glue_rows.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True)


def write(path, text: str, bom: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def fingerprint(ds) -> dict:
    """What tests/data/glue_rows.json holds per split (made by the parsers this loader replaced)."""
    rows = json.dumps(ds.to_dict(), sort_keys=True, ensure_ascii=False).encode()
    return {"rows": len(ds), "features": {k: str(v) for k, v in ds.features.items()},
            "sha256": hashlib.sha256(rows).hexdigest()}


# ----------------------------------------------------------------------------- the GLUE tasks: rows unchanged
SPLITS = [(t.name, s) for t in TASKS.values() for s in ("train", "dev", *t.ood_names)]


@pytest.mark.parametrize("task, split", SPLITS, ids=[f"{t}/{s}" for t, s in SPLITS])
def test_glue_rows_identical_to_the_old_parsers_on_the_embedded_files(task, split):
    """Content, order, idx, label ints and dropped rows of every shipped split equal those of taskprune's own
    TSV/JSONL parsers (recorded in tests/data/glue_rows.json before they were removed)."""
    assert fingerprint(load_split(task, split)) == GOLDEN["embedded"][f"{task}/{split}"]


@pytest.mark.slow
@pytest.mark.skipif(not FULL_DATA.is_dir(), reason="the full GLUE files ($TASKPRUNE_DATA, ../shared/data) are not here")
@pytest.mark.parametrize("task, split", SPLITS, ids=[f"{t}/{s}" for t, s in SPLITS])
def test_glue_rows_identical_to_the_old_parsers_on_the_full_files(task, split):
    assert fingerprint(load_split(task, split, FULL_DATA)) == GOLDEN["shared"][f"{task}/{split}"]


def test_every_shipped_split_is_fingerprinted():
    assert {f"{t}/{s}" for t, s in SPLITS} == set(GOLDEN["embedded"]) == set(GOLDEN["shared"])


# ------------------------------------------------------------------------------------------ GLUE read options
def test_tsv_bom_and_bare_quotes(tmp_path):
    write(tmp_path / "mrpc" / "dev.tsv", 'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n'
                                         '1\t1\t2\t" he said " it\tHe "said\n0\t3\t4\tNA\t007\n', bom=True)
    ds = load_split("mrpc", "dev", tmp_path)  # encoding utf-8-sig strips the BOM; quoting 3 keeps quotes verbatim
    assert ds["sentence1"] == ['" he said " it', "NA"] and ds["sentence2"] == ['He "said', "007"]
    assert ds["label"] == [1, 0] and ds["idx"] == [0, 1]


def test_cola_without_header(tmp_path):
    write(tmp_path / "cola" / "dev.tsv", "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")
    ds = load_split("cola", "dev", tmp_path)
    assert ds["sentence"] == ["The cat sat.", "Cat the sat."] and ds["label"] == [1, 0]


def test_unknown_label_names_file_row_and_value(tmp_path):
    write(tmp_path / "rte" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"rte/dev\.tsv', row 2: label 'maybe' in column 'label' is not in the "
                                         r"label map.*entailment"):
        load_split("rte", "dev", tmp_path)


def test_malformed_rows_name_the_file_and_row(tmp_path):
    write(tmp_path / "sst2" / "dev.tsv", "sentence\tlabel\ngood\t1\nno label here\n")
    with pytest.raises(ValueError, match=r"sst2/dev\.tsv', row 2: label '' in column 'label' is not in the label map"):
        load_split("sst2", "dev", tmp_path)
    write(tmp_path / "sst2" / "dev.tsv", "sentence\tlabel\ngood\t1\nx\t1\textra\n")
    with pytest.raises(ValueError, match=r"cannot read '.*sst2/dev\.tsv' as csv .*Expected 2 fields in line 3, saw 3"):
        load_split("sst2", "dev", tmp_path)


def test_bad_json_and_missing_label(tmp_path):
    write(tmp_path / "mnli" / "dev_matched.jsonl", '{"sentence1": "a", "sentence2": "b", "label": "neutral"}\n{oops\n')
    with pytest.raises(ValueError, match=r"cannot read '.*dev_matched\.jsonl' as json"):
        load_split("mnli", "dev", tmp_path)
    write(tmp_path / "mnli" / "dev_matched.jsonl", '{"sentence1": "a", "sentence2": "b", "label": "neutral"}\n'
                                                  '{"sentence1": "a", "sentence2": "b"}\n')
    with pytest.raises(ValueError, match=r"dev_matched\.jsonl', row 2: label is missing"):
        load_split("mnli", "dev", tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"sst2/train\.tsv' not found.*data_dir"):
        load_split("sst2", "train", tmp_path)


def test_stars_binarised(tmp_path):
    lines = [json.dumps({"sentence": f"review {s}", "label": s}) for s in (0, 1, 2, 3, 4, 2)]
    write(tmp_path / "yelp_full" / "test_sample.jsonl", "\n".join(lines) + "\n")
    ds = load_split("sst2", "yelp", tmp_path)
    assert ds["sentence"] == ["review 0", "review 1", "review 3", "review 4"]  # 3 stars dropped
    assert ds["label"] == [0, 0, 1, 1] and ds["idx"] == [0, 1, 2, 3]
    assert get_task("sst2").ood_set("yelp").file.label_dict == {"0": 0, "1": 0, "3": 1, "4": 1, "2": None}


# ---------------------------------------------------------------------------------------------- own tasks
def own_task(tmp_path, **over) -> dict:
    write(tmp_path / "train.csv", "text,stars\n" + "".join(f'"good, {i}",5\nbad {i},1\nso-so {i},3\n'
                                                          for i in range(4)))
    write(tmp_path / "shop.jsonl", "".join(json.dumps({"review": f"r{i}", "y": i % 2 == 0}) + "\n" for i in range(5)))
    import pandas as pd

    pd.DataFrame({"text": ["great", "awful"], "stars": ["5", "1"]}).to_parquet(tmp_path / "eval.parquet")
    d = {"name": "reviews", "labels": ["negative", "positive"], "metrics": ["accuracy", "f1"], "data_dir": str(tmp_path),
         "train": {"files": "train.csv", "text": "text", "label": "stars",
                   "label_map": {1: "negative", 5: "positive"}, "drop": [3]},
         "eval": {"files": "eval.parquet", "text": ["text"], "label": "stars",
                  "label_map": {"1": "negative", "5": "positive"}},
         "ood": {"shop": {"files": "shop.jsonl", "text": ["review"], "label": "y",
                          "label_map": {"true": "positive", "false": "negative"}}}}
    d.update(over)
    return d


def test_own_task_csv_parquet_jsonl(tmp_path):
    task = get_task(own_task(tmp_path))
    assert task.text_fields == ("sentence",) and task.ood_names == ("shop",) and task.n_labels == 2
    train = load_split(task, "train")
    assert train["sentence"][:2] == ["good, 0", "bad 0"] and train["label"][:2] == [1, 0] and len(train) == 8
    assert load_split(task, "eval")["label"] == [1, 0]
    assert load_split(task, "shop")["label"] == [1, 0, 1, 0, 1]


def test_own_task_from_a_file_resolves_paths_from_its_folder(tmp_path):
    d = own_task(tmp_path)
    del d["data_dir"]
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(d))
    task = get_task(str(tmp_path / "task.yaml"))
    assert task.root == tmp_path.resolve() and len(load_split(task, "train")) == 8


def test_regression_task(tmp_path):
    write(tmp_path / "s.csv", "a,b,score\nx,y,1.5\nx,z,4\n")
    task = task_from_dict({"name": "sim", "problem_type": "regression", "metrics": ["pearson", "mse"],
                           "train": {"files": str(tmp_path / "s.csv"), "text": ["a", "b"], "label": "score"},
                           "eval": {"files": str(tmp_path / "s.csv"), "text": ["a", "b"], "label": "score"}})
    ds = load_split(task, "train")
    assert ds["label"] == [1.5, 4.0] and task.label_names == ("score",) and task.text_fields == ("sentence1", "sentence2")


@pytest.mark.parametrize("change, match", [
    ({"metrics": ["pearson"]}, r"metric 'pearson' needs a regression task"),
    ({"metrics": ["bleu"]}, r"unknown metric 'bleu'; allowed: \['accuracy'"),
    ({"labels": ["only"]}, r"at least two labels"),
    ({"problem_type": "multi_label"}, r"unknown problem_type 'multi_label'"),
    ({"train": {"files": "train.csv", "text": ["text"], "label": "stars", "label_map": {"1": "neg"}}},
     r"train: label_map maps '1' to 'neg', which is not a label"),
    ({"train": {"files": "train.csv", "text": ["a", "b", "c"], "label": "stars"}}, r"text names 3 columns"),
    ({"train": {"files": "train.txt", "text": ["text"], "label": "stars"}}, r"cannot tell the format"),
    ({"train": {"files": "train.csv", "text": ["text"], "label": "stars", "read": {"quotin": 3}}}, None),
])
def test_bad_task_definitions(tmp_path, change, match):
    d = own_task(tmp_path, **change)
    if match is None:  # a read option datasets does not know: refused when the split is read
        with pytest.raises(ValueError, match=r"unknown read option\(s\) \['quotin'\] for format 'csv'"):
            load_split(get_task(d), "train")
        return
    with pytest.raises(ValueError, match=match):
        get_task(d)


# --------------------------------------------------------------------------------------------------- tasks
def test_task_registry():
    assert set(TASKS) == {"sst2", "mrpc", "qnli", "mnli", "qqp", "rte", "cola", "stsb"}
    assert get_task("mnli").n_labels == 3 and get_task("stsb").n_labels == 1
    assert get_task("sst2").ood_names == ("imdb", "yelp", "amazon")
    assert get_task("qqp").dev.split == "held-out sample" and get_task("qqp").dev.path == "qqp/heldout_sample.jsonl"
    assert get_task("sst2").train.path == "sst2/train.tsv"  # the zoo's recipe hash covers this path
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
        ({"task": "nope"}, r"unknown task 'nope'.*task definition file"),
        ({"task": "sst2", "calib_per_class": 4}, r"mutually exclusive.*calib_samples=None"),
        ({"task": "stsb", "calib_samples": None, "calib_per_class": 4}, r"regression"),
        ({"task": "sst2", "ood": ["snli"]}, r"no out-of-domain set 'snli'.*imdb"),
        ({"task": "sst2", "batch_size": 0}, r"batch_size must be an int >= 1, got 0"),
        ({"task": "sst2", "data_dir": "/nonexistent/xyz"}, r"data_dir '/nonexistent/xyz' is not a folder"),
        ({"task": "sst2", "calib_samples": None, "calib_per_class": 4, "holdout_samples": 64},
         r"holdout_samples=64 takes the training rows after the calibration draw, which calib_per_class=4 does not"),
        ({"task": "sst2", "holdout_samples": -1}, r"holdout_samples must be an int >= 0, got -1"),
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
    from taskprune.lightning.data import TaskDataModule

    saved = TaskDataModule("sst2", calib_samples=16, calib_seed=0).state_dict()
    TaskDataModule("sst2", calib_samples=16, calib_seed=0).load_state_dict(saved)  # same set: fine
    with pytest.raises(ValueError, match="calib_seed=0 in the checkpoint vs 1 now"):
        TaskDataModule("sst2", calib_samples=16, calib_seed=1).load_state_dict(saved)


def test_holdout_rows_follow_the_calibration_draw_and_never_overlap_it():
    train = load_split("sst2", "train")
    dm = TaskDataModule("sst2", calib_samples=20, holdout_samples=30, calib_seed=2)
    dm.setup()
    calib, held = set(dm.calib_set["sentence"]), dm.holdout_set["sentence"]
    assert len(held) == 30 and not calib & set(held)
    assert calib | set(held) == set(random_subset(train, 50, seed=2)["sentence"])  # the next rows of one draw
    assert TaskDataModule("sst2", calib_samples=20).holdout_samples == 0  # opt-in
    left = TaskDataModule("sst2", calib_samples=len(train) - 10, holdout_samples=30)
    left.setup()
    assert len(left.holdout_set) == 10  # what the split has left
    for kw in ({"calib_samples": 20}, {"calib_samples": None, "calib_per_class": 4}, {"calib_samples": None}):
        off = TaskDataModule("sst2", **kw)
        assert off.holdout_samples == 0 and off.holdout_dataloader() is None, kw


# ------------------------------------------------------------------------------ #22: files, cache, arguments
def csv_task(tmp_path: Path, files: str = "train.csv") -> dict:
    split = {"files": files, "text": "text", "label": "label", "label_map": {"0": "negative", "1": "positive"}}
    return {"name": "reviews", "labels": ["negative", "positive"], "metrics": ["accuracy"], "data_dir": str(tmp_path),
            "train": split, "eval": split}


def test_a_data_file_rewritten_with_its_old_mtime_is_read_again(tmp_path, monkeypatch):
    """Was: datasets keys its Arrow cache on the path and modification time, so a file replaced by ``cp -p``,
    ``rsync -a`` or ``tar x`` (same size here, mtime kept) was read from the stale cache."""
    monkeypatch.setenv("TASKPRUNE_CACHE", str(tmp_path / "cache"))
    path = write(tmp_path / "train.csv", "text,label\ngood,1\nbad,0\n")
    old = os.stat(path)
    assert load_split(csv_task(tmp_path), "train")["sentence"] == ["good", "bad"]
    write(path, "text,label\nnice,1\nsad,0\n")
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert os.stat(path).st_size == old.st_size and os.stat(path).st_mtime_ns == old.st_mtime_ns
    assert load_split(csv_task(tmp_path), "train")["sentence"] == ["nice", "sad"]


@pytest.mark.parametrize("kind, problem", [
    ("folder", "is a folder, not a file"),
    ("link loop", r"is a symbolic link loop \(following its links leads back to a link already followed\)"),
    ("broken link", r"is a symbolic link to '.*gone.csv', which does not exist"),
])
def test_a_data_file_that_is_a_folder_or_a_bad_link_is_named(tmp_path, kind, problem):
    """Was: "not found" for all three (the folder and the link exist)."""
    path = tmp_path / "train.csv"
    if kind == "folder":
        path.mkdir()
    elif kind == "link loop":
        os.symlink(path, path)
    else:
        os.symlink(tmp_path / "gone.csv", path)
    with pytest.raises(ValueError, match=rf"task 'reviews', train: data file '{path}' {problem}; `files:` must name "
                                         r"data files \(csv, tsv, json, jsonl, parquet\)"):
        load_split(csv_task(tmp_path), "train")


def test_a_negative_calib_seed_is_refused_when_the_datamodule_is_built():
    """Was: numpy's "expected non-negative integer" when the calibration rows were drawn."""
    with pytest.raises(ValueError, match=r"calib_seed must be an int >= 0 \(numpy's random generators take no negative "
                                         r"seed\), got -1; e.g. calib_seed=1"):
        TaskDataModule("sst2", calib_seed=-1)


def test_holdout_rows_when_calibration_takes_every_row_are_refused_naming_the_sizes():
    """Was: datasets' "Failed to concatenate on axis=1 because tables don't have the same number of rows"."""
    n = len(load_split("sst2", "train"))
    dm = TaskDataModule("sst2", calib_samples=n + 5, holdout_samples=8)
    with pytest.raises(ValueError, match=rf"holdout_samples=8: the calibration draw \(calib_samples={n + 5}\) "
                                         rf"already takes every one of the {n} rows of the train split of task "
                                         r"'sst2' \(.*\), so no row is left to hold out\. Lower calib_samples "
                                         rf"\(at most {n - 8} leaves 8 rows held out\), or set holdout_samples=0"):
        dm.setup()
    assert dm.calib_set is None


def test_the_calibration_fingerprint_follows_the_rows(tmp_path):
    def fingerprint_of(**kw) -> str:
        return TaskDataModule(csv_task(tmp_path), **{"calib_samples": None, **kw}).calibration_fingerprint()

    write(tmp_path / "train.csv", "text,label\ngood,1\nbad,0\nfine,1\nawful,0\n")
    every = fingerprint_of()
    assert every.startswith("sha256:") and every == fingerprint_of()
    assert fingerprint_of(calib_samples=2) != fingerprint_of(calib_samples=2, calib_seed=3) != every
    write(tmp_path / "train.csv", "text,label\ngood,1\nbad,0\nfine,0\nawful,0\n")  # one label changed
    assert fingerprint_of() != every
