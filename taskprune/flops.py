"""MAC and parameter counts per structured unit and per model.

Everything starts from an architecture *fingerprint* (:meth:`taskprune.arch.Architecture.fingerprint`), so costs can
be computed from a model or from saved :class:`~taskprune.unitscores.UnitScores` alone.

What is counted
    * MACs (multiply-accumulates) of the **prunable parts only**: the q/k/v/output projections and the two attention
      matmuls (``Q·Kᵀ`` and ``A·V``) of every attention block, and the up (and gate) / down projections of every FFN
      block, for **one sequence** of ``seq_len`` tokens. Embeddings, layer norms, biases, softmax, activations,
      relative-position biases, pooler and task / LM heads are **not** counted: they do not change with pruning.
      The attention matmuls count the full ``s × s`` score matrix (no causal halving); cross-attention is counted
      as if the encoder sequence also had ``seq_len`` tokens.
    * Parameters: :func:`count_params` is the exact ``numel`` sum of a model (tied weights once), and with a spec the
      exact count after :func:`taskprune.surgery.shrink_`. :func:`unit_costs` gives weight parameters per unit,
      plus per-unit biases only when asked (a fingerprint does not say whether a model has biases).

Per unit (``d`` = model width, ``dh`` = head width, ``g`` = query heads per KV group, ``s`` = ``seq_len``):

    ======================  ========================================  =====================
    unit                    MACs per sequence                         weight parameters
    ======================  ========================================  =====================
    KV group (attention)    ``g·2·s·d·dh + 2·s·d·dh + g·2·s²·dh``     ``(2·g + 2)·d·dh``
    FFN neuron              ``2·s·d`` (``3·s·d`` gated)               ``2·d`` (``3·d`` gated)
    ======================  ========================================  =====================

For multi-head attention (``g == 1``) the head cost is ``4·s·d·dh + 2·s²·dh`` (Kwon et al., 2022). The cost of a
block is linear in its number of units (``d`` is never pruned), so the cost of a pruned model is a sum over kept units.
"""

from __future__ import annotations

from torch import nn

from taskprune.arch import UNIT_KINDS, find_base, get_architecture, in_features, out_features

__all__ = ["unit_costs", "macs_breakdown", "count_macs", "prunable_params", "count_params", "fingerprint_of"]


def fingerprint_of(model_or_fingerprint: nn.Module | dict) -> dict:
    """The fingerprint of a model (or the given fingerprint dict, unchanged)."""
    if isinstance(model_or_fingerprint, dict):
        missing = [k for k in ("heads", "neurons", "head_dim", "group_size", "d_model", "gated")
                   if k not in model_or_fingerprint]
        if missing:
            raise ValueError(
                f"fingerprint is missing key(s) {missing}; pass Architecture.fingerprint() of the model "
                "(taskprune.get_architecture(model).fingerprint()) or the model itself"
            )
        return model_or_fingerprint
    if isinstance(model_or_fingerprint, nn.Module):
        return get_architecture(model_or_fingerprint).fingerprint()
    raise TypeError(
        f"expected a model (nn.Module) or a fingerprint dict, got {type(model_or_fingerprint).__name__}"
    )


def _check_seq_len(seq_len: int) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    return seq_len


def unit_costs(fingerprint: dict, seq_len: int = 128, biases: bool = False) -> dict[str, dict[str, tuple[int, int]]]:
    """Cost of one unit of every block: ``{"heads"|"neurons": {block_name: (macs_per_unit, params_per_unit)}}``.

    ``macs_per_unit`` is per sequence of ``seq_len`` tokens. ``params_per_unit`` counts weights, plus the unit's
    bias entries when ``biases=True`` (q/k/v biases for a KV group; up/gate biases for a neuron, where the model
    has them). Output / down projection biases are shared by all units and never removed.
    """
    fp = fingerprint_of(fingerprint)
    s = _check_seq_len(seq_len)
    out: dict[str, dict[str, tuple[int, int]]] = {"heads": {}, "neurons": {}}
    for name in fp["heads"]:
        d, dh, g = fp["d_model"][name], fp["head_dim"][name], fp["group_size"][name]
        macs = g * 2 * s * d * dh + 2 * s * d * dh + g * 2 * s * s * dh
        params = (2 * g + 2) * d * dh + ((g + 2) * dh if biases else 0)
        out["heads"][name] = (macs, params)
    for name in fp["neurons"]:
        d, n_in = fp["d_model"][name], (2 if fp["gated"][name] else 1)
        out["neurons"][name] = ((n_in + 1) * s * d, (n_in + 1) * d + (n_in if biases else 0))
    return out


def _kept_counts(fp: dict, spec) -> dict[str, dict[str, int]]:
    """Units per block after ``spec`` (all units when ``spec`` is None)."""
    counts = {k: dict(fp[k]) for k in UNIT_KINDS}
    if spec is None:
        return counts
    for kind in UNIT_KINDS:
        if spec.fingerprint.get(kind) != fp[kind]:
            raise ValueError(
                f"the spec was made for a model with {kind} {spec.fingerprint.get(kind)} but this one has "
                f"{fp[kind]}; pass the dense model the spec was made for (a model that is already shrunk is "
                "counted without a spec)"
            )
        for name, keep in spec.keep.get(kind, {}).items():
            if name not in counts[kind]:
                raise ValueError(f"the spec keeps {kind} of unknown block {name!r}; known: {list(counts[kind])}")
            counts[kind][name] = len(keep)
    return counts


def macs_breakdown(model_or_fingerprint: nn.Module | dict, seq_len: int = 128, spec=None) -> dict[str, dict[str, int]]:
    """MACs per block for one sequence: ``{"heads"|"neurons": {block_name: macs}}`` (after ``spec`` if given)."""
    fp = fingerprint_of(model_or_fingerprint)
    costs = unit_costs(fp, seq_len)
    counts = _kept_counts(fp, spec)
    return {k: {n: counts[k][n] * costs[k][n][0] for n in fp[k]} for k in UNIT_KINDS}


def count_macs(model_or_fingerprint: nn.Module | dict, seq_len: int = 128, spec=None) -> int:
    """MACs of the attention and FFN blocks for one sequence of ``seq_len`` tokens (after ``spec`` if given).

    Embeddings, layer norms, biases and heads are not counted (see the module docstring). ``spec`` must have been
    made for this (dense) model.
    """
    return sum(sum(blocks.values()) for blocks in macs_breakdown(model_or_fingerprint, seq_len, spec).values())


def prunable_params(model_or_fingerprint: nn.Module | dict, spec=None) -> int:
    """Weight parameters of the prunable units (biases excluded), after ``spec`` if given."""
    fp = fingerprint_of(model_or_fingerprint)
    costs = unit_costs(fp)
    counts = _kept_counts(fp, spec)
    return sum(counts[k][n] * costs[k][n][1] for k in UNIT_KINDS for n in fp[k])


def _per_channel(module: nn.Module, row_width: bool) -> tuple[int, int]:
    """``(weights per output channel, bias per output channel)`` of a projection when ``row_width``, else
    ``(weights per input channel, 0)``."""
    if row_width:
        return in_features(module), int(getattr(module, "bias", None) is not None)
    return out_features(module), 0


def _exact_unit_params(model: nn.Module) -> dict[str, dict[str, int]]:
    """Exact parameters (weights and biases) that removing one unit of each block takes out of ``model``."""
    base, _ = find_base(model)
    arch = get_architecture(model)
    out: dict[str, dict[str, int]] = {"heads": {}, "neurons": {}}
    for b in arch.attention:
        q, k, v, o = (base.get_submodule(p) for p in (b.q, b.k, b.v, b.out))
        wq, bq = _per_channel(q, True)
        if b.fused_qkv:  # one module holds q, k and v: (g + 2) * dh output channels per unit
            n = (b.group_size + 2) * b.head_dim * (wq + bq)
        else:
            (wk, bk), (wv, bv) = _per_channel(k, True), _per_channel(v, True)
            n = b.group_size * b.head_dim * (wq + bq) + b.head_dim * (wk + bk + wv + bv)
        n += _per_channel(o, False)[0] * b.unit_width
        # a position-bias table shared across layers keeps every head: shrink_ slices its output, not the table
        out["heads"][b.name] = n
    for b in arch.ffn:
        n = sum(sum(_per_channel(base.get_submodule(u), True)) for u in b.up)
        n += _per_channel(base.get_submodule(b.down), False)[0]
        out["neurons"][b.name] = n
    return out


def count_params(model: nn.Module, spec=None) -> int:
    """Exact parameter count of ``model`` (``numel`` sum, tied weights once); with ``spec``, the exact count that
    :func:`taskprune.surgery.shrink_` leaves (dense count minus the removed units' weights and biases).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_params needs the model (nn.Module), got {type(model).__name__}; "
                        "use prunable_params(fingerprint) to count from a fingerprint")
    total = sum(p.numel() for p in model.parameters())
    if spec is None:
        return total
    fp = fingerprint_of(model)
    counts = _kept_counts(fp, spec)
    per_unit = _exact_unit_params(model)
    return total - sum((fp[k][n] - counts[k][n]) * per_unit[k][n] for k in UNIT_KINDS for n in fp[k])
