"""Faults that lost data or gave a silently wrong result (issue 22): ``overwrite`` never deletes what taskprune did not
write, one run per output_dir, specs that know what they were made for, one-line CLI errors, runs that stop without
a spec exit non-zero, files written with the user's umask, old keywords named. Tiny models, seconds each; the rows
are in tests/README.md ("Faults")."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import transformers as tf

from lightning_tiny import TOKENIZER, tiny_classifier
from taskprune.attribution import AttributionConfig
from taskprune.io import LOCK, MARKER
from taskprune.lightning.callback import TaskPruning
from taskprune.lightning.data import TaskDataModule
from taskprune.lightning.module import AttributionModule
from taskprune.spec import PruneSpec

MAGNITUDE = AttributionConfig(method="magnitude")


def trainer(callbacks, **kw):
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=kw.pop("max_epochs", 1), logger=False,
                     enable_checkpointing=False, callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def datamodule(n=4, task="sst2", **kw):
    return TaskDataModule(task, tokenizer=TOKENIZER, calib_samples=n, batch_size=4, eval_samples=4, ood=[], **kw)


def module(model=None, task="sst2", attribution=MAGNITUDE):
    return AttributionModule(model if model is not None else tiny_classifier(), task=task, attribution=attribution)


def fit(out: Path, mod=None, dm=None, **cb):
    """One calibration fit into ``out``; returns the module (for ``scores.batches``: 0 means refused before work)."""
    mod = mod if mod is not None else module()
    trainer([TaskPruning(output_dir=str(out), **{"apply": "none", **cb})]).fit(mod, dm or datamodule())
    return mod


def fit_ckpt(out: Path, ckpt_path, mod=None, **cb):
    mod = mod if mod is not None else module()
    trainer([TaskPruning(output_dir=str(out), **{"apply": "none", **cb})]).fit(mod, datamodule(), ckpt_path=ckpt_path)
    return mod


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------ 1. nothing deleted that taskprune did not write
def test_export_dir_equal_to_the_output_dir_refused_in_setup_before_calibration(tmp_path):
    out = tmp_path / "run"
    fit(out)
    before = listing(out)
    mod = module(attribution=AttributionConfig(steps=1))
    with pytest.raises(ValueError, match=r"export_dir '.*run' is the run's output_dir .* would delete it"):
        fit(out, mod, apply="shrink", export_dir=str(out), overwrite=True)
    assert int(mod.scores.batches) == 0  # found in setup: no calibration batch ran
    assert listing(out) == before  # spec.json and scores still there


def test_export_dir_holding_the_output_dir_refused(tmp_path):
    (tmp_path / "runs" / "other").mkdir(parents=True)
    (tmp_path / "runs" / "other" / "spec.json").write_text("{}")
    with pytest.raises(ValueError, match=r"export_dir '.*runs' holds the run's output_dir"):
        fit(tmp_path / "runs" / "mine", apply="shrink", export_dir=str(tmp_path / "runs"), overwrite=True)
    assert (tmp_path / "runs" / "other" / "spec.json").read_text() == "{}"


def test_export_dir_equal_to_the_input_model_folder_refused(model_dir, tmp_path):
    before = listing(model_dir)
    mod = module(str(model_dir))
    with pytest.raises(ValueError, match=r"export_dir '.*' is the input model's folder"):
        fit(tmp_path / "out", mod, apply="shrink", export_dir=str(model_dir), overwrite=True)
    assert listing(model_dir) == before and not (tmp_path / "out").exists()


def test_export_dir_with_other_files_refused_even_with_overwrite(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match=r"export_dir '.*mine' holds files taskprune did not write .*nothing "
                                              r"was deleted"):
        fit(tmp_path / "out", apply="shrink", export_dir=str(tmp_path / "mine"), overwrite=True)
    assert listing(tmp_path / "mine") == {"thesis.tex": b"years of work"} and not (tmp_path / "out").exists()


def test_export_dir_of_an_earlier_export_is_replaced_with_overwrite(tmp_path):
    from taskprune.export import load_pruned

    fit(tmp_path / "a", apply="shrink", export_dir=str(tmp_path / "pruned"))
    assert json.loads((tmp_path / "pruned" / MARKER).read_text())["kind"] == "export"
    fit(tmp_path / "b", apply="shrink", export_dir=str(tmp_path / "pruned"), overwrite=True)
    assert load_pruned(tmp_path / "pruned") is not None


def test_save_pruned_never_replaces_a_foreign_folder_or_the_models_own(model_dir, tmp_path):
    from taskprune.arch import get_architecture
    from taskprune.export import save_pruned

    model = tf.AutoModelForSequenceClassification.from_pretrained(model_dir)
    spec = PruneSpec({}, get_architecture(model).fingerprint())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds files taskprune did not write"):
        save_pruned(model, spec, tmp_path / "other", overwrite=True)
    before = listing(model_dir)
    with pytest.raises(ValueError, match="is the folder the model was loaded from"):
        save_pruned(model, spec, model_dir, overwrite=True)
    assert listing(model_dir) == before and listing(tmp_path / "other") == {"notes.txt": b"keep me"}


def test_a_run_folder_is_not_replaced_by_an_export(tmp_path):
    from taskprune.arch import get_architecture
    from taskprune.export import save_pruned

    fit(tmp_path / "run")
    model = tiny_classifier()
    with pytest.raises(FileExistsError, match=r"is a taskprune run folder, not an export"):
        save_pruned(model, PruneSpec({}, get_architecture(model).fingerprint()), tmp_path / "run", overwrite=True)
    assert (tmp_path / "run" / "spec.json").is_file()


def test_mask_bank_save_never_replaces_a_foreign_folder(tmp_path):
    from taskprune.bank import MaskBank

    (tmp_path / "bank").mkdir()
    (tmp_path / "bank" / "data.csv").write_text("a,b\n")
    with pytest.raises(FileExistsError, match="holds files taskprune did not write"):
        MaskBank(tiny_classifier()).save(tmp_path / "bank", overwrite=True)
    MaskBank(tiny_classifier()).save(tmp_path / "bank2")
    MaskBank(tiny_classifier()).save(tmp_path / "bank2", overwrite=True)  # its own earlier save: replaced
    assert (tmp_path / "bank" / "data.csv").read_text() == "a,b\n"


def test_overwrite_does_not_replace_a_spec_taskprune_did_not_mark(tmp_path):
    fit(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "spec.json").write_bytes((tmp_path / "a" / "spec.json").read_bytes())  # no marker
    mod = module()
    with pytest.raises(FileExistsError, match=r"was not written by a taskprune run .*remove that spec.json yourself"):
        fit(tmp_path / "b", mod, overwrite=True)
    assert int(mod.scores.batches) == 0 and sorted(p.name for p in (tmp_path / "b").iterdir()) == ["spec.json"]


def test_resume_from_another_runs_checkpoint_into_a_finished_output_dir_needs_overwrite(tmp_path):
    steps = AttributionConfig(steps=1)
    fit(tmp_path / "a", module(attribution=steps), checkpoint_every=1, keep_checkpoint=True)
    fit(tmp_path / "b", module(attribution=steps))
    spec_b = (tmp_path / "b" / "spec.json").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds a spec from an earlier run \(resuming from another "
                                              r"run's checkpoint '.*calibration.ckpt' would replace it too\)"):
        fit_ckpt(tmp_path / "b", str(tmp_path / "a" / "calibration.ckpt"), module(attribution=steps))
    assert (tmp_path / "b" / "spec.json").read_bytes() == spec_b
    fit_ckpt(tmp_path / "b", str(tmp_path / "a" / "calibration.ckpt"), module(attribution=steps), overwrite=True)


def write_lock(out: Path, pid: int, host: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "then"}))


def test_a_second_run_into_an_output_dir_in_use_is_refused(tmp_path):
    write_lock(tmp_path / "out", os.getppid())  # a live process of this host holds it (here: pytest's parent)
    mod = module()
    with pytest.raises(FileExistsError, match=r"output_dir '.*out' is in use by another taskprune run: pid \d+ on "
                                              r"host .*; it is still running\. Wait for it .* rm '.*\.taskprune\.lock'"):
        fit(tmp_path / "out", mod)
    assert int(mod.scores.batches) == 0 and not (tmp_path / "out" / "spec.json").exists()
    assert json.loads((tmp_path / "out" / LOCK).read_text())["pid"] == os.getppid()  # the other run's lock stays


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    write_lock(tmp_path / "out", 12345, "some-other-node")
    with pytest.raises(FileExistsError, match=r"in use by another taskprune run: pid 12345 on host 'some-other-node'"
                                              r".*if that run is gone, remove the lock: rm "):
        fit(tmp_path / "out")


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_the_lock_is_gone_after_the_run(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / "out", dead.pid)
    with caplog.at_level("WARNING"):
        fit(tmp_path / "out")
    assert f"locked by pid {dead.pid}" in caplog.text and "no longer running" in caplog.text
    assert (tmp_path / "out" / "spec.json").is_file() and not (tmp_path / "out" / LOCK).exists()


def test_a_failed_run_leaves_no_lock_and_no_folder_it_created(tmp_path):
    mod = module()
    mod.unit_scores = lambda: (_ for _ in ()).throw(RuntimeError("boom"))  # calibration fails after the lock
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path / "fresh", mod)
    assert not (tmp_path / "fresh").exists()


# ------------------------------------------------------------------------ 2. a spec knows what it was made for
def test_fit_records_the_task_and_a_weights_fingerprint(tmp_path):
    from taskprune.spec import weights_fingerprint

    model = tiny_classifier()
    fit(tmp_path, module(model))
    meta = PruneSpec.load(tmp_path / "spec.json").meta
    assert meta["task"] == "sst2" and meta["weights"] == weights_fingerprint(tiny_classifier())
    assert meta["weights"].startswith("sha256:") and weights_fingerprint(tiny_classifier(seed=1)) != meta["weights"]


def test_a_spec_of_another_task_is_refused_at_test(tmp_path):
    fit(tmp_path)
    before = listing(tmp_path)
    with pytest.raises(ValueError, match=r"spec '.*spec.json' was made for task 'sst2' \(this run's task is 'rte'\)"
                                         r".*allow_foreign_spec=True"):
        trainer([TaskPruning(output_dir=str(tmp_path))]).test(module(task="rte"), datamodule(), verbose=False)
    assert listing(tmp_path) == before


def cli_run(stage: str, model: Path, out: Path, *extra: str):
    from taskprune.lightning.cli import main

    return main([stage, "--model.model", str(model), "--model.attribution.method", "magnitude",
                 "--data.calib_samples", "4", "--data.eval_samples", "4", "--data.batch_size", "4", "--data.ood", "[]",
                 "--pruning.output_dir", str(out), *extra])


def test_a_spec_of_other_weights_is_refused_at_test_unless_allowed_and_the_report_says_so(model_dir, tmp_path):
    other = tmp_path / "other_model"  # same shapes, other weights
    tiny_classifier(seed=1).save_pretrained(other)
    tf.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(other)
    out = tmp_path / "run"
    cli_run("fit", model_dir, out)
    with pytest.raises(ValueError, match=r"was made for other weights \(fingerprint sha256:\w+, this model's "
                                         r"sha256:\w+\).*--pruning.allow_foreign_spec true"):
        cli_run("test", other, out)
    assert not (out / "test_report.json").exists()
    cli_run("test", other, out, "--pruning.allow_foreign_spec", "true")
    report = json.loads((out / "test_report.json").read_text())
    assert report["foreign_spec"].startswith("made for other weights")
    cli_run("test", model_dir, out)  # its own model: no complaint
    assert json.loads((out / "test_report.json").read_text())["foreign_spec"] is None


# ------------------------------------------------------------------------ 3. one-line CLI errors
ROOT = Path(__file__).resolve().parent.parent


def test_the_cli_prints_a_bad_input_as_one_line_and_exits_2(model_dir, tmp_path, capsys):
    from taskprune.lightning.cli import main

    cli_run("fit", model_dir, tmp_path)
    capsys.readouterr()
    args = ["fit", "--model.model", str(model_dir), "--model.attribution.method", "magnitude", "--data.calib_samples",
            "4", "--data.ood", "[]", "--pruning.output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        main(args, one_line_errors=True)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"taskprune: error: {tmp_path / 'spec.json'} already holds a spec")
    with pytest.raises(FileExistsError, match="already holds a spec"):  # --verbose: the exception and its traceback
        main([*args, "--verbose"], one_line_errors=True)


def test_taskprune_verbose_keeps_the_traceback(model_dir, tmp_path, monkeypatch):
    from taskprune.lightning.cli import main

    monkeypatch.setenv("TASKPRUNE_VERBOSE", "1")
    with pytest.raises(ValueError, match="output_dir is empty"):
        main(["fit", "--model.model", str(model_dir), "--data.ood", "[]", "--pruning.output_dir", ""],
             one_line_errors=True)


def test_train_py_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "TASKPRUNE_VERBOSE": "0"}
    result = subprocess.run([sys.executable, "train.py", "fit", "--model.model", str(tmp_path / "no_model"),
                             "--data.ood", "[]", "--pruning.output_dir", str(tmp_path / "out")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("taskprune: error: cannot load model '") and "no_model" in last


# ------------------------------------------------------------------------ 4. runs that stop without a spec fail
@pytest.mark.parametrize("kw, name", [({"limit_train_batches": 0}, "limit_train_batches=0"),
                                      ({"max_epochs": 0}, "max_epochs=0")])
def test_an_empty_calibration_is_refused_before_work(tmp_path, kw, name):
    mod = module()
    with pytest.raises(ValueError, match=rf"trainer {name} leaves nothing to calibrate on: .*would write no spec"):
        trainer([TaskPruning(output_dir=str(tmp_path / "out"), apply="none")], **kw).fit(mod, datamodule())
    assert int(mod.scores.batches) == 0 and not (tmp_path / "out").exists()


def test_an_empty_calibration_from_the_cli_exits_2(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        from taskprune.lightning.cli import main

        main(["fit", "--model.model", str(model_dir), "--data.ood", "[]", "--pruning.output_dir", str(tmp_path / "o"),
              "--trainer.limit_train_batches", "0"], one_line_errors=True)
    assert exit_.value.code == 2
    assert "taskprune: error: trainer limit_train_batches=0 leaves nothing" in capsys.readouterr().err


def test_a_fit_that_runs_no_batch_fails_instead_of_ending_without_a_spec(tmp_path):
    from torch.utils.data import DataLoader

    with pytest.raises(ValueError, match=r"fit ended without calibrating: Lightning ran no training batch .*no spec "
                                         r"was written"):
        trainer([TaskPruning(output_dir=str(tmp_path / "out"), apply="none")]).fit(module(), DataLoader([]))
    assert not (tmp_path / "out").exists()


class SigtermAfterFirstBatch(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            os.kill(os.getpid(), __import__("signal").SIGTERM)  # what SLURM / Kubernetes send at a time limit


def test_sigterm_mid_calibration_exits_non_zero_with_what_to_do(tmp_path, caplog):
    import signal

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append(a[0]))  # never let the signal end pytest
    try:
        cb = TaskPruning(output_dir=str(tmp_path), apply="none", checkpoint_every=1)
        mod = module(attribution=AttributionConfig(steps=1))
        with caplog.at_level("ERROR"), pytest.raises(SystemExit) as exit_:
            trainer([cb, SigtermAfterFirstBatch()]).fit(mod, datamodule(n=8))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_.value.code == 143  # was SystemExit(None): exit status 0 with no spec
    assert "calibration stopped by SIGTERM before it finished; no spec was written. resume it with --ckpt_path" \
        in caplog.text
    assert not (tmp_path / "spec.json").exists() and (tmp_path / "calibration.ckpt").is_file()
    assert not (tmp_path / LOCK).exists()


# ------------------------------------------------------------------------ 5. leftovers and file modes
@pytest.mark.parametrize("keep", [False, True])
def test_calibration_checkpoint_removed_after_success_unless_kept(tmp_path, keep):
    fit(tmp_path, module(attribution=AttributionConfig(steps=1)), checkpoint_every=1, keep_checkpoint=keep)
    assert (tmp_path / "spec.json").is_file() and (tmp_path / "calibration.ckpt").exists() == keep


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_outputs_are_written_with_the_users_umask(tmp_path, umask_027):
    from taskprune.export import save_pruned

    fit(tmp_path / "run", apply="shrink", export_dir=str(tmp_path / "pruned"))
    for name in ("spec.json", "scores.safetensors", MARKER):
        assert mode(tmp_path / "run" / name) == 0o640, name  # mkstemp's 0o600 made them unreadable to the group
    assert mode(tmp_path / "pruned") == 0o750  # mkdtemp's 0o700 made the export unreadable to a serving user
    assert {p.name: mode(p) for p in (tmp_path / "pruned").iterdir()} == \
        {p.name: 0o640 for p in (tmp_path / "pruned").iterdir()}
    os.umask(0o022)
    save_pruned(tiny_classifier(), PruneSpec.load(tmp_path / "run" / "spec.json"), tmp_path / "p2")
    assert mode(tmp_path / "p2") == 0o755 and mode(tmp_path / "p2" / "taskprune_spec.json") == 0o644


# ------------------------------------------------------------------------ 6. old keywords name their replacement
@pytest.mark.parametrize("kw, match", [
    ({"budget_kind": "params"}, r"TaskPruning no longer takes budget_kind -> budget=Budget\(amount=\.\.\., kind=\.\.\.\)"),
    ({"scope": "global"}, r"scope -> budget=Budget\(scope=\.\.\.\) .*YAML: pruning\.budget\.scope"),
    ({"method": "fisher", "steps": 4}, r"method -> attribution=AttributionConfig\(method=\.\.\.\) .*; steps -> "
                                       r"attribution=AttributionConfig\(steps=\.\.\.\)"),
    ({"reconstruct": "lstsq"}, r"reconstruct -> nothing: it was removed in 0\.2; the tuning stage .*TuningConfig"),
    ({"budgte": 0.4}, r"unexpected keyword argument\(s\) \['budgte'\]; see help\(TaskPruning\)"),
])
def test_old_keywords_are_refused_with_their_replacement(kw, match):
    with pytest.raises(TypeError, match=match):
        TaskPruning(**kw)


def test_the_cli_still_parses_the_callbacks_signature():
    from taskprune.lightning.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--print_config"])
    assert exit_.value.code == 0


# ------------------------------------------------------------------------------ #22 points 1-6 (rows F28...)
def reviews_task(tmp_path: Path, train_split: str = "", labels: str = "[negative, positive]") -> Path:
    """A task file over a tiny csv of star ratings; ``train_split`` replaces the train split's label_map / drop."""
    (tmp_path / "r.csv").write_text("text,stars\ngood,5\nbad,1\nfine,yes\nawful,no\n")
    split = "{files: r.csv, text: text, label: stars, %s}"
    plain = "label_map: {1: negative, 5: positive}, drop: ['yes', 'no']"
    (tmp_path / "task.yaml").write_text(f"name: reviews\nlabels: {labels}\nmetrics: [accuracy]\n"
                                        f"train: {split % (train_split or plain)}\neval: {split % plain}\n")
    return tmp_path / "task.yaml"


@pytest.mark.parametrize("label_map, match", [
    ({1: "negative", "1": "positive"}, r"label_map: keys 1, '1' are all the raw label '1' .* keep one key"),
    ({"5": "positive", " 5 ": "negative", 1: "negative"}, r"keys '5', ' 5 ' are all the raw label '5'"),
])
def test_label_map_keys_that_are_one_raw_label_are_refused(label_map, match):
    from taskprune.tasks import task_from_dict

    split = {"files": "r.csv", "text": "text", "label": "stars", "label_map": label_map}
    with pytest.raises(ValueError, match=match):
        task_from_dict({"name": "reviews", "labels": ["negative", "positive"], "metrics": ["accuracy"],
                        "train": split, "eval": split})


def test_a_key_repeated_in_a_task_file_is_refused_with_its_lines(tmp_path):
    from taskprune.tasks import get_task

    path = reviews_task(tmp_path, "label_map: {1: negative, 5: positive, 1.0: positive}")
    with pytest.raises(ValueError, match=r"task.yaml', line 4: key 1.0 repeats key 1 of line 4 in one mapping "
                                         r"\(YAML would keep only the last, silently\); keep one\.$"):
        get_task(str(path))


@pytest.mark.parametrize("train_split, labels, match", [
    ("label_map: {yes: positive, 5: positive, 1: negative}, drop: ['no']", None,
     r"key 1 repeats key yes of line 4 .*\(yes is read as a boolean, which equals 1 or 0: .* quote it"),
    ("label_map: {yes: positive, 5: positive}, drop: ['no', '1']", None,
     r"label_map entry True: 'positive' holds a boolean.*quote it \(e.g. 'yes': positive"),
    ("label_map: {'yes': on, 1: negative, 5: positive}, drop: ['no']", None, r"label_map entry 'yes': True holds"),
    ("label_map: {1: negative, 5: positive, 'yes': positive}, drop: [no]", None, r"drop \[False\] holds a boolean"),
    ("", "[yes, no]", r"labels \[True, False\] holds a boolean"),
])
def test_yaml_booleans_in_a_label_map_are_refused_with_the_hint_to_quote(tmp_path, train_split, labels, match):
    from taskprune.tasks import get_task

    with pytest.raises(ValueError, match=match):
        get_task(str(reviews_task(tmp_path, train_split, labels or "[negative, positive]")))


def test_quoted_yes_and_no_are_raw_labels(tmp_path):
    from taskprune.lightning.data import load_split
    from taskprune.tasks import get_task

    task = get_task(str(reviews_task(tmp_path, "label_map: {'yes': positive, 'no': negative, 1: negative, "
                                               "5: positive}")))
    assert load_split(task, "train")["label"] == [1, 0, 1, 0]


def regression_task(tmp_path: Path, bad_split: str, value: str) -> dict:
    """A regression task over two tiny csv files; ``bad_split``'s file has ``value`` as the label of its row 2."""
    for split in ("train", "eval"):
        rows = ["good,4.5", f"bad,{value if split == bad_split else '1.0'}", "fine,3"]
        (tmp_path / f"{split}.csv").write_text("text,score\n" + "\n".join(rows) + "\n")
    return {"name": "rating", "problem_type": "regression", "metrics": ["pearson", "mse"], "data_dir": str(tmp_path),
            "train": {"files": "train.csv", "text": "text", "label": "score"},
            "eval": {"files": "eval.csv", "text": "text", "label": "score"}}


@pytest.mark.parametrize("stage", ["fit", "test"])
@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity"])
def test_nan_or_inf_regression_labels_are_refused_with_the_row_and_file(tmp_path, stage, value):
    bad = "train" if stage == "fit" else "eval"
    dm = TaskDataModule(regression_task(tmp_path, bad, value), tokenizer=TOKENIZER, calib_samples=3, batch_size=3)
    mod = AttributionModule(tiny_classifier(n_labels=1), task=dm.task, attribution=MAGNITUDE)
    t = trainer([TaskPruning(output_dir=str(tmp_path / "run"), apply="none")])
    with pytest.raises(ValueError, match=rf"task 'rating', {bad}: '.*{bad}.csv', row 2: label '{value}' in column "
                                         r"'score' is -?(nan|inf), not a finite number; .* Fix or remove the row\.$"):
        t.fit(mod, dm) if stage == "fit" else t.test(mod, dm)
    assert not (tmp_path / "run" / "spec.json").exists() and not (tmp_path / "run" / "test_report.json").exists()


def test_target_pseudo_on_a_regression_head_is_refused_when_the_module_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"task 'rating': target='pseudo' on a regression head \(1 output\): its "
                                         r"pseudo-label is its own output.*--model.attribution.target label"):
        AttributionModule(tiny_classifier(n_labels=1), task=regression_task(tmp_path, "none", "1"),
                          attribution=AttributionConfig(target="pseudo"))
    # methods that read no target take it as before
    AttributionModule(tiny_classifier(n_labels=1), task=regression_task(tmp_path, "none", "1"),
                      attribution=AttributionConfig(method="activation", target="pseudo"))


def one_output_batch(labels: torch.Tensor) -> dict:
    return {"input_ids": torch.randint(5, 1000, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long),
            "labels": labels}


@pytest.mark.parametrize("method", ["ig", "grad_x_gate", "fisher"])
def test_target_pseudo_on_a_regression_head_is_refused_by_score_units(method):
    from taskprune.attribution import score_units

    with pytest.raises(ValueError, match=r"target='pseudo' on a regression head \(1 output\).*every attribution is "
                                         r"~0 and the units would be chosen from noise"):
        score_units(tiny_classifier(n_labels=1), [one_output_batch(torch.tensor([0.5, 2.0]))], method,
                    target="pseudo")


def test_a_one_output_head_with_integer_labels_is_refused():
    from taskprune.attribution import score_units

    with pytest.raises(ValueError, match=r"target 'label': the head has 1 output \(a regression head\) but the labels "
                                         r"are integers \(torch.int64, e.g. \[0, 1\]\).*give float scores \(problem_"
                                         r"type: regression\); for classification load a head with one output per "
                                         r"class$"):
        score_units(tiny_classifier(n_labels=1), [one_output_batch(torch.tensor([0, 1]))], "ig")
    scores = score_units(tiny_classifier(n_labels=1), [one_output_batch(torch.tensor([0.0, 1.0]))], "ig")
    assert scores.count == 2


@pytest.fixture(scope="module")
def bare_model_dir(tmp_path_factory) -> Path:
    """A tiny SST-2 classifier folder without tokenizer files (config.json + model.safetensors only)."""
    folder = tmp_path_factory.mktemp("bare_model")
    tiny_classifier().save_pretrained(folder)
    return folder


def test_a_model_folder_without_tokenizer_files_is_refused_in_setup(tmp_path, bare_model_dir):
    mod = AttributionModule(str(bare_model_dir), task="sst2", attribution=AttributionConfig(steps=1))
    dm = TaskDataModule("sst2", calib_samples=4, batch_size=4, eval_samples=4, ood=[])
    with pytest.raises(ValueError, match=rf"the tokenizer '{bare_model_dir}' has 5 tokens but the model's input "
                                         rf"embedding has 30522 rows: '{bare_model_dir}' \(the model's folder\) holds "
                                         r"no tokenizer files .* nearly every word would become \[UNK\]\. Pass the "
                                         r"tokenizer the model was trained with: --data.tokenizer <folder or hub id>"):
        fit(tmp_path / "run", mod, dm)
    assert int(mod.scores.batches) == 0 and not (tmp_path / "run").exists()
    # the fix the message names: --data.tokenizer wins over the model's folder
    mod = AttributionModule(str(bare_model_dir), task="sst2", attribution=AttributionConfig(steps=1))
    fit(tmp_path / "run", mod, TaskDataModule("sst2", tokenizer=TOKENIZER, calib_samples=4, batch_size=4, ood=[]))
    assert int(mod.scores.batches) == 1 and (tmp_path / "run" / "spec.json").is_file()


def test_a_folder_whose_tokenizer_cannot_be_built_names_the_missing_files(tmp_path):
    from taskprune.lightning.data import load_tokenizer
    from tiny import tiny_model

    tiny_model("llama_gqa").save_pretrained(tmp_path)  # transformers raises a ValueError of its own for LLaMA
    with pytest.raises(ValueError, match=rf"cannot load a tokenizer from '{tmp_path}': the folder holds no tokenizer "
                                         r"files \(none of \['tokenizer.json', 'vocab\*'.*--data.tokenizer"):
        load_tokenizer(str(tmp_path))


def test_test_before_fit_shows_the_dense_column_only_and_says_no_spec_was_applied(model_dir, tmp_path, capsys):
    run = cli_run("test", model_dir, tmp_path / "run")
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "run" / "test_report.json").read_text())["rows"]
    assert rows and all(r["pruned"] is None and 0 <= r["dense"] <= 1 and r["retained_pct"] is None for r in rows)
    assert [r["dense"] for r in rows] == pytest.approx([r["dense"] for r in run.model.results])
    header = next(line for line in out.splitlines() if "metric" in line)
    assert "dense" in header and "pruned" not in header and "retained" not in header
    assert "no spec was applied: the dense model only" in " ".join(out.split())


def one_class_ood_task(tmp_path: Path) -> dict:
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"good film {i},1\nbad plot {i},0\n" for i in range(4)))
    (tmp_path / "shop.csv").write_text("text,label\n" + "".join(f"great shop {i},1\n" for i in range(4)))
    split = {"files": "train.csv", "text": "text", "label": "label", "label_map": {"0": "negative", "1": "positive"}}
    return {"name": "reviews", "labels": ["negative", "positive"], "metrics": ["accuracy", "matthews"],
            "data_dir": str(tmp_path), "train": split, "eval": split, "ood": {"shop": {**split, "files": "shop.csv"}}}


def test_an_ood_set_of_one_class_reports_accuracy_and_says_mcc_is_undefined(tmp_path):
    from taskprune.lightning.report import comparison_table, report_rows
    from rich.console import Console

    dm = TaskDataModule(one_class_ood_task(tmp_path), tokenizer=TOKENIZER, calib_samples=4, batch_size=4)
    out = tmp_path / "run"
    fit(out, module(task=dm.task), dm)
    mod = module(task=dm.task)
    t = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[TaskPruning(output_dir=str(out), apply="mask")])
    t.test(mod, dm, verbose=False)
    rows = {(r["set"], r["metric"]): r for r in report_rows(mod.results)}
    assert rows["shop", "accuracy"]["pruned"] is not None and rows["shop", "accuracy"]["dense"] is not None
    mcc = rows["shop", "matthews"]
    assert mcc["pruned"] is None and mcc["dense"] is None and mcc["retained_pct"] is None
    assert mcc["note"] == "MCC undefined: every row of 'shop' is 'positive' (one class); see accuracy"
    assert rows["reviews", "matthews"]["pruned"] is not None  # two classes: defined
    assert "ood/shop/matthews" not in t.callback_metrics and "ood/shop/accuracy" in t.callback_metrics
    console = Console(width=200, record=True)
    console.print(comparison_table(mod.results))
    assert "MCC undefined: every row of 'shop' is 'positive'" in console.export_text()


# ------------------------------------------------------------------------------ #22: resume checks, files, exports
def fit_with_checkpoint(out: Path, mod=None, dm=None, **cb) -> None:
    """A calibration (8 rows, 2 batches) that keeps its ``calibration.ckpt`` (as a run killed after its last
    checkpoint would)."""
    fit(out, mod or module(attribution=AttributionConfig(steps=1)), dm or datamodule(n=8),
        checkpoint_every=1, keep_checkpoint=True, **cb)


@pytest.mark.parametrize("other", ["same shapes", "other shapes"])
def test_a_resume_with_another_model_is_refused_before_its_weights_are_loaded(model_dir, tmp_path, other):
    """Was: the other model silently took the checkpoint's weights (same shapes; the export was the checkpoint's
    model), or a size-mismatch traceback (other shapes)."""
    other_dir = tmp_path / "other_model"
    model = tiny_classifier(seed=1) if other == "same shapes" else bert_with(intermediate_size=40)
    model.save_pretrained(other_dir)
    tf.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(other_dir)
    out = tmp_path / "run"
    cli_run("fit", model_dir, out, "--pruning.checkpoint_every", "1", "--pruning.keep_checkpoint", "true")
    spec = (out / "spec.json").read_bytes()
    with pytest.raises(ValueError, match=rf"cannot resume from '{out / 'calibration.ckpt'}': its sums belong to "
                                         r"other model weights \(fingerprint sha256:\w+ in the checkpoint, "
                                         r"sha256:\w+ now: the model given is not the one the checkpoint's run "
                                         r"calibrated\)\. .*start again without --ckpt_path$"):
        cli_run("fit", other_dir, out, "--ckpt_path", str(out / "calibration.ckpt"))
    assert (out / "spec.json").read_bytes() == spec
    cli_run("fit", model_dir, out, "--ckpt_path", str(out / "calibration.ckpt"))  # its own model resumes


def test_a_cli_resume_with_other_attribution_settings_is_refused_not_silently_given_the_checkpoints(model_dir,
                                                                                                     tmp_path):
    """Was: LightningCLI replaced --model.attribution.* with the checkpoint's hyperparameters, so the resume ran with
    steps=1 while the command said steps=2."""
    out = tmp_path / "run"
    cli_run("fit", model_dir, out, "--model.attribution.method", "ig", "--model.attribution.steps", "1",
            "--pruning.checkpoint_every", "1", "--pruning.keep_checkpoint", "true")
    with pytest.raises(ValueError, match=r"cannot resume calibration from this checkpoint: it was written with "
                                         r"steps=1 \(now 2\)"):
        cli_run("fit", model_dir, out, "--model.attribution.method", "ig", "--model.attribution.steps", "2",
                "--ckpt_path", str(out / "calibration.ckpt"))


def resume(out: Path, mod, dm=None, **cb) -> None:
    trainer([TaskPruning(output_dir=str(out), apply="none", **cb)]).fit(mod, dm or datamodule(n=8),
                                                                       ckpt_path=str(out / "calibration.ckpt"))


def bert_with(**cfg):
    torch.manual_seed(0)
    base = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                max_position_embeddings=128, num_labels=2)
    return tf.BertForSequenceClassification(tf.BertConfig(**{**base, **cfg})).eval()


def test_a_python_resume_with_another_model_of_the_same_shapes_is_refused(tmp_path):
    fit_with_checkpoint(tmp_path)
    before = listing(tmp_path)
    with pytest.raises(ValueError, match=r"its sums belong to other model weights \(fingerprint"):
        resume(tmp_path, module(tiny_classifier(seed=1), attribution=AttributionConfig(steps=1)))
    assert listing(tmp_path) == before  # refused before any batch or write


def test_a_python_resume_with_another_architecture_is_refused_before_its_weights_are_loaded(tmp_path):
    """Was: Lightning's `size mismatch` traceback (only the CLI checked before the weights load)."""
    fit_with_checkpoint(tmp_path)
    before = listing(tmp_path)
    with pytest.raises(ValueError, match=r"its sums belong to other model weights \(fingerprint"):
        resume(tmp_path, module(bert_with(intermediate_size=41), attribution=AttributionConfig(steps=1)))
    assert listing(tmp_path) == before


def rows_task(tmp_path: Path, words: list[str]) -> dict:
    """A task over ``tmp_path/train.csv``: one row per word, labels alternating."""
    rows = "".join(f"{w} film,{i % 2}\n" for i, w in enumerate(words))
    (tmp_path / "train.csv").write_text("text,label\n" + rows)
    split = {"files": "train.csv", "text": "text", "label": "label", "label_map": {"0": "negative", "1": "positive"}}
    return {"name": "reviews", "labels": ["negative", "positive"], "metrics": ["accuracy"], "data_dir": str(tmp_path),
            "train": split, "eval": split}


def test_a_resume_after_the_train_file_changed_is_refused(tmp_path):
    """Was: the same row count passed the check, and the sums mixed old and new rows."""
    def dm(task):
        return TaskDataModule(task, tokenizer=TOKENIZER, calib_samples=8, batch_size=4, ood=[])

    task = rows_task(tmp_path, ["good", "bad", "fine", "awful", "great", "dull", "nice", "poor"])
    out = tmp_path / "run"
    fit_with_checkpoint(out, module(task=task, attribution=AttributionConfig(steps=1)), dm(task))
    before = listing(out)
    task = rows_task(tmp_path, ["lovely", "vile", "neat", "grim", "superb", "bleak", "sweet", "weak"])
    mod = module(task=task, attribution=AttributionConfig(steps=1))
    with pytest.raises(ValueError, match=r"its sums belong to other calibration rows \(data fingerprint sha256:\w+ in "
                                         r"the checkpoint, sha256:\w+ now: the train file changed, or calib_samples / "
                                         r"calib_per_class / calib_seed\)"):
        resume(out, mod, dm(task))
    assert listing(out) == before


def test_a_checkpoint_without_a_record_resumes_with_one_warning(tmp_path, caplog):
    from taskprune.lightning.callback import RUN_KEY

    fit_with_checkpoint(tmp_path)
    ckpt = tmp_path / "calibration.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert set(state[RUN_KEY]) == {"task", "weights", "data", "attribution", "max_length"}
    del state[RUN_KEY]  # as taskprune before 0.2 wrote it
    torch.save(state, ckpt)
    with caplog.at_level("WARNING"):
        resume(tmp_path, module(attribution=AttributionConfig(steps=1)))
    assert caplog.text.count("holds no record of the model, data and settings its sums belong to") == 1


def test_the_spec_records_the_calibration_rows_fingerprint(tmp_path):
    dm = datamodule(n=8)
    fit(tmp_path / "a", dm=dm)
    meta = PruneSpec.load(tmp_path / "a" / "spec.json").meta
    assert meta["data"] == dm.calibration_fingerprint() and meta["data"].startswith("sha256:")
    assert meta["task"] == "sst2" and meta["weights"].startswith("sha256:")  # F15's fields, as before
    assert datamodule(n=8, calib_seed=1).calibration_fingerprint() != meta["data"]


@pytest.mark.parametrize("kind", ["latin-1 bytes", "folder", "link loop"])
def test_a_config_file_that_cannot_be_read_is_one_line_naming_it(tmp_path, capsys, kind):
    from taskprune.lightning.cli import main

    path = tmp_path / "config.yaml"
    if kind == "latin-1 bytes":
        path.write_bytes("data:\n  task: sst2 # café\n".encode("latin-1"))
        match = (rf"--config '{path}' is not UTF-8 text: byte 0xe9 at line 2, column 19 \(' task: sst2 # café' if "
                 r"read as latin-1\); save it as UTF-8")
    elif kind == "folder":
        path.mkdir()
        match = rf"--config '{path}' is a folder, not a file; pass a YAML config file"
    else:
        os.symlink(tmp_path / "b.yaml", path)
        os.symlink(path, tmp_path / "b.yaml")
        match = rf"--config '{path}' is a symbolic link loop"
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(path), "--print_config"], one_line_errors=True)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert __import__("re").match("taskprune: error: " + match, err.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["folder", "link loop"])
def test_a_spec_path_or_ckpt_path_that_is_not_a_file_is_named(model_dir, tmp_path, kind):
    path = tmp_path / "spec.json"
    if kind == "folder":
        path.mkdir()
        problem = "is a folder, not a file"
    else:
        os.symlink(path, path)
        problem = r"is a symbolic link loop \(following its links leads back to a link already followed\)"
    with pytest.raises(ValueError, match=rf"spec_path '{path}' {problem}; point spec_path at a spec.json written by "
                                         "fit"):
        cli_run("test", model_dir, tmp_path / "run", "--pruning.spec_path", str(path))
    with pytest.raises(ValueError, match=rf"ckpt_path '{path}' {problem}; pass the calibration checkpoint file"):
        cli_run("fit", model_dir, tmp_path / "run", "--ckpt_path", str(path))
    assert not (tmp_path / "run" / "spec.json").exists()


KILLED_EXPORT = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import transformers as tf
from test_faults import fit

def killed(self, folder, *args, **kw):
    (Path(folder) / "config.json").write_text("{{}}")  # part of the export is written, then the process is killed
    os.kill(os.getpid(), signal.SIGKILL)

tf.PreTrainedModel.save_pretrained = killed
fit(Path({out!r}), apply="shrink", export_dir={export!r})
"""


def test_a_run_killed_during_its_export_is_named_on_the_rerun_and_its_partial_copy_removed(tmp_path):
    """Was: the rerun said only "already holds a spec from an earlier run", and the killed export's hidden copy stayed
    beside the export folder for good."""
    from taskprune.export import load_pruned
    from taskprune.io import PARTIAL

    out, export = tmp_path / "run", tmp_path / "pruned"
    script = KILLED_EXPORT.format(tests=str(Path(__file__).parent), out=str(out), export=str(export))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".pruned.")]
    assert (out / "spec.json").is_file() and not export.exists() and len(partial) == 1
    assert (partial[0] / PARTIAL).is_file()
    spec = (out / "spec.json").read_bytes()
    with pytest.raises(FileExistsError, match=rf"{out / 'spec.json'} already holds a spec from an earlier run, but "
                                              rf"export_dir '{export}' holds no export of it \(the folder is missing: "
                                              r"that run stopped before its export finished, or had no export; it left "
                                              rf"the partial copy '{partial[0]}' beside it, which no loader reads: "
                                              r"remove it, or the next export into that folder removes it\)\. Nothing "
                                              r"was changed\. Export that spec without calibrating again: "
                                              r"taskprune\.export\.save_pruned\(model, PruneSpec\.load\("):
        fit(out, apply="shrink", export_dir=str(export))
    assert (out / "spec.json").read_bytes() == spec and partial[0].is_dir()
    fit(out, apply="shrink", export_dir=str(export), overwrite=True)
    assert load_pruned(export) is not None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pruned.")] == []
    assert not (export / PARTIAL).exists()
