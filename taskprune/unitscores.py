"""UnitScores: per-unit attribution sums over samples, mergeable across batches and processes."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from taskprune.io import atomic_write_bytes


@dataclass
class UnitScores:
    """Running sums of per-unit scores.

    ``sums[kind][block_name]`` is a float64 tensor ``[n_units]`` (kind is ``"heads"`` or ``"neurons"``); ``count`` is
    the number of real samples that went into the sums (0 for data-free methods such as ``magnitude``). Two
    ``UnitScores`` of the same model and method add up (``a + b``), so batches and processes can be summed.
    ``fingerprint`` is the model's :meth:`taskprune.arch.Architecture.fingerprint` (widths per block).
    """

    sums: dict[str, dict[str, Tensor]]
    count: int
    method: str
    fingerprint: dict
    options: dict = field(default_factory=dict)

    def mean(self) -> dict[str, dict[str, Tensor]]:
        """Per-unit scores: sums divided by the sample count (unchanged for data-free methods)."""
        d = max(self.count, 1)
        return {k: {n: v / d for n, v in blocks.items()} for k, blocks in self.sums.items()}

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in ("heads", "neurons") if self.sums.get(k))

    def check_finite(self) -> None:
        """Raise if any score is NaN or infinite (for example fp16 overflow during attribution)."""
        for kind, blocks in self.sums.items():
            for name, v in blocks.items():
                if not torch.isfinite(v).all():
                    bad = int((~torch.isfinite(v)).sum())
                    raise ValueError(
                        f"{bad} non-finite score(s) (NaN/Inf) for {kind} of {name!r} (method {self.method!r}); "
                        "this usually means the attribution overflowed in half precision: run attribution in "
                        "float32 (precision='32-true'), or use fewer IG steps / a smaller alpha_batch"
                    )

    def __add__(self, other: UnitScores) -> UnitScores:
        if not isinstance(other, UnitScores):
            return NotImplemented
        if other.method != self.method or other.fingerprint != self.fingerprint:
            raise ValueError(
                f"cannot add scores of method {other.method!r} to {self.method!r} or of a different model; "
                "sum only scores computed with the same method on the same model"
            )
        sums = {
            k: {n: v + other.sums[k][n] for n, v in blocks.items()} for k, blocks in self.sums.items()
        }
        return UnitScores(sums, self.count + other.count, self.method, self.fingerprint, dict(self.options))

    # ------------------------------------------------------------------ persistence
    def to_flat(self) -> dict[str, Tensor]:
        return {f"{k}/{n}": v.detach().cpu().contiguous() for k, blocks in self.sums.items() for n, v in blocks.items()}

    def save(self, path) -> None:
        """Write ``scores.safetensors`` atomically; metadata (count, method, fingerprint) goes in its header."""
        from safetensors.torch import save

        meta = {
            "count": str(self.count),
            "method": self.method,
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "options": json.dumps(self.options, sort_keys=True, default=str),
        }
        atomic_write_bytes(path, save(self.to_flat(), metadata=meta))

    @classmethod
    def load(cls, path) -> UnitScores:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                flat = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated / corrupted files
            raise ValueError(f"cannot read scores file {path}: {e}; re-run calibration to write it again") from e
        if "method" not in meta or "count" not in meta:
            raise ValueError(f"{path} is not a taskprune scores file (no count/method metadata)")
        sums: dict[str, dict[str, Tensor]] = {}
        for key, v in flat.items():
            kind, name = key.split("/", 1)
            sums.setdefault(kind, {})[name] = v
        return cls(sums, int(meta["count"]), meta["method"], json.loads(meta["fingerprint"]),
                   json.loads(meta.get("options", "{}")))


def empty_scores(fingerprint: dict, kinds: tuple[str, ...], method: str, options: dict | None = None) -> UnitScores:
    """Zero sums for every block of ``kinds``."""
    sums = {k: {n: torch.zeros(c, dtype=torch.float64) for n, c in fingerprint[k].items()} for k in kinds}
    return UnitScores(sums, 0, method, fingerprint, dict(options or {}))


def is_close(a: UnitScores, b: UnitScores, rtol: float = 1e-6) -> bool:
    """Whether two score sets agree within ``rtol`` relative to the largest magnitude per block."""
    if a.count != b.count:
        return False
    for k, blocks in a.sums.items():
        for n, v in blocks.items():
            w = b.sums[k][n]
            scale = max(float(v.abs().max()), float(w.abs().max()), 1e-30)
            if float((v - w).abs().max()) > rtol * scale or not math.isfinite(scale):
                return False
    return True
