"""Calibrate a tiny model with N CPU processes (gloo) and write the scores; run by tests/test_distributed.py.

Usage: python tests/ddp_calibrate.py OUT_DIR DEVICES CALIB_SAMPLES [CKPT_EVERY] [CKPT_PATH]
"""

import sys

import lightning as L
import torch

from lightning_tiny import TOKENIZER, tiny_classifier
from taskprune.callback import TaskPruning
from taskprune.data import TaskDataModule
from taskprune.module import AttributionModule


class KeepCheckpoints(L.Callback):
    """Copies output_dir/calibration.ckpt to calibration-<batch>.ckpt after each write (runs after TaskPruning)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import shutil

        if trainer.is_global_zero:
            shutil.copy(f"{self.out}/calibration.ckpt", f"{self.out}/calibration-{batch_idx + 1}.ckpt")


def main() -> None:
    out, devices, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ckpt_every = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "0" else None
    ckpt_path = sys.argv[5] if len(sys.argv) > 5 else None
    torch.set_num_threads(1)
    module = AttributionModule(tiny_classifier(), task="sst2", steps=3)
    dm = TaskDataModule("sst2", tokenizer=TOKENIZER, calib_samples=n, batch_size=4, ood=[])
    callbacks = [TaskPruning(budget=0.3, output_dir=out, apply="none", overwrite=True, checkpoint_every=ckpt_every)]
    if ckpt_every:  # also keep every calibration checkpoint, to resume from any of them
        callbacks.append(KeepCheckpoints(out))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_epochs=1, logger=False, enable_checkpointing=False, callbacks=callbacks,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, dm, ckpt_path=ckpt_path)


if __name__ == "__main__":
    main()
