"""A fork server for the kill tests: imports torch, Lightning and taskprune once, then forks a child per job.

Starting Python with Lightning and transformers takes seconds to tens of seconds on a loaded machine; a forked child
starts in milliseconds, so a test can kill and restart calibrations many times. Each child is a separate process
that a test can ``SIGKILL`` (by the pid the worker reports) at any point, like a crash or an out-of-memory kill.

Protocol (one JSON object per line on stdin; one reply line on stdout):
    {"job": "calibrate", "out": ..., "n": 16, "batch_size": 2, "ckpt_every": 1, "ckpt_path": null, "kill_after": 1.5}
    {"job": "write_loop", "kind": "bytes" | "spec" | "scores" | "export", "target": ..., "kill_after": 0.7}
replies ``exit <code> <seconds>`` when the child ends (``-9`` when killed). The worker itself sends ``SIGKILL`` after
``kill_after`` seconds (if given; counted from the moment the file ``arm_on`` is
(re)written, if given), before it reaps the
child, so the pid it kills is always its own child's.
A child's stdout and stderr go to ``<out or target's folder>/child-<pid>.log``.

Test side: :class:`Worker`.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

import ddp_calibrate
import tiny
from taskprune.export import save_pruned
from taskprune.io import atomic_write_bytes
from taskprune.spec import PruneSpec
from taskprune.unitscores import UnitScores


def versions(kind: str) -> list:
    """Two different complete versions of a file of ``kind``; the write loop alternates them."""
    from taskprune.arch import get_architecture

    if kind == "bytes":
        return [b"a" * 3_000_000, b"b" * 1_000_000]
    fp = get_architecture(tiny.tiny_model("bert")).fingerprint()
    blocks = list(fp["heads"])
    specs = [PruneSpec({"heads": {blocks[0]: [0, 1]}}, fp, "test"), PruneSpec({"heads": {blocks[1]: [2]}}, fp, "t")]
    if kind in ("spec", "export"):
        return specs
    if kind == "scores":
        g = torch.Generator().manual_seed(0)
        return [UnitScores({"heads": {b: torch.rand(n, generator=g, dtype=torch.float64) for b, n in
                                      fp["heads"].items()}}, i + 1, "ig", fp) for i in range(2)]
    raise ValueError(f"unknown kind {kind!r}")


def write_loop(kind: str, target: str) -> None:
    """Write the two versions of ``kind`` to ``target`` alternately, forever (until killed)."""
    items = versions(kind)
    model = tiny.tiny_model("bert") if kind == "export" else None
    i = 0
    while True:
        item = items[i % 2]
        if kind == "bytes":
            atomic_write_bytes(target, item)
        elif kind == "export":
            save_pruned(model, item, target, overwrite=True)
        else:
            item.save(target)
        i += 1


def run_child(job: dict) -> None:
    if job["job"] == "calibrate":
        ddp_calibrate.calibrate(job["out"], 1, job.get("n", 16), job.get("ckpt_every"), job.get("ckpt_path"),
                                batch_size=job.get("batch_size", 4), keep_checkpoints=False)
    elif job["job"] == "write_loop":
        write_loop(job["kind"], job["target"])
    else:
        raise ValueError(f"unknown job {job!r}")


def _identity(path: str) -> tuple[int, int] | None:
    """``(inode, mtime)`` of a file, ``None`` when absent: an atomic replace changes the inode."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def main() -> None:
    import signal
    import time

    torch.set_num_threads(1)
    out = sys.stdout
    for line in sys.stdin:
        job = json.loads(line)
        folder = job.get("out") or os.path.dirname(job["target"])
        os.makedirs(folder, exist_ok=True)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                log = os.open(os.path.join(folder, f"child-{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                run_child(job)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = None if job.get("kill_after") is None else start + float(job["kill_after"])
        arm_on = job.get("arm_on")  # the kill clock starts when this file is (re)written, e.g. a new checkpoint
        before = _identity(arm_on) if arm_on is not None else None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG if deadline is not None else 0)
            if done:
                break
            if arm_on is not None:
                if _identity(arm_on) not in (None, before):
                    deadline, arm_on = time.monotonic() + float(job["kill_after"]), None
                else:
                    time.sleep(0.005)
                    continue
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)  # not reaped yet: the pid is still our child's
                deadline = None
            else:
                time.sleep(min(0.005, max(deadline - time.monotonic(), 0)))
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out.write(f"exit {code} {time.monotonic() - start:.3f}\n")
        out.flush()


class Worker:
    """Test-side handle: ``with Worker() as w: code, seconds = w.run(job="calibrate", out=..., kill_after=2.0)``."""

    def __init__(self) -> None:
        import subprocess
        from pathlib import Path

        here = Path(__file__).parent
        self.proc = subprocess.Popen([sys.executable, str(here / "fork_worker.py")], cwd=here, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, **job) -> tuple[int, float]:
        """Run one job in a fresh child; ``(exit code, seconds)``, code ``-9`` when killed."""
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().split()
        if not reply or reply[0] != "exit":
            raise RuntimeError(f"fork worker died (reply {reply!r}, return code {self.proc.poll()})")
        return int(reply[1]), float(reply[2])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    main()
