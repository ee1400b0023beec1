"""Distributed calibration: 1 and 2 CPU processes (gloo, ``strategy="ddp"``; 3 with ``-m slow``) give the same
scores and spec, for sample counts that divide evenly by the world size, that do not, and that are smaller than it
(1 sample); every rank ends with the same spec (broadcast from rank zero); only rank zero writes.

Each world size is one run of ``tests/ddp_calibrate.py`` (``fit`` once per sample count, in one process group);
the runs start together so their imports overlap (1 + 2 processes on CI's 2 cores; the 3-process world is slow there).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from taskprune.spec import PruneSpec
from taskprune.unitscores import UnitScores, is_close

HERE = Path(__file__).parent
WORLDS = (1, 2)
COUNTS = (12, 13, 1)  # divides 1, 2, 3; divides none but 1; fewer samples than processes


def calibrate(root: Path, worlds) -> dict[int, Path]:
    """Run ``ddp_calibrate.py`` once per world size (together), each ``fit`` once per sample count."""
    procs = {}
    for world in worlds:
        log = open(root / f"world{world}.log", "w")
        procs[world] = (subprocess.Popen([sys.executable, str(HERE / "ddp_calibrate.py"), str(root / f"w{world}"),
                                          str(world), ",".join(map(str, COUNTS))], cwd=HERE, stdout=log,
                                         stderr=subprocess.STDOUT), log)
    for world, (proc, log) in procs.items():
        try:
            code = proc.wait(timeout=540)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            log.close()
        assert code == 0, (root / f"world{world}.log").read_text()[-3000:]
    return {world: root / f"w{world}" for world in worlds}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    return calibrate(tmp_path_factory.mktemp("ddp"), WORLDS)


@pytest.mark.parametrize("n", COUNTS)
def test_one_and_two_processes_give_the_same_scores_and_spec(runs, n):
    one = UnitScores.load(runs[1] / f"n{n}" / "scores.safetensors")
    spec = PruneSpec.load(runs[1] / f"n{n}" / "spec.json")
    for world in WORLDS[1:]:
        other = UnitScores.load(runs[world] / f"n{n}" / "scores.safetensors")
        assert other.count == one.count == n  # the sampler's padding duplicates are not counted
        assert is_close(one, other, rtol=1e-6), f"{world} processes, {n} samples"
        assert PruneSpec.load(runs[world] / f"n{n}" / "spec.json") == spec


@pytest.mark.parametrize("world", WORLDS)
def test_every_rank_ends_with_the_spec_rank_zero_wrote(runs, world):
    for n in COUNTS:
        out = runs[world] / f"n{n}"
        written = PruneSpec.load(out / "spec.json").to_dict()
        expected = hashlib.sha256(json.dumps(written, sort_keys=True).encode()).hexdigest()
        lines = [(out / f"rank{r}.txt").read_text().split() for r in range(world)]
        assert all(line == [expected, f"world={world}"] for line in lines), lines


@pytest.mark.parametrize("world", WORLDS)
def test_only_rank_zero_writes_each_file_once(runs, world):
    for n in COUNTS:
        out = runs[world] / f"n{n}"
        assert sorted(p.name for p in out.glob("writes-rank*.log")) == ["writes-rank0.log"]
        writes = (out / "writes-rank0.log").read_text().split()
        assert writes == ["scores", str(out / "scores.safetensors"), "spec", str(out / "spec.json")]
        # no temporary file and no lock left behind; only taskprune's marker of a run (rank zero's)
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".taskprune"]


@pytest.mark.slow
def test_three_processes_give_the_scores_spec_and_writes_of_one(runs, tmp_path):
    three = calibrate(tmp_path, (3,))[3]
    for n in COUNTS:
        assert UnitScores.load(three / f"n{n}" / "scores.safetensors").count == n
        assert is_close(UnitScores.load(runs[1] / f"n{n}" / "scores.safetensors"),
                        UnitScores.load(three / f"n{n}" / "scores.safetensors"), rtol=1e-6), f"{n} samples"
        assert PruneSpec.load(three / f"n{n}" / "spec.json") == PruneSpec.load(runs[1] / f"n{n}" / "spec.json")
        assert sorted(p.name for p in (three / f"n{n}").glob("writes-rank*.log")) == ["writes-rank0.log"]
