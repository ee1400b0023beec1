"""Probe (issue #21, point 4): does K-prune's weight refit help taskprune's default pipeline? Selection reserve only.

    python -m benchmarks.refit_probe --tasks mrpc mnli qqp stsb --cuts 0.4 0.6 --seed 0

For each task and cut: the default spec (preset ``taskprune``, 512 calibration rows of seed ``--seed``), then

* ``none``: the spec as it is;
* ``scales``: the faithful mask tuning of :mod:`taskprune.tuning` against the dense teacher (residual target, LSMR);
* ``refit λ``: K-prune's weight tuning — sub-layer by sub-layer in forward order, the kept input columns ``W_K`` of
  the output / down projection refitted by ridge least squares to the dense teacher's pre-LayerNorm sum
  (``y_T + x_T - x_S``, the faithful target), ``W_K' = (X_Kᵀ X_K + λ m I)⁻¹ (X_Kᵀ (Y - b) + λ m W_K)`` with ``m`` the
  mean diagonal of ``X_Kᵀ X_K`` (bias untouched); later sub-layers see the refitted ones.

It reuses the tuning module's capture helpers (the refit is a probe: it lives here until it earns a place in
:mod:`taskprune.tuning`). Writes ``benchmarks/results/refit_probe.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from benchmarks.common import cpu_name, git_commit, write_text
from benchmarks.headline import (MODEL, SEQ, batches_of, calibration_rows, eval_sets, evaluate, main_key,
                                 pruned_copy)
from taskprune.arch import find_base, unit_channels, weight_in_out
from taskprune.attribution import default_forward
from taskprune.gates import Gates
from taskprune.io import atomic_write_json
from taskprune.lightning.data import load_tokenizer
from taskprune.models.multitask import read_build_info
from taskprune.pipeline import Pipeline
from taskprune.surgery import shrink_
from taskprune.tuning import _capture, _forward_order, _teacher_outputs, _tokens, tune_masks
from taskprune.zoo import ensure_multitask, resolve_model_dir

log = logging.getLogger("refit_probe")


@torch.no_grad()
def refit(dense, spec, batches: list[dict], ridge: float):
    """A copy of ``dense`` whose kept output-projection columns are refitted (see the module docstring)."""
    student = copy.deepcopy(dense).eval()
    base, _ = find_base(student)
    with Gates(student) as gates:
        order = _forward_order(student, gates, batches[0], default_forward)
        targets = _teacher_outputs(student, gates, None, order, batches, default_forward, residual=True)
        values = gates.values_of(spec, scaled=False)
        for slot in order:
            kind, name = slot.kind, slot.block.name
            kept = spec.kept(kind, name)
            if not kept:
                continue
            proj = base.get_submodule(slot.block.out if kind == "heads" else slot.block.down)
            res = base.get_submodule(slot.block.residual[0])
            cols = unit_channels(kept, slot.block.unit_width)
            w = weight_in_out(proj)  # view [in, out]
            bias = proj.bias.double() if getattr(proj, "bias", None) is not None else None
            xx = torch.zeros(len(cols), len(cols), dtype=torch.float64)
            xt = torch.zeros(len(cols), w.shape[1], dtype=torch.float64)
            for batch, y in zip(batches, targets[name]):
                x, x_res = _capture(student, gates, values, proj, batch, default_forward, "input",
                                    (res, slot.block.residual[1]))
                tok = _tokens(batch, x, False)
                x, y = x.float()[tok][:, cols], y.float() - x_res.float()[tok]
                if bias is not None:
                    y = y - bias.float()
                xx += (x.t() @ x).double()  # float32 products per batch (as the lsmr tuning), summed in float64
                xt += (x.t() @ y).double()
            m = float(xx.diagonal().mean())
            lhs = xx + ridge * m * torch.eye(len(cols), dtype=torch.float64)
            new = torch.linalg.solve(lhs, xt + ridge * m * w[cols].double())
            w[cols] = new.to(w.dtype)
    return student


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.refit_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["mrpc", "mnli", "qqp", "stsb"])
    p.add_argument("--cuts", nargs="+", type=float, default=[0.4, 0.6])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ridges", nargs="+", type=float, default=[1e-2, 1e-1])
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out", default="benchmarks/results/refit_probe")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t_start = time.perf_counter()
    model = ensure_multitask(MODEL, data_dir=args.data_dir)
    tok = load_tokenizer(model.tokenizer_path)
    info = read_build_info(resolve_model_dir(MODEL))
    out = {"command": "python -m benchmarks.refit_probe " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
           "commit": git_commit(), "cpu": cpu_name(), "threads": torch.get_num_threads(), "rows": []}
    for task in args.tasks:
        sel = batches_of(tok, task, eval_sets(task, args.data_dir, "selection")["selection"], 64)
        dense = model.for_task(task).eval()
        d = evaluate(dense, task, sel)[main_key(task)]
        reserve = info["selection_reserve"][task]
        calib = batches_of(tok, task, calibration_rows(task, args.data_dir, reserve, args.calib, args.seed), 32)
        scores = Pipeline.preset("taskprune").score(dense, calib)
        for cut in args.cuts:
            spec = Pipeline.preset("taskprune").at(cut, seq_len=SEQ).prune(dense, calib, scores=scores)
            row = {"task": task, "cut": cut, "seed": args.seed, "dense": d}
            row["none"] = evaluate(pruned_copy(model, task, spec), task, sel)[main_key(task)]
            tuned = tune_masks(dense, spec, calib, target="residual", solver="lsmr", skip_first_attention=True)
            row["scales"] = evaluate(pruned_copy(model, task, tuned), task, sel)[main_key(task)]
            for r in args.ridges:
                m = refit(dense, spec, calib, r)
                row[f"refit {r:g}"] = evaluate(shrink_(m, spec), task, sel)[main_key(task)]
            out["rows"].append(row)
            log.info("%s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
            out["wall_s"] = round(time.perf_counter() - t_start, 1)
            atomic_write_json(Path(args.out + ".json"), out)
    variants = ["none", "scales", *[f"refit {r:g}" for r in args.ridges]]
    lines = [f"<!-- generated by `{out['command']}`; do not edit by hand -->", "",
             f"commit `{out['commit']}`, {out['cpu']}, {out['threads']} threads, {out['wall_s'] / 60:.1f} min. "
             f"Selection reserve, seed {args.seed}, {args.calib} calibration rows; % of dense kept.", "",
             "| task | cut | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for row in out["rows"]:
        lines.append(f"| {row['task']} | {row['cut']:.0%} | " +
                     " | ".join(f"{100 * row[v] / row['dense']:.1f}" for v in variants) + " |")
    for cut in args.cuts:
        rs = [r for r in out["rows"] if r["cut"] == cut]
        lines.append(f"| mean | {cut:.0%} | " + " | ".join(
            f"{sum(100 * r[v] / r['dense'] for r in rs) / len(rs):.1f}" for v in variants) + " |")
    write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
