"""Every shipped YAML parses against the CLI (types and keys checked; nothing is instantiated)."""

from pathlib import Path

import pytest
import yaml

from taskprune.lightning.cli import main

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_is_a_config_per_task_and_a_demo():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "sst2", "mrpc", "qnli", "mnli", "qqp", "rte", "cola", "stsb"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["task"] in {path.stem, "sst2"} and "task" not in printed["model"]  # linked from data
    assert 0 <= printed["pruning"]["budget"]["amount"] < 1


def test_help_shows_the_field_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--model.attribution.steps STEPS IG quadrature nodes" in out
    assert "--pruning.budget.amount AMOUNT Fraction to remove, in [0, 1)" in out


def test_unknown_key_is_refused(cli_refusal):
    assert "stepz" in cli_refusal("data:\n  task: sst2\nmodel:\n  stepz: 8\n")


def test_wrong_type_is_refused(cli_refusal):
    assert "budget" in cli_refusal("pruning:\n  budget:\n    amount: lots\n")


def test_unknown_method_is_refused(cli_refusal):
    assert "taylor" in cli_refusal("model:\n  attribution:\n    method: taylor\n")
