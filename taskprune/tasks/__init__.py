"""Task registry: where each task's data lives, its text fields, label names and metrics.

A :class:`Task` names files relative to a data folder laid out like ``/work/shared/data`` (and like the embedded
``taskprune/embedded``): ``<dataset>/<file>``. GLUE TSVs keep their original columns; everything else is JSONL with
``sentence`` or ``sentence1``/``sentence2`` and ``label``. Every file declares how its raw labels map onto the
task's label indices, so an out-of-domain set (Yelp 5-star reviews for SST-2, SNLI for MNLI...) is evaluated in the
task's own label space; raw labels mapped to ``None`` are dropped (the neutral 3-star reviews when binarised).

Label order is the order of the model head's outputs. Metrics follow GLUE: accuracy; + F1 of the positive class
for MRPC and QQP; Matthews correlation for CoLA; Pearson and Spearman for STS-B.

    task = get_task("sst2")
    metrics = task.make_metrics()
    metrics.update(task.predictions(logits), labels)   # logits [batch, n_labels] -> preds [batch]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torchmetrics
from torchmetrics.classification import BinaryF1Score, MulticlassAccuracy, MulticlassMatthewsCorrCoef
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

FileFormat = Literal["tsv", "jsonl"]
MetricName = Literal["accuracy", "f1", "matthews", "pearson", "spearman"]
METRIC_NAMES = ("accuracy", "f1", "matthews", "pearson", "spearman")


@dataclass(frozen=True)
class DataFile:
    """One data file and how to read it.

    ``text_columns`` / ``label_column``: column names (TSV with a header, JSONL keys) or 0-based column indices
    (TSV without a header, e.g. CoLA). ``label_map``: raw label (as a string) -> task label index, or ``None`` to drop
    the row; empty for regression (the label is parsed as a float). ``split``: how reports should call this file
    ("dev", "train sample", "held-out sample", "test sample").
    """

    path: str  # relative to the data folder: "<dataset>/<file>"
    format: FileFormat
    text_columns: tuple[str | int, ...]
    label_column: str | int
    split: str
    header: bool = True
    label_map: tuple[tuple[str, int | None], ...] = ()
    note: str = ""

    @property
    def label_dict(self) -> dict[str, int | None]:
        return dict(self.label_map)


@dataclass(frozen=True)
class EvalSet:
    """A named evaluation set for a task: ``name`` is the key in metric names (``ood/<name>/accuracy``)."""

    name: str
    file: DataFile


@dataclass(frozen=True)
class Task:
    """One task: text fields, label names (head output order), metrics, train/dev files and out-of-domain sets."""

    name: str
    text_fields: tuple[str, ...]  # ("sentence",) or ("sentence1", "sentence2"): the columns of the loaded dataset
    label_names: tuple[str, ...]  # index order = head output order; ("score",) for regression
    metrics: tuple[MetricName, ...]
    train: DataFile
    dev: DataFile
    ood: tuple[EvalSet, ...] = field(default=())
    regression: bool = False

    @property
    def n_labels(self) -> int:
        """Outputs of the task head: number of classes, 1 for regression."""
        return 1 if self.regression else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2

    @property
    def ood_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.ood)

    def ood_set(self, name: str) -> EvalSet:
        for s in self.ood:
            if s.name == name:
                return s
        raise ValueError(
            f"task {self.name!r} has no out-of-domain set {name!r}; known: {list(self.ood_names)}. "
            "Pass ood=[] for none or a subset of the known names."
        )

    def make_metrics(self) -> torchmetrics.MetricCollection:
        """Fresh metrics, keyed by ``accuracy`` / ``f1`` / ``matthews`` / ``pearson`` / ``spearman``.

        ``update(preds, target)`` takes ``preds`` from :meth:`predictions` (class indices, or float scores for
        regression) and integer (float for regression) targets.
        """
        n = self.n_labels
        make = {
            "accuracy": lambda: MulticlassAccuracy(num_classes=n, average="micro"),
            "f1": lambda: BinaryF1Score(),
            "matthews": lambda: MulticlassMatthewsCorrCoef(num_classes=n),
            "pearson": lambda: PearsonCorrCoef(),
            "spearman": lambda: SpearmanCorrCoef(),
        }
        return torchmetrics.MetricCollection({m: make[m]() for m in self.metrics})

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [batch, n_labels]`` -> ``preds [batch]``: argmax (long) or the regression score (float)."""
        if self.regression:
            return logits.reshape(-1).float()
        return logits.argmax(dim=-1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy for classification, MSE for regression (``logits [batch, n_labels]``, ``labels [batch]``)."""
        if self.regression:
            return torch.nn.functional.mse_loss(logits.reshape(-1).float(), labels.float())
        return torch.nn.functional.cross_entropy(logits.float(), labels.long())


def _identity(*names: str) -> tuple[tuple[str, int], ...]:
    return tuple((n, i) for i, n in enumerate(names))


_BIN01 = _identity("0", "1")
# 5-star ratings 0..4 -> binary sentiment: 1-2 stars negative, 4-5 stars positive, 3 stars dropped.
STARS_TO_BINARY: tuple[tuple[str, int | None], ...] = (("0", 0), ("1", 0), ("2", None), ("3", 1), ("4", 1))
_NLI3 = _identity("entailment", "neutral", "contradiction")
_NLI2 = _identity("entailment", "not_entailment")
_S = ("sentence",)
_S12 = ("sentence1", "sentence2")


def _jsonl(path: str, split: str, label_map=(), text=_S12, note: str = "") -> DataFile:
    return DataFile(path, "jsonl", text, "label", split, label_map=label_map, note=note)


_MRPC_TEXT = ("#1 String", "#2 String")

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "sst2", _S, ("negative", "positive"), ("accuracy",),
            train=DataFile("sst2/train.tsv", "tsv", ("sentence",), "label", "train", label_map=_BIN01),
            dev=DataFile("sst2/dev.tsv", "tsv", ("sentence",), "label", "dev", label_map=_BIN01),
            ood=(
                EvalSet("imdb", _jsonl("imdb/test_sample.jsonl", "test sample", _BIN01, _S)),
                EvalSet("yelp", _jsonl("yelp_full/test_sample.jsonl", "test sample", STARS_TO_BINARY, _S,
                                       "5-star ratings binarised: 1-2 stars negative, 4-5 positive, 3 dropped")),
                EvalSet("amazon", _jsonl("amazon_full/test_sample.jsonl", "test sample", STARS_TO_BINARY, _S,
                                         "5-star ratings binarised: 1-2 stars negative, 4-5 positive, 3 dropped")),
            ),
        ),
        Task(
            "mrpc", _S12, ("not_equivalent", "equivalent"), ("accuracy", "f1"),
            train=DataFile("mrpc/train.tsv", "tsv", _MRPC_TEXT, "Quality", "train", label_map=_BIN01),
            dev=DataFile("mrpc/dev.tsv", "tsv", _MRPC_TEXT, "Quality", "dev", label_map=_BIN01),
            ood=(EvalSet("qqp", _jsonl("qqp/heldout_sample.jsonl", "held-out sample", _BIN01,
                                       note="QQP duplicate (1) read as paraphrase (1)")),),
        ),
        Task(
            "qnli", _S12, ("entailment", "not_entailment"), ("accuracy",),
            train=_jsonl("qnli/train_sample.jsonl", "train sample", _NLI2),
            dev=DataFile("qnli/dev.tsv", "tsv", ("question", "sentence"), "label", "dev", label_map=_NLI2),
        ),
        Task(
            "mnli", _S12, ("entailment", "neutral", "contradiction"), ("accuracy",),
            train=_jsonl("mnli/train_sample.jsonl", "train sample", _NLI3),
            dev=_jsonl("mnli/dev_matched.jsonl", "dev (matched)", _NLI3),
            ood=(EvalSet("snli", _jsonl("snli/dev.jsonl", "dev", _NLI3)),),
        ),
        Task(
            "qqp", _S12, ("not_duplicate", "duplicate"), ("accuracy", "f1"),
            train=_jsonl("qqp/train_sample.jsonl", "train sample", _BIN01),
            dev=_jsonl("qqp/heldout_sample.jsonl", "held-out sample", _BIN01,
                       note="1000 rows of QQP train disjoint from train_sample; NOT the GLUE dev set"),
            ood=(EvalSet("mrpc", DataFile("mrpc/dev.tsv", "tsv", _MRPC_TEXT, "Quality", "dev", label_map=_BIN01,
                                          note="MRPC paraphrase (1) read as duplicate (1)")),),
        ),
        Task(
            "rte", _S12, ("entailment", "not_entailment"), ("accuracy",),
            train=DataFile("rte/train.tsv", "tsv", _S12, "label", "train", label_map=_NLI2),
            dev=DataFile("rte/dev.tsv", "tsv", _S12, "label", "dev", label_map=_NLI2),
        ),
        Task(
            "cola", _S, ("unacceptable", "acceptable"), ("matthews", "accuracy"),
            train=DataFile("cola/train.tsv", "tsv", (3,), 1, "train", header=False, label_map=_BIN01),
            dev=DataFile("cola/dev.tsv", "tsv", (3,), 1, "dev", header=False, label_map=_BIN01),
        ),
        Task(
            "stsb", _S12, ("score",), ("pearson", "spearman"),
            train=DataFile("stsb/train.tsv", "tsv", _S12, "score", "train"),
            dev=DataFile("stsb/dev.tsv", "tsv", _S12, "score", "dev"),
            regression=True,
        ),
    )
}


def get_task(name: str | Task) -> Task:
    """The registered task called ``name`` (a :class:`Task` passes through)."""
    if isinstance(name, Task):
        return name
    if not isinstance(name, str) or name.lower() not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name.lower()]
