"""The quality report's method rows and the raw-file comparison (benchmarks/), on small hand-made raw results."""

import json

import pytest

from benchmarks.compare_raw import compare
from benchmarks.compare_raw import main as compare_main
from benchmarks.quality_report import _methods, render


def run(dev: dict[float, float]) -> dict:
    return {"seconds": 1.0, "budgets": {f"macs={c}": {"dev": v} for c, v in dev.items()}}


@pytest.fixture
def raw() -> dict:
    return {
        "sst2/dense": {"dev": 0.8},
        "sst2/supervised/random1": run({0.2: 0.6, 0.4: 0.5}),
        "sst2/supervised/ig@baseline=0.5": run({0.2: 0.8, 0.4: 0.76}),
        "sst2/supervised/grad_x_gate": run({0.2: 0.79, 0.4: 0.78}),
        "sst2/supervised/random0": run({0.2: 0.7, 0.4: 0.6}),
        "sst2/supervised/ig": run({0.2: 0.8, 0.4: 0.72}),
    }


def test_variant_row_follows_its_method_and_random_seeds_merge(raw):
    methods = _methods(raw, "sst2")
    assert list(methods) == ["ig", "ig@baseline=0.5", "grad_x_gate", "random"]
    assert len(methods["random"]) == 2


def test_render_shows_the_variant_row_and_its_99_percent_cut(raw):
    md = render(raw, plot_dir=None)
    assert "| ig@baseline=0.5 | 100.0 | 95.0 | 1 |" in md
    assert "| random | 81.2 ± 8.8 | 68.8 ± 8.8 | 1 |" in md
    best = md.split("≥ 99 %")[1]
    assert "| task | ig | ig@baseline=0.5 | grad_x_gate | random |" in best
    assert "| sst2 | 20.0 | 20.0 | 0.0 | 0.0 |" in best


def test_compare_counts_equal_cells_and_lists_the_others(raw, tmp_path):
    rerun = json.loads(json.dumps(raw))
    rerun["sst2/supervised/ig"]["budgets"]["macs=0.4"]["dev"] = 0.73
    n, diff = compare(rerun, raw)
    assert n == 11  # 1 dense + 5 runs x 2 budgets
    assert diff == [(("sst2/supervised/ig", "macs=0.4", "dev"), 0.72, 0.73)]
    (tmp_path / "old.json").write_text(json.dumps(raw))
    (tmp_path / "new.json").write_text(json.dumps(rerun))
    compare_main([str(tmp_path / "new.json"), str(tmp_path / "old.json"), "--out", str(tmp_path / "r.md")])
    assert "**10 of 11** shared metric cells are exactly equal" in (tmp_path / "r.md").read_text()


def test_compare_refuses_files_with_nothing_in_common(raw, tmp_path):
    (tmp_path / "old.json").write_text(json.dumps(raw))
    (tmp_path / "new.json").write_text(json.dumps({"rte/dense": {"dev": 0.5}}))
    with pytest.raises(SystemExit, match="shares no result"):
        compare_main([str(tmp_path / "new.json"), str(tmp_path / "old.json")])


def test_render_names_ig_rows_by_their_path_start():
    from benchmarks.quality_report import IG_BASELINE, _label_ig_rows

    other = 0.0 if IG_BASELINE else 0.5
    old = {"sst2/supervised/ig": 1, "sst2/unsupervised/ig": 2, "sst2/ablation/steps/steps=4": 3,
           f"sst2/supervised/ig@baseline={IG_BASELINE:g}": 4, "sst2/supervised/fisher": 5}
    out = _label_ig_rows(old, {"ig_baseline": other})
    assert out == {f"sst2/supervised/ig@baseline={other:g}": 1, f"sst2/unsupervised/ig@baseline={other:g}": 2,
                   f"sst2/ablation/steps/steps=4,baseline={other:g}": 3, "sst2/supervised/ig": 4,
                   "sst2/supervised/fisher": 5}
    assert _label_ig_rows({"sst2/supervised/ig": 1}, {"ig_baseline": IG_BASELINE}) == {"sst2/supervised/ig": 1}
