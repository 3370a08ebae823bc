"""benchmarks/cpu_loop.py: its smoke mode runs the library's loop and the plain loop on the
default bench's data (a stand-in IDX folder here) and prints every row and a finite ratio. No
assertion on speed: the figures depend on the machine."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import torch
from _repo_scripts import load_repo_script
from _vision_fixtures import make_mnist_folder

pytestmark = pytest.mark.e2e  # trains the default bench's model for epochs

bench = load_repo_script("benchmarks/cpu_loop.py", "cpu_loop_bench")
VARIANTS = ["library", "library", "library (default)", "plain", "plain"]
LAYOUTS = ["NCHW", "channels_last", None, "NCHW", "channels_last"]  # None: the config's default


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    # 512 training + 72 validation images from the train split, 36 test images
    return make_mnist_folder(tmp_path_factory.mktemp("idx"), n_train=640, n_test=60)


def test_smoke_prints_every_row_and_a_finite_ratio(mini, tmp_path, capsys):
    out = tmp_path / "cpu.json"
    # (without --compile: compiling takes a minute; the break-even arithmetic is tested below)
    threads = torch.get_num_threads()
    try:
        res = bench.main(["--smoke", "--data-root", str(mini), "--json", str(out)])
        assert torch.get_num_threads() == 1  # --threads' default: a bench job's
    finally:
        torch.set_num_threads(threads)  # the other tests' setting
    text = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["n_train"] == 512 and res["epochs"] == 2 and res["batch_size"] == 128
    assert res["machine"]["threads"] == 1
    assert f"{res['machine']['cpus']} CPUs" in text and f"torch {torch.__version__}" in text
    assert text.count("load average") == 3  # before; before and after
    assert "compile" not in res["methods"]["bsam"]
    for method in ("sqinv", "bsam"):
        m = res["methods"][method]
        assert [r["variant"] for r in m["rows"][:5]] == VARIANTS
        default = m["rows"][2]
        assert [r["layout"] for r in m["rows"][:5]] == [x or default["layout"] for x in LAYOUTS]
        # the default row names what the run resolved the config's value to
        resolved = "channels_last" if default["channels_last"] is True else "NCHW"
        assert default["layout"].endswith(f" -> {resolved}")
        assert m["steps_per_epoch"] == 4  # 512 images in batches of 128
        for r in m["rows"]:
            assert len(r["epoch_s"]) == 2 and all(s > 0 for s in r["epoch_s"])
            assert r["median_epoch_s"] == r["epoch_s"][1]  # the epochs after the first
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and math.isfinite(r["val_mae"])
            line = re.compile(rf"^{re.escape(r['variant'])}\s+{re.escape(r['layout'])}\s+"
                              rf"{r['median_epoch_s']:.3f}\s+.*{r['ratio']:.2f}x", re.M)
            assert line.search(text), (r, text)
        assert m["rows"][3]["ratio"] == 1.0  # the plain NCHW loop is the reference
        assert m["headline"] == m["rows"][2]["ratio"]
        assert f"{method}: library (default layout) / plain NCHW = {m['headline']:.2f}x" in text
    assert res["methods"]["bsam"]["rho"] == 0.01 and res["methods"]["sqinv"]["rho"] is None


def test_the_plain_loops_weights_are_the_librarys_sqinv(mini):
    args = argparse.Namespace(smoke=True, n_train=None, data_root=str(mini),
                                    methods=["sqinv"], seed=0, epochs=1, threads=1)
    plan = bench.bench_plan(args)
    y = plan.data.train[1]
    mine = bench.sqinv_weights(plan, "mean")
    assert torch.allclose(mine, plan.data.bins.sample_weights(y, "sqrt_inv", "mean"), rtol=1e-5)
    assert abs(float(mine.mean()) - 1) < 1e-5 and mine.std() > 0


@pytest.mark.parametrize("bad", ["sgd", "sqinv,sqinv", ""])
def test_unknown_methods_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--methods", bad])
    assert "--methods takes a comma-separated list of sqinv, bsam" in capsys.readouterr().err


def test_compile_break_even_against_the_eager_row_of_the_same_layout():
    rows = [{"variant": "library", "layout": "NCHW", "epoch_s": [2.0, 1.0, 1.0],
             "median_epoch_s": 1.0},
            {"variant": "library", "layout": "channels_last", "epoch_s": [1.5, 0.7, 0.7],
             "median_epoch_s": 0.7}]
    # compiled NCHW: 10 s + 0.6 s per later epoch against 2 s + 1 s: level after 21 epochs
    c = bench.compile_figures(rows, {"epochs": [10.0, 0.6, 0.6], "channels_last": False})
    assert c["layout"] == "NCHW" and c["eager_steady_epoch_s"] == 1.0
    assert c["first_epoch_s"] == 10.0 and c["steady_epoch_s"] == 0.6
    assert c["break_even_epochs"] == 21
    # compiled channels_last, slower per epoch than eager channels_last: never
    c = bench.compile_figures(rows, {"epochs": [10.0, 0.8, 0.8], "channels_last": True})
    assert c["eager_steady_epoch_s"] == 0.7 and c["break_even_epochs"] is None
    # a layout other than the two: against the eager run of the same (default) config
    rows.append({"variant": "library (default)", "layout": "auto -> x", "epoch_s": [3.0, 1.2],
                 "median_epoch_s": 1.2})
    c = bench.compile_figures(rows, {"epochs": [10.0, 0.8], "channels_last": "x"})
    assert c["eager_first_epoch_s"] == 3.0 and c["break_even_epochs"] == 19  # 1 + 7 / 0.4 = 18.5
