"""analyze_model, the Table-8 formatter and the plots (files written and non-empty)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from balanced_sam.analysis import (
    Landscape,
    analyze_model,
    format_sharpness_table,
    hessian_top_eigenvalue,
    hessian_trace,
    loss_landscape,
)
from balanced_sam.bins import LabelBins

PNG = b"\x89PNG\r\n\x1a\n"




def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(80, 3, generator=g)
    y = (torch.rand(80, generator=g) ** 2 * 8).floor()
    train_y = torch.cat([y, torch.full((150,), 0.0)])  # bin 0 many-shot, the tail few-shot
    return model, x, y, LabelBins.from_labels(train_y, bin_width=1.0)


def test_analyze_model_values_json_and_empty_region(tmp_path) -> None:
    model, x, y, bins = setup()
    res = analyze_model(model, x, y, bins, regions=("all", "few", "medium"), out_dir=tmp_path,
                        iters=8, probes=4, grid=5, progress=False, name="sqinv run")
    text = json.dumps(res, allow_nan=False)  # strictly JSON-serialisable
    assert json.loads((tmp_path / "sqinv_run_analysis.json").read_text()) == json.loads(text)
    regs = res["regions"]
    assert regs["all"]["count"] == 80 and regs["few"]["count"] > 0
    assert regs["medium"]["count"] == 0
    assert regs["medium"]["lambda_max"] is None and regs["medium"]["trace"] is None
    eig = hessian_top_eigenvalue(model, None, x, y, bins=bins, region="few", iters=8)
    tr = hessian_trace(model, None, x, y, bins=bins, region="few", probes=4)
    assert regs["few"]["lambda_max"] == pytest.approx(eig.eigenvalue, rel=1e-6)
    assert regs["few"]["trace"] == pytest.approx(tr.trace, rel=1e-6)
    assert regs["few"]["trace_std_error"] == pytest.approx(tr.std_error, rel=1e-6)
    assert regs["few"]["trace_probes"] == 4
    land = res["landscape"]
    ls = Landscape.load(land["npz"])
    assert ls.values["few"]["mae"][2] == pytest.approx(regs["few"]["mae"], rel=1e-9)
    assert Landscape.load(land["json"]).counts == ls.counts
    assert land["plots"], "plots were requested"
    for p in land["plots"]:
        with open(p, "rb") as fh:
            assert fh.read(8) == PNG
    assert set(res["seconds"]) == {"lambda_max", "trace", "landscape", "total"}


def test_analyze_model_without_files_or_parts() -> None:
    model, x, y, bins = setup()
    res = analyze_model(model, x, y, bins, regions=("all",), hessian=False, landscape=False,
                        progress=False)
    assert res["landscape"] is None and "lambda_max" not in res["regions"]["all"]
    assert res["regions"]["all"]["mae"] > 0
    res = analyze_model(model, x, y, None, regions=("all",), hessian=False, grid=[-0.5, 0, 0.5],
                        progress=False)
    assert res["landscape"]["data"]["alphas"] == [-0.5, 0.0, 0.5]
    with pytest.raises(ValueError, match="needs bins"):
        analyze_model(model, x, y, None, regions=("few",), progress=False)


def test_format_sharpness_table() -> None:
    a = {"regions": {"all": {"count": 80, "lambda_max": 12.3456, "trace": 101.0,
                             "trace_std_error": 3.2},
                     "few": {"count": 9, "lambda_max": 40.0, "trace": 250.5,
                             "trace_std_error": None}}}
    b = {"regions": {"all": {"count": 80, "lambda_max": 8.0, "trace": 77.0,
                             "trace_std_error": 1.0},
                     "few": {"count": 9, "lambda_max": None, "trace": None}}}
    table = format_sharpness_table({"SQINV": a, "BSAM": b})
    lines = table.splitlines()
    assert lines[0] == ("| method | λ_max (all, n=80) | Tr(H) (all, n=80) | λ_max (few, n=9) "
                        "| Tr(H) (few, n=9) |")
    assert lines[1].startswith("| --- | ---: |")
    assert lines[2] == "| SQINV | 12.35 | 101 ± 3.2 | 40 | 250.5 |"
    assert lines[3] == "| BSAM | 8 | 77 ± 1 | n/a | n/a |"
    only_few = format_sharpness_table({"X": a["regions"]}, regions=["few"]).splitlines()
    assert only_few[0] == "| method | λ_max (few, n=9) | Tr(H) (few, n=9) |"
    assert only_few[2] == "| X | 40 | 250.5 |"


def test_plots_write_pngs(tmp_path) -> None:
    from balanced_sam.analysis import plots

    model, x, y, bins = setup()
    one = loss_landscape(model, x, y, bins, ("all", "few"), steps=5, label="vanilla")
    two = loss_landscape(model, x, y, bins, ("all", "few"), dim=2, steps=4, label="bsam")
    paths = [
        plots.plot_landscape_1d(one, tmp_path / "a" / "curve.png"),
        plots.plot_landscape_contour(two, "few", "mae", tmp_path / "contour.png"),
        plots.plot_landscape_surface(two, "all", "loss", tmp_path / "surface.png"),
        plots.plot_region_comparison({"vanilla": one, "again": one}, tmp_path / "fig1.png"),
        plots.plot_region_comparison(two, tmp_path / "fig1_2d.png", kind="surface"),
    ]
    for p in paths:
        assert p.stat().st_size > 1000
        assert p.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="2-D"):
        plots.plot_landscape_contour(one)
    with pytest.raises(ValueError, match="same dimension"):
        plots.plot_region_comparison({"a": one, "b": two})


@pytest.mark.e2e
def test_import_does_not_need_matplotlib() -> None:
    code = ("import sys, balanced_sam.analysis as a; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'; print(len(a.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_nan_safe_helpers() -> None:
    ls = Landscape(np.array([0.0]), None, {"few": {"loss": np.array([math.nan]),
                                                   "mae": np.array([math.nan])}}, {"few": 0})
    assert ls.to_dict()["values"]["few"]["loss"] == [None]
    assert ls.minimum("few")["index"] is None
