import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cli_refusal(tmp_path, capsys):
    """``refuse(yaml_text or None, path=None) -> stderr``: the CLI must exit 2 on that config before doing any work."""
    from taskprune.lightning.cli import main

    def refuse(text: str | None = None, path=None) -> str:
        if text is not None:
            path = tmp_path / "bad.yaml"
            path.write_text(text)
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", str(path), "--print_config"])
        assert exit_.value.code == 2
        return capsys.readouterr().err

    return refuse


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny SST-2 classifier saved as a local HF folder with the MiniLM tokenizer (what the CLI's model: takes)."""
    import transformers as tf
    from lightning_tiny import TOKENIZER, tiny_classifier

    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_classifier().save_pretrained(folder)
    tf.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    return folder
