"""`bsam analyze` end to end on checkpoints written by `bsam bench`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from balanced_sam.cli import main

pytestmark = pytest.mark.e2e  # every test here runs the application end to end


def test_analyze_bench_checkpoints(tmp_path, capsys):
    g = np.random.default_rng(0)
    x = g.normal(size=(700, 4))
    y = np.clip(np.exp(0.9 * x[:, 0]) * 10 + g.normal(scale=0.3, size=700), 0, 99)
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "d": x[:, 3],
                  "y": y.round(2)}).to_csv(tmp_path / "t.csv", index=False)
    out = tmp_path / "bench"
    assert main(["bench", "--csv", str(tmp_path / "t.csv"), "--target", "y", "--methods",
                 "sqinv,bsam", "--seeds", "1", "--epochs", "2", "--bin-width", "10", "--cap",
                 "15", "--out", str(out), "--no-plots"]) == 0
    capsys.readouterr()
    ana = tmp_path / "ana"
    args = ["analyze", "--checkpoint", f"SQINV={out / 'runs/sqinv-seed0/best.pt'}",
            str(out / "runs/bsam-rho0.05-seed0/best.pt"), "--samples", "120", "--iters", "8",
            "--probes", "6", "--grid", "5", "--out", str(ana)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| SQINV |" in text and "| bsam |" in text and "λ_max (few" in text
    res = json.loads((ana / "analysis.json").read_text())
    assert set(res) == {"SQINV", "bsam"}
    for r in res.values():
        assert set(r["regions"]) == {"all", "few"}
        assert r["regions"]["all"]["count"] == 120
        assert 0 < r["regions"]["few"]["count"] <= 120
        assert np.isfinite(r["regions"]["all"]["lambda_max"])
        assert r["regions"]["all"]["trace_std_error"] >= 0
    assert (ana / "landscapes.png").stat().st_size > 1000
    from balanced_sam.analysis import Landscape

    land = Landscape.load(ana / "SQINV_landscape.npz")
    assert set(land.values) == {"all", "few"} and land.dim == 1
    # the landscape's centre is the trained model: its MAE is the checkpoint's MAE on that subset
    mid = len(land.alphas) // 2
    assert land.alphas[mid] == 0
    assert np.isfinite(land.values["all"]["mae"][mid])
    assert main(["analyze", "--checkpoint", str(out / "runs/bsam-rho0.05-seed0/best.pt"),
                 "--regions", "all,tail"]) == 2
    assert "tail" in capsys.readouterr().err
    # the library call the command wraps: same figures; regions merged in memory (no file per
    # region written and read back)
    from balanced_sam.experiment import analyze_checkpoints

    lib = analyze_checkpoints([("SQINV", out / "runs/sqinv-seed0/best.pt")], samples=120,
                              iters=8, probes=6, grid=5, out=tmp_path / "lib",
                              log=lambda s: None)
    assert lib["SQINV"]["regions"]["all"]["lambda_max"] == res["SQINV"]["regions"]["all"][
        "lambda_max"]
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == [
        "SQINV_landscape.npz", "analysis.json", "landscapes.png", "sharpness_table.md"]
    assert not [p for p in ana.iterdir() if p.is_dir()]
