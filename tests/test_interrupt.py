"""Interruption: calibrations killed with SIGKILL at random points resume to the uninterrupted scores, and no output
file is ever half-written (it loads completely, or does not exist).

The kills run in children of :mod:`fork_worker` (forked after the imports, so a trial costs seconds). The default
suite runs ``TASKPRUNE_KILL_TRIALS`` (3) kill/resume trials and ``TASKPRUNE_WRITE_KILLS`` (4) kills per file kind;
``pytest -m slow tests/test_interrupt.py`` runs 25 and 30. ``TASKPRUNE_KILL_SEED`` changes the random kill times.
"""

from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path

import pytest
import torch

from fork_worker import Worker, versions
from taskprune.export import SPEC_FILE, load_pruned
from taskprune.spec import PruneSpec
from taskprune.unitscores import UnitScores, is_close

N, BATCH = 16, 2  # 8 calibration batches, a checkpoint after each
SEED = int(os.environ.get("TASKPRUNE_KILL_SEED", "0"))
OUTPUTS = {"spec.json", "scores.safetensors", "calibration.ckpt", "rank0.txt"}


@pytest.fixture(scope="module")
def worker():
    with Worker() as w:
        yield w


@pytest.fixture(scope="module")
def reference(worker, tmp_path_factory):
    """An uninterrupted run and how long it took."""
    out = tmp_path_factory.mktemp("reference")
    code, seconds = worker.run(job="calibrate", out=str(out), n=N, batch_size=BATCH, ckpt_every=1)
    assert code == 0, (out / "..").resolve()
    return out, seconds


def assert_complete_or_absent(out: Path) -> set[str]:
    """Every output file in ``out`` loads completely; returns the names that exist."""
    present = {p.name for p in out.iterdir()}
    stray = {n for n in present if not n.startswith(".") and n not in OUTPUTS and not n.startswith("child-")
             and not n.startswith("writes-")}
    assert not stray, f"unexpected files {stray} in {out}"
    if "spec.json" in present:
        PruneSpec.load(out / "spec.json")
    if "scores.safetensors" in present:
        UnitScores.load(out / "scores.safetensors")
    if "calibration.ckpt" in present:
        assert zipfile.is_zipfile(out / "calibration.ckpt")
        ckpt = torch.load(out / "calibration.ckpt", map_location="cpu", weights_only=True)
        assert "state_dict" in ckpt and "loops" in ckpt
    return present & OUTPUTS


def kill_and_resume(worker, out: Path, kills: list[tuple[float, bool]]) -> list[set[str]]:
    """Run, killing at each of ``kills`` in turn (``(seconds, counted from the first new checkpoint?)``), resuming
    from calibration.ckpt when there is one, then run to the end; returns the outputs present after each kill."""
    seen = []
    for kill in [*kills, None]:
        ckpt = out / "calibration.ckpt"
        kill_after, armed = kill if kill is not None else (None, False)
        code, _ = worker.run(job="calibrate", out=str(out), n=N, batch_size=BATCH, ckpt_every=1,
                             ckpt_path=str(ckpt) if ckpt.exists() else None, kill_after=kill_after,
                             arm_on=str(ckpt) if armed else None)
        assert code in (0, -9), f"run failed with {code}; see {out}/child-*.log"
        seen.append(assert_complete_or_absent(out))
        if code == 0:
            break
    assert code == 0
    return seen


def check_trials(worker, reference, tmp_path, trials: int) -> None:
    ref_dir, seconds = reference
    ref_scores, ref_spec = UnitScores.load(ref_dir / "scores.safetensors"), PruneSpec.load(ref_dir / "spec.json")
    rng = random.Random(SEED)
    resumed = 0
    for trial in range(trials):
        out = tmp_path / f"trial{trial}"
        # kills alternate: at a random time from the start (often before any checkpoint: a restart), and at a random
        # time after the run writes a new checkpoint (mid-calibration or mid-write: a resume)
        kills = [(rng.uniform(0.0, 0.25 * seconds), True) if (trial + k) % 2 == 0 else
                 (rng.uniform(0.0, 1.05 * seconds), False) for k in range(rng.choice((1, 1, 2)))]
        seen = kill_and_resume(worker, out, kills)
        resumed += any("calibration.ckpt" in s for s in seen[:-1])
        scores = UnitScores.load(out / "scores.safetensors")
        assert scores.count == N
        assert is_close(scores, ref_scores, rtol=1e-9), f"trial {trial} (kills at {kills}) differs"
        assert PruneSpec.load(out / "spec.json") == ref_spec
    assert trials < 3 or resumed, "no trial was killed after a checkpoint: the kill times are too early"


def test_killed_calibrations_resume_to_uninterrupted_scores(worker, reference, tmp_path):
    check_trials(worker, reference, tmp_path, int(os.environ.get("TASKPRUNE_KILL_TRIALS", "3")))


@pytest.mark.slow
def test_many_killed_calibrations(worker, reference, tmp_path):
    check_trials(worker, reference, tmp_path, 25)


# ---------------------------------------------------------------------------------------------- kills during writes
def matches(kind: str, target: Path, item) -> bool:
    if kind == "bytes":
        return target.read_bytes() == item
    if kind == "spec":
        return PruneSpec.load(target) == item
    if kind == "scores":
        got = UnitScores.load(target)
        return got.count == item.count and all(torch.equal(got.sums["heads"][b], v)
                                               for b, v in item.sums["heads"].items())
    model = load_pruned(target)  # a complete folder: config, weights and spec agree
    return PruneSpec.load(target / SPEC_FILE) == item and model is not None


def check_write_kills(worker, tmp_path, kind: str, kills: int) -> None:
    items = versions(kind)
    target = tmp_path / {"bytes": "blob.bin", "spec": "spec.json", "scores": "scores.safetensors",
                         "export": "pruned"}[kind]
    rng = random.Random(SEED)
    window = (0.5, 5.0) if kind == "export" else (0.3, 1.5)  # seconds; an export takes ~1 s on a loaded machine
    found = 0
    for _ in range(kills):
        code, _ = worker.run(job="write_loop", kind=kind, target=str(target), kill_after=rng.uniform(*window))
        assert code == -9, f"the write loop ended with {code}; see {tmp_path}/child-*.log"
        assert target.exists() or not found, f"{target} disappeared: a kill left neither version"
        if target.exists():
            found += 1
            assert any(matches(kind, target, item) for item in items), f"{target} is neither version"
        leftovers = [p.name for p in tmp_path.iterdir() if p != target and not p.name.startswith("child-")]
        assert all(n.startswith(f".{target.name}.") for n in leftovers), leftovers  # temporaries only, hidden
    assert found, "the target was never written before a kill"


@pytest.mark.parametrize("kind", ["bytes", "spec", "scores", "export"])
def test_kill_during_writes_leaves_the_old_or_the_new_file(worker, tmp_path, kind):
    check_write_kills(worker, tmp_path, kind, int(os.environ.get("TASKPRUNE_WRITE_KILLS", "4")))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bytes", "spec", "scores", "export"])
def test_many_kills_during_writes(worker, tmp_path, kind):
    check_write_kills(worker, tmp_path, kind, 30)
