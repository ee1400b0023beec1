import importlib.util
from pathlib import Path

import pytest

from taskprune.lightning.callback import TaskPruning
from taskprune.export import load_pruned

EXAMPLE = Path(__file__).parent.parent / "examples" / "own_project" / "train.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("own_project_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_project_exports_a_smaller_model_that_reloads(example, tmp_path):
    result = example.main(["--tiny", "--out", str(tmp_path), "--epochs", "1", "--calib-batches", "1"])
    assert result["max_abs_diff"] <= 1e-6
    reloaded = load_pruned(tmp_path / "pruned")
    assert sum(p.numel() for p in reloaded.parameters()) == result["pruned_params"] < result["dense_params"]
    assert (tmp_path / "taskprune" / "spec.json").is_file()
    assert (tmp_path / "pruned" / "tokenizer_config.json").is_file()  # the module's tokenizer went along


def test_export_dir_needs_shrink():
    with pytest.raises(ValueError, match="export_dir needs apply='shrink' \\(got apply='mask'\\)"):
        TaskPruning(apply="mask", export_dir="somewhere")


def test_existing_export_dir_refused_before_work(example, tmp_path):
    import lightning as L

    (tmp_path / "pruned").mkdir()
    cb = TaskPruning(output_dir=str(tmp_path / "tp"), export_dir=str(tmp_path / "pruned"))
    module = example.SentimentClassifier(tiny=True)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[cb],
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(FileExistsError, match="export_dir .* already exists; pass overwrite=True"):
        trainer.fit(module, example.ToyData(module.tokenizer))
    assert not (tmp_path / "tp" / "spec.json").exists()
