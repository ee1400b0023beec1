"""Datasets of a task's splits, read by ``datasets.load_dataset``, and the :class:`TaskDataModule` over them.

A task definition (:mod:`taskprune.tasks`) names each split's files (csv, tsv, json/jsonl, parquet) or hub dataset,
its text and label columns and its label map; :func:`load_split` reads the split with ``datasets.load_dataset``
(cached as Arrow under ``<taskprune cache>/datasets``, keyed by the files' content, memory-mapped; no network
for local files) and returns a :class:`datasets.Dataset` with the columns ``sentence`` (or ``sentence1`` /
``sentence2``), ``label`` (label index, ``int64``; ``float32`` score for regression) and ``idx`` (row number among the
kept rows). A missing file or column, a path that is a folder or a link loop, a label outside the map, a text column
that is not text, a regression label that is not a finite number (NaN, inf), an empty split or one whose map drops
every row raise ``ValueError`` naming the file, column, row and value.

Batches (dicts of tensors, padded to the longest row of the batch)::

    input_ids       long  [batch, seq]
    attention_mask  long  [batch, seq]
    token_type_ids  long  [batch, seq]    only if the tokenizer returns them
    labels          long  [batch]         float for regression (STS-B)
    idx             long  [batch]         position of the sample in its dataset (to drop DDP padding duplicates)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from taskprune.lightning.loader import CalibrationLoader
from taskprune.tasks import Source, Task, get_task, raw_key

log = logging.getLogger(__name__)

EMBEDDED_DATA_DIR = Path(__file__).resolve().parent.parent / "embedded"


def datasets_cache_dir() -> Path:
    """Where ``datasets`` keeps the Arrow copies of the files read: ``<taskprune cache>/datasets``."""
    from taskprune.io import cache_dir

    return cache_dir() / "datasets"


# ----------------------------------------------------------------------------------------------------- reading
@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars while reading (many small files; the calibration loop has its own bar)."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _config_fields(fmt: str) -> set[str]:
    from datasets.packaged_modules.csv.csv import CsvConfig
    from datasets.packaged_modules.json.json import JsonConfig
    from datasets.packaged_modules.parquet.parquet import ParquetConfig

    cls = {"csv": CsvConfig, "json": JsonConfig, "parquet": ParquetConfig}[fmt]
    return {f.name for f in dataclasses.fields(cls)} - {"name", "version", "data_dir", "data_files", "description",
                                                         "features"}


def _files(source: Source, root: Path, where: str) -> list[str]:
    from taskprune.io import file_problem

    paths = [Path(f) if Path(f).is_absolute() else root / f for f in source.files]
    for p in paths:
        problem = file_problem(p)
        if problem == "does not exist":
            hint = (" The embedded demo data holds only small subsets (see taskprune/embedded/PROVENANCE.md); pass "
                    "data_dir=<folder with the GLUE layout <dataset>/<file>>, e.g. ../shared/data or $TASKPRUNE_DATA."
                    if p.is_relative_to(EMBEDDED_DATA_DIR)
                    else f" Paths start at {str(root)!r} (data_dir, else the task definition's data_dir or folder).")
            raise ValueError(f"{where}: data file {str(p)!r} not found.{hint}")
        if problem is not None:
            raise ValueError(f"{where}: data file {str(p)!r} {problem}; `files:` must name data files (csv, tsv, "
                             "json, jsonl, parquet). Fix the path in the task definition, or the link.")
    return [str(p) for p in paths]


_CONTENT_HASHES: dict[tuple, str] = {}  # (path, size, mtime, ctime, inode) -> sha256 of the file, for this process


def content_hash(files: Sequence[str]) -> str:
    """A sha256 over the bytes of ``files`` (in order; 16 hex digits): what keys the Arrow cache, so a file rewritten
    with its modification time kept (``cp -p``, ``rsync -a``, ``tar x``) is read again. A file whose size, times and
    inode are unchanged is hashed once per process."""
    h = hashlib.sha256()
    for name in files:
        st = os.stat(name)
        key = (os.path.abspath(name), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        if key not in _CONTENT_HASHES:
            one = hashlib.sha256()
            with open(name, "rb") as f:
                while chunk := f.read(1 << 20):
                    one.update(chunk)
            _CONTENT_HASHES[key] = one.hexdigest()
        h.update(_CONTENT_HASHES[key].encode())
    return h.hexdigest()[:16]


def _load(source: Source, root: Path, where: str) -> tuple[datasets.Dataset, str]:
    """``(dataset of the raw columns, what to call it in messages)``."""
    cache = str(datasets_cache_dir())
    if source.hub is not None:
        h = source.hub
        try:
            return datasets.load_dataset(h.name, h.config, split=h.split, cache_dir=cache), source.path
        except Exception as e:  # hub unreachable, unknown name / config / split
            raise ValueError(f"{where}: cannot load hub dataset {source.path!r}: {e}. Without network access it "
                             "must already be in the datasets cache; or point `files:` at local copies.") from None
    files = _files(source, root, where)
    name = files[0] if len(files) == 1 else str(files)
    opts = source.read_options
    unknown = sorted(set(opts) - _config_fields(source.format))
    if unknown:
        raise ValueError(f"{where}: unknown read option(s) {unknown} for format {source.format!r}; allowed: "
                         f"{sorted(_config_fields(source.format))} (keyword options of datasets.load_dataset)")
    features = None
    if source.format == "csv":
        import pandas as pd
        from datasets.packaged_modules.csv.csv import CsvConfig

        opts = {"na_filter": False, **opts}  # "NA", "null", "" stay text
        kwargs = {k: v for k, v in CsvConfig(**opts).pd_read_csv_kwargs.items() if k not in ("chunksize", "nrows")}
        try:  # every column as text: "007" stays "007"; labels are parsed below, with the row named on error
            columns = pd.read_csv(files[0], nrows=0, **kwargs).columns
        except Exception as e:
            raise ValueError(f"{where}: cannot read the header of {name!r}: {e}") from None
        features = datasets.Features({str(c): datasets.Value("string") for c in columns})
    try:  # the config name carries the files' content: datasets keys its cache on path and modification time only
        ds = datasets.load_dataset(source.format, name=f"content-{content_hash(files)}", data_files=files,
                                   split="train", features=features, cache_dir=cache, **opts)
    except Exception as e:
        cause = e.__cause__ or e
        if "corresponds to no data" in str(cause):  # datasets' words for a file without rows
            raise ValueError(f"{where}: {name!r} has no rows; an empty split cannot be calibrated on or "
                             "evaluated.") from None
        raise ValueError(f"{where}: cannot read {name!r} as {source.format} with options {opts}: "
                         f"{type(cause).__name__}: {cause}. Fix the file or the split's `read:` options.") from None
    return ds, name


def _first(values: list, bad) -> int | None:
    return next((i for i, v in enumerate(values) if bad(v)), None)


def read_source(source: Source, text_fields: Sequence[str], root: str | os.PathLike, regression: bool = False,
                where: str = "split") -> datasets.Dataset:
    """Read one split into a Dataset with ``text_fields`` + ``label`` + ``idx`` (see the module docstring).

    Rows whose raw label the map drops are left out; ``idx`` numbers the kept rows 0..n-1 in file order.
    """
    with _quiet_datasets():
        return _read_source(source, text_fields, Path(root), regression, where)


def _read_source(source: Source, text_fields: Sequence[str], root: Path, regression: bool,
                 where: str) -> datasets.Dataset:
    ds, name = _load(source, root, where)
    cols = list(ds.column_names)
    for kind, c in [*(("text", t) for t in source.text), ("label", source.label)]:
        if c not in cols:
            raise ValueError(f"{where}: {name!r} has no column {c!r} (the split's {kind} column); its columns: "
                             f"{cols}. Fix `{kind}:` in the task definition or the file's header.")
    if len(ds) == 0:
        raise ValueError(f"{where}: {name!r} has no rows; an empty split cannot be calibrated on or evaluated.")
    for c in source.text:
        feature = ds.features[c]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise ValueError(f"{where}: text column {c!r} of {name!r} holds {feature}, not text; point `text:` at "
                             "columns of strings.")
        row = _first(ds.data.column(c).to_pylist(), lambda v: v is None) if ds.data.column(c).null_count else None
        if row is not None:
            raise ValueError(f"{where}: {name!r}, row {row + 1}: text column {c!r} is empty (null); fill or remove "
                             "the row.")
    raw = ds.data.column(source.label).to_pylist()
    row = _first(raw, lambda v: v is None)
    if row is not None:
        raise ValueError(f"{where}: {name!r}, row {row + 1}: label is missing (column {source.label!r}); every row "
                         "needs a label.")
    if regression:
        labels = []
        for i, v in enumerate(raw):
            try:
                if isinstance(v, bool):
                    raise ValueError
                labels.append(float(v))
            except (TypeError, ValueError):
                raise ValueError(f"{where}: {name!r}, row {i + 1}: label {v!r} in column {source.label!r} is not a "
                                 "number; a regression task needs numeric scores.") from None
            if not math.isfinite(labels[-1]):
                raise ValueError(f"{where}: {name!r}, row {i + 1}: label {v!r} in column {source.label!r} is "
                                 f"{labels[-1]}, not a finite number; a regression task needs a finite score on "
                                 "every row (metrics and attributions of NaN / inf are NaN). Fix or remove the row.")
        keep = None
    else:
        mapping = source.label_dict
        mapped = []
        for i, v in enumerate(raw):
            key = raw_key(v)
            if key not in mapping:
                raise ValueError(f"{where}: {name!r}, row {i + 1}: label {key!r} in column {source.label!r} is not "
                                 f"in the label map; mapped: {sorted(k for k, y in mapping.items() if y is not None)}"
                                 f", dropped: {sorted(k for k, y in mapping.items() if y is None)}. Add it to "
                                 "`label_map:` or `drop:`, or fix the row.")
            mapped.append(mapping[key])
        keep = [i for i, y in enumerate(mapped) if y is not None]
        labels = [mapped[i] for i in keep]
        if not keep:
            raise ValueError(f"{where}: the label map drops every row of {name!r} ({len(raw)} rows, raw labels "
                             f"{sorted({raw_key(v) for v in raw})}); map some of them to label names.")
        if len(keep) == len(mapped):
            keep = None
    out = ds.select_columns(list(source.text))
    out = out.rename_columns({c: f"__text{i}" for i, c in enumerate(source.text)})  # a text column may be "label"
    out = out.rename_columns({f"__text{i}": f for i, f in enumerate(text_fields)})
    if keep is not None:
        out = out.select(keep)
    out = out.add_column("label", labels).add_column("idx", list(range(len(labels))))
    features = datasets.Features({**{f: datasets.Value("string") for f in text_fields},
                                  "label": datasets.Value("float32" if regression else "int64"),
                                  "idx": datasets.Value("int64")})
    return out.cast(features) if out.features != features else out


def load_split(task: str | dict | Task, split: str, data_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """``split``: ``"train"``, ``"eval"`` (or ``"dev"``) or the name of one of the task's out-of-domain sets.

    Relative paths start at ``data_dir``, else at the task definition's data folder (the embedded subsets for the
    shipped GLUE tasks)."""
    task = get_task(task)
    where = f"task {task.name!r}, {'eval' if split == 'dev' else split}"
    return read_source(task.source(split), task.text_fields, task.data_root(data_dir), task.regression, where)


# ------------------------------------------------------------------------------------------------- subsetting
def _reindex(ds: datasets.Dataset, rows: Sequence[int]) -> datasets.Dataset:
    out = ds.select(sorted(int(r) for r in rows))
    return out.remove_columns("idx").add_column("idx", list(range(len(out))))


def random_subset(ds: datasets.Dataset, n: int, seed: int = 0, skip: int = 0) -> datasets.Dataset:
    """``n`` rows drawn without replacement (all if fewer), in file order, ``idx`` renumbered 0..n-1. ``skip`` > 0:
    the ``n`` rows after the first ``skip`` of the same seeded permutation (disjoint from
    ``random_subset(ds, skip, seed)``; fewer, or none, when the split runs out)."""
    if skip == 0 and n >= len(ds):
        return ds
    rows = np.random.default_rng(seed).permutation(len(ds))[skip : skip + n]
    return _reindex(ds, rows)


def per_class_subset(ds: datasets.Dataset, k: int, seed: int = 0, n_labels: int | None = None,
                     label_names: Sequence[str] | None = None) -> datasets.Dataset:
    """``k`` rows of each class (seeded), in file order. ``ValueError`` naming the class when one has fewer than
    ``k`` rows (``label_names``, when given, name the classes in the message)."""
    labels = np.asarray(ds["label"])
    if label_names is not None and n_labels is None:
        n_labels = len(label_names)
    classes = range(n_labels) if n_labels is not None else sorted(set(labels.tolist()))
    rng = np.random.default_rng(seed)
    rows = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) < k:
            name = f"{label_names[c]!r} (label {c})" if label_names is not None else f"label {c}"
            raise ValueError(f"calib_per_class={k} is larger than class {name}, which has {len(members)} row(s) in "
                             f"the calibration split ({len(ds)} rows); lower calib_per_class to at most "
                             f"{len(members)} or add rows of that class.")
        rows.extend(rng.permutation(members)[:k].tolist())
    return _reindex(ds, rows)


# ---------------------------------------------------------------------------------------------------- batches
_TRUNCATION_WARNED: set[int] = set()  # max_length values already warned about: once per run, not per collator


class Collator:
    """Tokenise a list of rows with dynamic padding; truncate to ``max_length`` (warns once)."""

    def __init__(self, tokenizer, text_fields: Sequence[str], max_length: int, regression: bool):
        self.tokenizer = tokenizer
        self.text_fields = tuple(text_fields)
        self.max_length = max_length
        self.regression = regression

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        texts = [[r[f] for r in rows] for f in self.text_fields]
        enc = self.tokenizer(
            *texts, truncation=True, max_length=self.max_length, padding="longest", return_tensors="pt"
        )
        if self.max_length not in _TRUNCATION_WARNED and enc["input_ids"].shape[1] >= self.max_length:
            full = self.tokenizer(*texts, truncation=False)["input_ids"]
            n_long = sum(len(x) > self.max_length for x in full)
            if n_long:
                _TRUNCATION_WARNED.add(self.max_length)
                log.warning(
                    "%d of %d rows in a batch are longer than max_length=%d tokens and were truncated "
                    "(warned once per run; raise max_length to keep more text)", n_long, len(rows), self.max_length,
                )
        batch = {k: v.long() for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        label_dtype = torch.float32 if self.regression else torch.long
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=label_dtype)
        batch["idx"] = torch.tensor([r["idx"] for r in rows], dtype=torch.long)
        return batch


VOCAB_FILES = ("tokenizer.json", "vocab*", "*.model", "*.spm", "merges.txt", "*.tiktoken")
"""Files that hold a tokenizer's vocabulary (BERT vocab.txt, GPT-2 vocab.json + merges.txt, sentencepiece *.model)."""


def has_vocab_file(name_or_path: str) -> bool | None:
    """Whether the local folder ``name_or_path`` holds a vocabulary file (:data:`VOCAB_FILES`); ``None`` when it is
    not a local folder (a hub id, a tokenizer object)."""
    folder = Path(str(name_or_path)) if name_or_path else None
    if folder is None or not folder.is_dir():
        return None
    return any(next(folder.glob(pattern), None) is not None for pattern in VOCAB_FILES)


NO_TOKENIZER_HINT = ("Pass the tokenizer the model was trained with: --data.tokenizer <folder or hub id> (Python: "
                     "TaskDataModule(tokenizer=...) or dm.set_tokenizer(tokenizer))")


def load_tokenizer(name_or_path: str):
    """A fast tokenizer from a local folder or hub name (``trust_remote_code`` off)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        if has_vocab_file(name_or_path) is False:
            raise ValueError(f"cannot load a tokenizer from {name_or_path!r}: the folder holds no tokenizer files "
                             f"(none of {list(VOCAB_FILES)}). {NO_TOKENIZER_HINT}.") from None
        raise ValueError(
            f"cannot load a tokenizer from {name_or_path!r} ({e}). Pass a local folder with tokenizer files "
            "(e.g. the saved multi-task model folder) or call dm.set_tokenizer(tokenizer)."
        ) from None


# ------------------------------------------------------------------------------------------------ data module
class TaskDataModule(L.LightningDataModule):
    """Calibration (train split subset) and evaluation (dev + out-of-domain) data for one task.

    Args:
        task: the task: a shipped name (``sst2``, ``mrpc``, ``qnli``, ``mnli``, ``qqp``, ``rte``, ``cola``,
            ``stsb``), the path of a task definition file (``my_task.yaml``) or the definition inline (a mapping:
            files, text and label columns, label map, labels, metrics, OOD sets; see :mod:`taskprune.tasks`).
        data_dir: where the task's relative file paths start; ``None``: the definition's own data folder (for the
            shipped GLUE tasks the small subsets embedded in the package; the project's data folder, e.g. ``$TASKPRUNE_DATA``, has the full files).
        tokenizer: tokenizer folder or name; or call :meth:`set_tokenizer` before asking for dataloaders.
        max_length: longer inputs are truncated (warned once).
        batch_size: rows per batch, for calibration and evaluation.
        calib_samples: size of the calibration subset drawn (seeded) from the train split; ``None`` = all rows.
        calib_per_class: low-resource calibration, ``k`` rows per class; needs ``calib_samples=None``.
        calib_seed: seed of the calibration draw.
        holdout_samples: training rows held out from calibration (the next rows of the calibration draw's seeded
            permutation, so never among the calibration rows), served by :meth:`holdout_dataloader`: the task loss on
            them chooses the heads / neurons split of the mask search (:class:`~taskprune.tuning.TuningConfig`
            ``allocate``). Default 0 (none): opt-in, see the README's "Defaults and why"; needs ``calib_samples``.
        ood: names of the out-of-domain sets to evaluate; ``None`` = the task's defaults, ``[]`` = none.
        eval_samples: cap on rows per evaluation set (seeded subset with ``calib_seed``); ``None`` = all.
        num_workers: DataLoader workers.

    ``train_dataloader()`` serves the calibration subset in a fixed order (no shuffling);
    ``val_dataloader()`` / ``test_dataloader()`` a list ``[dev, *ood]`` named by :attr:`eval_names`.
    """

    def __init__(
        self,
        task: str | dict = "sst2",
        data_dir: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        calib_samples: int | None = 512,
        calib_per_class: int | None = None,
        calib_seed: int = 0,
        holdout_samples: int = 0,
        ood: list[str] | None = None,
        eval_samples: int | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        self.task: Task = get_task(task)
        for name, value, lo in (("max_length", max_length, 2), ("batch_size", batch_size, 1),
                                ("calib_samples", calib_samples, 1), ("calib_per_class", calib_per_class, 1),
                                ("eval_samples", eval_samples, 1), ("num_workers", num_workers, 0),
                                ("holdout_samples", holdout_samples, 0)):
            if value is None and name in ("calib_samples", "calib_per_class", "eval_samples"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        if isinstance(calib_seed, bool) or not isinstance(calib_seed, int):
            raise TypeError(f"calib_seed must be an int, got {calib_seed!r}")
        if calib_seed < 0:
            raise ValueError(f"calib_seed must be an int >= 0 (numpy's random generators take no negative seed), got "
                             f"{calib_seed}; e.g. calib_seed={-calib_seed}")
        if calib_per_class is not None and calib_samples is not None:
            raise ValueError(
                f"calib_samples={calib_samples} and calib_per_class={calib_per_class} are mutually exclusive; "
                "pass calib_samples=None to draw calib_per_class rows per class."
            )
        if holdout_samples and calib_samples is None:
            how = f"calib_per_class={calib_per_class}" if calib_per_class is not None else "calib_samples=None"
            raise ValueError(f"holdout_samples={holdout_samples} takes the training rows after the calibration draw, "
                             f"which {how} does not make; use calib_samples=<n> with it, or holdout_samples=0")
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
            raise ValueError(f"data_dir {data_dir!r} is not a folder; pass the folder the task's file paths start "
                             "at (for the GLUE tasks, e.g. ../shared/data) or None for the definition's own.")
        self.data_dir = data_dir
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.calib_samples = calib_samples
        self.calib_per_class = calib_per_class
        self.calib_seed = calib_seed
        self.holdout_samples = holdout_samples
        self.ood = list(ood)
        self.eval_samples = eval_samples
        self.num_workers = num_workers
        self._tokenizer = None
        self._collator: Collator | None = None
        self.calib_set: datasets.Dataset | None = None
        self._calib_fingerprint: str | None = None
        self.holdout_set: datasets.Dataset | None = None
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

        ``tokenizer``: the model's own tokenizer folder, used unless a tokenizer is loaded or named (``tokenizer=``,
        ``--data.tokenizer``). Then refuse a tokenizer whose vocabulary is larger than the model's input embedding
        (a tokenizer of another model) or under a tenth of it (a model folder without tokenizer files: transformers
        builds one of special tokens, every word [UNK]), and lower ``max_length`` (with a warning) to the model's
        position limit.
        """
        from taskprune.models import max_positions, vocab_rows

        if tokenizer is not None and self._tokenizer is None and self.tokenizer_name is None:
            self.set_tokenizer(load_tokenizer(tokenizer))
        elif tokenizer is None and self._tokenizer is None and getattr(model, "tokenizer", None) is not None:
            self.set_tokenizer(model.tokenizer)  # a module that carries its tokenizer (taskprune.models.fewshot.PromptedLM)
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
        if hasattr(tok, "__len__") and n_rows is not None and len(tok) * 10 < n_rows:
            name = getattr(tok, "name_or_path", "") or type(tok).__name__
            whose = " (the model's folder)" if tokenizer is not None and str(tokenizer) == str(name) else ""
            why = (f"{name!r}{whose} holds no tokenizer files (none of {list(VOCAB_FILES)}), so transformers built a "
                   "tokenizer of its special tokens alone" if has_vocab_file(name) is False
                   else "it is far smaller than the model's vocabulary")
            raise ValueError(
                f"the tokenizer {name!r} has {len(tok)} tokens but the model's input embedding has {n_rows} rows: "
                f"{why}, and nearly every word would become [UNK]. {NO_TOKENIZER_HINT}"
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
            if not self.task.regression:
                present = sorted(set(train["label"]))
                if len(present) < 2:
                    only = [self.task.label_names[i] for i in present]
                    raise ValueError(
                        f"task {self.task.name!r}: the calibration split ({self.task.train.path}) holds one class "
                        f"{only} of {list(self.task.label_names)}; scores for a classifier need at least two. Check "
                        "the split's file and label_map.")
            if self.calib_per_class is not None:
                calib = per_class_subset(train, self.calib_per_class, self.calib_seed,
                                         label_names=self.task.label_names)
            elif self.calib_samples is not None:
                calib = random_subset(train, self.calib_samples, self.calib_seed)
            else:
                calib = train
            if len(calib) == 0:
                raise ValueError(f"empty calibration set for task {self.task.name!r}; check calib_samples / "
                                 "calib_per_class and the train file.")
            if self.holdout_samples and len(calib) >= len(train):
                raise ValueError(
                    f"holdout_samples={self.holdout_samples}: the calibration draw "
                    f"(calib_samples={self.calib_samples}) already takes every one of the {len(train)} rows of the "
                    f"train split of task {self.task.name!r} ({self.task.train.path}), so no row is left to hold out. "
                    f"Lower calib_samples (at most {max(1, len(train) - self.holdout_samples)} leaves "
                    f"{min(self.holdout_samples, len(train) - 1)} rows held out), or set holdout_samples=0")
            self.calib_set = calib
            self._calib_fingerprint = None
            if self.holdout_samples:
                self.holdout_set = random_subset(train, self.holdout_samples, self.calib_seed, skip=self.calib_samples)
                if len(self.holdout_set) < self.holdout_samples:
                    log.info("task %r: %d of holdout_samples=%d training rows are left after the %d calibration rows",
                             self.task.name, len(self.holdout_set), self.holdout_samples, len(calib))
        if self.eval_sets is None:
            sets = [load_split(self.task, "dev", self.data_dir)]
            sets += [load_split(self.task, o, self.data_dir) for o in self.ood]
            if self.eval_samples is not None:
                sets = [random_subset(s, self.eval_samples, self.calib_seed) for s in sets]
            self.eval_sets = sets

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.calib_set, resumable=True)

    def holdout_dataloader(self) -> DataLoader | None:
        """The held-out training rows (``holdout_samples``), or ``None`` when there are none."""
        self.setup("fit")
        return self._loader(self.holdout_set) if self.holdout_set is not None and len(self.holdout_set) else None

    def val_dataloader(self) -> list[DataLoader]:
        self.setup("validate")
        return [self._loader(s) for s in self.eval_sets]

    def test_dataloader(self) -> list[DataLoader]:
        self.setup("test")
        return [self._loader(s) for s in self.eval_sets]

    def calibration_fingerprint(self) -> str:
        """``"sha256:<hex>"`` over the calibration rows, in order (their text and labels): another train file, or
        another draw of it, gives another fingerprint. ``TaskPruning`` records it in calibration checkpoints (a
        resume on other rows is refused) and in ``spec.meta["data"]``."""
        self.setup("fit")
        if self._calib_fingerprint is None:
            rows = self.calib_set.select_columns([*self.task.text_fields, "label"]).to_dict()
            text = json.dumps(rows, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
            self._calib_fingerprint = "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32]
        return self._calib_fingerprint

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
        """Evaluation loaders are plain; the calibration loader resumes mid-epoch (see :mod:`taskprune.lightning.loader`)."""
        if self._collator is None:
            self._collator = Collator(self.tokenizer, self.task.text_fields, self.max_length, self.task.regression)
        cls = CalibrationLoader if resumable else DataLoader
        return cls(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=self._collator)
