import copy
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightning_tiny import TOKENIZER, tiny_classifier
from taskprune.attribution import AttributionConfig
from taskprune.lightning.callback import TaskPruning
from taskprune.lightning.data import TaskDataModule
from taskprune.lightning.module import AttributionModule
from taskprune.selection import Budget
from taskprune.spec import PruneSpec
from taskprune.unitscores import UnitScores, is_close

HERE = Path(__file__).parent


def trainer(callbacks, **kw):
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                     callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                     enable_model_summary=False, **kw)


def datamodule(n=12, **kw):
    kw.setdefault("ood", ["imdb"])
    return TaskDataModule("sst2", tokenizer=TOKENIZER, calib_samples=n, batch_size=4, eval_samples=12, **kw)


def test_fit_updates_no_weight_and_writes_spec(tmp_path):
    model = tiny_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = AttributionModule(model, task="sst2", attribution=AttributionConfig(steps=2))
    trainer([TaskPruning(budget=Budget(amount=0.3), output_dir=str(tmp_path), apply="none")]).fit(module, datamodule())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    spec = PruneSpec.load(tmp_path / "spec.json")
    scores = UnitScores.load(tmp_path / "scores.safetensors")
    assert scores.count == 12 and scores.method == "ig"
    assert spec.budget["achieved"]["macs"] >= 0.3
    assert spec.validate(model) == "dense"


def test_fit_then_test_reports_dense_and_pruned(tmp_path):
    module = AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(steps=2))
    cb = TaskPruning(budget=Budget(amount=0.4), output_dir=str(tmp_path), apply="shrink")
    tr = trainer([cb])
    tr.fit(module, datamodule())
    assert module.spec_mode == "shrink"
    tr.test(module, datamodule(), verbose=False)
    sets = {(r["set"], r["kind"]) for r in module.results}
    assert sets == {("sst2", "in-domain"), ("imdb", "ood")}
    assert all(r["dense"] is not None and 0 <= r["pruned"] <= 1 for r in module.results)
    assert "test/sst2/accuracy" in tr.callback_metrics and "ood/imdb/accuracy_dense" in tr.callback_metrics
    assert sum(p.numel() for p in module.model.parameters()) < sum(p.numel() for p in module.dense_model.parameters())


def test_test_applies_saved_spec_in_a_new_run(tmp_path):
    trainer([TaskPruning(budget=Budget(amount=0.4), output_dir=str(tmp_path), apply="none")]).fit(
        AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(steps=1)), datamodule())
    fresh = AttributionModule(tiny_classifier(), task="sst2")
    trainer([TaskPruning(output_dir=str(tmp_path), apply="mask")]).test(fresh, datamodule(), verbose=False)
    assert fresh.spec_mode == "mask" and fresh.spec == PruneSpec.load(tmp_path / "spec.json")


def test_shrunk_checkpoint_reloads(tmp_path):
    module = AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(steps=1),
                               compare_dense=False)
    tr = trainer([TaskPruning(budget=Budget(amount=0.4), output_dir=str(tmp_path), apply="shrink")])
    tr.fit(module, datamodule())
    tr.save_checkpoint(tmp_path / "pruned.ckpt")
    batch = {"input_ids": torch.randint(1000, 2000, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    expected = module.model(**batch).logits
    reloaded = AttributionModule.load_from_checkpoint(tmp_path / "pruned.ckpt", model=tiny_classifier(seed=5),
                                                      weights_only=False)
    torch.testing.assert_close(reloaded.model(**batch).logits, expected)


class UserModule(L.LightningModule):
    """A user's own module: not AttributionModule; exposes only `pruning_model`."""

    def __init__(self):
        super().__init__()
        self.net = tiny_classifier()

    @property
    def pruning_model(self) -> nn.Module:
        return self.net

    def training_step(self, batch, batch_idx):
        out = self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def pruning_batch(self, batch):
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def test_callback_works_with_a_users_own_module(tmp_path):
    module = UserModule()
    dense_params = sum(p.numel() for p in module.net.parameters())
    cb = TaskPruning(budget=Budget(amount=0.3), output_dir=str(tmp_path),
                     attribution=AttributionConfig(method="grad_x_gate"), calib_batches=2)
    trainer([cb]).fit(module, datamodule())
    assert UnitScores.load(tmp_path / "scores.safetensors").count == 8
    assert sum(p.numel() for p in module.net.parameters()) < dense_params


def test_callbacks_own_calibration_honours_every_attribution_option(tmp_path):
    from taskprune.attribution import score_units

    config = AttributionConfig("ig", steps=3, quadrature="trapezoid", baseline=0.0, alpha_batch=2, aggregate="signed")
    module, dm = UserModule(), datamodule()
    trainer([TaskPruning(output_dir=str(tmp_path), attribution=config, calib_batches=2, apply="none")]).fit(module, dm)
    got = UnitScores.load(tmp_path / "scores.safetensors")
    batches = [module.pruning_batch(b) for b, _ in zip(dm.train_dataloader(), range(2))]
    expected = score_units(tiny_classifier(), batches, config)  # the SGD step has lr=0: the weights are the same
    assert got.options == expected.options and got.options["quadrature"] == "trapezoid"
    assert is_close(got, expected, rtol=1e-6)


def test_data_free_method_through_the_module_gives_its_real_scores(tmp_path):
    from taskprune.attribution import score_units

    trainer([TaskPruning(output_dir=str(tmp_path), apply="none")]).fit(
        AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(method="magnitude")),
        datamodule())
    got = UnitScores.load(tmp_path / "scores.safetensors")
    assert got.count == 0 and is_close(got, score_units(tiny_classifier(), None, "magnitude"), rtol=1e-12)


def test_resumed_calibration_equals_uninterrupted(tmp_path):
    script = HERE / "ddp_calibrate.py"
    full = tmp_path / "full"
    subprocess.run([sys.executable, str(script), str(full), "1", "16", "1"], check=True, cwd=HERE,
                   capture_output=True, timeout=300)
    ckpts = sorted(full.glob("calibration-2.ckpt"))  # killed after 2 of 4 batches
    assert ckpts, list(full.iterdir())
    resumed = tmp_path / "resumed"
    subprocess.run([sys.executable, str(script), str(resumed), "1", "16", "0", str(ckpts[0])], check=True,
                   cwd=HERE, capture_output=True, timeout=300)
    a = UnitScores.load(full / "scores.safetensors")
    b = UnitScores.load(resumed / "scores.safetensors")
    assert a.count == b.count == 16
    assert is_close(a, b, rtol=1e-9)


# ---------------------------------------------------------------------------------------------- bad input
def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'sst3'"):
        AttributionModule(tiny_classifier(), task="sst3")


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'taylor'"):
        AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(method="taylor"))


def test_head_does_not_match_task_labels():
    with pytest.raises(ValueError, match="head has 3 outputs but task 'sst2' has 2 labels"):
        AttributionModule(tiny_classifier(n_labels=3), task="sst2")


def named(id2label: dict, n_labels: int = 2):
    model = tiny_classifier(n_labels=n_labels)
    model.config.id2label = id2label
    model.config.label2id = {v: k for k, v in id2label.items()}
    return model


def test_model_label_names_that_do_not_match_the_task_refused_before_work():
    with pytest.raises(ValueError, match=r"the model's labels \['NEG', 'POS'\] \(config.id2label\) do not match the "
                                         r"labels of task 'sst2' \['negative', 'positive'\]; pass --model.label_map"):
        AttributionModule(named({0: "NEG", 1: "POS"}), task="sst2")


def test_model_label_names_matched_case_insensitively_and_reordered():
    batch = {"input_ids": torch.tensor([[101, 2204, 102], [101, 2919, 102]]), "attention_mask": torch.ones(2, 3).long()}
    same = AttributionModule(named({0: "Negative", 1: "POSITIVE"}), task="sst2")
    assert same.label_order is None
    swapped = AttributionModule(named({0: "positive", 1: "negative"}), task="sst2")
    assert swapped.label_order == [1, 0]
    raw = swapped.model(**batch).logits
    assert torch.equal(swapped.forward_fn(swapped.model, batch).logits, raw[:, [1, 0]])


def test_label_map_overrides_the_match():
    mapped = AttributionModule(named({0: "NEG", 1: "POS"}), task="sst2",
                               label_map={"negative": "neg", "positive": "pos"})
    assert mapped.label_order is None
    three = AttributionModule(named({0: "neg", 1: "neutral", 2: "pos"}, n_labels=3), task="sst2",
                              label_map={"negative": "NEG", "positive": 2})
    assert three.label_order == [0, 2]
    with pytest.raises(ValueError, match=r"label_map maps 'positive' to 'great', which is neither a label"):
        AttributionModule(named({0: "NEG", 1: "POS"}), task="sst2", label_map={"negative": "NEG", "positive": "great"})
    with pytest.raises(ValueError, match=r"label_map must map each label of task 'sst2'"):
        AttributionModule(named({0: "NEG", 1: "POS"}), task="sst2", label_map={"negative": "NEG"})


def test_the_module_implements_the_pruning_protocol():
    from taskprune.lightning.protocol import PruningModule

    assert isinstance(AttributionModule(tiny_classifier(), task="sst2"), PruningModule)
    assert not isinstance(nn.Linear(2, 2), PruningModule)


def test_budget_outside_unit_interval():
    with pytest.raises(ValueError, match="budget must be a fraction in \\[0, 1\\), got 1.5"):
        TaskPruning(budget=Budget(amount=1.5))


def test_unreachable_budget_fails_before_work(tmp_path):
    module = AttributionModule(tiny_classifier(), task="sst2")
    cb = TaskPruning(budget=Budget(amount=0.9, kind="heads", min_heads=2), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="lower the budget or the floor"):
        trainer([cb]).fit(module, datamodule())
    assert not (tmp_path / "spec.json").exists()


def test_heads_neurons_split_by_held_out_loss_when_the_datamodule_holds_rows_out(tmp_path):
    from taskprune.tuning import TuningConfig

    def fit(out, budget=Budget(amount=0.4)):
        module = AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(steps=1),
                                   compare_dense=False)
        trainer([TaskPruning(budget=budget, output_dir=str(tmp_path / out), apply="none")]).fit(
            module, datamodule(holdout_samples=24))
        return PruneSpec.load(tmp_path / out / "spec.json")

    by_loss = fit("auto")  # squared IG -> the mask search, split by the loss on 24 held-out rows (auto: rows given)
    assert by_loss.budget["scope"] == "search" and by_loss.budget["allocation"] == "loss"
    assert by_loss.budget["achieved"]["macs"] >= 0.4
    score = fit("score", budget=Budget(amount=0.4, split="score"))
    assert score.budget["allocation"] == "score" and score.meta["pipeline"] == "custom"
    module = AttributionModule(tiny_classifier(), task="sst2")
    cb = TaskPruning(budget=Budget(amount=0.4, split="loss"), output_dir=str(tmp_path / "none"))
    with pytest.raises(ValueError, match=r"split='loss' needs rows held out from calibration.*holdout_samples"):
        trainer([cb]).fit(module, datamodule(holdout_samples=0))  # refused before any calibration
    assert not (tmp_path / "none").exists()


def test_second_run_into_same_output_dir_refused(tmp_path):
    trainer([TaskPruning(output_dir=str(tmp_path), apply="none")]).fit(
        AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(method="magnitude")),
        datamodule())
    with pytest.raises(FileExistsError, match="already holds a spec from an earlier run; pass overwrite=True"):
        trainer([TaskPruning(output_dir=str(tmp_path))]).fit(
            AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(method="magnitude")),
            datamodule())


def test_spec_of_another_model_refused_at_test(tmp_path):
    trainer([TaskPruning(output_dir=str(tmp_path), apply="none")]).fit(
        AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(method="random")), datamodule())
    import transformers as tf

    other = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3,
                                                           num_attention_heads=4, intermediate_size=37)).eval()
    with pytest.raises(ValueError, match="spec"):
        trainer([TaskPruning(output_dir=str(tmp_path))]).test(AttributionModule(other, task="sst2"), datamodule(),
                                                              verbose=False)


def test_missing_spec_path_at_test(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `fit` first"):
        trainer([TaskPruning(spec_path=str(tmp_path / "nope.json"))]).test(
            AttributionModule(tiny_classifier(), task="sst2"), datamodule(), verbose=False)


def test_labels_required_for_gold_target(tmp_path):
    class NoLabels(TaskDataModule):
        def train_dataloader(self):
            loader = super().train_dataloader()
            batches = [{k: v for k, v in b.items() if k != "labels"} for b in loader]
            return torch.utils.data.DataLoader(batches, batch_size=None)

    dm = NoLabels("sst2", tokenizer=TOKENIZER, calib_samples=4, batch_size=4, ood=[])
    with pytest.raises(ValueError, match="target='label' needs labelled batches"):
        trainer([TaskPruning(output_dir=str(tmp_path))]).fit(AttributionModule(tiny_classifier(), task="sst2"), dm)


def test_fsdp_refused_with_a_clear_message():
    from lightning.pytorch.strategies import FSDPStrategy

    module = AttributionModule(tiny_classifier(), task="sst2")

    class FakeTrainer:
        strategy = FSDPStrategy.__new__(FSDPStrategy)
        datamodule = None

    module._trainer = FakeTrainer()
    with pytest.raises(ValueError, match="strategy='fsdp' is not supported for calibration.*Use strategy='ddp'"):
        module.setup("fit")


def test_preset_fills_scope_and_tuning_and_refuses_another_attribution(tmp_path):
    from taskprune.tuning import TuningConfig

    cb = TaskPruning(preset="kwon", output_dir=str(tmp_path / "kwon"))
    assert (cb.budget.scope, cb.budget.min_heads, cb.budget.seq_len) == ("search", 0, "mean")
    assert cb.tuning == TuningConfig(rearrange=True, tune="schedule", target="residual", solver="lsmr",
                                     skip_first_attention=True)
    assert TaskPruning(preset="kwon", budget=Budget(amount=0.6, min_heads=2)).budget.min_heads == 2  # given wins
    assert TaskPruning(preset="kwon", tuning=TuningConfig(tune="dense")).tuning.tune == "dense"  # given wins
    assert TaskPruning(preset="kwon", tuning=TuningConfig()).tuning == TuningConfig()  # a preset's tuning turned off
    assert TaskPruning(preset="kwon_notune").tuning == TuningConfig(rearrange=True)
    module = AttributionModule(tiny_classifier(), task="sst2")  # scores with squared IG, not Kwon's Fisher
    with pytest.raises(ValueError, match=r"preset 'kwon' scores with .*'method': 'fisher'.*--model.attribution"):
        trainer([cb]).fit(module, datamodule())
    kwon = AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(method="fisher", per="batch"),
                             compare_dense=False)
    trainer([cb]).fit(kwon, datamodule())
    spec = PruneSpec.load(tmp_path / "kwon" / "spec.json")
    assert spec.meta["pipeline"] == "kwon" and spec.scales and spec.budget["allocation"] == "score"
    with pytest.raises(ValueError, match=r"unknown preset 'kwan'; allowed: \['taskprune'"):
        TaskPruning(preset="kwan")


def test_the_default_tuning_is_the_column_refit_and_off_without_a_spec_to_apply():
    from taskprune.pipeline import DEFAULT_TUNING, Pipeline
    from taskprune.tuning import TuningConfig

    assert DEFAULT_TUNING.fit == "columns" and DEFAULT_TUNING.target == "residual"
    assert TaskPruning().tuning == Pipeline().tuning == Pipeline.preset("taskprune").tuning == DEFAULT_TUNING
    assert TaskPruning(apply="none").tuning == TuningConfig()  # scores only: nothing to tune
    assert TaskPruning(tuning=TuningConfig()).tuning == TuningConfig() == Pipeline.preset("taskprune_notune").tuning
    with pytest.raises(ValueError, match="tuning needs a spec to apply"):
        TaskPruning(apply="none", tuning=DEFAULT_TUNING)


def test_callback_exports_onnx_int8_after_fit_and_refuses_options_without_a_folder(tmp_path):
    pytest.importorskip("onnxruntime")
    from taskprune.deploy import OnnxOptions

    with pytest.raises(ValueError, match=r"configures the ONNX export, which is off; set onnx_dir"):
        TaskPruning(onnx=OnnxOptions(quantize="int8"))
    with pytest.raises(ValueError, match=r"onnx_dir='x' needs a folder name and apply='shrink'"):
        TaskPruning(onnx_dir="x", apply="mask")
    module = AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(steps=1),
                               compare_dense=False)
    cb = TaskPruning(budget=Budget(amount=0.4), output_dir=str(tmp_path / "run"), onnx_dir=str(tmp_path / "onnx"),
                     onnx=OnnxOptions(quantize="int8"))
    trainer([cb]).fit(module, datamodule())
    info = json.loads((tmp_path / "onnx" / "onnx.json").read_text())
    assert (tmp_path / "onnx" / "model.onnx").is_file() and info["quantize"] == "int8"


def test_test_loop_evaluates_the_onnx_export_it_ships(tmp_path):
    """runtime='onnx': the pruned column is the ONNX Runtime session of onnx_dir (fp32: the torch numbers), checked
    to hold the run's spec; a missing or foreign export, or no onnx_dir, is refused before any evaluation."""
    pytest.importorskip("onnxruntime")
    from taskprune.deploy import OnnxModel
    from taskprune.export import SPEC_FILE

    with pytest.raises(ValueError, match=r"runtime='onnx' evaluates the ONNX export in onnx_dir .* set onnx_dir"):
        TaskPruning(runtime="onnx")
    with pytest.raises(ValueError, match=r"unknown runtime 'ort'; allowed: \['torch', 'onnx'\]"):
        TaskPruning(runtime="ort")
    run, onnx = str(tmp_path / "run"), str(tmp_path / "onnx")
    model = tiny_classifier()

    def module():
        return AttributionModule(copy.deepcopy(model), task="sst2", attribution=AttributionConfig(steps=1))

    trainer([TaskPruning(budget=Budget(amount=0.4), output_dir=run, onnx_dir=onnx)]).fit(module(), datamodule())
    by_torch, by_onnx = module(), module()
    trainer([TaskPruning(output_dir=run)]).test(by_torch, datamodule())
    trainer([TaskPruning(output_dir=run, onnx_dir=onnx, runtime="onnx")]).test(by_onnx, datamodule())
    assert by_torch.runtime_model is None and isinstance(by_onnx.runtime_model, OnnxModel)
    assert [r["pruned"] for r in by_onnx.results] == pytest.approx([r["pruned"] for r in by_torch.results], abs=1e-6)
    assert [r["dense"] for r in by_onnx.results] == [r["dense"] for r in by_torch.results]
    assert by_onnx.throughput["pruned"] > 0
    # an export of another spec, then no export at all
    spec = PruneSpec.load(Path(onnx) / SPEC_FILE)
    other = PruneSpec({**spec.keep, "neurons": {k: v[1:] for k, v in spec.keep["neurons"].items()}},
                      spec.fingerprint)
    other.save(Path(onnx) / SPEC_FILE)
    with pytest.raises(ValueError, match=r"holds the export of another spec than .*spec\.json"):
        trainer([TaskPruning(output_dir=run, onnx_dir=onnx, runtime="onnx")]).test(module(), datamodule())
    (Path(onnx) / SPEC_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no finished ONNX export .* run fit with --pruning.onnx_dir"):
        trainer([TaskPruning(output_dir=run, onnx_dir=onnx, runtime="onnx")]).test(module(), datamodule())
