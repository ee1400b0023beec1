"""Determinism on CPU: the same seed and configuration give bit-identical scores and byte-identical spec files in two
separate runs (separate processes forked by :mod:`fork_worker`). GPU runs are not bitwise reproducible by default;
see tests/README.md ("Determinism")."""

from __future__ import annotations

import pytest
import torch

from fork_worker import Worker
from taskprune.unitscores import UnitScores


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    with Worker() as worker:
        for run in ("a", "b"):
            code, _ = worker.run(job="calibrate", out=str(root / run), n=12, batch_size=4)
            assert code == 0, f"see {root / run}/child-*.log"
    return root / "a", root / "b"


def test_same_seed_gives_bitwise_identical_scores(two_runs):
    a, b = (UnitScores.load(d / "scores.safetensors") for d in two_runs)
    assert a.count == b.count == 12 and a.options == b.options
    for kind, blocks in a.sums.items():
        for name, v in blocks.items():
            assert torch.equal(v, b.sums[kind][name]), f"{kind} of {name} differ"


def test_same_seed_gives_a_byte_identical_spec_file(two_runs):
    a, b = two_runs
    assert (a / "spec.json").read_bytes() == (b / "spec.json").read_bytes()
    # scores.safetensors are equal tensor for tensor (above) but not byte for byte: safetensors writes its metadata
    # header from a Rust HashMap, whose key order changes from one call to the next
