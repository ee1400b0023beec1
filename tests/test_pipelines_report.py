"""The pipeline report (benchmarks/pipelines_report.py) on small hand-made raw results: % of dense, the "default"
alias, the paired rows and the machine-readable summary."""

import json

from benchmarks import pipelines_report as pr


def rec(pipeline, seed, cut, dev, sel=None):
    metrics = {"dev": {"accuracy": dev}, "selection": {"accuracy": sel if sel is not None else dev - 0.1}}
    return {"pipeline": pipeline, "seed": seed, "cut": cut, "seconds": {"score": 1.0, "tune": 2.0},
            "macs_kept": 1 - cut, "metrics": metrics, "speedup": 1.5, "speedup_of_bound": 0.9}


def raw_file(tmp_path, swap=False):
    raw = {"_settings": {"model": "m", "split": "dev"}, "_cpu": "cpu", "_commands": ["cmd"],
           "sst2": {"dense": {"dev": {"accuracy": 0.8}, "selection": {"accuracy": 0.8}}}}
    for seed, (d, k) in enumerate([(0.78, 0.76), (0.76, 0.74)]):
        d, k = (k, d) if swap else (d, k)
        raw["sst2"][f"{pr.DEFAULT}|{seed}|0.4"] = rec(pr.DEFAULT, seed, 0.4, d)
        raw["sst2"][f"kwon|{seed}|0.4"] = rec("kwon", seed, 0.4, k)
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(raw))
    return path


def test_summary_and_tables(tmp_path):
    path = raw_file(tmp_path)
    pr.render_files([str(path)], str(tmp_path), "header\n")
    summary = json.loads((tmp_path / "quality_summary.json").read_text())
    assert summary["model"] == "m" and summary["dense"] == {"sst2": 0.8}
    assert summary["retained"]["default"]["sst2"]["0.4"] == summary["retained"][pr.DEFAULT]["sst2"]["0.4"] == 96.25
    assert summary["retained"]["kwon"]["sst2"]["0.4"] == 93.75
    md = (tmp_path / "quality.md").read_text()
    assert "96.2 ± 1.8" in md and "| SST-2 | 40% | 96.2 | 93.8 | +2.5 | 2 | yes (default ahead) |" in md
    sel = (tmp_path / "quality_selection.md").read_text()
    assert "(selection split)" in sel and "83.8 ± 1.8" in sel and "Paired" not in sel


def test_a_lead_of_kwon_beyond_the_std_is_not_counted_for_the_default(tmp_path):
    pr.render_files([str(raw_file(tmp_path, swap=True))], str(tmp_path), "header\n")
    assert "| SST-2 | 40% | 93.8 | 96.2 | -2.5 | 2 | yes (kwon ahead) |" in (tmp_path / "quality.md").read_text()


def test_other_calibration_size_is_its_own_row(tmp_path):
    """A file made with --calib 2048 adds rows "<pipeline>@2048"; it never overwrites the 512-sample rows."""
    base = raw_file(tmp_path)
    big = json.loads(base.read_text())
    big["_settings"]["calib"] = 2048
    for key in [k for k in big["sst2"] if "|" in k]:
        big["sst2"][key]["metrics"]["dev"]["accuracy"] = 0.8
    (tmp_path / "big.json").write_text(json.dumps(big))
    pr.render_files([str(base), str(tmp_path / "big.json")], str(tmp_path), "header\n")
    retained = json.loads((tmp_path / "quality_summary.json").read_text())["retained"]
    assert retained["kwon"]["sst2"]["0.4"] == 93.75 and retained["default"]["sst2"]["0.4"] == 96.25
    assert retained["kwon@2048"]["sst2"]["0.4"] == retained[f"{pr.DEFAULT}@2048"]["sst2"]["0.4"] == 100.0
    assert "| kwon@2048 |" in (tmp_path / "quality.md").read_text()
