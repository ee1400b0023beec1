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


def main() -> None:
    out, devices, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ckpt_every = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "0" else None
    ckpt_path = sys.argv[5] if len(sys.argv) > 5 else None
    torch.set_num_threads(1)
    module = AttributionModule(tiny_classifier(), task="sst2", steps=3)
    dm = TaskDataModule("sst2", tokenizer=TOKENIZER, calib_samples=n, batch_size=4, ood=[])
    callbacks = [TaskPruning(budget=0.3, output_dir=out, apply="none", overwrite=True)]
    if ckpt_every:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=f"{out}/ckpt", every_n_train_steps=ckpt_every,
                                                             save_top_k=-1, save_on_train_epoch_end=False))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_epochs=1, logger=False, enable_checkpointing=bool(ckpt_every), callbacks=callbacks,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, dm, ckpt_path=ckpt_path)


if __name__ == "__main__":
    main()
