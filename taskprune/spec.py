"""PruneSpec: which structured units of each block a pruned model keeps.

A spec is a *recipe* (kept indices per block), not a pickled model: it is saved as JSON, checked against a model's
:meth:`taskprune.arch.Architecture.fingerprint`, and replayed on a fresh dense model by
:func:`taskprune.surgery.apply_mask` (reversible gates) or :func:`taskprune.surgery.shrink_` (physical removal).

``keep[kind][block_name]`` lists the kept unit indices of one block, sorted and unique (``kind`` is ``"heads"`` --
one unit is a KV group, i.e. one head for multi-head attention -- or ``"neurons"``). A block, or a whole kind, that is
absent from ``keep`` keeps all its units.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from taskprune.arch import UNIT_KINDS, find_base, get_architecture
from taskprune.io import atomic_write_json

FORMAT = "taskprune.spec/1"

# fingerprint fields compared by PruneSpec.validate, besides the unit counts ("heads", "neurons")
_SHAPE_FIELDS = ("head_dim", "group_size", "d_model", "gated")
#: config field set by :func:`taskprune.surgery.shrink_`: the :meth:`PruneSpec.identity` of the spec that shrank it
SHRUNK_BY = "taskprune_spec_id"


@dataclass
class PruneSpec:
    """Kept unit indices per block, for the model whose fingerprint is ``fingerprint`` (dense widths).

    Args:
        keep: ``{"heads" | "neurons": {block_name: sorted kept unit indices}}``; absent blocks keep everything.
        fingerprint: :meth:`taskprune.arch.Architecture.fingerprint` of the dense model the spec was made for.
        method: the scoring method that produced the spec (informative).
        budget: the budget it was selected under (informative, JSON-serialisable).
        meta: anything else worth keeping with it (JSON-serialisable). The Lightning callback records ``task`` (the
            task's name) and ``weights`` (:func:`weights_fingerprint` of the dense model) and refuses at ``test`` a
            spec recorded for another task or other weights.
        scales: ``{kind: {block_name: [one float per kept unit, in keep order]}}``: real-valued unit scales (mask
            tuning, :mod:`taskprune.tuning`); absent blocks have scale 1. :func:`taskprune.tuning.fold_scales_`
            folds them into the weights, after which the spec needs none.
        columns: ``{kind: {block_name: tensor [kept units x unit width, d_out]}}``: refitted weights of the kept
            units' input columns of the block's output / down projection (``TuningConfig(fit="columns")``, K-prune's
            weight tuning), in :func:`taskprune.arch.weight_in_out` orientation; exclusive with ``scales``.
            :meth:`save` writes them beside the JSON (``<stem>.columns.safetensors``, its sha256 in the JSON);
            :func:`taskprune.tuning.fold_scales_` writes them into the weights.
        biases: ``{kind: {block_name: tensor [d_out]}}``: the refitted output bias of the block's output / down
            projection (``TuningConfig(fit="bias")`` or ``"columns_bias"``: FLAP's bias compensation of the removed
            units' mean output, as a least-squares intercept); exclusive with ``scales``; saved in the same file as the
            columns. :func:`taskprune.tuning.fold_scales_` writes them, adding a bias to a projection that had none
            (recorded in ``meta["added_biases"]`` for :func:`taskprune.export.load_pruned`).

    Example::

        spec = PruneSpec(keep={"heads": {"encoder.layer.0.attention.self": [0, 2]}},
                         fingerprint=get_architecture(model).fingerprint())
        spec.save("spec.json")
        shrink_(fresh_model, PruneSpec.load("spec.json"))
    """

    keep: dict[str, dict[str, list[int]]]
    fingerprint: dict
    method: str = ""
    budget: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    scales: dict = field(default_factory=dict)
    columns: dict = field(default_factory=dict, compare=False)  # tensors; in save()'s sidecar, not to_dict()
    biases: dict = field(default_factory=dict, compare=False)  # tensors; in the same sidecar

    def __post_init__(self) -> None:
        if not isinstance(self.fingerprint, dict):
            raise TypeError(
                f"fingerprint must be a dict (Architecture.fingerprint()), got {type(self.fingerprint).__name__}; "
                "build it with taskprune.get_architecture(model).fingerprint()"
            )
        missing = [k for k in ("model_type", *UNIT_KINDS) if k not in self.fingerprint]
        if missing:
            raise ValueError(
                f"fingerprint lacks field(s) {missing}; expected the dict returned by "
                "taskprune.get_architecture(model).fingerprint()"
            )
        if not isinstance(self.keep, dict):
            raise TypeError(f"keep must be a dict {{kind: {{block: [indices]}}}}, got {type(self.keep).__name__}")
        for name, value in (("method", self.method), ("budget", self.budget), ("meta", self.meta)):
            expected = str if name == "method" else dict
            if not isinstance(value, expected):
                raise TypeError(f"{name} must be a {expected.__name__}, got {type(value).__name__}")
        self.keep = {kind: self._check_kind(kind, blocks) for kind, blocks in self.keep.items()}
        if not isinstance(self.scales, dict):
            raise TypeError(f"scales must be a dict {{kind: {{block: [one float per kept unit]}}}}, got "
                            f"{type(self.scales).__name__} ({_short(self.scales)}); fix it, or remove 'scales' "
                            "(scale 1 everywhere)")
        self.scales = {kind: self._check_scales(kind, blocks) for kind, blocks in self.scales.items()}
        if not isinstance(self.columns, dict):
            raise TypeError(f"columns must be a dict {{kind: {{block: tensor}}}}, got {type(self.columns).__name__}")
        if not isinstance(self.biases, dict):
            raise TypeError(f"biases must be a dict {{kind: {{block: tensor}}}}, got {type(self.biases).__name__}")
        if (self.columns or self.biases) and self.scales:
            raise ValueError("a spec holds scales or refitted columns / biases, not both (fold one into the weights "
                             "first)")
        self.columns = {kind: self._check_columns(kind, blocks) for kind, blocks in self.columns.items()}
        self.biases = {kind: self._check_biases(kind, blocks) for kind, blocks in self.biases.items()}

    def _check_biases(self, kind: str, blocks) -> dict[str, torch.Tensor]:
        return self._check_tensors("biases", kind, blocks, 1, "[d_out]")

    def _check_columns(self, kind: str, blocks) -> dict[str, torch.Tensor]:
        return self._check_tensors("columns", kind, blocks, 2, "[kept units x unit width, d_out]")

    def _check_tensors(self, field_name: str, kind: str, blocks, dim: int, shape: str) -> dict[str, torch.Tensor]:
        """A ``{block: tensor}`` of refitted weights (``columns``, one row per input channel of each kept unit) or
        biases: finite float tensors of ``dim`` dimensions, on the CPU in float32."""
        _check_kind_name(kind)
        if not isinstance(blocks, dict):
            raise TypeError(f"{field_name}[{kind!r}] must be a dict {{block: tensor}}, got {type(blocks).__name__}")
        out = {}
        for name, t in blocks.items():
            where = f"{field_name}[{kind!r}][{name!r}]"
            self._check_block(kind, name)
            if not isinstance(t, torch.Tensor) or t.dim() != dim or not t.is_floating_point():
                raise TypeError(f"{where} must be a {dim}-D float tensor {shape}, got {_short(t)}")
            if field_name == "columns":
                n_kept = len(self.kept(kind, name))
                if n_kept == 0 or t.shape[0] % n_kept:
                    raise ValueError(f"{where} has {t.shape[0]} rows for {n_kept} kept unit(s); expected a multiple "
                                     "of the kept units (one row per input channel of each kept unit)")
            if not torch.isfinite(t).all():
                raise ValueError(f"{where} holds non-finite values; refit the spec")
            out[name] = t.detach().float().cpu()
        return out

    def _check_scales(self, kind: str, blocks) -> dict[str, list[float]]:
        if kind not in UNIT_KINDS:
            raise ValueError(f"scales names unit kind {kind!r}; allowed: {list(UNIT_KINDS)} (scales must be "
                             "{kind: {block: [floats]}})")
        if not isinstance(blocks, dict):
            raise TypeError(f"scales[{kind!r}] is a {type(blocks).__name__} ({_short(blocks)}), not a dict "
                            "{block: [one float per kept unit]}; fix it, or remove it (scale 1)")
        out = {}
        for name, values in blocks.items():
            where = f"scales[{kind!r}][{name!r}]"
            if name not in self.fingerprint[kind]:
                known = list(self.fingerprint[kind])
                raise ValueError(f"{where} names a block the model does not have (its {kind} blocks: {known[:4]}"
                                 f"{' ...' if len(known) > 4 else ''}); remove it, or fix the block name")
            n_kept = len(self.kept(kind, name))
            fix = (f"give one finite scale per kept unit ({n_kept}, a list in keep order), or remove the block from "
                   "scales (scale 1)")
            if not isinstance(values, (list, tuple)):
                raise TypeError(f"{where} is a {type(values).__name__} ({_short(values)}), not a list; {fix}")
            bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Real)]
            if bad:
                raise TypeError(f"{where} holds non-number value(s) {', '.join(_short(v) for v in bad[:3])}; {fix}")
            values = [float(v) for v in values]
            if len(values) != n_kept:
                raise ValueError(f"{where} has {len(values)} value(s) for {n_kept} kept unit(s); {fix}")
            nonfinite = [v for v in values if not math.isfinite(v)]
            if nonfinite:
                raise ValueError(f"{where} holds non-finite value(s) {nonfinite[:3]}; {fix}")
            out[name] = values
        return out

    def scale_of(self, kind: str, name: str) -> list[float]:
        """Scales of one block's kept units (all 1 when the spec has none for it)."""
        return list(self.scales.get(kind, {}).get(name, [1.0] * len(self.kept(kind, name))))

    def _check_kind(self, kind: str, blocks) -> dict[str, list[int]]:
        if kind not in UNIT_KINDS:
            raise ValueError(f"unknown unit kind {kind!r} in keep; allowed: {list(UNIT_KINDS)}")
        if not isinstance(blocks, dict):
            raise TypeError(f"keep[{kind!r}] must be a dict {{block_name: [indices]}}, got {type(blocks).__name__}")
        widths = self.fingerprint[kind]
        out = {}
        for name, idx in blocks.items():
            if name not in widths:
                known = list(widths)
                raise ValueError(
                    f"keep[{kind!r}] names block {name!r}, which the model does not have; its {kind} blocks are "
                    f"{known[:4]}{' ...' if len(known) > 4 else ''} ({len(known)} in all). Was the spec made for "
                    "another model?"
                )
            out[name] = _check_indices(kind, name, idx, widths[name])
        return out

    # ------------------------------------------------------------------ queries
    def kept(self, kind: str, name: str) -> list[int]:
        """Kept unit indices of one block (all of them when the spec does not name it)."""
        self._check_block(kind, name)
        blocks = self.keep.get(kind, {})
        return list(blocks[name]) if name in blocks else list(range(self.fingerprint[kind][name]))

    def drop(self, kind: str, name: str) -> list[int]:
        """Removed unit indices of one block, sorted."""
        kept = set(self.kept(kind, name))
        return [i for i in range(self.fingerprint[kind][name]) if i not in kept]

    def n_total(self, kind: str) -> int:
        """Units of ``kind`` in the dense model."""
        _check_kind_name(kind)
        return sum(self.fingerprint[kind].values())

    def n_kept(self, kind: str) -> int:
        """Units of ``kind`` the spec keeps, over all blocks."""
        _check_kind_name(kind)
        return sum(len(self.kept(kind, name)) for name in self.fingerprint[kind])

    def summary(self) -> dict:
        """``{kind: {"kept", "total", "dropped", "blocks_pruned"}}``: unit counts per kind."""
        out = {}
        for kind in UNIT_KINDS:
            kept, total = self.n_kept(kind), self.n_total(kind)
            pruned = sum(1 for name in self.fingerprint[kind] if self.drop(kind, name))
            out[kind] = {"kept": kept, "total": total, "dropped": total - kept, "blocks_pruned": pruned}
        return out

    def shrunk_fingerprint(self) -> dict:
        """The fingerprint of the model after :func:`taskprune.surgery.shrink_` (kept units per block)."""
        fp = json.loads(json.dumps(self.fingerprint))  # deep copy of plain JSON
        for kind in UNIT_KINDS:
            fp[kind] = {name: len(self.kept(kind, name)) for name in self.fingerprint[kind]}
        return fp

    def identity(self) -> str:
        """``"sha256:<hex>"`` of what :func:`~taskprune.surgery.shrink_` does with this spec: the dense fingerprint and
        every block's removed indices. Equal for two specs that cut the same units (scales, method, budget and meta
        aside); ``shrink_`` records it in the model's config (``config.taskprune_spec_id``)."""
        drop = {kind: {name: self.drop(kind, name) for name in self.fingerprint[kind] if self.drop(kind, name)}
                for kind in UNIT_KINDS}
        text = json.dumps({"fingerprint": self.fingerprint, "drop": drop}, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32]

    def _check_block(self, kind: str, name: str) -> None:
        _check_kind_name(kind)
        if name not in self.fingerprint[kind]:
            known = list(self.fingerprint[kind])
            raise ValueError(f"no {kind} block named {name!r} in this spec's model; its blocks: {known}")

    # ------------------------------------------------------------------ model check
    def validate(self, model: nn.Module) -> str:
        """Check that the spec fits ``model`` (a HF model or a module holding one).

        Returns ``"dense"`` when the model has the widths the spec was made for, ``"shrunk"`` when it already has the
        widths this spec leaves (a spec that drops nothing gives ``"dense"``). Raises ``ValueError`` naming the first
        differences otherwise, and for a model that :func:`~taskprune.surgery.shrink_` shrank by *another* spec of
        the same widths (its ``config.taskprune_spec_id``): this spec's indices would describe other units.
        """
        fp = get_architecture(model).fingerprint()
        if _same(fp, self.fingerprint):
            return "dense"
        shrunk = self.shrunk_fingerprint()
        if _same(fp, shrunk):
            recorded = getattr(getattr(find_base(model)[0], "config", None), SHRUNK_BY, None)
            if recorded is not None and recorded != self.identity():
                raise ValueError(
                    f"this model was shrunk by another spec ({recorded}; this one is {self.identity()}): the widths "
                    "match but the kept units differ, so this spec's indices would describe other weights. Pass the "
                    "spec given to shrink_, or apply this one to a fresh copy of the dense model"
                )
            return "shrunk"
        diffs = fingerprint_diff(self.fingerprint, fp)
        also = ""
        if not fingerprint_diff(
            {k: v for k, v in self.fingerprint.items() if k not in UNIT_KINDS},
            {k: v for k, v in fp.items() if k not in UNIT_KINDS},
        ):
            also = " (the model has the same shape but other widths: was it shrunk by another spec?)"
        raise ValueError(
            f"this spec was made for another model{also}: {'; '.join(diffs[:5])}"
            f"{f'; ... {len(diffs) - 5} more' if len(diffs) > 5 else ''}. Use a spec made for this model, or apply "
            "it to a fresh copy of the model it was made for."
        )

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = {"format": FORMAT, "keep": self.keep, "fingerprint": self.fingerprint, "method": self.method,
             "budget": self.budget, "meta": self.meta}
        if self.scales:
            d["scales"] = self.scales
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "the given dict") -> PruneSpec:
        if not isinstance(d, dict):
            raise ValueError(f"{source} holds a JSON {type(d).__name__}, not a taskprune spec object")
        if d.get("format") != FORMAT:
            raise ValueError(
                f"{source} has format {d.get('format')!r}; expected {FORMAT!r}. It is not a taskprune spec, or was "
                "written by an incompatible version"
            )
        missing = [k for k in ("keep", "fingerprint") if k not in d]
        if missing:
            raise ValueError(f"{source} lacks field(s) {missing}; a spec needs 'keep' and 'fingerprint'")
        try:
            return cls(keep=d["keep"], fingerprint=d["fingerprint"], method=d.get("method", ""),
                       budget=d.get("budget", {}), meta=d.get("meta", {}), scales=d.get("scales", {}))
        except (TypeError, ValueError) as e:
            if source == "the given dict":
                raise
            raise type(e)(f"{source}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the spec as JSON (atomically: readers see the old file or the new one); refitted ``columns`` and
        ``biases`` go to ``<stem>.columns.safetensors`` beside it first, the JSON naming the file and its sha256."""
        d = self.to_dict()
        try:
            json.dumps(d)
        except TypeError as e:
            raise TypeError(f"spec is not JSON-serialisable ({e}); budget and meta may hold only plain JSON values")
        if self.columns or self.biases:
            from safetensors.torch import save as st_save

            from taskprune.io import atomic_write_bytes

            sidecar = columns_file(path)
            tensors = {f"{k}/{n}": t.contiguous() for k, blocks in self.columns.items() for n, t in blocks.items()}
            tensors.update({f"{BIAS_KEY}/{k}/{n}": t.contiguous() for k, blocks in self.biases.items()
                            for n, t in blocks.items()})
            data = st_save(tensors)
            atomic_write_bytes(sidecar, data)
            d["columns"] = {"file": sidecar.name, "sha256": hashlib.sha256(data).hexdigest()}
        atomic_write_json(path, d, compact=True)  # kilobytes per task, not one line per kept index

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruneSpec:
        """Read a spec written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no spec file at {str(path)!r}; pass the path given to PruneSpec.save")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(
                f"{str(path)!r} is not valid JSON ({e}); the file is truncated or not a spec. Write it again with "
                "PruneSpec.save"
            ) from None
        ref = d.pop("columns", None) if isinstance(d, dict) else None
        spec = cls.from_dict(d, source=repr(str(path)))
        if ref is not None:
            columns, biases = _read_columns(path, ref)
            if spec.scales:
                raise ValueError(f"{str(path)!r}: a spec holds scales or refitted columns / biases, not both (fold one "
                                 "into the weights first)")
            spec.columns = {kind: spec._check_columns(kind, blocks) for kind, blocks in columns.items()}
            spec.biases = {kind: spec._check_biases(kind, blocks) for kind, blocks in biases.items()}
        return spec


def columns_file(path: str | os.PathLike) -> Path:
    """Where :meth:`PruneSpec.save` writes the refitted columns of the spec saved at ``path``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.columns.safetensors")


#: the key prefix of the refitted biases in the tensor file beside a spec (``bias/<kind>/<block>``)
BIAS_KEY = "bias"


def _read_columns(path: Path, ref) -> tuple[dict, dict]:
    """``(columns, biases)`` of the spec JSON at ``path`` from the file its ``ref`` names, checked against its
    sha256."""
    from safetensors.torch import load as st_load

    if not isinstance(ref, dict) or not isinstance(ref.get("file"), str) or not isinstance(ref.get("sha256"), str):
        raise ValueError(f"{str(path)!r}: 'columns' must be {{'file': ..., 'sha256': ...}} as PruneSpec.save writes it")
    sidecar = path.with_name(Path(ref["file"]).name)
    if not sidecar.is_file():
        raise FileNotFoundError(f"{str(path)!r} names its refitted columns {str(sidecar)!r}, which is missing; copy "
                                "it with the spec, or fit the spec again")
    data = sidecar.read_bytes()
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise ValueError(f"{str(sidecar)!r} is not the columns file {str(path)!r} was saved with (sha256 differs: "
                         "truncated, or from another spec); copy both files of one save together")
    columns: dict = {}
    biases: dict = {}
    for key, t in st_load(data).items():
        kind, _, name = key.partition("/")
        if kind == BIAS_KEY:
            kind, _, name = name.partition("/")
            biases.setdefault(kind, {})[name] = t
        else:
            columns.setdefault(kind, {})[name] = t
    return columns, biases


def _short(value, n: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _check_kind_name(kind: str) -> None:
    if kind not in UNIT_KINDS:
        raise ValueError(f"unknown unit kind {kind!r}; allowed: {list(UNIT_KINDS)}")


def _check_indices(kind: str, name: str, idx, n_units: int) -> list[int]:
    where = f"keep[{kind!r}][{name!r}]"
    if not isinstance(idx, (list, tuple)):
        raise TypeError(f"{where} must be a list of ints, got {type(idx).__name__}; use tensor.tolist()")
    bad = [i for i in idx if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if bad:
        raise TypeError(f"{where} holds non-integer value(s) {bad[:5]}; kept unit indices must be ints")
    idx = [int(i) for i in idx]
    out = [i for i in idx if not 0 <= i < n_units]
    if out:
        raise ValueError(
            f"{where} holds index(es) {out[:5]} out of range; this block has {n_units} {kind} "
            f"(indices 0..{n_units - 1})"
        )
    if len(set(idx)) != len(idx):
        dup = sorted({i for i in idx if idx.count(i) > 1})
        raise ValueError(f"{where} holds duplicate index(es) {dup[:5]}; each kept unit must be listed once")
    if idx != sorted(idx):
        raise ValueError(f"{where} is not sorted ({idx[:8]}...); list kept unit indices in increasing order")
    return idx


def _same(a: dict, b: dict) -> bool:
    return not fingerprint_diff(a, b)


def fingerprint_diff(expected: dict, actual: dict) -> list[str]:
    """Human-readable differences between two fingerprints (``expected``: the spec's, ``actual``: the model's)."""
    diffs = []
    if expected.get("model_type") != actual.get("model_type"):
        diffs.append(f"model_type: spec says {expected.get('model_type')!r}, model has {actual.get('model_type')!r}")
    for key in (*UNIT_KINDS, *_SHAPE_FIELDS):
        if key not in expected and key not in actual:
            continue
        e, a = expected.get(key, {}), actual.get(key, {})
        label = {"heads": "heads (KV groups)"}.get(key, key)
        if set(e) != set(a):  # compare as sets: a spec loaded from JSON has its keys sorted
            if len(e) != len(a):
                diffs.append(f"number of blocks with {label}: spec says {len(e)}, model has {len(a)}")
            else:
                only = [n for n in e if n not in a]
                diffs.append(f"block names differ for {label}: spec has {only[:3]}, which the model lacks")
            continue
        for name in e:
            if e[name] != a[name]:
                diffs.append(f"{label} of block {name!r}: spec says {e[name]}, model has {a[name]}")
    return diffs


def weights_fingerprint(model: nn.Module, n_tensors: int = 8, n_values: int = 4096) -> str:
    """``"sha256:<hex>"`` over a strided sample of ``n_values`` values from each of ``n_tensors`` parameters (the
    first, the last and evenly between, with their names, shapes and dtypes): cheap at any model size, and different
    for two models of the same shapes but other weights. Computed on the dense model (a shrink changes it)."""
    params = list(model.named_parameters())
    h = hashlib.sha256()
    if params:
        last = len(params) - 1
        for i in sorted({round(k * last / max(1, n_tensors - 1)) for k in range(n_tensors)}):
            name, p = params[i]
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // n_values)][:n_values].to("cpu", copy=True).contiguous()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            h.update(sample.view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]
