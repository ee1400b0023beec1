"""examples/own_data: a task defined only in YAML runs `fit` then `test` through the CLI with a tiny random model,
and its out-of-domain set shows up in the logged metrics and in the report files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import transformers as tf

from lightning_tiny import TOKENIZER, tiny_classifier
from taskprune.lightning.cli import main
from taskprune.lightning.data import load_split
from taskprune.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "own_data"


def test_the_example_task_reads_its_own_csv_files():
    task = get_task(str(EXAMPLE / "task.yaml"))
    assert task.name == "reviews" and task.ood_names == ("restaurants",) and task.root == EXAMPLE
    train, ood = load_split(task, "train"), load_split(task, "restaurants")
    assert 100 < len(train) < 240 and set(train["label"]) == {0, 1}  # 3-star rows dropped
    assert len(ood) == 60 and set(ood["label"]) == {0, 1}


def test_fit_then_test_through_the_cli_reports_the_ood_set(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config names the task file relative to the repository root, as in the README
    out = tmp_path / "run"
    common = ["--config", str(EXAMPLE / "config.yaml"), "--model.model", str(model_dir),
              "--model.attribution.steps", "1", "--data.calib_samples", "16", "--data.eval_samples", "24",
              "--pruning.output_dir", str(out)]
    main(["fit", *common])
    assert (out / "spec.json").is_file()
    run = main(["test", *common])
    metrics = run.trainer.callback_metrics
    assert {"test/reviews/accuracy", "test/reviews/f1", "ood/restaurants/accuracy", "ood/restaurants/f1",
            "ood/restaurants/accuracy_dense"} <= set(metrics)
    rows = list(csv.DictReader((out / "test_report.csv").open()))
    assert [(r["set"], r["kind"], r["metric"]) for r in rows] == [
        ("reviews", "in-domain", "accuracy"), ("reviews", "in-domain", "f1"),
        ("restaurants", "ood", "accuracy"), ("restaurants", "ood", "f1")]
    ood = rows[2]
    assert float(ood["pruned"]) == pytest.approx(float(metrics["ood/restaurants/accuracy"]))
    assert float(ood["dense"]) == pytest.approx(float(metrics["ood/restaurants/accuracy_dense"]))
    report = json.loads((out / "test_report.json").read_text())
    assert report["task"] == "reviews" and report["eval_sets"] == ["reviews", "restaurants"]
    assert report["size"]["params_pruned"] < report["size"]["params_dense"]
    # no temporary and no lock left; only taskprune's marker of a run
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".taskprune"]


def test_inline_task_definition_under_data(model_dir, tmp_path):
    task = json.dumps({"name": "reviews", "labels": ["negative", "positive"], "metrics": ["accuracy"],
                       "data_dir": str(EXAMPLE),
                       "train": {"files": "reviews_train.csv", "text": "review", "label": "rating",
                                 "label_map": {1: "negative", 2: "negative", 4: "positive", 5: "positive"},
                                 "drop": [3]},
                       "eval": {"files": "restaurants_ood.csv", "text": "text", "label": "sentiment",
                                "label_map": {"neg": "negative", "pos": "positive"}}})
    run = main(["fit", "--model.model", str(model_dir), "--data.task", task, "--model.attribution.method", "magnitude",
                "--data.calib_samples", "8", "--data.ood", "[]", "--pruning.output_dir", str(tmp_path / "run"),
                "--pruning.apply", "none"])
    assert run.model.task.name == "reviews" and run.datamodule.eval_names == ["reviews"]
    assert (tmp_path / "run" / "spec.json").is_file()
