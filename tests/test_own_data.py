"""examples/own_data: a task defined only in YAML runs `fit` then `test` through the CLI with a tiny random model,
and its out-of-domain set shows up in the logged metrics and in the report files. A task names the head of a
multi-task model that reads it (``head: sst2``, ``--model.head``); task files that are not UTF-8 and truncated
weights files are one-line errors (issue #22)."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml

from lightning_tiny import TOKENIZER
from taskprune.attribution import AttributionConfig
from taskprune.lightning.cli import main
from taskprune.lightning.data import load_split
from taskprune.lightning.module import AttributionModule
from taskprune.models import load_task_model
from taskprune.models.multitask import HeadInfo, MultiTaskModel, TaskModel, save_multitask
from taskprune.tasks import get_task, load_task_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "own_data"


HEADS = ("sst2", "mnli", "rte")  # rte: a second two-label head, to override sst2 with


def tiny_multitask(seed: int = 0) -> MultiTaskModel:
    """A tiny random multi-task BERT (MiniLM vocabulary) with the heads :data:`HEADS`."""
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=128)
    return MultiTaskModel(tf.BertModel(cfg), {t: HeadInfo.for_task(t) for t in HEADS}).eval()


@pytest.fixture(scope="module")
def multitask_dir(tmp_path_factory):
    """:func:`tiny_multitask` saved in the multi-task folder format, with the MiniLM tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_multitask") / "mt"
    save_multitask(tiny_multitask(), folder, {"recipe_hash": "tiny", "name": "tiny-glue"},
                   tokenizer=tf.AutoTokenizer.from_pretrained(TOKENIZER))
    return folder


def write_task(folder: Path, **changes) -> Path:
    """The example's task definition with ``changes`` (a value ``None`` removes the key), beside the example's csvs."""
    d = yaml.safe_load((EXAMPLE / "task.yaml").read_text())
    for k, v in changes.items():
        d.pop(k) if v is None else d.__setitem__(k, v)
    d["data_dir"] = str(EXAMPLE)
    path = folder / "task.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_the_example_task_reads_its_own_csv_files():
    task = get_task(str(EXAMPLE / "task.yaml"))
    assert task.name == "reviews" and task.ood_names == ("restaurants",) and task.root == EXAMPLE
    assert task.head == "sst2"  # the multi-task model's sentiment head reads the reviews
    train, ood = load_split(task, "train"), load_split(task, "restaurants")
    assert 100 < len(train) < 240 and set(train["label"]) == {0, 1}  # 3-star rows dropped
    assert len(ood) == 60 and set(ood["label"]) == {0, 1}


def test_the_example_runs_as_shipped_on_the_multitask_model():
    """config.yaml names the project's multi-task model and no other flag is needed: its task is read by the sst2
    head, whose labels are the task's in the same order (nothing to reorder)."""
    config = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
    assert config["model"]["model"] == "minilm-glue" and "head" not in config["model"]
    assert config["data"]["task"] == "examples/own_data/task.yaml"
    comments = [line for line in (EXAMPLE / "config.yaml").read_text().splitlines() if line.startswith("#")]
    assert "#   python train.py fit  --config examples/own_data/config.yaml" in comments
    assert any("--model.model path/to/your-classifier" in line for line in comments)
    task = get_task(str(EXAMPLE / "task.yaml"))
    assert HeadInfo.for_task(task.head).label_names == task.label_names == ("negative", "positive")


def test_fit_then_test_through_the_cli_reports_the_ood_set(multitask_dir, tmp_path, monkeypatch, caplog):
    """The shipped config and task file (head: sst2), a tiny multi-task model in place of minilm-glue: the reports,
    metric keys and the spec say the user's task, `reviews`; the log says which head read it."""
    monkeypatch.chdir(ROOT)  # the config names the task file relative to the repository root, as in the README
    out = tmp_path / "run"
    common = ["--config", str(EXAMPLE / "config.yaml"), "--model.model", str(multitask_dir),
              "--model.attribution.steps", "1", "--data.calib_samples", "16", "--data.eval_samples", "24",
              "--pruning.output_dir", str(out)]
    with caplog.at_level(logging.INFO, logger="taskprune.models"):
        run = main(["fit", *common])
    assert isinstance(run.model.model, TaskModel) and run.model.model.task == "sst2"
    assert "task 'reviews' is read by the head 'sst2' of the multi-task model" in caplog.text
    assert (out / "spec.json").is_file()
    assert json.loads((out / "spec.json").read_text())["meta"]["task"] == "reviews"
    run = main(["test", *common])
    metrics = run.trainer.callback_metrics
    assert {"test/reviews/accuracy", "test/reviews/f1", "ood/restaurants/accuracy", "ood/restaurants/f1",
            "ood/restaurants/accuracy_dense"} <= set(metrics)
    assert not any("sst2" in k for k in metrics)
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


def test_model_head_overrides_the_tasks_head(multitask_dir):
    task = str(EXAMPLE / "task.yaml")  # head: sst2
    outputs = {"negative": 0, "positive": 1}  # rte's labels are entailment / not_entailment: name the outputs
    module = AttributionModule(str(multitask_dir), task=task, head="rte", label_map=outputs)
    assert module.model.task == "rte" and module.task.name == "reviews" and module.head == "rte"
    assert module.hparams["head"] == "rte"
    assert AttributionModule(str(multitask_dir), task=task).model.task == "sst2"
    # the CLI's --model.head, and a MultiTaskModel given from Python
    run = main(["--config", str(EXAMPLE / "config.yaml"), "--data.task", task, "--model.model", str(multitask_dir),
                "--model.head", "rte", "--model.label_map", json.dumps(outputs)], run=False)
    assert run.model.model.task == "rte" and run.model.task.name == "reviews"
    multi = tiny_multitask()
    module = AttributionModule(multi, task=task, attribution=AttributionConfig(method="magnitude"))
    assert module.model.head is multi.heads["sst2"] and module.model.encoder is multi.encoder


def test_a_task_named_after_the_users_data_without_a_head_is_one_line_naming_the_heads(multitask_dir, tmp_path,
                                                                                      capsys):
    """Before: `name: reviews` on a multi-task model ended in a traceback `no head for task 'reviews'`."""
    path = write_task(tmp_path, head=None)
    with pytest.raises(ValueError, match=r"has no head named like task 'reviews'; its heads: \['mnli', 'rte', "
                                         r"'sst2'\]\. Say which head reads this task: `head: <one of them>` in the "
                                         r"task definition \(e\.g\. head: sst2, whose labels are the task's\), or "
                                         r"--model\.head <one of them>\.$"):
        AttributionModule(str(multitask_dir), task=str(path))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--data.task", str(path), "--model.model", str(multitask_dir), "--pruning.output_dir",
              str(tmp_path / "run")], one_line_errors=True)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and not (tmp_path / "run").exists()
    assert err.strip().splitlines()[-1].startswith("taskprune: error: the multi-task model ")


def test_a_missing_head_names_the_head_and_lists_the_models_heads(multitask_dir, tmp_path):
    heads = r"its heads: \['mnli', 'rte', 'sst2'\]\. Set `head: <one of them>` in the task definition, or " \
            r"--model\.head <one of them>\.$"
    with pytest.raises(ValueError, match=r"has no head 'sst3' \(asked for to read task 'reviews'\); " + heads):
        AttributionModule(str(multitask_dir), task=str(EXAMPLE / "task.yaml"), head="sst3")
    with pytest.raises(ValueError, match=r"has no head 'qqp' .*" + heads):
        AttributionModule(str(multitask_dir), task=str(write_task(tmp_path, head="qqp")))
    with pytest.raises(ValueError, match=r"has no head 'sst3' .*" + heads):
        load_task_model(str(multitask_dir), "reviews", head="sst3")
    with pytest.raises(ValueError, match=r"head must be the name of a head of the multi-task model .* got 'sst 2'"):
        get_task(str(write_task(tmp_path, head="sst 2")))


def test_a_head_that_does_not_fit_the_tasks_labels_says_to_pick_another(multitask_dir):
    task = str(EXAMPLE / "task.yaml")
    with pytest.raises(ValueError, match=r"the model's head has 3 outputs but task 'reviews' has 2 labels .* \(this "
                                         r"is the multi-task model's head 'mnli': pick another with `head:` in the "
                                         r"task definition or --model\.head\), or pass --model\.label_map"):
        AttributionModule(str(multitask_dir), task=task, head="mnli")
    with pytest.raises(ValueError, match=r"the model's labels \['entailment', 'not_entailment'\] .* \(the labels of "
                                         r"the multi-task model's head 'rte'\); or read the task with another head: "
                                         r"`head:` in the task definition or --model\.head$"):
        AttributionModule(str(multitask_dir), task=task, head="rte")


def test_a_head_with_a_one_head_model_is_refused(model_dir):
    """A sequence-classification model has one head: `head` would do nothing, so it is refused."""
    fix = r"Remove `head:` from the task definition \(and leave out --model\.head\) for this model\."
    with pytest.raises(ValueError, match=r"head 'sst2' picks a head of a taskprune multi-task model .* but '.*' is "
                                         r"not one: a sequence-classification model has one head, .*" + fix):
        AttributionModule(str(model_dir), task=str(EXAMPLE / "task.yaml"))
    with pytest.raises(ValueError, match=r"head 'sst2' picks a head of a taskprune multi-task model"):
        load_task_model(str(model_dir), "sst2", head="sst2")
    with pytest.raises(ValueError, match=r"head 'rte' picks a head of a taskprune MultiTaskModel, but the model "
                                         r"given is a BertForSequenceClassification"):
        AttributionModule(tf.AutoModelForSequenceClassification.from_pretrained(model_dir), task="sst2", head="rte")


def test_a_task_file_that_is_not_utf8_is_one_line_naming_the_byte_and_line(tmp_path):
    text = (EXAMPLE / "task.yaml").read_text().replace("product reviews", "product reviews (caf\u00e9s too)")
    path = tmp_path / "task.yaml"
    path.write_bytes(text.encode("latin-1"))
    at = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(ValueError, match=rf"task definition file '.*task\.yaml' is not UTF-8: byte 0xe9 at position "
                                         rf"{at} \(line 1\) is not valid UTF-8 .*; save it as UTF-8\.$"):
        load_task_file(path)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # UTF-8 with a byte-order mark: read as it is
    assert load_task_file(path).name == "reviews"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"byte 0xe9 at position {at + 3} \(line 1\)"):
        load_task_file(path)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("name", ["model.safetensors", "heads.safetensors"])
def test_a_truncated_weights_file_of_a_multitask_folder_is_named(multitask_dir, tmp_path, name):
    folder = tmp_path / "mt"
    shutil.copytree(multitask_dir, folder)
    size = (folder / name).stat().st_size
    truncate(folder / name)
    with pytest.raises(ValueError, match=rf"'.*mt/{name}' is truncated or corrupt: it holds {size // 2} of the "
                                         rf"{size} bytes its header describes \(safetensors: .*\)\. Copy the model "
                                         r"folder again, or rebuild it \(python -m taskprune\.zoo build tiny-glue "
                                         r"--force\)\.$"):
        AttributionModule(str(folder), task=str(EXAMPLE / "task.yaml"))


def test_a_truncated_zoo_model_is_named_not_rebuilt(multitask_dir, tmp_path, monkeypatch):
    """A zoo name whose cached folder is unreadable is not taken for a missing model (no build starts)."""
    import taskprune.zoo.build as build

    monkeypatch.setenv("TASKPRUNE_CACHE", str(tmp_path))
    shutil.copytree(multitask_dir, tmp_path / "minilm-glue")
    (tmp_path / "minilm-glue" / "build.json").write_text(json.dumps({"name": "minilm-glue"}))
    truncate(tmp_path / "minilm-glue" / "model.safetensors")
    monkeypatch.setattr(build, "build_multitask", lambda *a, **k: pytest.fail("a rebuild was started"))
    with pytest.raises(ValueError, match=r"minilm-glue/model\.safetensors' is truncated or corrupt: .* rebuild it "
                                         r"\(python -m taskprune\.zoo build minilm-glue --force\)\.$"):
        load_task_model("minilm-glue", "reviews", head="sst2")


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_a_truncated_weights_file_of_an_hf_folder_is_named(model_dir, tmp_path, keep):
    folder = tmp_path / "hf"
    shutil.copytree(model_dir, folder)
    truncate(folder / "model.safetensors", keep)
    with pytest.raises(ValueError, match=r"'.*hf/model\.safetensors' is truncated or corrupt: it holds \d+ .*"
                                         r"\(safetensors: .*\)\. Copy the model folder again \(or download it "
                                         r"again, or save it again with save_pretrained\)\.$"):
        load_task_model(str(folder), "sst2")


@pytest.mark.slow
def test_the_example_end_to_end_on_the_real_multitask_model(tmp_path, monkeypatch):
    """The two commands of config.yaml as shipped, on a built minilm-glue (else minilm-glue-large, the benchmarks'
    model, in its place); skipped when neither is cached (`python -m taskprune.zoo build minilm-glue`: minutes)."""
    from taskprune.zoo import resolve_model_dir

    for name in ("minilm-glue", "minilm-glue-large"):
        try:
            resolve_model_dir(name)
            break
        except ValueError:
            continue
    else:
        pytest.skip("no multi-task model is built (python -m taskprune.zoo build minilm-glue)")
    monkeypatch.chdir(ROOT)
    common = ["--config", str(EXAMPLE / "config.yaml"), "--pruning.output_dir", str(tmp_path / "run")]
    common += [] if name == "minilm-glue" else ["--model.model", name]
    main(["fit", *common])
    metrics = main(["test", *common]).trainer.callback_metrics
    # the sentiment head reads product reviews in the task's label order (minilm-glue-large: 0.92 and 1.0 dense)
    assert float(metrics["test/reviews/accuracy_dense"]) > 0.8
    assert float(metrics["ood/restaurants/accuracy_dense"]) > 0.8
    assert json.loads((tmp_path / "run" / "spec.json").read_text())["meta"]["task"] == "reviews"


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
