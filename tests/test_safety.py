"""Safety: the package never unpickles, never loads torch files without ``weights_only=True``, never turns on remote
code by itself, and never prints outside the CLI / report layer; ``trust_remote_code`` reaches transformers only
when the user sets it.

The scan reads the syntax tree of every ``taskprune/**/*.py`` (so docstrings that *mention* pickle do not count),
plus a plain-text grep for the same patterns as a second net.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "taskprune"
FILES = sorted(PACKAGE.rglob("*.py"))
PRINT_ALLOWED = {"cli.py", "report.py"}
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _name(node: ast.AST) -> str:
    """Dotted name of a call target (``torch.load``, ``print``), '' when it is not a plain name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _name(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def findings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    where = lambda node: f"{path.parent.name}/{path.name}:{node.lineno}"  # noqa: E731
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [f"{where(node)}: imports {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            out.append(f"{where(node)}: imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = _name(node.func)
            kwargs = {k.arg: k.value for k in node.keywords if k.arg}
            if name == "torch.load" or name.endswith(".torch.load"):
                wo = kwargs.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    out.append(f"{where(node)}: torch.load without weights_only=True")
            trc = kwargs.get("trust_remote_code")
            if isinstance(trc, ast.Constant) and trc.value is True:
                out.append(f"{where(node)}: trust_remote_code=True")
            if name == "print" and path.name not in PRINT_ALLOWED:
                out.append(f"{where(node)}: print() outside cli.py/report.py (use logging / rank_zero_info)")
    return out


def test_package_files_are_found():
    assert len(FILES) > 10 and PACKAGE / "lightning" / "module.py" in FILES


def test_no_pickle_unsafe_torch_load_remote_code_or_print_in_the_package():
    problems = [f for path in FILES for f in findings(path)]
    assert not problems, "\n".join(problems)


def test_plain_text_grep_agrees():
    code_line = re.compile(r"^\s*(import|from)\s+(pickle|dill|cloudpickle)\b|torch\.load\((?![^)]*weights_only=True)"
                           r"|trust_remote_code\s*=\s*True|(?<![\w.])print\(")
    hits = []
    for path in FILES:
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            if code_line.search(code) and not (path.name in PRINT_ALLOWED and "print(" in code):
                hits.append(f"{path.name}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("source", [
    "import pickle\n", "from pickle import loads\n", "import torch\ntorch.load('x')\n",
    "import torch\ntorch.load('x', weights_only=False)\n", "f(trust_remote_code=True)\n", "print('hi')\n",
])
def test_the_scan_catches_each_pattern(tmp_path, source):
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    assert findings(bad)


# ---------------------------------------------------------------------------------------------- trust_remote_code
@pytest.fixture
def recorded(monkeypatch):
    """Replace AutoModelForSequenceClassification.from_pretrained with a recorder that returns a tiny model."""
    import transformers

    from lightning_tiny import tiny_classifier

    calls = []

    def from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        return tiny_classifier()

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", from_pretrained)
    return calls


def test_trust_remote_code_is_off_by_default(recorded):
    from taskprune.models import load_task_model
    from taskprune.lightning.module import AttributionModule

    load_task_model("some/model", "sst2")
    AttributionModule("some/model", task="sst2")
    assert [kw.get("trust_remote_code") for _, kw in recorded] == [False, False]


def test_trust_remote_code_is_passed_only_when_the_user_sets_it(recorded):
    from taskprune.models import load_task_model
    from taskprune.lightning.module import AttributionModule

    load_task_model("some/model", "sst2", trust_remote_code=True)
    AttributionModule("some/model", task="sst2", trust_remote_code=True)
    assert [kw.get("trust_remote_code") for _, kw in recorded] == [True, True]


def test_trust_remote_code_defaults_to_false_in_every_signature():
    import inspect

    from taskprune.models import load_task_model
    from taskprune.lightning.module import AttributionModule

    for fn in (load_task_model, AttributionModule.__init__):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
