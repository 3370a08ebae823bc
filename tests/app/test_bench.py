"""The bench's evidence (issue 9): paired comparisons, parallel runs with the same figures,
diverged runs left out, `bsam compare`, and the default dataset a recipe can point at."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import time

import pytest
import torch
from _tables import long_tail, thirds

from balanced_sam.bench import (
    BenchConfig,
    BenchInterrupted,
    bench_defaults,
    bench_table,
    compare_results,
    comparison_text,
    finish_results,
    run_bench,
)
from balanced_sam.cli import main
from balanced_sam.data import registry
from balanced_sam.data.base import BenchData
from balanced_sam.stats import (
    COMPARISON_METRICS,
    detectable_effect,
    paired_comparisons,
    seeds_needed,
)

# the generated long-tailed table (the `table` fixture of tests/app/conftest.py), small and fast
TABLE = dict(target="target", bin_width=10, cap=20, epochs=2, rho=0.05)


@pytest.fixture(scope="module")
def serial(table, tmp_path_factory):
    """sqinv, bsam and sam over 3 seeds in this process (one thread per run)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("serial") / "b"
    logs: list[str] = []
    res = run_bench(BenchConfig(csv_path=str(table), methods=["sqinv", "bsam", "sam"],
                                seeds=[0, 1, 2], out=out, jobs=1, **TABLE), log=logs.append)
    return res, out, "\n".join(logs)


def _per_run(results):
    return {(m, r["seed"], r["rho"]): (r["best_epoch"], r["val"], r["test"], r["test_per_bin"])
            for m, e in results["methods"].items() for r in e["runs"]}


# ---------------------------------------------------------------------------- parallel runs
@pytest.mark.e2e
def test_jobs_2_gives_the_same_per_run_figures_as_jobs_1(serial, table, tmp_path, capsys):
    ser, _, _ = serial
    par = run_bench(BenchConfig(csv_path=str(table), methods=["sqinv", "bsam", "sam"],
                                seeds=[0, 1, 2], out=tmp_path / "p", jobs=2, plots=False, **TABLE),
                                log=lambda s: None)
    assert par["parallel"] == {"jobs": 2, "threads_per_run": 1, "start_method": "spawn"}
    assert ser["parallel"]["start_method"] == "in-process"
    # bit-identical: every metric of every run, validation and test, and the best epoch
    a, b = _per_run(ser), _per_run(par)
    assert a.keys() == b.keys() and len(a) == 9
    for key in a:
        assert json.dumps(a[key]) == json.dumps(b[key]), key
    assert par["comparisons"] == ser["comparisons"]
    # one progress line for the whole bench on stderr: runs done / total, time left, the run
    err = capsys.readouterr().err
    assert "bench: 0/9 runs done; 9 to train, 2 at a time, 1 CPU thread(s) each" in err
    assert "bench: 9/9 runs done, all trained |" in err
    assert "left |" in err and "bsam-rho0.05-seed" in err


@pytest.mark.e2e
def test_initial_weights_depend_on_the_seed_alone(serial, table, tmp_path):
    # one run alone (nothing before it in the queue) gives the same figures as inside the bench
    ser, _, _ = serial
    alone = run_bench(BenchConfig(csv_path=str(table), methods=["bsam"], seeds=[2],
                                  out=tmp_path / "one", plots=False, **TABLE), log=lambda s: None)
    assert _per_run(alone)[("bsam", 2, 0.05)] == _per_run(ser)[("bsam", 2, 0.05)]


def _square(context, payload, device):
    return context * payload


def _fail(context, payload, device):
    if payload == 2:
        raise ValueError(f"bad payload {payload}")
    return payload


def _vanish(context, payload, device):
    os._exit(3)


def _sleepy(context, payload, device):
    time.sleep(payload)
    return payload


@pytest.mark.e2e
def test_worker_pool_results_errors_and_a_dead_worker():
    from balanced_sam.parallel import WorkerDiedError, run_tasks

    got = {}
    run_tasks(_square, 3, [("a", 1), ("b", 2), ("c", 5)], jobs=2,
              prepare=lambda key, p: p + 1, on_done=lambda k, r, s: got.setdefault(k, r))
    assert got == {"a": 6, "b": 9, "c": 18}
    with pytest.raises(ValueError, match="bad payload 2") as err:
        run_tasks(_fail, None, [("x", 1), ("y", 2)], jobs=2, on_done=lambda *a: None)
    assert "raised in a worker process while running y" in "".join(err.value.__notes__)
    with pytest.raises(WorkerDiedError, match="exit code 3"):
        run_tasks(_vanish, None, [("z", 1)], jobs=1, on_done=lambda *a: None)


@pytest.mark.e2e
def test_ctrl_c_stops_the_workers(monkeypatch):
    import multiprocessing as mp

    from balanced_sam import parallel

    monkeypatch.setattr(parallel, "GRACE_S", 5.0)

    def interrupt(key, result, seconds):
        raise KeyboardInterrupt

    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        # the first task ends at once, the other would sleep a minute: it is interrupted
        parallel.run_tasks(_sleepy, None, [("quick", 0), ("long", 60)], jobs=2,
                           on_done=interrupt)
    assert time.perf_counter() - t0 < 45
    assert not mp.active_children()


@pytest.mark.e2e
def test_an_interrupted_bench_says_how_to_resume_and_resumes(table, tmp_path, monkeypatch):
    from balanced_sam.bench import run as bench_run

    real = bench_run.train_task
    calls = []

    def flaky(ctx, task, device):
        calls.append(task.label)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(ctx, task, device)

    monkeypatch.setattr(bench_run, "train_task", flaky)
    kw = dict(csv_path=str(table), methods=["sqinv", "bsam"], seeds=[0], out=tmp_path / "b",
              plots=False, **TABLE)
    with pytest.raises(BenchInterrupted, match=r"1 of 2 runs finished.*--out .*b"):
        run_bench(BenchConfig(**kw), log=lambda s: None)
    logs = []
    res = run_bench(BenchConfig(**kw), log=logs.append)
    assert any("sqinv-seed0: done earlier, read back" in s for s in logs)
    assert calls == ["sqinv-seed0", "bsam-rho0.05-seed0", "bsam-rho0.05-seed0"]
    assert set(res["methods"]) == {"sqinv", "bsam"}


# ---------------------------------------------------------------------------- comparisons
@pytest.mark.e2e
def test_results_hold_the_paired_comparisons(serial):
    res, out, text = serial
    on_disk = json.loads((out / "results.json").read_text())
    cmp = on_disk["comparisons"]
    assert set(cmp) == {"bsam", "sam"}
    keys = {f"{m}_{r}" for m, r in COMPARISON_METRICS}
    assert keys == {"mae_all", "mae_many", "mae_medium", "mae_few", "gm_all", "bmae_all"}
    for method in cmp:
        assert set(cmp[method]) == keys
        for c in cmp[method].values():
            assert set(c) == {"mean", "ci_low", "ci_high", "wins", "n", "sd", "mde", "effect",
                              "seeds_needed"} and c["n"] == 3
            assert c["ci_low"] <= c["mean"] <= c["ci_high"]
            # the power entries follow from the paired sd and the baseline's 5%
            assert c["mde"] == pytest.approx(detectable_effect(c["sd"], 3), rel=1e-12)
    info = on_disk["comparisons_info"]
    assert info["baseline"] == "sqinv" and info["confidence"] == 0.95
    assert info["effect"] == "5%" and info["power"] == 0.8
    assert info["split"] == "test" and info["left_out"] == {}
    # the numbers are those of the seed-by-seed differences
    runs = {m: {r["seed"]: r["test"]["all"]["mae"] for r in e["runs"]}
            for m, e in on_disk["methods"].items()}
    d = [runs["bsam"][s] - runs["sqinv"][s] for s in range(3)]
    assert cmp["bsam"]["mae_all"]["mean"] == pytest.approx(sum(d) / 3, rel=1e-12)
    assert cmp["bsam"]["mae_all"]["wins"] == sum(x < 0 for x in d)
    base = [runs["sqinv"][s] for s in range(3)]
    assert cmp["bsam"]["mae_all"]["effect"] == pytest.approx(0.05 * sum(base) / 3, rel=1e-12)
    want = seeds_needed(cmp["bsam"]["mae_all"]["effect"], cmp["bsam"]["mae_all"]["sd"])
    assert cmp["bsam"]["mae_all"]["seeds_needed"] == want
    # printed under the table, which points to them
    assert "mean ± std over seeds; differences between methods: see the paired comparisons " \
           "below" in text
    assert text.index("| sqinv |") < text.index("Paired differences on test: method - sqinv")
    verdicts = ("includes 0: no evidence of a difference", "better (interval below 0)",
                "worse (interval above 0)")
    assert sum(v in line for line in text.splitlines() for v in verdicts) == 12
    assert (out / "paired_differences.png").stat().st_size > 5000


@pytest.mark.e2e
def test_a_baseline_outside_the_methods_is_refused_before_training(table, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"baseline 'sam' is not among the methods \(sqinv, "
                                         r"bsam\): add it to methods="):
        run_bench(BenchConfig(csv_path=str(table), methods=["sqinv", "bsam"], baseline="sam",
                              out=tmp_path / "x", **TABLE))
    assert not (tmp_path / "x").exists()  # nothing read or trained
    assert main(["bench", "--csv", str(table), "--target", "target", "--methods",
                 "sqinv,bsam", "--baseline", "sam", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "add it to --methods" in err and "--baseline M" in err
    # no default baseline among the methods: no comparisons, and the bench says so
    logs = []
    res = run_bench(BenchConfig(csv_path=str(table), methods=["vanilla", "bsam"], seeds=[0],
                                out=tmp_path / "z", plots=False, **TABLE), log=logs.append)
    assert res["comparisons"] == {} and res["comparisons_info"]["baseline"] is None
    assert any("no paired comparisons: the default baseline sqinv is not among" in s
               for s in logs)
    assert "compare methods seed by seed (bsam compare" in bench_table(res)


@pytest.mark.e2e
def test_bsam_compare_recomputes_from_a_results_file(serial, tmp_path, capsys):
    res, out, _ = serial
    path = tmp_path / "results.json"
    path.write_text((out / "results.json").read_text())
    assert main(["compare", str(path), "--baseline", "bsam"]) == 0
    text = capsys.readouterr().out
    assert "Paired differences on test: method - bsam" in text and "| bsam (rho 0.05) |" in text
    assert json.loads(path.read_text())["comparisons_info"]["baseline"] == "sqinv"  # unchanged
    assert main(["compare", str(path), "--baseline", "bsam", "--confidence", "0.9", "--write",
                 "--plot"]) == 0
    again = json.loads(path.read_text())
    assert again["comparisons_info"] == {**again["comparisons_info"], "baseline": "bsam",
                                         "confidence": 0.9}
    expected = paired_comparisons(again, "bsam", confidence=0.9)
    assert again["comparisons"] == json.loads(json.dumps(expected))
    assert set(again["comparisons"]) == {"sqinv", "sam"}
    assert (tmp_path / "paired_differences.png").stat().st_size > 5000
    capsys.readouterr()
    assert main(["compare", str(path), "--baseline", "inv"]) == 2
    assert "baseline 'inv' is not among the results' methods" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # the library call takes the dictionary too; writing needs a path
    logs = []
    assert compare_results(copy.deepcopy(res), baseline="sam", log=logs.append)[
        "comparisons_info"]["baseline"] == "sam"
    assert "Paired differences on test: method - sam" in "\n".join(logs)
    with pytest.raises(ValueError, match="need the results.json path"):
        compare_results(copy.deepcopy(res), write=True, log=lambda s: None)


@pytest.mark.e2e
def test_bsam_compare_power(serial, tmp_path, capsys):
    res, out, _ = serial
    path = tmp_path / "results.json"
    path.write_text((out / "results.json").read_text())
    assert main(["compare", str(path), "--power", "--effect", "0.5"]) == 0
    text = capsys.readouterr().out
    c = paired_comparisons(json.loads(path.read_text()), "sqinv", effect=0.5)["bsam"]["mae_all"]
    mde = f"{c['mde']:.2f}"
    assert mde in text and f"an effect of 0.50 needs {c['seeds_needed']} seeds" in text
    assert ("the seeds could not have detected an effect smaller than" in text
            or "smallest effect detectable at 80% power" in text)
    capsys.readouterr()
    assert main(["compare", str(path), "--effect", "-3"]) == 2
    assert "effect must be a finite number > 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------- divergence
def _report(mae: float) -> dict:
    regions = {}
    for i, region in enumerate(("all", "many", "medium", "few")):
        v = mae + i
        regions[region] = {"mae": v, "mse": v * v, "rmse": v, "gm": v / 2, "bmae": v + 1,
                           "count": 10}
    return regions


def _results(maes: dict[str, list[float]], skipped=None, amp="none") -> dict:
    methods = {}
    for name, values in maes.items():
        runs = []
        for seed, mae in enumerate(values):
            runs.append({"seed": seed, "rho": None, "best_epoch": 1, "train_seconds": 1.0,
                         "skipped_steps": (skipped or {}).get((name, seed), 0),
                         "val": _report(mae), "test": _report(mae),
                         "test_per_bin": {"mae": [mae], "count": [10]}})
        methods[name] = {"runs": runs}
    return {"dataset": "synthetic", "config": {"train": {"amp": amp}, "target_unit": "$"},
            "methods": methods}


def test_diverged_runs_are_flagged_and_left_out():
    res = _results({"sqinv": [10.0, 11.0, 12.0, 13.0],
                    "inv": [10.5, 40.0, 12.5, 12.0],          # seed 1: > 3 x its median
                    "bsam": [9.0, 10.0, math.nan, 12.0],      # seed 2: NaN
                    "sam": [10.0, 11.0, 11.5, 12.5]},         # seed 3: skipped steps
                   skipped={("sam", 3): 4})
    finish_results(res, baseline="sqinv", factor=3.0)
    flags = {m: [r["diverged"] for r in e["runs"]] for m, e in res["methods"].items()}
    assert flags == {"sqinv": [False] * 4, "inv": [False, True, False, False],
                     "bsam": [False, False, True, False], "sam": [False, False, False, True]}
    inv = res["methods"]["inv"]
    assert "test MAE 40 > 3 x the median 12.25 of its seeds" in inv["runs"][1]["diverged_reason"]
    assert res["methods"]["bsam"]["runs"][2]["diverged_reason"] == "NaN/inf metrics"
    assert "4 step(s) skipped" in res["methods"]["sam"]["runs"][3]["diverged_reason"]
    # not averaged in: the mean is over the three kept seeds
    assert inv["mean"]["all"]["mae"] == pytest.approx((10.5 + 12.5 + 12.0) / 3)
    assert inv["by_rho"]["None"]["n"] == 3 and inv["by_rho"]["None"]["diverged"] == 1
    # the paired comparison drops that seed for that pair only, and says so with n
    cmp = res["comparisons"]
    assert cmp["inv"]["mae_all"]["n"] == 3 and cmp["bsam"]["mae_all"]["n"] == 3
    assert cmp["sam"]["mae_all"]["n"] == 3
    assert cmp["inv"]["mae_all"]["mean"] == pytest.approx(((10.5 - 10) + (12.5 - 12)
                                                           + (12 - 13)) / 3)
    assert res["comparisons_info"]["left_out"] == {"inv": {"1": "inv diverged"},
                                                   "bsam": {"2": "bsam diverged"},
                                                   "sam": {"3": "sam diverged"}}
    assert res["divergence"]["factor"] == 3.0
    assert [d["seed"] for d in res["divergence"]["diverged"]["inv"]] == [1]
    table, text = bench_table(res), comparison_text(res)
    assert "| inv † |" in table and "| sqinv |" in table
    assert "† inv: seed 1 diverged (test MAE 40 > 3 x the median" in table
    assert "left out: 3 of 4 seeds shown" in table
    assert re.search(r"inv +left out: seed 1 \(inv diverged\) - n counts the pairs kept", text)


def test_a_run_that_stalled_early_is_marked_but_kept():
    res = _results({"sqinv": [10.0, 11.0, 12.0], "inv": [10.5, 19.0, 12.0]})
    res["config"]["train"]["epochs"] = 60
    for name, best in (("sqinv", [60, 58, 59]), ("inv", [60, 18, 20])):
        for run, b in zip(res["methods"][name]["runs"], best):
            run["best_epoch"] = b
    res["methods"]["inv"]["runs"][2]["test"] = _report(math.nan)  # diverged
    finish_results(res, baseline="sqinv", factor=3.0)
    inv = res["methods"]["inv"]["runs"]
    assert [r["stalled"] for r in inv] == [False, True, False]  # a diverged run is not stalled
    assert inv[2]["diverged"] and res["divergence"]["stalled"] == {"inv": [1]}
    # kept in the mean and in the pairs: only the diverged seed leaves them
    assert res["methods"]["inv"]["mean"]["all"]["mae"] == pytest.approx((10.5 + 19.0) / 2)
    assert res["comparisons"]["inv"]["mae_all"]["n"] == 2
    table = bench_table(res)
    assert "| inv † ‡ |" in table and "| sqinv |" in table
    assert "‡ inv: seed 1 stopped improving at epoch 18 of 60 (test MAE 19)" in table
    # without the epoch count (an older results.json) nothing is marked
    del res["config"]["train"]["epochs"]
    finish_results(res, baseline="sqinv", factor=3.0)
    assert not any(r["stalled"] for r in inv) and res["divergence"]["stalled"] == {}


def test_a_diverged_baseline_seed_leaves_every_pair_and_fp16_skips_do_not_count():
    res = _results({"sqinv": [10.0, math.inf, 12.0], "bsam": [9.0, 10.0, 11.0]},
                   skipped={("bsam", 0): 2}, amp="fp16")
    finish_results(res, baseline="sqinv")
    assert [r["diverged"] for r in res["methods"]["bsam"]["runs"]] == [False] * 3
    assert res["comparisons"]["bsam"]["mae_all"]["n"] == 2
    assert res["comparisons_info"]["left_out"] == {"bsam": {"1": "sqinv diverged"}}
    # two seeds: 3 x their median can never be exceeded by one of them
    two = _results({"sqinv": [10.0, 1000.0], "bsam": [1.0, 2.0]})
    finish_results(two, baseline="sqinv")
    assert not any(r["diverged"] for e in two["methods"].values() for r in e["runs"])
    # every seed of a method diverged: no mean, no pair left
    gone = _results({"sqinv": [10.0, 11.0, 12.0], "bsam": [math.nan] * 3})
    finish_results(gone, baseline="sqinv")
    assert gone["methods"]["bsam"]["mean"] is None
    assert gone["comparisons"]["bsam"]["mae_all"] == {
        "mean": None, "ci_low": None, "ci_high": None, "wins": 0, "n": 0, "sd": None,
        "mde": None, "effect": None, "seeds_needed": None}
    assert "n/a (no pair left: diverged runs)" in comparison_text(gone)
    assert "| bsam † | - |" in bench_table(gone)


def _nan_loader(**_):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g)
    y = (x[:, 0].exp() * 10).clamp(0, 99)
    x_train = x[:200].clone()
    x_train[7] = math.nan  # one poisoned training row: its batch's gradient is NaN
    return BenchData("nan-rows", x_train, y[:200], x[200:250], y[200:250], x[250:], y[250:],
                     bins={"bin_width": 10.0, "lower": 0.0, "upper": 100.0})


@pytest.mark.e2e
def test_the_bench_records_skipped_steps_and_flags_those_runs(tmp_path, monkeypatch):
    from balanced_sam.data import REGISTRY, DatasetEntry, Recipe, table_loader
    from balanced_sam.data.registry import TABLE_RECIPE

    recipe = Recipe(train={**TABLE_RECIPE.train, "epochs": 2, "batch_size": 50, "rho": 0.05},
                    model={"name": "mlp", "hidden": [8]})
    monkeypatch.setitem(REGISTRY, "nan-rows", DatasetEntry("nan-rows", table_loader(_nan_loader),
                                                           recipe, "", "one poisoned row"))
    res = run_bench(BenchConfig(dataset="nan-rows", methods=["sqinv", "bsam"], seeds=[0],
                                out=tmp_path / "n", plots=False), log=lambda s: None)
    for name in ("sqinv", "bsam"):
        run = res["methods"][name]["runs"][0]
        assert run["skipped_steps"] == 2  # one poisoned batch per epoch, 2 epochs
        assert math.isfinite(run["test"]["all"]["mae"])  # the weights stayed finite
        assert run["diverged"] and "2 step(s) skipped" in run["diverged_reason"]
        on_disk = json.loads((tmp_path / "n" / "runs" / _label(name) / "result.json")
                             .read_text())
        assert on_disk["skipped_steps"] == 2
    assert res["comparisons"]["bsam"]["mae_all"]["n"] == 0


def _label(name: str) -> str:
    return f"{name}-seed0" if name == "sqinv" else f"{name}-rho0.05-seed0"


# ---------------------------------------------------------------------------- options
@pytest.mark.e2e
def test_a_folder_of_an_older_bench_is_still_the_same_bench(table, tmp_path):
    kw = dict(csv_path=str(table), methods=["sqinv"], seeds=[0], out=tmp_path / "b",
              plots=False, **TABLE)
    run_bench(BenchConfig(**kw), log=lambda s: None)
    path = tmp_path / "b" / "bench_config.json"
    cfg = json.loads(path.read_text())
    for key in ("interval", "max_grad_norm"):  # written before these options existed
        del cfg["train"][key]
    path.write_text(json.dumps(cfg))
    logs = []
    run_bench(BenchConfig(**kw), log=logs.append)
    assert any("read back" in s for s in logs)
    with pytest.raises(FileExistsError, match="another configuration"):
        run_bench(BenchConfig(overrides={"max_grad_norm": 1.0}, **kw), log=lambda s: None)


@pytest.mark.e2e
def test_a_bench_may_add_methods_and_seeds_to_a_folder_and_reads_the_common_runs_back(
        table, tmp_path):
    kw = dict(csv_path=str(table), out=tmp_path / "b", plots=False, **TABLE)
    first = run_bench(BenchConfig(methods=["sqinv", "bsam"], seeds=[0], **kw), log=lambda s: None)
    logs: list[str] = []
    more = run_bench(BenchConfig(methods=["sqinv", "bsam", "vanilla"], seeds=[0, 1], **kw),
                                 log=logs.append)
    assert sum("read back" in s for s in logs) == 2  # sqinv-seed0, bsam-rho0.05-seed0
    assert more["methods"]["bsam"]["runs"][0]["test"] == first["methods"]["bsam"]["runs"][0]["test"]
    assert [r["seed"] for r in more["methods"]["vanilla"]["runs"]] == [0, 1]
    # the earlier, smaller bench still runs from the same folder, training nothing
    logs = []
    run_bench(BenchConfig(methods=["sqinv", "bsam"], seeds=[0], **kw), log=logs.append)
    assert sum("read back" in s for s in logs) == 2
    # a method's rho is part of the setting: another one is refused, as is another recipe
    with pytest.raises(FileExistsError, match="another configuration"):
        run_bench(BenchConfig(methods=["bsam"], seeds=[0], **{**kw, "rho": 0.2}),
                              log=lambda s: None)
    with pytest.raises(FileExistsError, match="another configuration"):
        run_bench(BenchConfig(methods=["sqinv"], seeds=[0], overrides={"weight_decay": 0.0}, **kw),
                              log=lambda s: None)


@pytest.mark.e2e
def test_an_interval_variant_takes_its_base_methods_rho_from_the_recipe(tiny_default, tmp_path):
    from balanced_sam.experiment import train_config

    recipe = registry.Recipe(train={"epochs": 1, "batch_size": 64, "rho": 0.3},
                             rho_by_method={"bsam": 0.07}, model={"name": "mlp", "hidden": [8]})
    registry.REGISTRY["tiny-default"] = dataclasses.replace(tiny_default, recipe=recipe)
    res = run_bench(BenchConfig(methods=["sqinv", "bsam", "bsam-i3", "sam-i3"], seeds=[0],
                                out=tmp_path / "r", plots=False), log=lambda s: None)
    assert res["config"]["rho_by_method"] == {"bsam": 0.07, "bsam-i3": 0.07, "sam-i3": 0.3}
    data = registry.load_data({"name": "tiny-default"})
    assert train_config(data, {"method": "bsam-i3"}).rho == 0.07


@pytest.mark.e2e
def test_bench_cli_passes_clipping_interval_and_jobs(table, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["bench", "--csv", str(table), "--target", "target", "--methods",
                 "sqinv,bsam,bsam-i5", "--seeds", "1", "--epochs", "2", "--rho", "0.05",
                 "--bin-width", "10", "--cap", "20", "--max-grad-norm", "5", "--set",
                 "warmup_epochs=1", "--jobs", "1", "--no-plots", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    train = res["config"]["train"]
    assert train["max_grad_norm"] == 5.0 and train["warmup_epochs"] == 1
    assert set(res["comparisons"]) == {"bsam", "bsam-i5"}
    ck = torch.load(out / "runs" / "bsam-i5-rho0.05-seed0" / "best.pt", weights_only=False)
    assert ck["config"]["method"] == "bsam-i5"
    a, b = (res["methods"][m]["runs"][0]["test"]["all"]["mae"] for m in ("bsam", "bsam-i5"))
    assert a != b
    capsys.readouterr()
    assert main(["bench", "--csv", str(table), "--target", "target", "--set",
                 "data.cap=3"]) == 2
    assert "--set takes training options" in capsys.readouterr().err
    assert main(["bench", "--csv", str(table), "--target", "target", "--jobs", "0",
                 "--out", str(tmp_path / "j")]) == 2
    assert "jobs must be an integer >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------- default dataset
def _tiny(**options):
    x, y = long_tail(int(options.get("n", 400)))
    tr, va, te = thirds(x, y)
    return BenchData("tiny-default", tr[0], tr[1], va[0], va[1], te[0], te[1],
                     bins={"bin_width": 5.0, "lower": 0.0, "upper": 100.0},
                     info={"n": len(y), "split_params": {"n": len(y)}})


@pytest.fixture
def tiny_default(monkeypatch):
    recipe = registry.Recipe(
        train={"epochs": 1, "batch_size": 64, "lr": 0.05, "rho": 0.05},
        model={"name": "mlp", "hidden": [8]}, data={"n": 400},
        bench={"methods": ("sqinv", "bsam"), "seeds": 2,
               "quick": {"seeds": [0], "epochs": 1, "data": {"n": 200}}})
    entry = registry.register(registry.DatasetEntry(
        "tiny-default", registry.table_loader(_tiny), recipe, "$", "a tiny test table",
        options=("n", "split_seed")))
    monkeypatch.setattr(registry, "DEFAULT_BENCH_DATASET", "tiny-default")
    yield entry
    registry.REGISTRY.pop("tiny-default")


@pytest.mark.e2e
def test_bench_without_a_dataset_runs_the_registry_default(tiny_default, tmp_path, capsys):
    res = run_bench(BenchConfig(out=tmp_path / "d", plots=False), log=lambda s: None)
    assert res["dataset"] == "tiny-default"
    assert list(res["methods"]) == ["sqinv", "bsam"]  # the recipe's bench methods and seeds
    assert [r["seed"] for r in res["methods"]["bsam"]["runs"]] == [0, 1]
    assert res["split"]["train"] + res["split"]["val"] + res["split"]["test"] == 400
    quick = run_bench(BenchConfig(out=tmp_path / "q", quick=True, plots=False), log=lambda s: None)
    assert [r["seed"] for r in quick["methods"]["bsam"]["runs"]] == [0]
    assert quick["split"]["train"] + quick["split"]["val"] + quick["split"]["test"] == 200
    assert bench_defaults(quick=True)["data"] == {"n": 200}
    # another dataset stays one option away, with the bench's own defaults
    assert bench_defaults("diamonds")["seeds"] == [0, 1, 2, 3, 4]
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "(default tiny-default; see `bsam list`)" in " ".join(capsys.readouterr().out.split())


def test_the_default_bench_is_the_image_benchmark_in_the_methods_regime():
    assert registry.DEFAULT_BENCH_DATASET == "rotated-fashion-mnist"
    entry = registry.get_entry(registry.DEFAULT_BENCH_DATASET)
    recipe = entry.recipe
    assert recipe is registry.IMAGE_BENCH_RECIPE and entry.kind == "image"
    assert set(recipe.data) <= set(entry.options)
    defaults = bench_defaults()
    assert len(defaults["seeds"]) >= 5  # paired seeds, enough for an interval
    assert {"sqinv", "sam", "imbsam", "bsam"} <= set(defaults["methods"])
    # every SAM-family method of the bench has its own rho, chosen on one grid
    assert {"sam", "imbsam", "bsam"} <= set(recipe.rho_by_method)
    assert all(0.005 <= r <= 0.2 for r in recipe.rho_by_method.values())
    quick = bench_defaults(quick=True)
    assert len(quick["seeds"]) < len(defaults["seeds"]) and quick["epochs"] < recipe.train["epochs"]
    # the tabular regime stays one option away, with its own recipe
    assert registry.get_entry("diamonds").recipe is registry.DIAMONDS_RECIPE


def test_a_recipe_with_an_unknown_data_option_is_refused():
    bad = registry.Recipe(data={"image_sise": 14})
    with pytest.raises(ValueError, match="data.image_sise is not an option"):
        registry.register(registry.DatasetEntry("bad-recipe", registry.table_loader(_tiny), bad, "",
                                                "x", options=("n",)))
    assert "bad-recipe" not in registry.REGISTRY


def test_default_jobs_is_what_the_machine_offers(monkeypatch):
    from balanced_sam import parallel

    monkeypatch.setattr(parallel, "usable_cpus", lambda: 8)
    assert parallel.default_jobs("cpu") == 8
    assert parallel.default_jobs("cpu", threads=2) == 4
    assert parallel.default_jobs("cpu", threads=16) == 1
    assert parallel.default_jobs("mps") == 1 and parallel.default_jobs("cuda:1") == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert parallel.default_jobs("auto") == 3  # one run per GPU unless asked for more
    assert parallel.default_jobs("cuda:0") == 1


# ---------------------------------------------------------------------------- the printout
@pytest.mark.e2e
def test_every_printed_line_fits_100_columns_and_names_the_plots(serial):
    res, out, text = serial
    too_long = [line for line in text.splitlines() if len(line) > 100]
    assert not too_long, too_long
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "paired_differences.png" in pngs and "label_histogram.png" in pngs
    last = text[text.rindex("\nwrote into "):]  # the last two lines
    assert all(name in last for name in ["results.json", "results.csv", *pngs]), last
    assert "bMAE |" in text and "bMAE: the mean of the per-bin MAEs" in text  # it differs here


@pytest.mark.e2e
def test_bmae_is_shown_only_where_it_differs_from_mae_all(serial):
    res = copy.deepcopy(serial[0])
    assert "bMAE |" in bench_table(res) and "bMAE All" in comparison_text(res)
    for m in res["methods"].values():  # a test set with as many samples in every bin
        for r in m["runs"]:
            r["test"]["all"]["bmae"] = r["test"]["all"]["mae"]
    table = bench_table(res)
    assert "bMAE |" not in table and "bMAE equals MAE All here" in table
    assert "bMAE All" not in comparison_text(res) and "MAE All" in comparison_text(res)
    assert max(len(line) for line in (table + "\n" + comparison_text(res)).splitlines()) <= 100


def test_the_recipe_line_cites_what_a_wheel_user_has():
    from balanced_sam.bench.folder import _source_text

    source = registry.IMAGE_BENCH_RECIPE.source
    assert "benchmarks/" in source  # the repository's tuning script...
    assert _source_text(source) == "the recipe's, chosen on the validation split"  # ...not cited
