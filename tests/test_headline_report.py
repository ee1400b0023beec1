"""benchmarks/headline.py's rendering on a small hand-made raw file: % of dense kept, seeds, pairing by seed."""

from benchmarks.headline import _paired, render


def rec(pipeline, seed, cut, dev, imdb):
    return {"pipeline": pipeline, "seed": seed, "cut": cut, "code": "abc",
            "seconds": {"score": 1.0, "allocate_tune": 2.0 + seed}, "macs_kept": 1 - cut,
            "metrics": {"dev": {"accuracy": dev}, "imdb": {"accuracy": imdb}}}


def raw():
    recs = {f"{p}|{s}|0.4": rec(p, s, 0.4, dev, 0.7) for p, s, dev in
            (("taskprune", 0, 0.80), ("taskprune", 1, 0.78), ("kwon", 0, 0.76), ("kwon", 1, 0.74))}
    runs = [{"command": "python -m benchmarks.headline --name t", "commit": "c0ffee", "code": "abc", "cpu": "AMD EPYC",
             "threads": 2, "wall_s": 90.0}]
    return {"_settings": {"model": "m", "recipe_hash": "h", "calib": 512, "seq": 128}, "_runs": runs,
            "sst2": {"dense": {"dev": {"accuracy": 0.8}, "imdb": {"accuracy": 0.7}}, **recs}}


def test_cells_are_percent_of_dense_over_seeds_and_pairs_are_per_seed():
    r = raw()
    md = render(r, ["sst2"], ["taskprune", "kwon"])
    assert "| taskprune | 40% | 98.8 ± 1.8 (2) |" in md and "| kwon | 40% | 93.8 ± 1.8 (2) |" in md
    assert "| taskprune | 40% | 100.0 ± 0.0 (2) |" in md  # the unseen domain
    assert _paired(r, "sst2", 0.4) == [5.0, 5.0]
    assert "yes (taskprune ahead)" in md and "AMD EPYC" in md and "1.5 min" in md
    assert "| kwon | 1 | 40%: 2 | 2 |" in md  # cost: scoring, allocation + tuning per cut (medians), task x seed runs
    del r["sst2"]["kwon|1|0.4"]
    assert _paired(r, "sst2", 0.4) == [5.0]  # an unpaired seed is left out, never compared across seeds


def test_the_runs_table_lists_the_runs_whose_rows_are_shown_and_mixed_code_is_said():
    r = raw()
    r["_runs"].insert(0, {**r["_runs"][0], "commit": "0ld", "code": "old"})  # a run whose rows were all re-run
    assert "`0ld`" not in render(r, ["sst2"], ["taskprune", "kwon"])
    r["sst2"]["kwon|1|0.4"]["code"] = "old"  # not re-run yet
    md = render(r, ["sst2"], ["taskprune", "kwon"])
    assert "`0ld`" in md and "Rows by library tree: `abc` 3, `old` 1" in md


def test_targets_say_met_or_missed_by_how_much_and_what_is_not_final():
    md = render(raw(), ["sst2"], ["taskprune", "kwon"])
    targets = md.split("### targets")[1]
    assert "| default ≥ 99.3 % of dense on the mean, 40% | 98.75 % (1 / 6 tasks, seeds [0, 1]: not final) | " \
           "**missed by 0.55 points** |" in targets
    assert "| default ≥ faithful Kwon on the mean, 40% (paired) | +5.00 points (1 / 6 tasks) | met |" in targets


def test_a_benchmark_waits_between_rows_while_its_pause_file_exists(tmp_path):
    """``touch <results>.pause``: the run waits before its next row and goes on once the file is removed."""
    import threading
    import time

    from benchmarks.common import wait_while_paused

    results = tmp_path / "headline.md"
    wait_while_paused(results, poll=0.01)  # no file: no wait
    flag = tmp_path / "headline.pause"
    flag.touch()
    threading.Timer(0.3, flag.unlink).start()
    t0 = time.perf_counter()
    wait_while_paused(results, poll=0.01)
    assert time.perf_counter() - t0 >= 0.25 and not flag.exists()


def test_the_glance_table_needs_every_headline_task_and_both_cuts():
    """The README's table shows 40 / 60 % cells over the six headline tasks, and nothing while any is missing."""
    r = raw()
    assert "at a glance" not in render(r, ["sst2"], ["taskprune", "kwon"])  # five tasks missing
    tasks = ("sst2", "mrpc", "qnli", "mnli", "qqp", "stsb")

    def every_metric(rec_):  # each task's main metric (accuracy, F1, Pearson) at the same value
        return {**rec_, "metrics": {k: {m: v["accuracy"] for m in ("accuracy", "f1", "pearson")}
                                    for k, v in rec_["metrics"].items()}}

    recs = {**r["sst2"], **{f"{p}|{s}|0.6": rec(p, s, 0.6, dev, 0.7) for p, s, dev in
                            (("taskprune", 0, 0.72), ("taskprune", 1, 0.72), ("kwon", 0, 0.64))}}
    for t in tasks:
        r[t] = {k: every_metric(v) if "|" in k else every_metric({"metrics": v})["metrics"] for k, v in recs.items()}
    md = render(r, list(tasks), ["taskprune", "kwon"])
    glance = md.split("### at a glance")[1].split("###")[0]
    assert "| taskprune | " + " | ".join(["98.8 ± 1.8 / 90.0 ± 0.0"] * 6) + " | **98.8 / 90.0** |" in glance
    assert "| kwon | " + " | ".join(["93.8 ± 1.8 / 80.0"] * 6) + " | **93.8 / 80.0** |" in glance
