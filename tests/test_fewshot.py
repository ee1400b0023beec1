"""The k-shot prompted classifier (taskprune.models.fewshot) on a tiny random LLaMA (GQA) with a word-level HF tokenizer:
the prefix KV cache gives the scores of recomputing the prefix, padding changes nothing, attribution and shrinking
go through it, the shrunk decoder exports, reloads and generates the same tokens, and the shipped SmolLM2 config
runs fit + test through the CLI with the tiny LLaMA in place of SmolLM2."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml
from tiny import tiny_model

from taskprune.attribution import score_units
from taskprune.export import load_pruned, save_pruned
from taskprune.models.fewshot import FewShotTemplate, PromptedLM, TextCollator, draw_demos
from taskprune.selection import select_units
from taskprune.surgery import apply_mask, remove_mask, shrink_

WORDS = ("<pad> <s> </s> <unk> review sentiment : positive negative good bad film great awful plot the is a movie "
         "classify each as or n/a [mask] system user assistant <|im_start|> <|im_end|>").split()
CHAT = ("{% for m in messages %}{{ '<|im_start|> ' + m['role'] + ' ' + m['content'] + ' <|im_end|> ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|> assistant ' }}{% endif %}")
TEMPLATE = FewShotTemplate("classify each review as positive or negative", "review : {text} sentiment :",
                           (("negative", "bad"), ("positive",)))
TRAIN = [{"sentence": s, "label": y} for s, y in [("good film", 1), ("awful plot", 0), ("great movie", 1),
                                                    ("bad bad film", 0), ("a great plot", 1), ("the awful movie", 0)]]
ROWS = [{"sentence": s, "label": y, "idx": i} for i, (s, y) in enumerate([
    ("good film", 1), ("awful plot awful film is bad", 0), ("great", 1), ("the movie is bad bad and the plot awful", 0),
    ("", 1)])]


def word_tokenizer(chat: bool = False) -> tf.PreTrainedTokenizerFast:
    """A whitespace word-level fast tokenizer over :data:`WORDS` (saveable, loadable offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>")
    if chat:
        tok.chat_template = CHAT
    return tok


def prompted(style: str = "plain", arch: str = "llama_gqa", **kw) -> PromptedLM:
    return PromptedLM(tiny_model(arch), template=TEMPLATE, demos=draw_demos(TRAIN, 2, 2, seed=0),
                      tokenizer=word_tokenizer(chat=style == "chat"), style=style, **kw)


def batch(model, rows=ROWS):
    return TextCollator(model, max_length=16)(rows)


@pytest.mark.parametrize("style", ["plain", "chat"])
@pytest.mark.parametrize("calibrate", [True, False])
def test_prefix_cache_gives_the_scores_of_recomputing_the_prefix(style, calibrate):
    cached = prompted(style, calibrate=calibrate)
    recomputed = prompted(style, calibrate=calibrate, prefix_cache=False)
    assert len(cached.prefix_ids) > 10
    with torch.inference_mode():
        a, b = cached(**batch(cached)), recomputed(**batch(recomputed))
        again = cached(**batch(cached))  # the cache is reused, not consumed
    assert a.shape == (5, 2) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, a, atol=0, rtol=0)


def test_padding_does_not_change_scores():
    m = prompted()
    with torch.inference_mode():
        together = m(**batch(m))
        alone = torch.cat([m(**batch(m, [r])) for r in ROWS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_calibration_removes_the_content_free_bias():
    m, uncalibrated = prompted(), prompted(calibrate=False)
    with torch.inference_mode():
        raw = uncalibrated(**batch(m, [{"sentence": "n/a"}]))
        calibrated = m(**batch(m, [{"sentence": "n/a"}]))
    assert raw[0, 0] != raw[0, 1]
    assert (calibrated[0, 0] - calibrated[0, 1]).abs() < (raw[0, 0] - raw[0, 1]).abs()


def test_a_changed_model_recomputes_cache_and_bias():
    m = prompted()
    with torch.inference_mode():
        before = m(**batch(m))
    spec = select_units(score_units(m, [batch(m)], "magnitude"), macs=0.4, seq_len=32)
    shrink_(m, spec)
    with torch.inference_mode():
        after = m(**batch(m))
    fresh = copy.deepcopy(m)
    fresh.prefix_cache = False
    with torch.inference_mode():
        expected = fresh(**batch(fresh))
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)


def test_attribution_with_the_cached_prefix_gates_the_rows_only():
    full, rows_only = prompted(), prompted(attribute_prefix=False)
    a = score_units(full, [batch(full)], "grad_x_gate").mean()
    b = score_units(rows_only, [batch(rows_only)], "grad_x_gate").mean()
    for kind in a:
        for name in a[kind]:
            assert torch.isfinite(b[kind][name]).all()
    assert any(not torch.allclose(a[k][n], b[k][n]) for k in a for n in a[k])  # the prefix's share is left out


@pytest.mark.parametrize("target", ["label", "pseudo"])
def test_attribution_through_the_prompted_lm_and_masked_equals_shrunk(target):
    m = prompted()
    scores = score_units(m, [batch(m)], "ig", target, steps=2)
    assert scores.count == 5
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for b in scores.mean().values() for v in b.values())
    spec = select_units(scores, macs=0.5, seq_len=32)
    apply_mask(m, spec)
    with torch.inference_mode():
        masked = m(**batch(m))
    remove_mask(m)
    shrink_(m, spec)
    with torch.inference_mode():
        shrunk = m(**batch(m))
    torch.testing.assert_close(masked, shrunk, atol=1e-5, rtol=1e-5)


def test_shrunk_decoder_exports_reloads_and_generates_the_same_tokens(tmp_path):
    m = prompted()
    spec = select_units(score_units(m, [batch(m)], "ig", steps=1), macs=0.4, seq_len=32)
    shrink_(m, spec)
    save_pruned(m, spec, tmp_path / "pruned", tokenizer=m.tokenizer)
    reloaded = load_pruned(tmp_path / "pruned")
    assert isinstance(reloaded, tf.LlamaForCausalLM)
    ids = torch.tensor([m.prompt_ids("good film")])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        ours = m.lm.generate(ids, **kw)
        theirs = reloaded.generate(ids, **kw)
    assert ours.shape[1] == ids.shape[1] + 6
    assert torch.equal(ours, theirs)
    again = PromptedLM(reloaded, template=TEMPLATE, demos=m.demos, tokenizer=m.tokenizer)
    with torch.inference_mode():
        torch.testing.assert_close(again(**batch(again)), m(**batch(m)), atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise():
    tok, lm = word_tokenizer(), tiny_model("llama_gqa")
    with pytest.raises(ValueError, match="unknown prompt style 'xml'"):
        PromptedLM(lm, template=TEMPLATE, demos=[], tokenizer=tok, style="xml")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        PromptedLM(lm, template=TEMPLATE, demos=[], tokenizer=tok, style="chat")
    with pytest.raises(ValueError, match="needs its tokenizer"):
        PromptedLM(lm, template=TEMPLATE, demos=[])
    with pytest.raises(ValueError, match="no few-shot template for task 'qqp'"):
        PromptedLM(lm, task="qqp", demos=[], tokenizer=tok)
    with pytest.raises(ValueError, match="exactly one"):
        FewShotTemplate("x", "no placeholder", (("a",), ("b",)))
    with pytest.raises(ValueError, match="share a first token"):
        PromptedLM(lm, template=FewShotTemplate("x", "{text}", (("good",), ("good",))), demos=[], tokenizer=tok)
    with pytest.raises(ValueError, match="fewer than shots=5"):
        draw_demos(TRAIN, 5, 2)
    with pytest.raises(ValueError, match="neither 'smollm2-135m-instruct' nor a local folder"):
        PromptedLM("no/such/folder", template=TEMPLATE, demos=[])


# --------------------------------------------------------------------------------------------------- CLI
CONFIG = Path(__file__).parent.parent / "configs" / "smollm2_sst2.yaml"


def tiny_lm_folder(path: Path) -> Path:
    lm = tiny_model("llama_gqa")
    lm.config.vocab_size = 100
    lm.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_smollm2_config_runs_fit_and_test_with_a_tiny_llama(tmp_path, monkeypatch):
    """configs/smollm2_sst2.yaml as shipped, with the tiny LLaMA as the LM and few rows (offline, seconds)."""
    from taskprune.lightning.cli import main

    monkeypatch.chdir(tmp_path)
    lm = tiny_lm_folder(tmp_path / "tiny-llama")
    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg["model"]["model"]["class_path"] == "taskprune.models.fewshot.PromptedLM"
    cfg["model"]["model"]["init_args"]["lm"] = str(lm)
    cfg["data"].pop("data_dir", None)  # the embedded SST-2 subset; tests never read ../shared
    cfg["data"].update({"tokenizer": str(lm), "calib_samples": 8, "eval_samples": 8, "batch_size": 4})
    cfg["pruning"].update({"output_dir": str(tmp_path / "run"), "export_dir": str(tmp_path / "pruned")})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(tmp_path / "tiny.yaml")])
    assert (tmp_path / "run" / "spec.json").is_file()
    reloaded = load_pruned(tmp_path / "pruned")
    assert isinstance(reloaded, tf.LlamaForCausalLM)
    cli = main(["test", "--config", str(tmp_path / "tiny.yaml")])
    names = {r["set"] for r in cli.model.results}
    assert "sst2" in names and all(0 <= r["pruned"] <= 1 for r in cli.model.results)


@pytest.mark.parametrize(("pipeline", "cut"), [("ig_rows", 0.4), ("igsq_search", 0.4), ("fisher_search_tune", 0.4),
                                                   ("igsq_neurons", 0.2), ("fisher_search_refit", 0.4),
                                                   ("fisher_search_refit_iter", 0.4), ("fisher_search_refit_bias", 0.4),
                                                   ("fisher_search_refit_bias_iter", 0.4)])
def test_benchmark_pipelines_run_through_the_prompted_lm(pipeline, cut):
    """benchmarks/smollm2.py's pipelines on the tiny LLaMA: scores with gates on the prefix, allocation, mask tuning
    (it fits the single packed pass of the prefix and the batch's rows: the content-free rows of contextual
    calibration pass after them and are not fitted; the refit fails on mismatched token counts otherwise) and shrinking."""
    from benchmarks.smollm2 import PIPELINES, Scorer, achieved_cut, prune

    m = prompted()
    pruned, spec, _ = prune(Scorer(m, [batch(m)], steps=1, alpha_batch=1), pipeline, cut, seq_len=32)
    assert m.attribute_prefix  # restored after a rows-only scoring
    assert cut - 1e-9 <= achieved_cut(m, pruned, 32) < cut + 0.15  # at least the cut asked for
    if PIPELINES[pipeline].units == "neurons":
        assert spec.summary()["heads"]["kept"] == spec.summary()["heads"]["total"]
    with torch.inference_mode():
        out = pruned(**batch(pruned))
    assert out.shape == (5, 2) and torch.isfinite(out).all()


def _smollm2_benchmark(tmp_path, monkeypatch):
    """benchmarks/smollm2.py with the tiny LLaMA and word tokenizer in place of SmolLM2, on a tiny SST-2 layout."""
    import benchmarks.smollm2 as bench

    words = ["good film", "awful plot", "great movie", "bad bad film", "a great plot", "the awful movie", "great",
             "bad", "the film is good", "the plot is awful"]
    rows = [(w, int(any(x in w for x in ("good", "great")))) for w in words]
    d = tmp_path / "data"
    (d / "sst2").mkdir(parents=True)
    (d / "sst2" / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{w} {i}\t{y}\n" for i in range(6)
                                                                         for w, y in rows).replace(" 0\t", "\t"))
    (d / "sst2" / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{w}\t{y}\n" for w, y in rows))
    for folder, name, lab in (("imdb", "test_sample.jsonl", {0: 0, 1: 1}), ("yelp_full", "test_sample.jsonl",
                                                                          {0: 0, 1: 4})):
        (d / folder).mkdir()
        (d / folder / name).write_text("".join(json.dumps({"sentence": w, "label": lab[y]}) + "\n" for w, y in rows))
    monkeypatch.setattr(bench, "load_smollm2", lambda: (tiny_model("llama_gqa"), word_tokenizer()))
    monkeypatch.setitem(bench.TEMPLATES, "sst2", TEMPLATE)
    monkeypatch.setitem(bench.TASKS, "sst2", ("sst2/dev.tsv", "file", 1))
    return bench, d


def test_smollm2_benchmark_resumes_and_checks_the_targets(tmp_path, monkeypatch):
    """Calibration seeds draw disjoint rows apart from the selection rows; the rendered table carries unseen domains
    and the target verdicts; a rerun of the same command recomputes nothing, a changed setting recomputes all."""
    bench, d = _smollm2_benchmark(tmp_path, monkeypatch)
    out = tmp_path / "r.md"
    argv = ["--data-dir", str(d), "--tasks", "sst2", "--cuts", "0.2", "0.4", "--n-eval", "6", "--n-ood", "4",
            "--n-calib", "4", "--calib-seeds", "0", "1", "--n-select", "4", "--pipeline", "fisher_search",
            "--speed-prompts", "1", "--reps", "1", "--new-tokens", "2", "--calib-batch", "2", "--out", str(out)]
    bench.main(argv)
    res = json.loads(out.with_suffix(".json").read_text())
    assert not res["partial"] and [r["kind"] for r in res["rows"]] == ["dense", "seed", "seed"]
    seeds = res["rows"][1:]
    assert "prefill_speedup" in seeds[0]["cuts"][0] and "prefill_speedup" not in seeds[1]["cuts"][0]
    assert seeds[0]["cuts"][0]["export_generate_equal"] is True
    assert set(seeds[1]["cuts"][1]["ood"]) == {"imdb", "yelp"}
    text = out.read_text()
    assert "sst2 → yelp" in text and "≥ 95% of dense at a 40% cut" in text and "calibration ≤ 10 min" in text
    assert all(s["peak_rss_of_seed"] for s in seeds) and "each seed's own peak" in text  # Linux: reset per seed

    t = bench.TaskRows("sst2", bench.parse_args(argv), *bench.load_smollm2())
    picked = [[r["sentence"] for r in t.calibration_rows(4, s)] for s in (0, 1)]
    assert len(set(picked[0] + picked[1])) == 8  # disjoint seeds
    assert not set(picked[0] + picked[1]) & {r["sentence"] for r in t.select}  # no text calibrated and selected on

    def fail(*a, **k):
        raise AssertionError("a row already done was recomputed")

    monkeypatch.setattr(bench, "seed_row", fail)
    monkeypatch.setattr(bench, "dense_row", fail)
    bench.main(argv)  # resumes: nothing to do
    assert len(json.loads(out.with_suffix(".json").read_text())["rows"]) == 3
    with pytest.raises(AssertionError, match="recomputed"):
        bench.main([*argv, "--max-text", "8"])  # another setting: the rows are not reused


def test_smollm2_selection_rows_per_row_count_and_seed(tmp_path, monkeypatch):
    """--select with several row counts and calibration seeds: one row per (row count, seed, pipeline) on the same
    selection rows, resumable; a row of a file written before seeds counts as seed 0; the summary averages seeds."""
    bench, d = _smollm2_benchmark(tmp_path, monkeypatch)
    out = tmp_path / "s.md"
    argv = ["--data-dir", str(d), "--tasks", "sst2", "--cuts", "0.4", "--n-eval", "6", "--n-calib", "2", "4",
            "--n-select", "4", "--calib-batch", "2", "--select", "fisher_search", "fisher_search_refit", "--out", str(out)]
    bench.main(argv)
    res = json.loads(out.with_suffix(".json").read_text())
    rows = res["rows"]
    assert [(r["n_calib"], r["seed"], r["pipeline"]) for r in rows] == [
        (2, 0, "fisher_search"), (2, 0, "fisher_search_refit"), (4, 0, "fisher_search"), (4, 0, "fisher_search_refit")]
    assert len({r["dense_accuracy"] for r in rows}) == 1
    assert "| 4 | fisher_search_refit | 40% | 1 |" in out.read_text()
    for r in res["rows"]:  # as written before --select took seeds
        del r["seed"]
    out.with_suffix(".json").write_text(json.dumps(res))
    bench.main([*argv, "--calib-seeds", "0", "1"])  # seed 0 is not recomputed: four rows of seed 1 are added
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["seed"] for r in rows] == [0] * 4 + [1] * 4
    assert [r["cuts"][0]["accuracy"] for r in rows[:4]] == [r["cuts"][0]["accuracy"] for r in res["rows"]]
    two = [r["cuts"][0]["accuracy"] / r["dense_accuracy"] for r in rows
           if (r["n_calib"], r["pipeline"]) == (4, "fisher_search")]
    assert f"| 4 | fisher_search | 40% | 2 | {100 * sum(two) / 2:.1f} |" in out.read_text()
    with pytest.raises(SystemExit):  # several row counts make a curve of the selection, not an evaluation
        bench.parse_args(argv[: argv.index("--select")])


@pytest.mark.parametrize("fit", ["columns_bias", "scales"])
def test_shared_prefix_once_fits_the_prefix_in_the_first_batch_only(fit):
    """shared_prefix="once": tuning on the rows in two batches gives the fit of one batch of all of them (the prefix's
    tokens counted once either way); per_batch counts the prefix twice and gives another fit."""
    from taskprune.tuning import tune_masks

    m = prompted()
    whole, halves = batch(m), [batch(m, ROWS[:2]), batch(m, ROWS[2:])]
    spec = select_units(score_units(m, [whole], method="random"), sparsity=0.4)
    kw = dict(target="residual", fit=fit, damping=0.0)
    one = tune_masks(m, spec, [whole], **kw)
    once = tune_masks(m, spec, halves, shared_prefix="once", **kw)
    twice = tune_masks(m, spec, halves, **kw)
    assert once.meta["tuned"]["shared_prefix"] == "once"
    from test_tuning import labelled, random_scores

    plain, bs = tiny_model("llama_gqa"), labelled("llama_gqa", 2)  # no shared prefix: "once" changes nothing
    s2 = select_units(random_scores(plain), sparsity=0.4)
    assert fitted_equal(tune_masks(plain, s2, bs, shared_prefix="once", **kw), tune_masks(plain, s2, bs, **kw))
    fitted = (lambda s: s.columns) if fit != "scales" else (lambda s: {k: {n: torch.tensor(v) for n, v in b.items()}
                                                                       for k, b in s.scales.items()})
    a, b, c = fitted(one), fitted(once), fitted(twice)
    assert a and a.keys() == b.keys()
    differs = False
    for kind in a:
        for name in a[kind]:
            torch.testing.assert_close(b[kind][name], a[kind][name], atol=2e-4, rtol=2e-4)
            differs |= not torch.allclose(c[kind][name], a[kind][name], atol=2e-3, rtol=2e-3)
    assert differs


def fitted_equal(a, b) -> bool:
    """Whether two tuned specs hold the same scales, columns and biases."""
    same = lambda x, y: x.keys() == y.keys() and all(
        x[k].keys() == y[k].keys() and all(torch.equal(torch.as_tensor(x[k][n]), torch.as_tensor(y[k][n])) for n in x[k])
        for k in x)
    return same(a.scales, b.scales) and same(a.columns, b.columns) and same(a.biases, b.biases)


def test_tuning_fits_the_prefix_once_and_the_rows_real_tokens_and_a_masked_forward_is_unchanged():
    """In its single pass (what tuning runs) a prompted LM packs its prefix once with its rows' real tokens, no padding:
    each projection is called once with exactly those tokens, the scores are those of the other paths, and the
    masked model's scores equal those of recomputing the prefix for every row."""
    from test_tuning import capture

    from taskprune.arch import find_base, get_architecture
    from taskprune.attribution import default_forward
    from taskprune.gates import Gates

    m, per_row = prompted(), prompted(prefix_cache=False)
    b = batch(m)
    block = get_architecture(m).ffn[1]
    proj = find_base(m)[0].get_submodule(block.down)
    calls = []
    hook = proj.register_forward_hook(lambda mod, a, r: calls.append(a[0].shape))
    with Gates(m) as gates, torch.no_grad(), m.single_pass():
        packed = m(**b)
        hook.remove()
        x = capture(m, gates, None, proj, b, default_forward, "input")
    _, row_mask = m._rows(b["input_ids"], b["attention_mask"])
    assert len(calls) == 2  # the batch, then the content-free rows of contextual calibration
    assert x.shape[0] == len(m.prefix_ids) + int(row_mask.sum()) < len(m.prefix_ids) + row_mask.numel()
    with torch.no_grad():
        torch.testing.assert_close(packed, m(**b), atol=1e-5, rtol=1e-5)
    spec = select_units(score_units(m, [b], method="random"), sparsity=0.4)
    apply_mask(m, spec)
    apply_mask(per_row, spec)
    with torch.no_grad():
        torch.testing.assert_close(m(**b), per_row(**batch(per_row)), atol=1e-5, rtol=1e-5)


def test_tuning_a_prompted_lm_inside_a_users_module_fits_the_same_packed_pass():
    """The single pass is entered for a prompted LM anywhere inside the tuned module: wrapped, it is fitted exactly as
    bare (without it, the prefix's pass would be the first call of each projection and the rows would not be fitted)."""
    from torch import nn

    from taskprune.tuning import tune_masks

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return self.inner(**kw)

    m = prompted()
    b = batch(m)
    spec = select_units(score_units(m, [b], method="random"), sparsity=0.4)
    bare = tune_masks(m, spec, [b], target="residual", fit="columns")
    wrapped = tune_masks(Wrapped(m), spec, [b], target="residual", fit="columns")
    for kind, blocks in bare.columns.items():
        for name, cols in blocks.items():
            torch.testing.assert_close(wrapped.columns[kind][name], cols)


@pytest.mark.parametrize("arch", ["llama_gqa", "gpt2"])
def test_the_single_packed_pass_gives_the_scores_of_the_cached_prefix(arch):
    """The packed pass (prefix + rows in one sequence, a block mask, positions continuing the prefix's) is the same
    function as the prefix cache for each decoder family's attention and position code, gated or not."""
    from taskprune.gates import Gates

    m = prompted(arch=arch)
    b = batch(m)
    with torch.no_grad():
        cached = m(**b)
        with Gates(m) as gates:
            values = torch.rand(gates.n_units, generator=torch.Generator().manual_seed(0))
            gates.set(values)
            gated = m(**b)
            with m.single_pass():
                torch.testing.assert_close(m(**b), gated, atol=1e-5, rtol=1e-5)
            gates.set(None)
            with m.single_pass():
                torch.testing.assert_close(m(**b), cached, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(gated, cached, atol=1e-3)  # the gates did something
