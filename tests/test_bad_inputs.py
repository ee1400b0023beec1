"""Bad inputs not covered elsewhere: CLI and Trainer arguments, tokenizer / length mismatches between data and model,
unwritable or full output folders, hand-edited specs and broken checkpoints at the Lightning level. Each bad input
fails before any work with a message that names it (or, for an overlong input, is truncated with a warning).
The full table, with the tests in other files, is in tests/README.md."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import transformers as tf
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_tiny import TOKENIZER, tiny_classifier
from taskprune.attribution import AttributionConfig
from taskprune.lightning.callback import TaskPruning
from taskprune.lightning.cli import main
from taskprune.lightning.data import TaskDataModule
from taskprune.lightning.module import AttributionModule
from taskprune.spec import PruneSpec
from taskprune.unitscores import UnitScores


def trainer(callbacks, **kw):
    kw = {"accelerator": "cpu", "devices": 1, **kw}
    return L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, callbacks=callbacks,
                     limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                     enable_model_summary=False, **kw)


def datamodule(n=4, **kw):
    return TaskDataModule("sst2", tokenizer=TOKENIZER, calib_samples=n, batch_size=4, eval_samples=4, ood=[], **kw)


def bert(**cfg):
    torch.manual_seed(0)
    base = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                max_position_embeddings=128, num_labels=2)
    return tf.BertForSequenceClassification(tf.BertConfig(**{**base, **cfg})).eval()


def cli(model_dir: Path, out: Path, *extra: str):
    return main(["fit", "--model.model", str(model_dir), "--model.attribution.method", "magnitude",
                 "--data.calib_samples", "4", "--data.batch_size", "4", "--data.ood", "[]",
                 "--pruning.output_dir", str(out), "--pruning.apply", "none", *extra])


# ------------------------------------------------------------------------------------------------ CLI and configs
def test_missing_config_file(cli_refusal, tmp_path):
    assert "nope.yaml" in cli_refusal(path=tmp_path / "nope.yaml")


def test_config_that_is_not_yaml(cli_refusal):
    assert "did not find expected ',' or ']'" in cli_refusal("model: [unclosed\n  task: sst2\n")


def test_second_cli_run_into_the_same_output_dir_refused(model_dir, tmp_path):
    cli(model_dir, tmp_path)
    first = (tmp_path / "spec.json").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a spec from an earlier run; pass overwrite=True"):
        cli(model_dir, tmp_path)
    assert (tmp_path / "spec.json").read_bytes() == first


def test_gpu_accelerator_without_a_gpu_refused_by_the_cli(model_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(MisconfigurationException, match="can not run on your system since the accelerator is not"):
        cli(model_dir, tmp_path, "--trainer.accelerator", "cuda")
    assert not tmp_path.joinpath("spec.json").exists()


@pytest.mark.parametrize("kw, match", [
    ({"accelerator": "gpu"}, "No supported gpu backend found"),
    ({"accelerator": "cuda", "devices": 4}, "can not run on your system since the accelerator is not available"),
    ({"accelerator": "cpu", "devices": 0}, r"devices=0\)` value is not a valid input using cpu accelerator"),
])
def test_devices_that_do_not_exist_refused(kw, match):
    if torch.cuda.is_available() and kw["accelerator"] != "cpu":
        pytest.skip("a GPU is present")
    with pytest.raises(MisconfigurationException, match=match):
        trainer([], **kw)


def test_cli_links_the_values_that_must_agree(model_dir, tmp_path):
    run = main(["--model.model", str(model_dir), "--model.attribution.method", "magnitude",
                "--model.attribution.units", "heads", "--data.max_length", "64", "--data.ood", "[]",
                "--pruning.output_dir", str(tmp_path)], run=False)
    pruning = next(cb for cb in run.trainer.callbacks if isinstance(cb, TaskPruning))
    assert pruning.attribution == run.model.attribution == AttributionConfig("magnitude", units="heads")
    assert pruning.budget.seq_len == run.datamodule.max_length == 64 and run.datamodule.task == run.model.task


def test_callback_attribution_that_differs_from_the_modules_refused_before_work(tmp_path):
    module = AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(steps=1))
    callback = TaskPruning(output_dir=str(tmp_path), attribution=AttributionConfig(steps=8))
    with pytest.raises(ValueError, match=r"differs from the attribution of AttributionModule .*Set it on the module"):
        trainer([callback]).fit(module, datamodule())
    assert int(module.scores.batches) == 0 and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ model vs data
def test_model_folder_that_does_not_exist(tmp_path):
    with pytest.raises(ValueError, match="cannot load model .*nope.*Pass a local folder"):
        AttributionModule(str(tmp_path / "nope"), task="sst2")


def test_tokenizer_of_another_model_refused_before_work(tmp_path):
    module = AttributionModule(bert(vocab_size=1000), task="sst2")
    with pytest.raises(ValueError, match="vocabulary of 30522 tokens but the model's input embedding has 1000 rows"):
        trainer([TaskPruning(output_dir=str(tmp_path))]).fit(module, datamodule())
    assert not list(tmp_path.iterdir())
    assert int(module.scores.batches) == 0  # nothing was scored


def test_inputs_longer_than_the_model_are_truncated_with_a_warning(tmp_path, caplog):
    dm = TaskDataModule("sst2", tokenizer=TOKENIZER, calib_samples=4, batch_size=4, ood=[], max_length=128)
    module = AttributionModule(bert(max_position_embeddings=12), task="sst2", attribution=AttributionConfig(steps=1))
    with caplog.at_level(logging.WARNING, logger="taskprune.lightning.data"):
        trainer([TaskPruning(output_dir=str(tmp_path), apply="none")]).fit(module, dm)
    assert "max_length=128 is longer than the model's 12 positions" in caplog.text
    assert dm.max_length == 12 and UnitScores.load(tmp_path / "scores.safetensors").count == 4


def test_roberta_position_offset_counted():
    from taskprune.models import max_positions

    cfg = tf.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=37, max_position_embeddings=20, pad_token_id=1)
    assert max_positions(tf.RobertaForSequenceClassification(cfg)) == 18
    assert max_positions(bert(max_position_embeddings=20)) == 20


def test_non_finite_scores_refused_with_the_fp32_hint():
    from taskprune.arch import get_architecture

    fp = get_architecture(bert()).fingerprint()
    sums = {"heads": {b: torch.full((n,), float("inf"), dtype=torch.float64) for b, n in fp["heads"].items()}}
    with pytest.raises(ValueError, match=r"non-finite score.*precision='32-true'.*fewer IG steps"):
        UnitScores(sums, 4, "ig", fp).check_finite()


def test_half_precision_overflow_in_a_batch_refused_with_the_hint():
    from taskprune.attribution import Attributor

    att = Attributor(bert(), "grad_x_gate")
    att._grad_x_gate = lambda batch, n: torch.full((n, att.gates.n_units), float("nan"))  # what an fp16 overflow gives
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long)}
    with pytest.raises(ValueError, match="overflowed in half precision; run attribution in float32"):
        att.batch_sums(batch)


# ------------------------------------------------------------------------------------------------ output folders
def test_output_dir_under_a_regular_file_refused_before_work(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    module = AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(steps=1))
    with pytest.raises(NotADirectoryError, match=r"output_dir .*file/out' cannot be created: .*is a file"):
        trainer([TaskPruning(output_dir=str(tmp_path / "file" / "out"))]).fit(module, datamodule())
    assert int(module.scores.batches) == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits; the file-as-folder case stands in")
def test_read_only_output_dir_refused_before_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match="is not writable"):
        trainer([TaskPruning(output_dir=str(ro / "out"))]).fit(AttributionModule(tiny_classifier(), task="sst2"),
                                                             datamodule())


@pytest.fixture
def disk_full(monkeypatch):
    """Every atomic file write fails as on a full disk, after its temporary file got some bytes."""
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("taskprune.io.os.fsync", fsync)


def spec_of(keep):
    from taskprune.arch import get_architecture

    fp = get_architecture(tiny_classifier()).fingerprint()
    return PruneSpec({"heads": {next(iter(fp["heads"])): keep}}, fp, "test")


def test_full_disk_leaves_no_partial_spec_or_scores(tmp_path, disk_full):
    with pytest.raises(OSError, match="No space left on device"):
        spec_of([0, 1]).save(tmp_path / "spec.json")
    from taskprune.arch import get_architecture
    from taskprune.unitscores import empty_scores

    scores = empty_scores(get_architecture(tiny_classifier()).fingerprint(), ("heads",), "ig")
    with pytest.raises(OSError, match="No space left on device"):
        scores.save(tmp_path / "scores.safetensors")
    assert not list(tmp_path.iterdir())  # neither the targets nor their temporary files


def test_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    old = spec_of([0, 1])
    old.save(tmp_path / "spec.json")
    monkeypatch.setattr("taskprune.io.os.fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(OSError, match="No space"):
        spec_of([2]).save(tmp_path / "spec.json")
    assert PruneSpec.load(tmp_path / "spec.json") == old and [p.name for p in tmp_path.iterdir()] == ["spec.json"]


def test_full_disk_during_export_leaves_no_folder(tmp_path, monkeypatch):
    from taskprune.export import save_pruned

    def full(self, *args, **kwargs):
        (Path(args[0]) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tf.PreTrainedModel, "save_pretrained", full)
    with pytest.raises(OSError, match="No space left on device"):
        save_pruned(tiny_classifier(), spec_of([0, 1]), tmp_path / "pruned")
    assert not list(tmp_path.iterdir())


def test_full_disk_during_a_calibration_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    cb = TaskPruning(output_dir=str(tmp_path), apply="none", checkpoint_every=1)
    module = AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(steps=1))
    tr = trainer([cb])
    saves = []
    real = tr.save_checkpoint

    def save_checkpoint(path, *a, **kw):
        saves.append(path)
        if len(saves) == 2:
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **kw)

    monkeypatch.setattr(tr, "save_checkpoint", save_checkpoint)
    with pytest.raises(OSError, match="No space left on device"):
        tr.fit(module, datamodule(n=8))
    import zipfile

    assert zipfile.is_zipfile(tmp_path / "calibration.ckpt")  # the first checkpoint, complete
    # no half-written temporary and no lock left; the marker says taskprune writes this folder
    assert {p.name for p in tmp_path.iterdir()} == {"calibration.ckpt", ".taskprune"}


# ------------------------------------------------------------------------------------------------ specs, checkpoints
def test_hand_edited_spec_with_unsorted_indices_refused_at_test(tmp_path):
    spec = spec_of([0, 1]).to_dict()
    block = next(iter(spec["keep"]["heads"]))
    spec["keep"]["heads"][block] = [1, 0]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"keep\['heads'\]\[.*\] is not sorted"):
        trainer([TaskPruning(output_dir=str(tmp_path))]).test(AttributionModule(tiny_classifier(), task="sst2"),
                                                              datamodule(), verbose=False)


def test_hand_edited_spec_with_duplicate_indices_refused_at_test(tmp_path):
    spec = spec_of([0, 1]).to_dict()
    block = next(iter(spec["keep"]["heads"]))
    spec["keep"]["heads"][block] = [0, 0, 1]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"duplicate index\(es\) \[0\]"):
        trainer([TaskPruning(output_dir=str(tmp_path))]).test(AttributionModule(tiny_classifier(), task="sst2"),
                                                              datamodule(), verbose=False)


def test_truncated_scores_file_refused(tmp_path):
    from taskprune.arch import get_architecture
    from taskprune.unitscores import empty_scores

    empty_scores(get_architecture(tiny_classifier()).fingerprint(), ("heads",), "ig").save(tmp_path / "s.safetensors")
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "s.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read scores file .*re-run calibration"):
        UnitScores.load(tmp_path / "s.safetensors")


def test_resume_from_a_missing_checkpoint_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Checkpoint file not found: .*calibration.ckpt"):  # Lightning's
        trainer([TaskPruning(output_dir=str(tmp_path), checkpoint_every=1)]).fit(
            AttributionModule(tiny_classifier(), task="sst2"), datamodule(), ckpt_path=str(tmp_path / "calibration.ckpt"))


def test_resume_from_a_truncated_checkpoint_refused(tmp_path):
    (tmp_path / "calibration.ckpt").write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(RuntimeError, match="checkpoint file is corrupted"):  # torch's message, through Lightning
        trainer([TaskPruning(output_dir=str(tmp_path), checkpoint_every=1)]).fit(
            AttributionModule(tiny_classifier(), task="sst2"), datamodule(), ckpt_path=str(tmp_path / "calibration.ckpt"))


def test_resume_into_an_output_dir_holding_a_spec_is_not_refused(tmp_path):
    """The refusal of a second run (row 6) must not block resuming the first one from its own checkpoint (a run
    killed after it wrote its spec, before it removed the checkpoint; kept here with keep_checkpoint)."""
    trainer([TaskPruning(output_dir=str(tmp_path), apply="none", checkpoint_every=1, keep_checkpoint=True)]).fit(
        AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(steps=1)), datamodule(n=8))
    first = UnitScores.load(tmp_path / "scores.safetensors")
    trainer([TaskPruning(output_dir=str(tmp_path), apply="none", checkpoint_every=1)]).fit(
        AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(steps=1)), datamodule(n=8),
        ckpt_path=str(tmp_path / "calibration.ckpt"))
    assert torch.equal(UnitScores.load(tmp_path / "scores.safetensors").to_flat()["heads/" + next(iter(
        first.sums["heads"]))], first.to_flat()["heads/" + next(iter(first.sums["heads"]))])


@pytest.mark.parametrize("change, match", [
    ({"steps": 2}, r"written with steps=1 \(now 2\)"),
    ({"n": 12}, r"samples=8 \(now 12\)"),
])
def test_resume_with_other_settings_refused(tmp_path, change, match):
    trainer([TaskPruning(output_dir=str(tmp_path), apply="none", checkpoint_every=1, keep_checkpoint=True)]).fit(
        AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(steps=1)), datamodule(n=8))
    module = AttributionModule(tiny_classifier(), task="sst2",
                               attribution=AttributionConfig(steps=change.get("steps", 1)))
    with pytest.raises(ValueError, match="cannot resume calibration from this checkpoint: .*" + match):
        trainer([TaskPruning(output_dir=str(tmp_path), apply="none")]).fit(
            module, datamodule(n=change.get("n", 8)), ckpt_path=str(tmp_path / "calibration.ckpt"))


# ------------------------------------------------------------------------------------- your own task (issue 13)
def own_task(tmp_path: Path, **change) -> dict:
    """A small review task on CSV files in ``tmp_path``; ``change`` replaces top-level keys or, as
    ``train=dict(...)``, updates one split's keys."""
    rows = "".join(f"good thing {i},5\nbad thing {i},1\n" for i in range(6))
    (tmp_path / "train.csv").write_text("review,rating\n" + rows)
    (tmp_path / "eval.csv").write_text("review,rating\n" + rows)
    (tmp_path / "ood.csv").write_text("text,y\nlovely,pos\nawful,neg\n")
    split = {"files": "train.csv", "text": ["review"], "label": "rating", "label_map": {1: "negative", 5: "positive"}}
    d = {"name": "reviews", "labels": ["negative", "positive"], "metrics": ["accuracy"], "data_dir": str(tmp_path),
         "train": dict(split), "eval": {**split, "files": "eval.csv"},
         "ood": {"shop": {"files": "ood.csv", "text": ["text"], "label": "y",
                          "label_map": {"pos": "positive", "neg": "negative"}}}}
    for key, value in change.items():
        if key in ("train", "eval") and isinstance(value, dict):
            d[key] = {**d[key], **value}
        elif key == "shop":
            d["ood"]["shop"] = {**d["ood"]["shop"], **value}
        else:
            d[key] = value
    return d


def fit_own(tmp_path: Path, task: dict, **data) -> None:
    """fit on ``task`` with a TaskPruning writing into ``tmp_path/out``; the caller expects it to raise."""
    out = tmp_path / "out"
    try:
        n_out = 1 if task.get("problem_type") == "regression" else 2
        module = AttributionModule(tiny_classifier(n_out), task=task, attribution=AttributionConfig(steps=1))
        dm = TaskDataModule(task, tokenizer=TOKENIZER, batch_size=4, **{"calib_samples": 8, **data})
        trainer([TaskPruning(output_dir=str(out))]).fit(module, dm)
    finally:
        assert not out.exists()  # refused before any work: nothing written


def test_own_task_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"task 'reviews', train: data file '.*nope\.csv' not found"):
        fit_own(tmp_path, own_task(tmp_path, train={"files": "nope.csv"}))


def test_own_task_missing_column(tmp_path):
    with pytest.raises(ValueError, match=r"eval: '.*eval\.csv' has no column 'stars' \(the split's label column\); "
                                         r"its columns: \['review', 'rating'\]"):
        fit_own(tmp_path, own_task(tmp_path, eval={"label": "stars"}))


def test_own_task_label_value_not_in_the_map(tmp_path):
    task = own_task(tmp_path)
    (tmp_path / "train.csv").write_text("review,rating\nfine,5\nmeh,3\nbad,1\n")
    with pytest.raises(ValueError, match=r"train\.csv', row 2: label '3' in column 'rating' is not in the label map; "
                                         r"mapped: \['1', '5'\]"):
        fit_own(tmp_path, task)


def test_own_task_empty_split(tmp_path):
    task = own_task(tmp_path)
    (tmp_path / "eval.csv").write_text("review,rating\n")
    with pytest.raises(ValueError, match=r"eval: '.*eval\.csv' has no rows"):
        fit_own(tmp_path, task)


def test_own_task_calib_per_class_larger_than_a_class(tmp_path):
    with pytest.raises(ValueError, match=r"calib_per_class=7 is larger than class 'negative' \(label 0\), which has 6"):
        fit_own(tmp_path, own_task(tmp_path), calib_samples=None, calib_per_class=7)


def test_own_task_fewer_than_two_classes_to_calibrate_on(tmp_path):
    task = own_task(tmp_path)
    (tmp_path / "train.csv").write_text("review,rating\ngood,5\nfine,5\n")
    with pytest.raises(ValueError, match=r"calibration split \(train\.csv\) holds one class \['positive'\]"):
        fit_own(tmp_path, task)


def test_own_task_text_field_that_is_not_text(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"review": 1, "rating": 5}\n{"review": 2, "rating": 1}\n')
    task = own_task(tmp_path, train={"files": "train.jsonl"})
    with pytest.raises(ValueError, match=r"text column 'review' of '.*train\.jsonl' holds .*int64.*, not text"):
        fit_own(tmp_path, task)


def test_own_task_regression_label_that_is_not_a_number(tmp_path):
    task = own_task(tmp_path, problem_type="regression", labels=["score"], metrics=["pearson"], ood={})
    for split in ("train", "eval"):
        del task[split]["label_map"]
    (tmp_path / "eval.csv").write_text("review,rating\nfine,4.5\nmeh,three\n")
    with pytest.raises(ValueError, match=r"eval\.csv', row 2: label 'three' in column 'rating' is not a number"):
        fit_own(tmp_path, task)


def test_own_task_ood_set_whose_map_drops_every_row(tmp_path):
    task = own_task(tmp_path, shop={"label_map": {}, "drop": ["pos", "neg"]})
    with pytest.raises(ValueError, match=r"task 'reviews', shop: the label map drops every row of '.*ood\.csv' "
                                         r"\(2 rows"):
        fit_own(tmp_path, task)


def test_own_task_definition_with_an_unknown_key(tmp_path):
    with pytest.raises(ValueError, match=r"inline task definition: unknown key\(s\) \['label'\]; allowed: \['name'"):
        fit_own(tmp_path, own_task(tmp_path, label=["negative", "positive"]))
    (tmp_path / "task.yaml").write_text("name: x\nlabels: [a, b]\nmetrics: [accuracy]\ntrain: {files: t.csv, "
                                        "text: [t], label: y, labelmap: {}}\neval: {files: t.csv, text: [t], label: y}\n")
    with pytest.raises(ValueError, match=r"task\.yaml: train: unknown key\(s\) \['labelmap'\]"):
        AttributionModule(tiny_classifier(), task=str(tmp_path / "task.yaml"))
