"""Kwon et al.'s stages as taskprune stages: mask search (MAC budget met, never exceeded), rearrangement (counts kept,
block cost never up), mask tuning (a block's error on its own calibration batches never up), scale folding (fold +
shrink == masked with scales), scales in the spec's JSON."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_batch, tiny_model, widen_
from torch import nn

from dataclasses import replace

from taskprune.arch import find_base, get_architecture, unit_channels, weight_in_out
from taskprune.attribution import score_units
from taskprune.flops import count_macs, unit_costs
from taskprune.gates import Gates
from taskprune.attribution import make_target
from taskprune.search import head_counts, search_by_loss, search_macs
from taskprune.selection import select_units
from taskprune.spec import PruneSpec
from taskprune.surgery import shrink_
from taskprune.tuning import _tokens, batch_gradients, fold_scales_, rearrange, scaled_mask, tune_masks
from taskprune.unitscores import UnitScores


def capture(model, gates, values, proj, batch, forward, what, residual=None, first=False):
    """The oracle for what tuning fits on: one whole forward with ``values`` as gates, and ``proj``'s (gated) input or
    its output at its first call over the fitted tokens; with ``residual = (module, arg)`` also the residual stream
    entering that module last before it: ``(x, stream)``."""
    got, stream = [], []
    h = proj.register_forward_hook(lambda m, a, r: got.append(((a[0] if what == "input" else r).detach(),
                                                                stream[-1] if stream else None)) if not got else None)
    hr = residual[0].register_forward_pre_hook(lambda m, a: stream.append(a[residual[1]].detach())) \
        if residual is not None else None
    gates.set(values)
    try:
        with torch.no_grad():
            forward(model, batch)
    finally:
        h.remove()
        if hr is not None:
            hr.remove()
        gates.set(None)
    x, s = got[0]
    pick = _tokens(batch, x, first)
    return x[pick] if residual is None else (x[pick], s[pick])


def dense_targets(model, block, calib) -> list[torch.Tensor]:
    """The residual target of ``block``'s output projection in the dense model, per batch: its output plus the
    residual stream entering the block's residual add, over the fitted tokens (computed here, apart from the tuning)."""
    base, _ = find_base(model)
    proj = base.get_submodule(block.down if hasattr(block, "down") else block.out)
    res = (base.get_submodule(block.residual[0]), block.residual[1])
    with Gates(model) as gates:
        return [sum(capture(model, gates, None, proj, batch, _fwd, "output", res)) for batch in calib]


def wide_model(name: str) -> nn.Module:
    """A tiny model whose units matter (BERT's 0.02-std init makes every unit negligible)."""
    return widen_(tiny_model(name, seed=0))


def labelled(name: str, n: int, seed: int = 0) -> list[dict]:
    out = []
    for i in range(n):
        b = tiny_batch(name, batch_size=8, seq_len=12, seed=seed + i)
        if name == "bert":
            b["labels"] = torch.arange(8) % 3
        else:
            b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        out.append(b)
    return out


def random_scores(model: nn.Module, seed: int = 0) -> UnitScores:
    fp = get_architecture(model).fingerprint()
    g = torch.Generator().manual_seed(seed)
    sums = {k: {n: torch.rand(w, generator=g, dtype=torch.float64) for n, w in fp[k].items()}
            for k in ("heads", "neurons")}
    return UnitScores(sums, 1, "random", fp)


@pytest.mark.parametrize("name", ["bert", "llama_gqa", "t5"])
@pytest.mark.parametrize("macs", [0.0, 0.2, 0.45, 0.6])
def test_search_meets_the_mac_budget_and_never_exceeds_it(name, macs):
    model = tiny_model(name)
    scores = random_scores(model, seed=3)
    spec = search_macs(scores, macs, seq_len=16)
    dense = count_macs(model, 16)
    kept = count_macs(model, 16, spec)
    budget = (1 - macs) * dense
    assert kept <= budget
    cheapest = min(c for blocks in unit_costs(spec.fingerprint, 16).values() for c, _ in blocks.values())
    # "exactly": the search stops only when not even one more unit of the cheaper kind would fit
    assert budget - kept < max(c for c, _ in unit_costs(spec.fingerprint, 16)["neurons"].values()) or \
        spec.n_kept("neurons") == spec.n_total("neurons")
    assert cheapest > 0


def test_search_maximises_the_kept_score():
    """Brute force over every head count on a tiny model gives the same total score."""
    model = tiny_model("bert")
    scores = random_scores(model, seed=5)
    spec = search_macs(scores, 0.5, seq_len=16)
    mean = scores.mean()

    def total(sp):
        return sum(float(mean[k][n][sp.kept(k, n)].sum()) for k in ("heads", "neurons") for n in mean[k])

    costs = unit_costs(spec.fingerprint, 16)
    budget = 0.5 * count_macs(model, 16)
    heads = sorted(((float(v), n, i) for n, t in mean["heads"].items() for i, v in enumerate(t)), reverse=True)
    neurons = sorted(((float(v), n, i) for n, t in mean["neurons"].items() for i, v in enumerate(t)), reverse=True)
    floor = {n: int(t.argmax()) for n, t in mean["heads"].items()}
    budget -= sum(costs["heads"][n][0] for n in floor)
    base = sum(float(mean["heads"][n][i]) for n, i in floor.items())
    heads = [x for x in heads if floor[x[1]] != x[2]]
    best = -1.0
    for h in range(len(heads) + 1):
        spent = sum(costs["heads"][n][0] for _, n, _ in heads[:h])
        if spent > budget:
            break
        tot, used = sum(v for v, _, _ in heads[:h]), spent
        for v, n, _ in neurons:
            if used + costs["neurons"][n][0] > budget:
                break
            used += costs["neurons"][n][0]
            tot += v
        best = max(best, tot + base)
    assert total(spec) == pytest.approx(best, rel=1e-9)


def test_search_refuses_a_bad_budget():
    scores = random_scores(tiny_model("bert"))
    with pytest.raises(ValueError, match=r"macs=1\.0.*\[0, 1\)"):
        search_macs(scores, 1.0)


def test_search_with_a_fixed_head_count_keeps_it_and_meets_the_budget():
    model = tiny_model("bert")
    scores = random_scores(model, seed=7)
    counts = head_counts(scores, 0.5, seq_len=16, n=4)
    searched = search_macs(scores, 0.5, seq_len=16)
    assert searched.n_kept("heads") in counts and len(counts) >= 3
    budget = 0.5 * count_macs(model, 16)
    for h in counts:
        spec = search_macs(scores, 0.5, seq_len=16, heads=h)
        assert spec.n_kept("heads") == h and count_macs(model, 16, spec) <= budget
        assert all(spec.kept("heads", n) for n in spec.fingerprint["heads"])  # min_heads per block
    assert search_macs(scores, 0.5, seq_len=16, heads=searched.n_kept("heads")).keep == searched.keep
    with pytest.raises(ValueError, match=r"heads=1: must be an int from"):
        search_macs(scores, 0.5, seq_len=16, heads=1)
    with pytest.raises(ValueError, match=r"cost more than macs=0\.7"):
        search_macs(scores, 0.7, seq_len=16, heads=spec.n_total("heads"))


@pytest.mark.parametrize("name", ["bert", "llama_gqa"])
def test_search_by_loss_keeps_the_head_count_of_lowest_held_out_loss(name):
    model = wide_model(name).eval()
    scores = random_scores(model, seed=2)
    held_out = labelled(name, 2, seed=50)
    spec = search_by_loss(model, scores, 0.5, held_out, seq_len=16, n=5)
    assert spec.budget["allocation"] == "loss"
    assert count_macs(model, 16, spec) <= 0.5 * count_macs(model, 16)

    def loss(sp):
        with torch.no_grad(), scaled_mask(model, sp):
            fn = make_target("label", model)
            return -sum(float(fn(model(**{k: v for k, v in b.items() if k != "labels"}), b).sum()) for b in held_out)

    candidates = [search_macs(scores, 0.5, seq_len=16, heads=h) for h in head_counts(scores, 0.5, seq_len=16, n=5)]
    assert len(candidates) >= 2 and spec.keep in [c.keep for c in candidates]
    assert loss(spec) == pytest.approx(min(loss(c) for c in candidates), rel=1e-6)
    with pytest.raises(ValueError, match="no batches"):
        search_by_loss(model, scores, 0.5, [], seq_len=16)


def _block_cost(g: torch.Tensor, drop: list[int]) -> float:
    return float(g[:, drop].sum(1).pow(2).sum()) if drop else 0.0


@pytest.mark.parametrize("name", ["bert", "llama_gqa"])
def test_rearrange_keeps_counts_and_never_raises_the_block_cost(name):
    model = wide_model(name)
    grads, n = batch_gradients(model, labelled(name, 6))
    assert n == 48
    spec = search_macs(score_units(model, labelled(name, 6), "fisher", per="batch"), 0.5, seq_len=12)
    new = rearrange(spec, grads)
    for kind, blocks in grads.items():
        for block, g in blocks.items():
            assert len(new.kept(kind, block)) == len(spec.kept(kind, block))
            assert _block_cost(g, new.drop(kind, block)) <= _block_cost(g, spec.drop(kind, block)) + 1e-12


def test_batch_gradients_match_autograd_of_the_mean_loss():
    model = wide_model("bert")
    batch = labelled("bert", 1)[0]
    grads, _ = batch_gradients(model, [batch])
    with Gates(model) as gates:
        g = torch.ones(gates.n_units, requires_grad=True)
        gates.set(g)
        loss = nn.functional.cross_entropy(model(**{k: v for k, v in batch.items() if k != "labels"}).logits,
                                           batch["labels"])
        (ref,) = torch.autograd.grad(-loss, g)
        flat = gates.flat({k: {n: v[0] for n, v in d.items()} for k, d in grads.items()})
    torch.testing.assert_close(flat, ref.float(), rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def _block_errors(model, spec, batches):
    """Per block (forward order): the squared error of the student's block output against the dense teacher's,
    with the student's earlier blocks as ``spec`` has them, at the block's own scales and at scale 1."""
    base, _ = find_base(model)
    out = {}
    with Gates(model) as gates:
        for s in gates.slots:
            proj = base.get_submodule(s.block.out if s.kind == "heads" else s.block.down)
            ones = copy.deepcopy(spec)
            ones.scales.get(s.kind, {}).pop(s.block.name, None)
            err = {}
            for label, sp in (("tuned", spec), ("ones", ones)):
                e = 0.0
                for b in batches:
                    y = capture(model, gates, None, proj, b, _fwd, "output")
                    x = capture(model, gates, gates.values_of(sp), proj, b, _fwd, "output")
                    e += float((x - y).double().pow(2).sum())  # over real tokens
                err[label] = e
            out[(s.kind, s.block.name)] = err
    return out


def _fwd(model, batch):
    return model(**{k: v for k, v in batch.items() if k != "labels"})


@pytest.mark.parametrize("name", ["bert", "llama_gqa"])
def test_tuning_never_increases_a_blocks_error_on_its_calibration_batches(name):
    model = wide_model(name)
    calib = labelled(name, 4)
    spec = select_units(score_units(model, method="magnitude"), sparsity=0.5)
    tuned = tune_masks(model, spec, calib, forward=_fwd)
    assert tuned.scales and tuned.keep == spec.keep
    errors = _block_errors(model, tuned, calib)
    improved = 0
    for key, e in errors.items():
        assert e["tuned"] <= e["ones"] * (1 + 1e-6) + 1e-9, key
        improved += e["tuned"] < 0.99 * e["ones"]
    assert improved >= 1


@pytest.mark.parametrize("name", ["bert", "llama_gqa", "gpt2", "t5"])
def test_fold_then_shrink_equals_masked_with_scales(name):
    model = tiny_model(name)
    batch = tiny_batch(name)
    spec = select_units(score_units(model, method="magnitude"), sparsity=0.4)
    g = torch.Generator().manual_seed(0)
    scales = {k: {n: (0.5 + torch.rand(len(spec.kept(k, n)), generator=g)).tolist() for n in spec.fingerprint[k]}
              for k in ("heads", "neurons")}
    spec = PruneSpec(keep=spec.keep, fingerprint=spec.fingerprint, scales=scales)
    with torch.no_grad(), scaled_mask(model, spec):
        ref = model(**batch).logits
    folded = copy.deepcopy(model)
    plain = fold_scales_(folded, spec)
    assert plain.scales == {}
    shrink_(folded, plain)
    with torch.no_grad():
        torch.testing.assert_close(folded(**batch).logits, ref, rtol=1e-5, atol=1e-5)


def test_scales_round_trip_through_json_and_bad_scales_are_refused(tmp_path):
    model = tiny_model("bert")
    spec = select_units(score_units(model, method="magnitude"), sparsity=0.5)
    block = next(iter(spec.fingerprint["neurons"]))
    n = len(spec.kept("neurons", block))
    with_scales = PruneSpec(keep=spec.keep, fingerprint=spec.fingerprint, scales={"neurons": {block: [2.0] * n}})
    with_scales.save(tmp_path / "s.json")
    back = PruneSpec.load(tmp_path / "s.json")
    assert back.scales == with_scales.scales and back.scale_of("neurons", block) == [2.0] * n
    with pytest.raises(ValueError, match=r"scales\['neurons'\].*one finite scale per kept unit"):
        PruneSpec(keep=spec.keep, fingerprint=spec.fingerprint, scales={"neurons": {block: [1.0] * (n + 1)}})


def test_unit_channels_used_by_folding_cover_each_kept_unit():
    assert unit_channels([1, 3], 2).tolist() == [2, 3, 6, 7]


# ------------------------------------------------------------------------------------ through the callback
def test_callback_runs_kwons_stages_and_the_applied_model_equals_the_scaled_mask(tmp_path):
    """search -> rearrange -> tune (schedule) through TaskPruning: spec.json holds the scales, the shrunk model (scales
    folded) equals the dense model masked with them, and a new run replays spec.json to the same model."""
    import lightning as L
    from lightning_tiny import TOKENIZER, tiny_classifier

    from taskprune.attribution import AttributionConfig
    from taskprune.lightning.callback import TaskPruning
    from taskprune.lightning.data import TaskDataModule
    from taskprune.lightning.module import AttributionModule
    from taskprune.selection import Budget
    from taskprune.tuning import TuningConfig

    def trainer(cb):
        return L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         callbacks=[cb], limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                         enable_model_summary=False)

    def dm():
        return TaskDataModule("sst2", tokenizer=TOKENIZER, calib_samples=12, batch_size=4, eval_samples=8, ood=[])

    module = AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(steps=1),
                               compare_dense=False)
    cb = TaskPruning(budget=Budget(amount=0.4, scope="search"), output_dir=str(tmp_path), apply="shrink",
                     tuning=TuningConfig(rearrange=True, tune="schedule"))
    trainer(cb).fit(module, dm())
    spec = PruneSpec.load(tmp_path / "spec.json")
    assert spec.scales and spec.budget["scope"] == "search" and spec.meta["tuning"]["tune"] == "schedule"
    assert spec.budget["achieved"]["macs"] >= 0.4
    batch = {"input_ids": torch.randint(1000, 2000, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    dense = tiny_classifier()
    with torch.no_grad(), scaled_mask(dense, spec):
        expected = dense(**batch).logits
    with torch.no_grad():
        torch.testing.assert_close(module.model(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    fresh = AttributionModule(tiny_classifier(), task="sst2", compare_dense=False)
    trainer(TaskPruning(output_dir=str(tmp_path), apply="shrink")).test(fresh, dm(), verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_callback_with_the_column_refit_writes_the_columns_beside_the_spec_and_test_replays_them(tmp_path):
    import lightning as L
    from lightning_tiny import TOKENIZER, tiny_classifier

    from taskprune.attribution import AttributionConfig
    from taskprune.lightning.callback import TaskPruning
    from taskprune.lightning.data import TaskDataModule
    from taskprune.lightning.module import AttributionModule
    from taskprune.selection import Budget
    from taskprune.tuning import TuningConfig

    def run(cb, module, stage):
        t = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                      callbacks=[cb], limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                      enable_model_summary=False)
        dm = TaskDataModule("sst2", tokenizer=TOKENIZER, calib_samples=12, batch_size=4, eval_samples=8, ood=[])
        getattr(t, stage)(module, dm, **({"verbose": False} if stage == "test" else {}))

    module = AttributionModule(tiny_classifier(), task="sst2", attribution=AttributionConfig(steps=1),
                               compare_dense=False)
    refit = TuningConfig(tune="dense", target="residual", fit="columns")  # preset taskprune_refit's stages
    run(TaskPruning(budget=Budget(amount=0.4), output_dir=str(tmp_path), tuning=refit), module, "fit")
    assert (tmp_path / "spec.columns.safetensors").is_file()
    spec = PruneSpec.load(tmp_path / "spec.json")
    assert spec.columns and spec.meta["tuned"]["fit"] == "columns"
    expected_model = tiny_classifier()
    shrink_(expected_model, fold_scales_(expected_model, spec))
    batch = {"input_ids": torch.randint(1000, 2000, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with torch.no_grad():
        expected = expected_model(**batch).logits
        assert not torch.allclose(expected, shrink_(tiny_classifier(), replace(spec, columns={}))(**batch).logits)
        # shrink_ of a tuned spec folds the tuning in (it once shrank silently without it)
        torch.testing.assert_close(shrink_(tiny_classifier(), spec)(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module.model(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    fresh = AttributionModule(tiny_classifier(), task="sst2", compare_dense=False)
    run(TaskPruning(output_dir=str(tmp_path), apply="shrink"), fresh, "test")
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_tuning_config_refuses_bad_values():
    from taskprune.tuning import TuningConfig

    with pytest.raises(ValueError, match=r"tune='teacher' is not allowed; use one of \['none', 'dense', 'schedule'\]"):
        TuningConfig(tune="teacher")
    with pytest.raises(ValueError, match=r"damping=-1 must be a finite number >= 0"):
        TuningConfig(damping=-1)


def test_search_scope_needs_a_mac_budget():
    from taskprune.selection import Budget

    with pytest.raises(ValueError, match=r"scope='search' searches under a MAC budget; got kind='params'"):
        Budget(kind="params", scope="search")


def test_select_units_splits_by_held_out_loss_when_rows_are_given_or_asked_for():
    from dataclasses import replace

    from taskprune.selection import Budget

    model = wide_model("bert").eval()
    scores = random_scores(model, seed=2)
    budget = Budget(amount=0.5, scope="search", seq_len=16)
    spec = select_units(scores, budget)
    held_out = labelled("bert", 2, seed=50)
    out = select_units(scores, budget, model=model, held_out=held_out)  # auto + rows -> loss
    assert out.keep == search_by_loss(model, scores, 0.5, held_out, seq_len=16).keep
    assert out.budget["allocation"] == "loss" and spec.budget["allocation"] == "score"
    assert out.budget["achieved"]["macs"] >= 0.5  # recomputed for the kept units, not copied from the score split
    assert select_units(scores, replace(budget, split="score"), model=model, held_out=held_out).keep == spec.keep
    with pytest.raises(ValueError, match=r"split='loss' needs held-out batches.*holdout_samples=256"):
        select_units(scores, replace(budget, split="loss"), model=model)
    with pytest.raises(ValueError, match=r"split='loss' chooses the heads / neurons split.*scope='per_kind'"):
        Budget(amount=0.5, scope="per_kind", split="loss")
    assert select_units(scores, replace(budget, scope="per_kind"), model=model, held_out=held_out).budget[
        "allocation"] is None
    with pytest.raises(ValueError, match=r"split='split' is not allowed; use one of \['auto', 'score', 'loss'\]"):
        Budget(split="split")


# ------------------------------------------------------------------------------------ faithful Kwon et al.
@pytest.mark.parametrize("name", ["bert", "llama_gqa", "gpt2"])
def test_residual_target_leaves_the_pre_norm_error_stationary_in_every_kept_scale(name):
    """Their least squares (damping 0, exact solve): after tuning a feed-forward block, the gradient of
    |sum_S - sum_T|² (sum = output + residual stream: before the LayerNorm, or after the residual add for pre-norm)
    w.r.t. each kept scale is ~0: |Σ_tok c_i · (sum_S - sum_T)| <= 1e-6 x its value at scale 1."""

    model = wide_model(name).eval()
    calib = labelled(name, 3)
    spec = select_units(random_scores(model, seed=3), sparsity=0.5)
    tuned = tune_masks(model, spec, calib, damping=0.0, forward=_fwd, target="residual")
    base, _ = find_base(model)
    arch = get_architecture(model)
    block = arch.ffn[0]
    assert block.name in tuned.scales.get("neurons", {})
    before = {k: {n: v for n, v in d.items() if not (k == "neurons" and n == block.name)} for k, d in tuned.scales.items()}
    upstream = replace(spec, scales=before)
    proj, res = base.get_submodule(block.down), base.get_submodule(block.residual[0])
    kept = spec.kept("neurons", block.name)
    w = weight_in_out(proj).detach().double()[kept]
    b = proj.bias.detach().double() if proj.bias is not None else 0.0
    teacher = dense_targets(model, block, calib)
    with Gates(model) as gates:
        grads = {}
        for label, s in (("tuned", torch.tensor(tuned.scales["neurons"][block.name], dtype=torch.float64)),
                         ("ones", torch.ones(len(kept), dtype=torch.float64))):
            g = torch.zeros(len(kept), dtype=torch.float64)
            for batch, y_t in zip(calib, teacher):
                x, stream = capture(model, gates, gates.values_of(upstream), proj, batch, _fwd, "input",
                                     (res, block.residual[1]))
                pick = _tokens(batch, x, False)
                xk = x.double()[pick][:, kept]
                diff = (xk * s) @ w + b + stream.double()[pick] - y_t.double()
                g += torch.einsum("tk,kd,td->k", xk, w, diff)  # Σ_tok c_i · (sum_S - sum_T)
            grads[label] = g
    assert grads["ones"].abs().max() > 1e-6
    assert grads["tuned"].abs().max() <= 1e-6 * grads["ones"].abs().max()


def test_kwons_options_skip_the_first_attention_and_stop_on_lsmr_failure(monkeypatch):
    import taskprune.tuning as tuning

    model = wide_model("bert").eval()
    calib = labelled("bert", 3)
    spec = select_units(random_scores(model, seed=4), sparsity=0.5)
    first = get_architecture(model).attention[0].name
    tuned = tune_masks(model, spec, calib, forward=_fwd, target="residual", solver="lsmr", skip_first_attention=True)
    assert first not in tuned.scales.get("heads", {}) and tuned.scales["neurons"]
    assert get_architecture(model).attention[1].name in tuned.scales["heads"]
    calls = []

    def failing(a, b, damping, intercept=None):
        calls.append(intercept is not None)
        return torch.zeros(a.shape[0]), False

    monkeypatch.setattr(tuning, "_lsmr", failing)
    stopped = tune_masks(model, spec, calib, forward=_fwd, target="residual", solver="lsmr")
    assert stopped.scales == {} and calls == [True]  # the first solve (attention, with its intercept) fails: stop


def test_lsmr_solves_a_good_system_and_maps_stop_codes_from_3_to_failure(monkeypatch):
    import scipy.sparse.linalg

    from taskprune.tuning import _lsmr

    good = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    rhs = torch.tensor([1.0, 2.0], dtype=torch.float64)
    u, ok = _lsmr(good, rhs, 0.0)
    assert ok and torch.allclose(1 + u, torch.linalg.solve(good, rhs), atol=1e-5)
    damped, _ = _lsmr(good, rhs, 1.0)
    assert (damped.abs() < u.abs()).all()  # damping shrinks the scales towards 1
    seen = {}

    def fake(a, b, **kw):
        seen.update(kw)
        return (b * 0, 3) + (0,) * 6  # istop 3: the condition estimate exceeded conlim

    monkeypatch.setattr(scipy.sparse.linalg, "lsmr", fake)
    assert _lsmr(good, rhs, 1.0)[1] is False
    assert seen == {"damp": 1.0, "atol": 1e-6, "btol": 1e-6, "conlim": 1e8, "maxiter": 10}


def test_tuning_options_are_refused_when_tuning_is_off():
    from taskprune.tuning import TuningConfig

    with pytest.raises(ValueError, match=r"\{'target': 'residual'\} configure mask tuning, which is off"):
        TuningConfig(target="residual")
    with pytest.raises(ValueError, match=r"solver='cg' is not allowed; use one of \['exact', 'lsmr'\]"):
        TuningConfig(tune="dense", solver="cg")


# ------------------------------------------------------------------------------------ K-prune's column refit
def test_column_refit_leaves_the_pre_norm_error_stationary_in_every_kept_weight():
    """fit='columns', ridge 0: after the refit of a feed-forward block, the gradient of |sum_S - sum_T|² w.r.t. its
    kept input columns, X_Kᵀ (sum_S - sum_T), is ~0 next to its value at the dense columns (float32 products)."""

    model = wide_model("bert").eval()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = labelled("bert", 3)
    spec = select_units(random_scores(model, seed=3), sparsity=0.5)
    tuned = tune_masks(model, spec, calib, forward=_fwd, target="residual", fit="columns", ridge=0.0)
    assert all(torch.equal(v, dense_state[k]) for k, v in model.state_dict().items())  # weights restored
    assert not tuned.scales and tuned.meta["tuned"]["fit"] == "columns"
    block = get_architecture(model).ffn[0]
    new = tuned.columns["neurons"][block.name]
    upstream = copy.deepcopy(model)  # the refitted sub-layers before this block written in, as the tuning saw them
    fold_scales_(upstream, replace(tuned, columns={k: {n: t for n, t in d.items() if n != block.name}
                                                   for k, d in tuned.columns.items()}))
    base, _ = find_base(upstream)
    proj, res = base.get_submodule(block.down), base.get_submodule(block.residual[0])
    kept = spec.kept("neurons", block.name)
    b = proj.bias.detach().double()
    teacher = dense_targets(model, block, calib)
    grads = {}
    with Gates(upstream) as gates:
        for label, w in (("refit", new.double()), ("dense", weight_in_out(proj).detach().double()[kept])):
            g = torch.zeros_like(w)
            for batch, y_t in zip(calib, teacher):
                x, stream = capture(upstream, gates, gates.values_of(spec, scaled=False), proj, batch, _fwd, "input",
                                     (res, block.residual[1]))
                pick = _tokens(batch, x, False)
                xk = x.double()[pick][:, kept]
                g += xk.t() @ (xk @ w + b + stream.double()[pick] - y_t.double())
            grads[label] = g
    assert grads["dense"].abs().max() > 1e-6
    assert grads["refit"].abs().max() <= 1e-4 * grads["dense"].abs().max()


@pytest.mark.parametrize("name", ["bert", "llama_gqa"])
def test_refitted_columns_fold_shrink_and_round_trip_beside_the_json(name, tmp_path):
    """fold + shrink of a column-refitted spec equals the dense model masked with the columns written; the columns
    travel in <stem>.columns.safetensors (sha256 in the JSON); a missing or foreign file is refused; a bank refuses."""
    from taskprune.bank import MaskBank
    from taskprune.spec import columns_file
    from taskprune.surgery import apply_mask

    model = wide_model(name).eval()
    calib = labelled(name, 2)
    spec = select_units(random_scores(model, seed=1), sparsity=0.4)
    tuned = tune_masks(model, spec, calib, forward=_fwd, target="residual", fit="columns")
    assert tuned.columns and set(tuned.columns) <= {"heads", "neurons"}
    batch = tiny_batch(name, seed=9)
    written = copy.deepcopy(model)
    fold_scales_(written, tuned)
    apply_mask(written, spec)
    shrunk = copy.deepcopy(model)
    plain = fold_scales_(shrunk, tuned)
    assert not plain.columns
    shrink_(shrunk, plain)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(**batch).logits, written(**batch).logits, rtol=1e-4, atol=1e-4)
    tuned.save(tmp_path / "spec.json")
    assert columns_file(tmp_path / "spec.json").name == "spec.columns.safetensors"
    back = PruneSpec.load(tmp_path / "spec.json")
    assert back.keep == tuned.keep and all(torch.equal(back.columns[k][n], t) for k, d in tuned.columns.items()
                                           for n, t in d.items())
    other = tmp_path / "other"
    other.mkdir()
    replace(tuned, columns={k: {n: t + 1 for n, t in d.items()} for k, d in tuned.columns.items()}).save(
        other / "spec.json")
    (tmp_path / "spec.columns.safetensors").write_bytes((other / "spec.columns.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"is not the columns file .* was saved with \(sha256 differs"):
        PruneSpec.load(tmp_path / "spec.json")
    (tmp_path / "spec.columns.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"names its refitted columns .* which is missing"):
        PruneSpec.load(tmp_path / "spec.json")
    with pytest.raises(ValueError, match=r"holds refitted weight columns .* masks on the bank's one shared model"):
        MaskBank(model).add("t", tuned)


def test_column_fit_options_are_refused_where_they_do_nothing():
    from taskprune.tuning import TuningConfig

    with pytest.raises(ValueError, match=r"configure the scales' solve, which fit='columns' does not use"):
        TuningConfig(tune="dense", fit="columns", solver="lsmr")
    with pytest.raises(ValueError, match=r"ridge=0.5 configures fit='columns'"):
        TuningConfig(tune="dense", ridge=0.5)
    with pytest.raises(ValueError, match=r"fit='weights' is not allowed; use one of \['scales', 'columns', 'bias', 'columns_bias'\]"):
        TuningConfig(tune="dense", fit="weights")
    with pytest.raises(ValueError, match=r"ridge=-1 must be a finite number >= 0"):
        TuningConfig(tune="dense", fit="columns", ridge=-1)
    with pytest.raises(ValueError, match=r"ridge=0.5 configures .* fit='bias' fits no columns"):
        TuningConfig(tune="dense", fit="bias", ridge=0.5)
    with pytest.raises(ValueError, match=r"which fit='columns_bias' does not use"):
        TuningConfig(tune="dense", fit="columns_bias", damping=0.0)


@pytest.mark.parametrize("name", ["llama_gqa", "bert"])
def test_bias_fit_is_flaps_compensation_of_the_removed_units_mean_output(name):
    """fit='bias', output target, the dense teacher, only the first feed-forward block pruned: its new bias is the old
    one plus the removed neurons' mean output over real tokens, W[:, removed] · mean(x[removed]) (FLAP); LLaMA's down
    projection, which has no bias, gets one; the model's weights and biases are put back."""
    model = wide_model(name).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = labelled(name, 2)
    block = get_architecture(model).ffn[0]
    n = get_architecture(model).fingerprint()["neurons"][block.name]
    spec = PruneSpec(keep={"neurons": {block.name: list(range(0, n, 2))}}, fingerprint=get_architecture(model).fingerprint())
    tuned = tune_masks(model, spec, calib, forward=_fwd, fit="bias")
    assert set(model.state_dict()) == set(before) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert list(tuned.biases["neurons"]) == [block.name] and not tuned.columns
    base, _ = find_base(model)
    proj = base.get_submodule(block.down)
    assert (proj.bias is None) == (name == "llama_gqa")
    xs = []
    with torch.no_grad():
        for b in calib:
            got = []
            h = proj.register_forward_hook(lambda m, a, o: got.append(a[0].detach()))
            try:
                _fwd(model, b)
            finally:
                h.remove()
            xs.append(got[0][b["attention_mask"].bool()])
    x = torch.cat(xs).double()
    removed = [i for i in range(n) if i % 2]
    w = weight_in_out(proj).detach().double()
    flap = x[:, removed].mean(0) @ w[removed] + (0 if proj.bias is None else proj.bias.detach().double())
    torch.testing.assert_close(tuned.biases["neurons"][block.name].double(), flap, rtol=1e-4, atol=1e-5)


def test_columns_and_bias_leave_the_pre_norm_error_stationary_in_the_bias_too():
    """fit='columns_bias', ridge 0: after the refit of the first feed-forward block the summed pre-norm error over
    real tokens, Σ (sum_S - sum_T), is ~0 (the intercept's normal equation) and smaller than with the columns alone."""

    model = wide_model("llama_gqa").eval()
    calib = labelled("llama_gqa", 3)
    arch = get_architecture(model)
    block = arch.ffn[0]
    n = arch.fingerprint()["neurons"][block.name]
    spec = PruneSpec(keep={"neurons": {block.name: list(range(0, n, 3))}}, fingerprint=arch.fingerprint())
    teacher = dense_targets(model, block, calib)
    errors = {}
    for fit in ("columns", "columns_bias"):
        tuned = tune_masks(model, spec, calib, forward=_fwd, target="residual", fit=fit, ridge=0.0)
        written = copy.deepcopy(model)
        fold_scales_(written, tuned)
        base, _ = find_base(written)
        proj, res = base.get_submodule(block.down), base.get_submodule(block.residual[0])
        total = 0
        with Gates(written) as gates:
            for batch, y_t in zip(calib, teacher):
                out, _ = capture(written, gates, gates.values_of(spec, scaled=False), proj, batch, _fwd, "output",
                                  (res, block.residual[1]))
                _, stream = capture(written, gates, gates.values_of(spec, scaled=False), proj, batch, _fwd, "input",
                                     (res, block.residual[1]))
                pick = _tokens(batch, out, False)
                total = total + (out.double()[pick] + stream.double()[pick] - y_t.double()).sum(0)
        errors[fit] = total.abs().max()
    assert errors["columns_bias"] <= 1e-4 * max(errors["columns"], 1e-3)


@pytest.mark.parametrize("fit", ["bias", "columns_bias"])
def test_refitted_biases_fold_shrink_export_and_reload(fit, tmp_path):
    """A LLaMA spec with refitted biases: shrink_ of the dense model folds them (a bias added where the projection had
    none), equal to the dense model with them written and masked; save_pruned of the dense model and load_pruned give
    the same logits; the biases travel beside the spec's JSON; a bank refuses them."""
    from taskprune.bank import MaskBank
    from taskprune.export import load_pruned, save_pruned
    from taskprune.surgery import apply_mask

    model = wide_model("llama_gqa").eval()
    spec = select_units(random_scores(model, seed=2), sparsity=0.4)
    tuned = tune_masks(model, spec, labelled("llama_gqa", 2), forward=_fwd, target="residual", fit=fit)
    assert tuned.biases.get("neurons") and tuned.biases.get("heads")
    batch = tiny_batch("llama_gqa", seed=4)
    written = copy.deepcopy(model)
    folded = fold_scales_(written, tuned)
    assert folded.meta["added_biases"] and not folded.biases
    apply_mask(written, spec)
    shrunk = shrink_(copy.deepcopy(model), tuned)  # folds first
    with torch.no_grad():
        want = written(**batch).logits
        torch.testing.assert_close(shrunk(**batch).logits, want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(shrink_(copy.deepcopy(model), replace(tuned, biases={}, columns={}))(**batch).logits,
                                  want, atol=1e-3)
    save_pruned(model, tuned, tmp_path / "out")  # the dense model: a copy is folded and shrunk
    back = load_pruned(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, want, rtol=1e-4, atol=1e-4)
    tuned.save(tmp_path / "spec.json")
    again = PruneSpec.load(tmp_path / "spec.json")
    assert all(torch.equal(again.biases[k][n], t) for k, d in tuned.biases.items() for n, t in d.items())
    with pytest.raises(ValueError, match=r"holds refitted weight columns or biases"):
        MaskBank(model).add("t", tuned)


def test_the_teacher_runs_on_a_copy_sharing_all_weights_but_the_fitted_projections_and_its_spec_gates_it():
    """No target is stored per token: the teacher's forwards run beside the student's on a copy of the model that
    shares every weight but the output / down projections' (which the refit writes into). A teacher spec gates that
    copy: a student tuned to its own selection keeps every scale at 1, and against the dense teacher it does not."""
    from taskprune.tuning import _teacher_copy

    model = wide_model("llama_gqa").eval()
    teacher = _teacher_copy(model)
    base, copied = find_base(model)[0], find_base(teacher)[0]
    arch = get_architecture(model)
    fitted = {b.out for b in arch.blocks("heads")} | {b.down for b in arch.blocks("neurons")}
    for name, p in base.named_parameters():
        q = copied.get_parameter(name)
        assert (q is p) == (name.rsplit(".", 1)[0] not in fitted), name
        assert torch.equal(q, p)
    calib = labelled("llama_gqa", 2)
    spec = select_units(random_scores(model, seed=1), sparsity=0.5)
    for target, close in ((spec, True), (None, False)):
        tuned = tune_masks(model, spec, calib, teacher=target, damping=0.0, forward=_fwd, target="residual")
        s = torch.tensor([v for blocks in tuned.scales.values() for scales in blocks.values() for v in scales])
        assert len(s) == sum(len(spec.kept(k, b.name)) for k in ("heads", "neurons") for b in arch.blocks(k))
        assert ((s - 1).abs().max() < 1e-3) == close


def test_tuning_runs_in_eval_mode_whatever_the_models_mode():
    """Dropout never enters the fit (the Lightning callback tunes a model left in train mode): the same refit from a
    model in train mode as in eval mode, and the model's mode is given back."""
    model = wide_model("bert")
    assert model.config.hidden_dropout_prob > 0
    batches = labelled("bert", 2)
    spec = select_units(random_scores(model), sparsity=0.5)
    in_train = tune_masks(model.train(), spec, batches, forward=_fwd, target="residual", fit="columns")
    assert model.training
    in_eval = tune_masks(model.eval(), spec, batches, forward=_fwd, target="residual", fit="columns")
    torch.testing.assert_close(in_train.columns, in_eval.columns, rtol=0, atol=0)


def test_tuning_runs_each_calibration_batch_through_the_model_once_and_stops_its_threads():
    """The sub-layers are fitted in lockstep: every calibration forward runs once for all the fits (plus one forward
    to find their order and one teacher pass per batch), not once per sub-layer; no thread outlives the call, also
    when a forward raises, and the error reaches the caller."""
    import threading

    model = wide_model("llama_gqa")
    batches = labelled("llama_gqa", 3)
    spec = select_units(random_scores(model), sparsity=0.5)
    calls = []
    embed = model.get_input_embeddings()
    hook = embed.register_forward_hook(lambda *a: calls.append(1))
    before = threading.active_count()
    tuned = tune_masks(model, spec, batches, forward=_fwd, target="residual", fit="columns")
    hook.remove()
    assert len(tuned.columns["neurons"]) + len(tuned.columns["heads"]) == 2 * model.config.num_hidden_layers
    assert len(calls) == 1 + 2 * len(batches)
    assert threading.active_count() == before

    def failing(m, batch):
        if batch is batches[1]:
            raise KeyError("bad batch")
        return _fwd(m, batch)

    with pytest.raises(KeyError, match="bad batch"):
        tune_masks(model, spec, batches, forward=failing, target="residual", fit="columns")
    assert threading.active_count() == before
    torch.testing.assert_close(tune_masks(model, spec, batches, forward=_fwd, target="residual", fit="columns").columns,
                               tuned.columns)  # the failed call left the model as it was
