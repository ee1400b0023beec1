"""Tasks as data: a task definition (YAML) names its files, text and label columns, label names, metrics and
out-of-domain sets; :mod:`taskprune.lightning.data` reads the files with ``datasets.load_dataset``.

The eight GLUE tasks taskprune ships (``sst2``, ``mrpc``, ``qnli``, ``mnli``, ``qqp``, ``rte``, ``cola``, ``stsb``)
are definitions in this same format, one file each in this folder (``taskprune/tasks/<name>.yaml``). Your own task
is a YAML file passed by path (``--data.task my_task.yaml``) or the same mapping inline under ``data.task``::

    name: reviews                        # the task's name in metric keys (test/reviews/accuracy) and reports
    head: sst2                           # optional: the head of a multi-task model that reads it (default: name)
    problem_type: single_label_classification   # or regression (one float label, metrics pearson / spearman / mse)
    labels: [negative, positive]         # head output order; a model's own id2label is matched to these names
    metrics: [accuracy, f1]              # torchmetrics by name: see METRICS
    data_dir: .                          # optional: where relative file paths start (relative to this file)
    train:                               # the calibration split
      files: train.csv                   # one path or a list (csv, tsv, json, jsonl, parquet)
      text: [review]                     # one or two text columns (pairs: premise, hypothesis)
      label: stars                       # the label column
      label_map: {"1": negative, "2": negative, "4": positive, "5": positive}   # raw value -> label name
      drop: ["3"]                        # raw values whose rows are left out
    eval:                                # the in-domain evaluation split (same keys)
      files: dev.csv
      ...
    ood:                                 # optional: out-of-domain sets by name (ood/<name>/<metric>)
      shop: {files: shop.csv, text: [text], label: label}

A split may also name ``format`` (``csv`` / ``json`` / ``parquet``; default from the file extension, ``.tsv`` = csv
with a tab delimiter), ``read`` (keyword options of ``datasets.load_dataset`` for that format, e.g. GLUE's
``{quoting: 3}`` for unquoted TSV, ``{encoding: utf-8-sig}`` for a byte-order mark, ``{column_names: [...]}`` for a
file without a header), ``hub`` (``{name, config, split}``: a hub dataset instead of files), ``description`` (how
reports call it) and ``note``. Without ``label_map`` the raw labels must be the label names themselves. Unknown keys
are an error. Relative paths start at ``--data.data_dir`` when given, else at ``data_dir`` of the definition (relative
to its file; the shipped GLUE definitions point at the embedded subsets), else at the definition file's folder
(the working directory for an inline definition). ``head`` is for a taskprune multi-task model (``minilm-glue``):
the head that reads the task when its name is not a head's (``--model.head`` overrides it); metric keys and reports
keep ``name``. A sequence-classification model has one head: a ``head`` given with it is refused. The definition
file is read as UTF-8.

    task = get_task("sst2")                                  # or get_task("path/to/task.yaml") or get_task({...})
    metrics = task.make_metrics()
    metrics.update(task.predictions(logits), labels)         # logits [batch, n_labels] -> preds [batch]
"""

from __future__ import annotations

import codecs
import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torchmetrics
import yaml

ProblemType = Literal["single_label_classification", "regression"]
PROBLEM_TYPES = ("single_label_classification", "regression")
FORMATS = ("csv", "json", "parquet")
EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SHIPPED_DIR = Path(__file__).resolve().parent


def _metric_factories():
    from torchmetrics import classification as c
    from torchmetrics import regression as r

    return {  # name -> (problem types, factory(n_labels))
        "accuracy": ("classification", lambda n: c.MulticlassAccuracy(num_classes=n, average="micro")),
        "f1": ("binary", lambda n: c.BinaryF1Score()),  # F1 of label index 1 (MRPC / QQP)
        "macro_f1": ("classification", lambda n: c.MulticlassF1Score(num_classes=n, average="macro")),
        "matthews": ("classification", lambda n: c.MulticlassMatthewsCorrCoef(num_classes=n)),
        "pearson": ("regression", lambda n: r.PearsonCorrCoef()),
        "spearman": ("regression", lambda n: r.SpearmanCorrCoef()),
        "mse": ("regression", lambda n: r.MeanSquaredError()),
        "mae": ("regression", lambda n: r.MeanAbsoluteError()),
    }


METRICS: tuple[str, ...] = tuple(_metric_factories())
METRIC_NAMES = METRICS  # kept for callers of the earlier name


# ----------------------------------------------------------------------------------------------- definitions
@dataclass(frozen=True)
class HubSource:
    """A dataset on the Hugging Face hub: ``load_dataset(name, config, split=split)`` (needs the hub or its cache)."""

    name: str
    config: str | None = None
    split: str = "train"


@dataclass(frozen=True)
class Source:
    """One split of a task: where its rows come from and how their columns become text and labels.

    ``files`` are relative to the data folder (see the module docstring) unless absolute; ``read`` holds keyword
    options of ``datasets.load_dataset`` for ``format``; ``label_map`` maps a raw label (as a string) to a label
    index, ``None`` dropping the row; it is empty for regression (labels are read as floats).
    """

    files: tuple[str, ...]
    format: str
    text: tuple[str, ...]
    label: str
    label_map: tuple[tuple[str, int | None], ...] = ()
    read: tuple[tuple[str, Any], ...] = ()
    hub: HubSource | None = None
    description: str = ""
    note: str = ""

    @property
    def path(self) -> str:
        """The file (the first of several), or ``hub:<name>[/<config>]:<split>``: for reports and fingerprints."""
        if self.hub is not None:
            return f"hub:{self.hub.name}{'/' + self.hub.config if self.hub.config else ''}:{self.hub.split}"
        return self.files[0]

    @property
    def split(self) -> str:
        """How reports call this split ("dev", "train sample"...): :attr:`description` (the earlier name)."""
        return self.description

    @property
    def label_dict(self) -> dict[str, int | None]:
        return dict(self.label_map)

    @property
    def read_options(self) -> dict[str, Any]:
        """Keyword options of ``datasets.load_dataset`` (lists as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.read}


@dataclass(frozen=True)
class EvalSet:
    """A named evaluation set: ``name`` is the key in metric names (``ood/<name>/accuracy``)."""

    name: str
    file: Source


@dataclass(frozen=True)
class Task:
    """One task: label names (head output order), problem type, metrics, its calibration / evaluation splits and
    out-of-domain sets. Rows load as columns ``sentence`` (or ``sentence1`` / ``sentence2``), ``label``, ``idx``."""

    name: str
    label_names: tuple[str, ...]  # index order = head output order; ("score",) for regression
    metrics: tuple[str, ...]
    train: Source
    eval: Source
    ood: tuple[EvalSet, ...] = field(default=())
    problem_type: ProblemType = "single_label_classification"
    root: Path | None = None  # where relative paths start when no data_dir is given (None: the working directory)
    origin: str = "inline"  # the definition's file, or "inline"
    definition: dict = field(default_factory=dict, compare=False, repr=False)  # the plain mapping it was read from
    head: str | None = None  # the multi-task model's head that reads this task (None: the head named like the task)

    @property
    def regression(self) -> bool:
        return self.problem_type == "regression"

    @property
    def text_fields(self) -> tuple[str, ...]:
        """Columns of the loaded rows: ``("sentence",)`` or ``("sentence1", "sentence2")``."""
        return ("sentence",) if len(self.train.text) == 1 else ("sentence1", "sentence2")

    @property
    def dev(self) -> Source:
        """The evaluation split (:attr:`eval`; the earlier name)."""
        return self.eval

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

    def source(self, split: str) -> Source:
        """``split``: ``"train"``, ``"eval"`` (or ``"dev"``) or the name of an out-of-domain set."""
        if split == "train":
            return self.train
        if split in ("eval", "dev"):
            return self.eval
        return self.ood_set(split).file

    def ood_set(self, name: str) -> EvalSet:
        for s in self.ood:
            if s.name == name:
                return s
        raise ValueError(
            f"task {self.name!r} has no out-of-domain set {name!r}; known: {list(self.ood_names)}. "
            "Pass ood=[] for none or a subset of the known names, or add the set under `ood:` in the task definition."
        )

    def make_metrics(self) -> torchmetrics.MetricCollection:
        """Fresh metrics keyed by name; ``update(preds, target)`` takes :meth:`predictions` and the labels."""
        make = _metric_factories()
        return torchmetrics.MetricCollection({m: make[m][1](self.n_labels) for m in self.metrics})

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

    def data_root(self, data_dir: str | os.PathLike | None = None) -> Path:
        """Where relative file paths start: ``data_dir`` when given, else the definition's own folder."""
        if data_dir is not None:
            return Path(data_dir)
        return self.root if self.root is not None else Path.cwd()


# ---------------------------------------------------------------------------------------------- reading YAML
TASK_KEYS = ("name", "head", "problem_type", "labels", "metrics", "data_dir", "train", "eval", "ood", "description")
SOURCE_KEYS = ("files", "format", "read", "hub", "text", "label", "label_map", "drop", "description", "note")
HUB_KEYS = ("name", "config", "split")


def _check_keys(d: Any, allowed: tuple[str, ...], required: tuple[str, ...], where: str) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping with keys {list(allowed)}, got {type(d).__name__} {d!r}")
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {list(allowed)}. Check the spelling.")
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing} (required: {list(required)}).")
    return d


YAML_BOOL_HINT = ("YAML 1.1 reads an unquoted yes / no / on / off / true / false as a boolean; quote it "
                  "(e.g. 'yes': positive, or drop: ['no'])")


def _str_list(value: Any, what: str, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if isinstance(items, (list, tuple)) and any(isinstance(x, bool) for x in items):
        raise ValueError(f"{where}: {what} {list(items)!r} holds a boolean, not a name: {YAML_BOOL_HINT}.")
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(x, str) and x for x in items):
        raise ValueError(f"{where}: {what} must be a name or a non-empty list of names, got {value!r}")
    return tuple(items)


def raw_key(raw: Any) -> str:
    """A raw label as the key of a label map: ``1``, ``1.0`` and ``" 1 "`` are all ``"1"``; ``True`` is ``"true"``."""
    if isinstance(raw, bool):
        return str(raw).lower()
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    return str(raw).strip()


def _refuse_colliding_keys(keys: list, where: str) -> None:
    """``ValueError`` when two keys are one raw label after :func:`raw_key` (``1``, ``"1"``, ``" 1 "``): the map
    would keep the last silently."""
    groups: dict[str, list] = {}
    for k in keys:
        groups.setdefault(raw_key(k), []).append(k)
    clash = {key: ks for key, ks in groups.items() if len(ks) > 1}
    if clash:
        key, ks = next(iter(clash.items()))
        raise ValueError(f"{where}: keys {', '.join(repr(k) for k in ks)} are all the raw label {key!r} (numbers, "
                         "their text and surrounding spaces read alike), so only the last would count; keep one "
                         "key per raw label.")


def _source(d: Any, where: str, labels: tuple[str, ...], regression: bool, default_description: str) -> Source:
    d = _check_keys(d, SOURCE_KEYS, ("text", "label"), where)
    if (d.get("files") is None) == (d.get("hub") is None):
        raise ValueError(f"{where}: give either `files` (local files) or `hub` (a hub dataset), not "
                         f"{'both' if d.get('files') is not None else 'neither'}.")
    hub, files = None, ()
    if d.get("hub") is not None:
        h = d["hub"] if isinstance(d["hub"], dict) else {"name": d["hub"]}
        h = _check_keys(h, HUB_KEYS, ("name",), f"{where}.hub")
        hub = HubSource(str(h["name"]), None if h.get("config") is None else str(h["config"]),
                        str(h.get("split") or "train"))
    else:
        files = _str_list(d["files"], "files", where)
    fmt = d.get("format")
    if fmt is None and files:
        kinds = {EXTENSIONS.get(Path(f).suffix.lower()) for f in files}
        if None in kinds or len(kinds) > 1:
            raise ValueError(f"{where}: cannot tell the format of {list(files)} from the extension(s) (known: "
                             f"{sorted(EXTENSIONS)}); set `format:` to one of {list(FORMATS)}.")
        fmt = kinds.pop()
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"{where}: unknown format {fmt!r}; allowed: {list(FORMATS)}")
    read = d.get("read") or {}
    if not isinstance(read, dict):
        raise ValueError(f"{where}.read must be a mapping of datasets.load_dataset options, got {read!r}")
    if files and fmt == "csv" and all(Path(f).suffix.lower() == ".tsv" for f in files):
        read = {"delimiter": "\t", **read}
    read = {str(k): tuple(v) if isinstance(v, list) else v for k, v in read.items()}  # hashable: Task is frozen
    text = _str_list(d["text"], "text", where)
    if len(text) not in (1, 2):
        raise ValueError(f"{where}: text names {len(text)} columns {list(text)}; give one (a sentence) or two "
                         "(a pair).")
    if len(set(text)) != len(text):
        raise ValueError(f"{where}: text names the same column twice {list(text)}; a pair needs two columns.")
    if not isinstance(d["label"], str):
        raise ValueError(f"{where}: label must be a column name, got {d['label']!r}")
    label_map: dict[str, int | None] = {}
    drop = d.get("drop") or []
    if not isinstance(drop, list):
        raise ValueError(f"{where}: drop must be a list of raw label values, got {drop!r}")
    if regression:
        if d.get("label_map") is not None or drop:
            raise ValueError(f"{where}: label_map / drop are for classification; a regression task reads its label "
                             "column as numbers. Remove them or set problem_type: single_label_classification.")
    else:
        raw_map = d.get("label_map")
        if raw_map is None:
            raw_map = {n: n for n in labels}
        if not isinstance(raw_map, dict):
            raise ValueError(f"{where}: label_map must map raw values to label names, got {raw_map!r}")
        for raw, name in raw_map.items():
            if isinstance(raw, bool) or isinstance(name, bool):
                raise ValueError(f"{where}: label_map entry {raw!r}: {name!r} holds a boolean, not a raw label / "
                                 f"label name: {YAML_BOOL_HINT}.")
        _refuse_colliding_keys(list(raw_map), f"{where}: label_map")
        if any(isinstance(raw, bool) for raw in drop):
            raise ValueError(f"{where}: drop {drop!r} holds a boolean, not a raw label: {YAML_BOOL_HINT}.")
        for raw, name in raw_map.items():
            if name not in labels:
                raise ValueError(f"{where}: label_map maps {raw!r} to {name!r}, which is not a label of the task; "
                                 f"labels: {list(labels)} (list values to leave out under `drop:`).")
            label_map[raw_key(raw)] = labels.index(name)
        for raw in drop:
            if raw_key(raw) in label_map:
                raise ValueError(f"{where}: {raw!r} is both in label_map and in drop; keep one.")
            label_map[raw_key(raw)] = None
    return Source(files, fmt or "", text, d["label"], tuple(label_map.items()), tuple(read.items()), hub,
                  str(d.get("description") or default_description), str(d.get("note") or ""))


def task_from_dict(d: Any, root: str | os.PathLike | None = None, origin: str = "inline") -> Task:
    """Build a :class:`Task` from a definition mapping (see the module docstring); ``ValueError`` naming the key
    on any unknown or missing key or bad value. ``root``: the folder relative ``data_dir`` / paths start at."""
    where = f"task definition {origin}" if origin != "inline" else "inline task definition"
    d = _check_keys(d, TASK_KEYS, (), where)
    regression = d.get("problem_type") == "regression"
    _check_keys(d, TASK_KEYS, ("name", *(() if regression else ("labels",)), "metrics", "train", "eval"), where)
    name = d["name"]
    if not isinstance(name, str) or not name or any(c in name for c in "/\\ "):
        raise ValueError(f"{where}: name must be a word (it becomes a metric key), got {name!r}")
    head = d.get("head")
    if head is not None and (not isinstance(head, str) or not head or any(c in head for c in "/\\ ")):
        raise ValueError(f"{where}: head must be the name of a head of the multi-task model (a word, e.g. sst2), "
                         f"got {head!r}")
    problem = d.get("problem_type", "single_label_classification")
    if problem not in PROBLEM_TYPES:
        raise ValueError(f"{where}: unknown problem_type {problem!r}; allowed: {list(PROBLEM_TYPES)}")
    labels = _str_list(d.get("labels", ["score"] if regression else None), "labels", where)
    if regression and len(labels) != 1:
        raise ValueError(f"{where}: a regression task has one output; labels must be one name, got {list(labels)}")
    if not regression and len(labels) < 2:
        raise ValueError(f"{where}: a classification task needs at least two labels, got {list(labels)}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"{where}: labels {list(labels)} repeat a name")
    metrics = _str_list(d["metrics"], "metrics", where)
    factories = _metric_factories()
    for m in metrics:
        if m not in factories:
            raise ValueError(f"{where}: unknown metric {m!r}; allowed: {list(factories)}")
        kind = factories[m][0]
        if (kind == "regression") != regression or (kind == "binary" and len(labels) != 2):
            need = {"regression": "a regression task", "binary": "two labels", "classification": "classification"}
            raise ValueError(f"{where}: metric {m!r} needs {need[kind]}; task {name!r} is {problem} with labels "
                             f"{list(labels)}")
    base = Path(root) if root is not None else None
    if d.get("data_dir") is not None:
        dd = Path(str(d["data_dir"]))
        base = (dd if dd.is_absolute() or base is None else base / dd).resolve()
    train = _source(d["train"], f"{where}: train", labels, regression, "train")
    evals = _source(d["eval"], f"{where}: eval", labels, regression, "eval")
    ood_map = d.get("ood") or {}
    if not isinstance(ood_map, dict):
        raise ValueError(f"{where}: ood must map set names to splits ({{name: {{files, text, label}}}}), got "
                         f"{ood_map!r}")
    ood = tuple(EvalSet(str(k), _source(v, f"{where}: ood.{k}", labels, regression, "out-of-domain"))
                for k, v in ood_map.items())
    for s in (evals, *(o.file for o in ood)):
        if len(s.text) != len(train.text):
            raise ValueError(f"{where}: train has {len(train.text)} text column(s) {list(train.text)} but another "
                             f"split has {len(s.text)} {list(s.text)}; every split needs the same number.")
    return Task(name, labels, metrics, train, evals, ood, problem, base, origin, copy.deepcopy(d), head)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key repeated in one mapping (``1`` and ``1.0`` too): PyYAML keeps the last."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: SafeLoader's own error follows
                if first is not key_node:
                    bools = [n.value for n in (first, key_node) if isinstance(self.construct_object(n), bool)]
                    hint = (f" ({bools[0]} is read as a boolean, which equals 1 or 0: {YAML_BOOL_HINT})" if bools
                            else "")
                    raise _RepeatedKey(f"line {key_node.start_mark.line + 1}: key {key_node.value} repeats key "
                                       f"{first.value} of line {first.start_mark.line + 1} in one mapping (YAML would "
                                       f"keep only the last, silently){hint}; keep one")
        return super().construct_mapping(node, deep)


class _RepeatedKey(ValueError):
    pass


def load_task_file(path: str | os.PathLike) -> Task:
    """Read one task definition file (YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"task definition file {str(path)!r} not found; pass a shipped task name "
                         f"({sorted(TASKS)}), a YAML file, or an inline mapping.")
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0  # a byte-order mark is fine
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        line = raw[:at].count(b"\n") + 1
        raise ValueError(f"task definition file {str(path)!r} is not UTF-8: byte 0x{raw[at]:02x} at position {at} "
                         f"(line {line}) is not valid UTF-8 (a latin-1 / Windows-1252 file?); save it as UTF-8.") \
            from None
    try:
        d = yaml.load(text, Loader=_UniqueKeyLoader)
    except _RepeatedKey as e:
        raise ValueError(f"task definition file {str(path)!r}, {e}.") from None
    except yaml.YAMLError as e:
        raise ValueError(f"task definition file {str(path)!r} is not valid YAML: {e}") from None
    return task_from_dict(d, root=path.resolve().parent, origin=str(path))


def _shipped() -> dict[str, Task]:
    tasks = {}
    for f in sorted(SHIPPED_DIR.glob("*.yaml")):
        t = load_task_file(f)
        tasks[t.name] = t
    return tasks


TASKS: dict[str, Task] = {}
TASKS.update(_shipped())


def get_task(task: str | dict | Task) -> Task:
    """A :class:`Task` from a shipped name (``sst2``...), a definition file (``*.yaml``) or an inline mapping."""
    if isinstance(task, Task):
        return task
    if isinstance(task, dict):
        return task_from_dict(task)
    if isinstance(task, str):
        if task.lower() in TASKS:
            return TASKS[task.lower()]
        if task.endswith((".yaml", ".yml")) or os.sep in task or Path(task).is_file():
            return load_task_file(task)
    raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}. Your own task: pass the path of a "
                     "task definition file (.yaml) or the definition inline (see taskprune.tasks).")


__all__ = ["Task", "Source", "EvalSet", "HubSource", "TASKS", "METRICS", "get_task", "task_from_dict",
           "load_task_file", "raw_key"]
