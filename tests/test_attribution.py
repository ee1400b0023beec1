import pytest
import torch

from taskprune.attribution import METHODS, Attributor, default_forward, quadrature, score_units
from taskprune.gates import Gates
from tiny import ARCHS, tiny_batch, tiny_model


def labelled(name, batch_size=4, seed=1):
    b = tiny_batch(name, batch_size=batch_size, seed=seed)
    if name == "bert":
        b["labels"] = torch.arange(batch_size) % 3
    elif name.startswith("t5"):
        b["labels"] = b["decoder_input_ids"].clone()
    else:
        lab = b["input_ids"].clone()
        b["labels"] = lab.masked_fill(b["attention_mask"] == 0, -100)
    return b


def target_gap(model, batch, att, baseline=None):
    """F(all gates 1) - F(all gates at the baseline; default: where att's path starts), summed over the batch."""
    baseline = att.options["baseline"] if baseline is None else baseline
    with torch.no_grad(), Gates(model) as g:
        g.set(torch.ones(g.n_units))
        f1 = att.target(default_forward(model, batch), batch).sum()
        g.set(torch.full((g.n_units,), baseline))
        f0 = att.target(default_forward(model, batch), batch).sum()
    return float(f1 - f0)


@pytest.mark.parametrize("arch", ARCHS)
def test_ig_completeness(arch):
    model, batch = tiny_model(arch), labelled(arch)
    att = Attributor(model, "ig", steps=24, quadrature="gauss_legendre", aggregate="signed", baseline=0.0)
    sums, count = att.batch_sums(batch)
    gap = target_gap(model, batch, att)
    assert count == 4
    assert sums.sum().item() == pytest.approx(gap, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("baseline", [0.5, 0.9])
def test_ig_completeness_from_a_baseline(baseline):
    model, batch = tiny_model("bert"), labelled("bert")
    att = Attributor(model, "ig", steps=16, quadrature="gauss_legendre", aggregate="signed", baseline=baseline)
    gap = target_gap(model, batch, att, baseline)
    assert gap != pytest.approx(target_gap(model, batch, att, 0.0), rel=1e-3)  # the start of the path matters
    assert att.batch_sums(batch)[0].sum().item() == pytest.approx(gap, rel=1e-3, abs=1e-6)
    assert att.options["baseline"] == baseline


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, "0.5"])
def test_ig_baseline_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"baseline=.*\[0, 1\)"):
        Attributor(tiny_model("bert"), "ig", baseline=bad)


def test_ig_error_falls_with_steps():
    model, batch = tiny_model("t5"), labelled("t5")
    errors = []
    for steps in (1, 4, 16):
        att = Attributor(model, "ig", steps=steps, quadrature="riemann_middle", aggregate="signed")
        gap = target_gap(model, batch, att)
        errors.append(abs(att.batch_sums(batch)[0].sum().item() - gap))
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("rule", ["riemann_left", "riemann_right", "riemann_middle", "trapezoid", "gauss_legendre"])
def test_ig_exact_for_linear_target(rule):
    model, batch = tiny_model("bert"), labelled("bert")
    c = torch.linspace(-1, 1, Gates(model).n_units)
    holder = {}

    def forward(m, b):  # F(g) = g · c per sample: linear in the gates
        return holder["att"].gates.values @ c

    att = Attributor(model, "ig", target=lambda out, b: out, steps=2, quadrature=rule, aggregate="signed",
                     forward=forward, baseline=0.0)
    holder["att"] = att
    sums, _ = att.batch_sums(batch)
    torch.testing.assert_close(sums, (4 * c).double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule", ["riemann_left", "riemann_right", "riemann_middle", "trapezoid", "gauss_legendre"])
def test_quadrature_weights_sum_to_one(rule):
    nodes, weights = quadrature(rule, 5)
    assert weights.sum().item() == pytest.approx(1.0)
    assert nodes.min() >= 0 and nodes.max() <= 1


def test_batches_add_up():
    model = tiny_model("bert")
    b8 = labelled("bert", batch_size=8, seed=3)
    halves = [{k: v[:4] for k, v in b8.items()}, {k: v[4:] for k, v in b8.items()}]
    whole = score_units(model, [b8], "ig", steps=4)
    parts = score_units(model, halves, "ig", steps=4)
    assert whole.count == parts.count == 8
    for kind in whole.sums:
        for name in whole.sums[kind]:
            torch.testing.assert_close(whole.sums[kind][name], parts.sums[kind][name], rtol=1e-5, atol=1e-9)


def test_alpha_batch_gives_same_scores():
    model, batch = tiny_model("llama_gqa"), labelled("llama_gqa")
    a = Attributor(model, "ig", steps=6, alpha_batch=1).batch_sums(batch)[0]
    b = Attributor(model, "ig", steps=6, alpha_batch=4).batch_sums(batch)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_padding_never_contributes():
    model = tiny_model("bert")
    batch = labelled("bert", batch_size=4)
    row = 1  # a padded row
    n_real = int(batch["attention_mask"][row].sum())
    alone = {k: v[row : row + 1, :n_real] if v.dim() == 2 else v[row : row + 1] for k, v in batch.items()}
    in_batch = {k: v[row : row + 1] for k, v in batch.items()}
    a = Attributor(model, "ig", steps=4).batch_sums(alone)[0]
    b = Attributor(model, "ig", steps=4).batch_sums(in_batch)[0]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_sample_weight_zero_drops_sample():
    model, batch = tiny_model("bert"), labelled("bert")
    weighted = {**batch, "sample_weight": torch.tensor([1.0, 1.0, 1.0, 0.0])}
    first3 = {k: v[:3] for k, v in batch.items()}
    a, ca = Attributor(model, "fisher").batch_sums(weighted)
    b, cb = Attributor(model, "fisher").batch_sums(first3)
    assert ca == cb == 3
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_weights_frozen_and_untouched(method):
    model, batch = tiny_model("gpt2"), labelled("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    scores = score_units(model, [batch], method)
    assert model.training  # mode restored
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for blocks in scores.sums.values():
        for v in blocks.values():
            assert torch.isfinite(v).all() and v.dtype == torch.float64


def test_pseudo_reads_no_labels_and_matches_gold_on_predictions():
    model, batch = tiny_model("bert"), labelled("bert")
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        pred = model(**unlabelled).logits.argmax(-1)
    pseudo = score_units(model, [unlabelled], "ig", target="pseudo", steps=3)
    gold = score_units(model, [{**unlabelled, "labels": pred}], "ig", target="label", steps=3)
    for kind in pseudo.sums:
        for name in pseudo.sums[kind]:
            torch.testing.assert_close(pseudo.sums[kind][name], gold.sums[kind][name])


def test_units_subset_and_data_free_methods():
    model = tiny_model("bert")
    heads = score_units(model, None, "magnitude", units="heads")
    assert heads.kinds == ("heads",) and heads.count == 0
    r1, r2 = score_units(model, None, "random", seed=1), score_units(model, None, "random", seed=1)
    assert torch.equal(r1.sums["neurons"]["encoder.layer.0.intermediate"],
                       r2.sums["neurons"]["encoder.layer.0.intermediate"])


def test_bad_method():
    with pytest.raises(ValueError, match="unknown method 'taylor'"):
        Attributor(tiny_model("bert"), "taylor")


def test_bad_unit():
    with pytest.raises(ValueError, match="unknown unit kind"):
        Attributor(tiny_model("bert"), "ig", units="layers")


def test_bad_quadrature():
    with pytest.raises(ValueError, match="unknown quadrature 'simpson'"):
        Attributor(tiny_model("bert"), "ig", quadrature="simpson")


def test_bad_steps():
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        Attributor(tiny_model("bert"), "ig", steps=0)


def test_bad_alpha_batch():
    with pytest.raises(ValueError, match="alpha_batch must be a positive integer"):
        Attributor(tiny_model("bert"), "ig", alpha_batch=0)


def test_bad_aggregate():
    with pytest.raises(ValueError, match="unknown aggregate 'median'"):
        Attributor(tiny_model("bert"), "ig", aggregate="median")


def test_bad_target():
    with pytest.raises(ValueError, match="unknown target 'gold'"):
        Attributor(tiny_model("bert"), "ig", target="gold")


def test_no_batches():
    with pytest.raises(ValueError, match="data loader is empty"):
        score_units(tiny_model("bert"), [], "ig")


def test_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        Attributor(tiny_model("bert"), "ig").batch_sums({"input_ids": torch.zeros(0, 5, dtype=torch.long)})


def test_labels_missing_for_gold_target():
    b = {k: v for k, v in labelled("bert").items() if k != "labels"}
    with pytest.raises(ValueError, match="needs batch\\['labels'\\]; use target='pseudo'"):
        score_units(tiny_model("bert"), [b], "ig", steps=1)


def test_non_finite_attribution_has_hint():
    model, batch = tiny_model("bert"), labelled("bert")
    with pytest.raises(ValueError, match="half precision"):
        score_units(model, [batch], "grad_x_gate", target=lambda out, b: out.logits.sum(-1) * float("inf"))


def test_unsupported_model_type():
    import transformers as tf

    model = tf.DistilBertModel(tf.DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=20))
    with pytest.raises(ValueError, match="unsupported model_type 'distilbert'; supported: .*bert"):
        Attributor(model, "ig")


def test_square_aggregate_of_grad_x_gate_is_the_per_sample_fisher():
    """Squared per-sample attributions put any score on Fisher's scale: at the end point they are Fisher itself."""
    model, batch = tiny_model("bert"), labelled("bert")
    sq = Attributor(model, "grad_x_gate", aggregate="square").batch_sums(batch)[0]
    fisher = Attributor(model, "fisher").batch_sums(batch)[0]
    assert torch.allclose(sq, fisher, rtol=1e-6, atol=1e-12)
    ig_sq = Attributor(model, "ig", steps=3, aggregate="square").batch_sums(batch)[0]
    assert not torch.allclose(ig_sq, fisher, rtol=1e-3)  # IG's path gradients are not the end point's
    assert torch.all(ig_sq >= 0) and ig_sq.sum() > 0


def test_fisher_per_batch_is_kwons_fisher_of_the_masks():
    """fisher with per='batch' is Kwon et al.'s Fisher of the masks: Σ_b g_b² of the per-batch mask gradients
    (taskprune.tuning.batch_gradients, the rows rearrangement reads), up to the constant n_b / N."""
    from taskprune.tuning import batch_gradients

    model = tiny_model("bert")
    batches = [labelled("bert", batch_size=4, seed=s) for s in (1, 2, 3)]
    ours = score_units(model, batches, "fisher", per="batch")
    grads, n = batch_gradients(model, batches)
    assert ours.count == n == 12 and ours.options["per"] == "batch"
    for kind, blocks in grads.items():
        for name, g in blocks.items():
            v = g.pow(2).sum(0)  # equal batches: Σ_b 4·ḡ_b² / 12 = Σ_b ḡ_b² / 3
            torch.testing.assert_close(ours.mean()[kind][name], v / 3, rtol=1e-5, atol=1e-12)
    per_sample = score_units(model, batches, "fisher")  # E[g²] >= E[g]² per batch: strictly, as samples differ
    flat = {name: torch.cat([torch.cat(list(s.mean()[k].values())) for k in s.sums])
            for name, s in (("sample", per_sample), ("batch", ours))}
    assert torch.all(flat["sample"] >= flat["batch"] - 1e-12) and flat["sample"].sum() > 1.5 * flat["batch"].sum()


def test_per_batch_ignores_zero_weight_samples():
    model, batch = tiny_model("bert"), labelled("bert", batch_size=6)
    padded = {**batch, "sample_weight": torch.tensor([1.0, 1, 1, 1, 0, 0])}
    first4 = {k: v[:4] for k, v in batch.items()}
    a, wa = Attributor(model, "grad_x_gate", aggregate="square", per="batch").batch_sums(padded)
    b, wb = Attributor(model, "grad_x_gate", aggregate="square", per="batch").batch_sums(first4)
    assert wa == wb == 4
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


def test_bad_per():
    with pytest.raises(ValueError, match="unknown per 'token'"):
        Attributor(tiny_model("bert"), "ig", per="token")


def test_options_of_other_methods_are_refused_not_ignored():
    from taskprune.attribution import AttributionConfig

    cases = (("fisher", {"steps": 8}), ("grad_x_gate", {"baseline": 0.0}), ("fisher", {"aggregate": "abs"}),
             ("activation", {"per": "batch"}), ("ig", {"seed": 3}))
    for method, option in cases:
        with pytest.raises(ValueError, match=rf"{next(iter(option))}=.* has no effect with method='{method}'"):
            AttributionConfig(method=method, **option)
    assert AttributionConfig(method="fisher", per="batch").per == "batch"
