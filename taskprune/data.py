"""Datasets from local files and the :class:`TaskDataModule` over them (offline; no hub needed).

Readers turn a GLUE TSV (``csv.QUOTE_NONE``, optional UTF-8 BOM, with or without a header) or a JSONL file into a
:class:`datasets.Dataset` with the task's text columns (``sentence`` or ``sentence1``/``sentence2``), ``label``
(task label index; float score for regression) and ``idx`` (row position in that dataset). A malformed row, an
unknown label or a missing file raises ``ValueError`` naming the file and the line.

Batches (dicts of tensors, padded to the longest row of the batch)::

    input_ids       long  [batch, seq]
    attention_mask  long  [batch, seq]
    token_type_ids  long  [batch, seq]    only if the tokenizer returns them
    labels          long  [batch]         float for regression (STS-B)
    idx             long  [batch]         position of the sample in its dataset (to drop DDP padding duplicates)
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from taskprune.loader import CalibrationLoader

from taskprune.tasks import DataFile, Task, get_task

log = logging.getLogger(__name__)

EMBEDDED_DATA_DIR = Path(__file__).resolve().parent / "embedded"

csv.field_size_limit(2**30)


def _resolve_dir(data_dir: str | os.PathLike | None) -> Path:
    return EMBEDDED_DATA_DIR if data_dir is None else Path(data_dir)


# ----------------------------------------------------------------------------------------------------- readers
def _check_exists(path: Path, what: str = "data file") -> None:
    if not path.is_file():
        hint = (
            " The embedded demo data holds only small subsets (see taskprune/embedded/PROVENANCE.md);"
            " pass data_dir=<folder with the GLUE layout <dataset>/<file>>, e.g. /work/shared/data."
            if path.is_relative_to(EMBEDDED_DATA_DIR)
            else " Check data_dir: it must hold <dataset>/<file> as in the GLUE layout (e.g. sst2/dev.tsv)."
        )
        raise ValueError(f"{what} {str(path)!r} not found.{hint}")


def read_tsv(path: str | os.PathLike, header: bool = True) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """Read a GLUE TSV: ``(header or None, [(line_number, fields), ...])``; line numbers are 1-based.

    Uses ``quoting=csv.QUOTE_NONE`` (GLUE text has bare quotes) and strips a UTF-8 BOM (MRPC). Blank lines are
    skipped.
    """
    path = Path(path)
    _check_exists(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [(i, line.rstrip("\r\n").split("\t")) for i, line in enumerate(f, start=1) if line.strip()]
    if header:
        if not rows:
            raise ValueError(f"{path}: empty file, expected a header line. Pass header=False for header-less TSV.")
        return [c.strip() for c in rows[0][1]], rows[1:]
    return None, rows


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """Read a JSONL file: ``[(line_number, object), ...]``; blank lines are skipped."""
    path = Path(path)
    _check_exists(path)
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); fix or remove the line.") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object per line, got {type(obj).__name__}.")
            out.append((i, obj))
    return out


def _parse_label(raw, spec: DataFile, regression: bool, where: str):
    if raw is None:
        raise ValueError(f"{where}: label is missing (column {spec.label_column!r}); every row needs a label.")
    if regression:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: label {raw!r} is not a number; a regression task needs float scores.") from None
    key = str(raw).strip()
    if isinstance(raw, float) and raw.is_integer():
        key = str(int(raw))
    labels = spec.label_dict
    if key not in labels:
        known = sorted(labels)
        raise ValueError(f"{where}: unknown label {key!r}; expected one of {known}. Fix the row or the label map.")
    return labels[key]


def load_file(
    spec: DataFile, text_fields: Sequence[str], data_dir: str | os.PathLike | None = None, regression: bool = False
) -> datasets.Dataset:
    """Read ``spec`` from ``data_dir`` into a Dataset with ``text_fields`` + ``label`` + ``idx`` columns.

    Rows whose raw label maps to ``None`` (e.g. 3-star reviews when binarising) are dropped.
    """
    path = _resolve_dir(data_dir) / spec.path
    if len(spec.text_columns) != len(text_fields):
        raise ValueError(f"{spec.path}: {len(spec.text_columns)} text columns for {len(text_fields)} text fields")
    texts: list[list[str]] = [[] for _ in text_fields]
    labels: list = []
    if spec.format == "tsv":
        header, rows = read_tsv(path, header=spec.header)
        cols = []
        for c in (*spec.text_columns, spec.label_column):
            if isinstance(c, int):
                cols.append(c)
            elif header is None or c not in header:
                raise ValueError(f"{path}:1: column {c!r} not in header {header}; is this the right file?")
            else:
                cols.append(header.index(c))
        need = max(cols) + 1
        for line, fields in rows:
            where = f"{path}:{line}"
            if len(fields) < need:
                raise ValueError(
                    f"{where}: malformed row, {len(fields)} tab-separated field(s), expected at least {need}. "
                    "Fix or remove the row (GLUE TSVs are read with quoting=csv.QUOTE_NONE)."
                )
            y = _parse_label(fields[cols[-1]], spec, regression, where)
            if y is None:
                continue
            for t, c in zip(texts, cols[:-1]):
                t.append(fields[c])
            labels.append(y)
    elif spec.format == "jsonl":
        for line, obj in read_jsonl(path):
            where = f"{path}:{line}"
            missing = [c for c in spec.text_columns if not isinstance(obj.get(c), str)]
            if missing:
                raise ValueError(f"{where}: malformed row, text field(s) {missing} missing or not strings.")
            y = _parse_label(obj.get(spec.label_column), spec, regression, where)
            if y is None:
                continue
            for t, c in zip(texts, spec.text_columns):
                t.append(obj[c])
            labels.append(y)
    else:
        raise ValueError(f"unknown file format {spec.format!r}; allowed: 'tsv', 'jsonl'")
    if not labels:
        raise ValueError(f"{path}: no labelled rows; the file is empty or every label was dropped.")
    features = datasets.Features(
        {
            **{f: datasets.Value("string") for f in text_fields},
            "label": datasets.Value("float32" if regression else "int64"),
            "idx": datasets.Value("int64"),
        }
    )
    cols = dict(zip(text_fields, texts))
    return datasets.Dataset.from_dict({**cols, "label": labels, "idx": list(range(len(labels)))}, features=features)


def load_split(task: str | Task, split: str, data_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """``split``: ``"train"``, ``"dev"`` or the name of one of the task's out-of-domain sets."""
    task = get_task(task)
    if split == "train":
        spec = task.train
    elif split == "dev":
        spec = task.dev
    else:
        spec = task.ood_set(split).file
    return load_file(spec, task.text_fields, data_dir, task.regression)


# ------------------------------------------------------------------------------------------------- subsetting
def _reindex(ds: datasets.Dataset, rows: Sequence[int]) -> datasets.Dataset:
    cols = ds.select(sorted(int(r) for r in rows)).to_dict()
    cols["idx"] = list(range(len(cols["idx"])))
    return datasets.Dataset.from_dict(cols, features=ds.features)


def random_subset(ds: datasets.Dataset, n: int, seed: int = 0) -> datasets.Dataset:
    """``n`` rows drawn without replacement (all if fewer), in file order, ``idx`` renumbered 0..n-1."""
    if n >= len(ds):
        return ds
    rows = np.random.default_rng(seed).permutation(len(ds))[:n]
    return _reindex(ds, rows)


def per_class_subset(ds: datasets.Dataset, k: int, seed: int = 0, n_labels: int | None = None) -> datasets.Dataset:
    """``k`` rows of each class (seeded), in file order. A class with fewer than ``k`` rows gives all it has."""
    labels = np.asarray(ds["label"])
    classes = range(n_labels) if n_labels is not None else sorted(set(labels.tolist()))
    rng = np.random.default_rng(seed)
    rows = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            raise ValueError(f"class {c} has no rows in the calibration split; cannot draw {k} per class.")
        if len(members) < k:
            log.warning("class %s has only %d rows, fewer than calib_per_class=%d; using all", c, len(members), k)
        rows.extend(rng.permutation(members)[:k].tolist())
    return _reindex(ds, rows)


# ---------------------------------------------------------------------------------------------------- batches
class Collator:
    """Tokenise a list of rows with dynamic padding; truncate to ``max_length`` (warns once)."""

    def __init__(self, tokenizer, text_fields: Sequence[str], max_length: int, regression: bool):
        self.tokenizer = tokenizer
        self.text_fields = tuple(text_fields)
        self.max_length = max_length
        self.regression = regression
        self._warned = False

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        texts = [[r[f] for r in rows] for f in self.text_fields]
        enc = self.tokenizer(
            *texts, truncation=True, max_length=self.max_length, padding="longest", return_tensors="pt"
        )
        if not self._warned and enc["input_ids"].shape[1] >= self.max_length:
            full = self.tokenizer(*texts, truncation=False)["input_ids"]
            n_long = sum(len(x) > self.max_length for x in full)
            if n_long:
                self._warned = True
                log.warning(
                    "%d of %d rows in a batch are longer than max_length=%d tokens and were truncated "
                    "(warned once; raise max_length to keep more text)", n_long, len(rows), self.max_length,
                )
        batch = {k: v.long() for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        label_dtype = torch.float32 if self.regression else torch.long
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=label_dtype)
        batch["idx"] = torch.tensor([r["idx"] for r in rows], dtype=torch.long)
        return batch


def load_tokenizer(name_or_path: str):
    """A fast tokenizer from a local folder or hub name (``trust_remote_code`` off)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except OSError as e:
        raise ValueError(
            f"cannot load a tokenizer from {name_or_path!r} ({e}). Pass a local folder with tokenizer files "
            "(e.g. the saved multi-task model folder) or call dm.set_tokenizer(tokenizer)."
        ) from None


# ------------------------------------------------------------------------------------------------ data module
class TaskDataModule(L.LightningDataModule):
    """Calibration (train split subset) and evaluation (dev + out-of-domain) data for one task.

    Args:
        task: registered task name (``sst2``, ``mrpc``, ``qnli``, ``mnli``, ``qqp``, ``rte``, ``cola``, ``stsb``).
        data_dir: folder with the GLUE layout (``<dataset>/<file>``, e.g. ``/work/shared/data``); ``None`` uses the
            small subsets embedded in the package.
        tokenizer: tokenizer folder or name; or call :meth:`set_tokenizer` before asking for dataloaders.
        max_length: longer inputs are truncated (warned once).
        batch_size: rows per batch, for calibration and evaluation.
        calib_samples: size of the calibration subset drawn (seeded) from the train split; ``None`` = all rows.
        calib_per_class: low-resource calibration, ``k`` rows per class; needs ``calib_samples=None``.
        calib_seed: seed of the calibration draw.
        ood: names of the out-of-domain sets to evaluate; ``None`` = the task's defaults, ``[]`` = none.
        eval_samples: cap on rows per evaluation set (seeded subset with ``calib_seed``); ``None`` = all.
        num_workers: DataLoader workers.

    ``train_dataloader()`` serves the calibration subset in a fixed order (no shuffling);
    ``val_dataloader()`` / ``test_dataloader()`` a list ``[dev, *ood]`` named by :attr:`eval_names`.
    """

    def __init__(
        self,
        task: str,
        data_dir: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        calib_samples: int | None = 512,
        calib_per_class: int | None = None,
        calib_seed: int = 0,
        ood: list[str] | None = None,
        eval_samples: int | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        self.task: Task = get_task(task)
        for name, value, lo in (("max_length", max_length, 2), ("batch_size", batch_size, 1),
                                ("calib_samples", calib_samples, 1), ("calib_per_class", calib_per_class, 1),
                                ("eval_samples", eval_samples, 1), ("num_workers", num_workers, 0)):
            if value is None and name in ("calib_samples", "calib_per_class", "eval_samples"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        if not isinstance(calib_seed, int):
            raise TypeError(f"calib_seed must be an int, got {calib_seed!r}")
        if calib_per_class is not None and calib_samples is not None:
            raise ValueError(
                f"calib_samples={calib_samples} and calib_per_class={calib_per_class} are mutually exclusive; "
                "pass calib_samples=None to draw calib_per_class rows per class."
            )
        if calib_per_class is not None and self.task.regression:
            raise ValueError(f"calib_per_class needs a classification task; {self.task.name!r} is a regression task. "
                             "Use calib_samples instead.")
        if ood is None:
            ood = list(self.task.ood_names)
        elif isinstance(ood, str) or not all(isinstance(o, str) for o in ood):
            raise TypeError(f"ood must be a list of names, got {ood!r}; known for {self.task.name}: "
                            f"{list(self.task.ood_names)}")
        for o in ood:
            self.task.ood_set(o)  # raises with the known names
        if len(set(ood)) != len(ood):
            raise ValueError(f"ood has duplicates: {ood}")
        if data_dir is not None and not Path(data_dir).is_dir():
            raise ValueError(f"data_dir {data_dir!r} is not a folder; pass a folder with the GLUE layout "
                             "(e.g. /work/shared/data) or None for the embedded demo data.")
        self.data_dir = data_dir
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.calib_samples = calib_samples
        self.calib_per_class = calib_per_class
        self.calib_seed = calib_seed
        self.ood = list(ood)
        self.eval_samples = eval_samples
        self.num_workers = num_workers
        self._tokenizer = None
        self._collator: Collator | None = None
        self.calib_set: datasets.Dataset | None = None
        self.eval_sets: list[datasets.Dataset] | None = None

    # ------------------------------------------------------------------------------------------------ public
    @property
    def eval_names(self) -> list[str]:
        """Names of the evaluation sets, in dataloader order: ``[task, *ood]``."""
        return [self.task.name, *self.ood]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.tokenizer_name is None:
                raise ValueError("TaskDataModule has no tokenizer: pass tokenizer=<folder or name> or call "
                                 "dm.set_tokenizer(tokenizer) before asking for dataloaders.")
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def set_tokenizer(self, tokenizer) -> None:
        """Use ``tokenizer`` (a transformers tokenizer object) for all batches."""
        if not callable(tokenizer):
            raise TypeError(f"set_tokenizer expects a transformers tokenizer, got {type(tokenizer).__name__}")
        self._tokenizer = tokenizer
        self._collator = None

    def fit_to(self, model, tokenizer: str | None = None) -> None:
        """Fit the data to ``model`` before any work (called by ``AttributionModule.setup``).

        ``tokenizer``: the model's own tokenizer folder, used unless a tokenizer is already loaded. Then refuse a
        tokenizer whose vocabulary is larger than the model's input embedding (a tokenizer of another model), and
        lower ``max_length`` (with a warning) to the model's position limit.
        """
        from taskprune.models import max_positions, vocab_rows

        if tokenizer is not None and self._tokenizer is None:
            self.set_tokenizer(load_tokenizer(tokenizer))
        try:
            tok = self.tokenizer
        except ValueError:
            tok = None  # no tokenizer (yet): the dataloaders raise their own error when they need one
        n_rows = vocab_rows(model)
        if hasattr(tok, "__len__") and n_rows is not None and len(tok) > n_rows:
            name = getattr(tok, "name_or_path", "") or type(tok).__name__
            raise ValueError(
                f"the tokenizer {name!r} has a vocabulary of {len(tok)} tokens but the model's input embedding has "
                f"{n_rows} rows: token ids >= {n_rows} would index past it. The tokenizer belongs to another model; "
                "pass the model's own tokenizer (data.tokenizer, or the tokenizer saved with the model)"
            )
        limit = max_positions(model)
        if limit is not None and self.max_length > limit:
            log.warning("max_length=%d is longer than the model's %d positions; inputs are truncated to %d tokens",
                        self.max_length, limit, limit)
            self.max_length = limit
            self._collator = None  # rebuilt with the new length

    def setup(self, stage: str | None = None) -> None:
        if self.calib_set is None:
            train = load_split(self.task, "train", self.data_dir)
            if self.calib_per_class is not None:
                calib = per_class_subset(train, self.calib_per_class, self.calib_seed, self.task.n_labels)
            elif self.calib_samples is not None:
                calib = random_subset(train, self.calib_samples, self.calib_seed)
            else:
                calib = train
            if len(calib) == 0:
                raise ValueError(f"empty calibration set for task {self.task.name!r}; check calib_samples / "
                                 "calib_per_class and the train file.")
            self.calib_set = calib
        if self.eval_sets is None:
            sets = [load_split(self.task, "dev", self.data_dir)]
            sets += [load_split(self.task, o, self.data_dir) for o in self.ood]
            if self.eval_samples is not None:
                sets = [random_subset(s, self.eval_samples, self.calib_seed) for s in sets]
            self.eval_sets = sets

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.calib_set, resumable=True)

    def val_dataloader(self) -> list[DataLoader]:
        self.setup("validate")
        return [self._loader(s) for s in self.eval_sets]

    def test_dataloader(self) -> list[DataLoader]:
        self.setup("test")
        return [self._loader(s) for s in self.eval_sets]

    def state_dict(self) -> dict:
        """What defines the calibration set; a resumed run must draw the same one."""
        return {"task": self.task.name, "calib_seed": self.calib_seed, "calib_samples": self.calib_samples,
                "calib_per_class": self.calib_per_class, "data_dir": self.data_dir, "max_length": self.max_length}

    def load_state_dict(self, state_dict: dict) -> None:
        """Refuse to resume a calibration with another calibration set (the sums would mix two sets)."""
        mine = self.state_dict()
        diff = {k: (v, mine.get(k)) for k, v in state_dict.items() if k in mine and v != mine[k]}
        if diff:
            raise ValueError(
                "the checkpoint was calibrated on another calibration set: "
                + ", ".join(f"{k}={old!r} in the checkpoint vs {new!r} now" for k, (old, new) in diff.items())
                + "; resume with the same data settings, or start a new calibration without --ckpt_path"
            )

    # ----------------------------------------------------------------------------------------------- private
    def _loader(self, ds: datasets.Dataset, resumable: bool = False) -> DataLoader:
        """Evaluation loaders are plain; the calibration loader resumes mid-epoch (see :mod:`taskprune.loader`)."""
        if self._collator is None:
            self._collator = Collator(self.tokenizer, self.task.text_fields, self.max_length, self.task.regression)
        cls = CalibrationLoader if resumable else DataLoader
        return cls(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=self._collator)
