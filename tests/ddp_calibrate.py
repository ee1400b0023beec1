"""Calibrate a tiny model with N CPU processes (gloo) and write the scores; run by tests/test_distributed.py,
tests/test_lightning.py and (through tests/fork_worker.py) tests/test_interrupt.py / tests/test_determinism.py.

Usage: python tests/ddp_calibrate.py OUT_DIR DEVICES CALIB_SAMPLES [CKPT_EVERY] [CKPT_PATH]

CALIB_SAMPLES may be a comma-separated list (``12,13,1``): one ``fit`` per count, in one process group, into
``OUT_DIR/n<count>``. Every rank writes ``<out>/rank<r>.txt`` (a hash of the spec it ended with) and logs each
spec / scores file it writes to ``<out>/writes-rank<r>.log``, so a test can check that all ranks agree and only rank
zero writes.
"""

import hashlib
import json
import os
import sys

import lightning as L
import torch

from lightning_tiny import TOKENIZER, tiny_classifier
from taskprune.attribution import AttributionConfig
from taskprune.lightning.callback import TaskPruning
from taskprune.lightning.data import TaskDataModule
from taskprune.lightning.module import AttributionModule
from taskprune.selection import Budget
from taskprune.spec import PruneSpec
from taskprune.unitscores import UnitScores


class KeepCheckpoints(L.Callback):
    """Copies output_dir/calibration.ckpt to calibration-<batch>.ckpt after each write (runs after TaskPruning)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import shutil

        if trainer.is_global_zero:
            shutil.copy(f"{self.out}/calibration.ckpt", f"{self.out}/calibration-{batch_idx + 1}.ckpt")


class RankReport(L.Callback):
    """After TaskPruning (it comes later in the callback list): each rank writes the hash of its spec."""

    def __init__(self, out: str, pruning: TaskPruning) -> None:
        self.out, self.pruning = out, pruning

    def on_train_end(self, trainer, pl_module) -> None:
        spec = json.dumps(self.pruning.spec.to_dict(), sort_keys=True).encode()
        with open(f"{self.out}/rank{trainer.global_rank}.txt", "w") as f:
            f.write(f"{hashlib.sha256(spec).hexdigest()} world={trainer.world_size}\n")


def _log_writes(cls, name: str) -> None:
    """Wrap ``cls.save`` so that every call appends ``name path`` to ``<folder>/writes-rank<r>.log``."""
    save = cls.save

    def logged(self, path):
        rank = os.environ.get("LOCAL_RANK", "0")
        with open(os.path.join(os.path.dirname(path), f"writes-rank{rank}.log"), "a") as f:
            f.write(f"{name} {path}\n")
        return save(self, path)

    cls.save = logged


def calibrate(out: str, devices: int = 1, n: int = 16, ckpt_every: int | None = None, ckpt_path: str | None = None,
              batch_size: int = 4, keep_checkpoints: bool | None = None) -> None:
    """One calibration ``fit`` of the tiny classifier on ``n`` SST-2 samples into ``out`` (overwrite on)."""
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(steps=3))
    dm = TaskDataModule("sst2", tokenizer=TOKENIZER, calib_samples=n, batch_size=batch_size, ood=[])
    pruning = TaskPruning(budget=Budget(amount=0.3), output_dir=out, apply="none", overwrite=True,
                          checkpoint_every=ckpt_every)
    callbacks = [pruning, RankReport(out, pruning)]
    if keep_checkpoints if keep_checkpoints is not None else bool(ckpt_every):
        callbacks.append(KeepCheckpoints(out))  # keep every calibration checkpoint, to resume from any of them
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_epochs=1, logger=False, enable_checkpointing=False, callbacks=callbacks,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, dm, ckpt_path=ckpt_path)


def main() -> None:
    out, devices, counts = sys.argv[1], int(sys.argv[2]), [int(c) for c in sys.argv[3].split(",")]
    ckpt_every = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "0" else None
    ckpt_path = sys.argv[5] if len(sys.argv) > 5 else None
    _log_writes(PruneSpec, "spec")
    _log_writes(UnitScores, "scores")
    for n in counts:
        folder = out if len(counts) == 1 else os.path.join(out, f"n{n}")
        calibrate(folder, devices, n, ckpt_every, ckpt_path)


if __name__ == "__main__":
    main()
