"""benchmarks/throughput.py: its smoke mode runs ``bsam train``'s library call on the CPU and
reports every figure it promises."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from _repo_scripts import ROOT
from PIL import Image

pytestmark = pytest.mark.e2e  # every test here runs the application end to end

BENCH = ROOT / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("throughput_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["throughput_bench"] = mod  # worker processes would pickle its functions
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("throughput_bench", None)


def _split_csv(path: Path, n_train: int) -> Path:
    rows = ["age,path,split"]
    rows += [f"{20 + i % 50},AgeDB/{i}_x_{20 + i % 50}_f.jpg,train" for i in range(n_train)]
    rows += [f"{30 + i},AgeDB/v{i}.jpg,val" for i in range(5)]
    path.write_text("\n".join(rows) + "\n")
    return path


def positive(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_smoke_reports_every_figure(bench, tmp_path, capsys):
    csv_path = _split_csv(tmp_path / "agedb.csv", 40)
    out = tmp_path / "r.json"
    data = tmp_path / "data"
    res = bench.main(["--smoke", "--threads", "1", "--csv", str(csv_path), "--json", str(out),
                      "--data-dir", str(data)])
    text = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(res, default=str))
    assert res["split_csv"] == str(csv_path) and res["images"] == 24  # --smoke takes 24 rows
    # the stand-in root: the split's first 24 training rows, one 24x20 JPEG at each path
    with open(data / "agedb.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [f"AgeDB/{i}_x_{20 + i % 50}_f.jpg" for i in range(24)]
    assert {r["split"] for r in rows} == {"train"}
    with Image.open(data / rows[3]["path"]) as im:
        assert im.size == (20, 24)
    assert res["cache_fill"]["filled"] == 24 and positive(res["cache_fill"]["img_s"])
    assert set(res["reads_img_s"]) == {"jpeg_decode", "jpeg_decode_resize",
                                       "device_cached_picture", "cpu_jpeg_sample",
                                       "cpu_cached_sample"}
    assert all(positive(v) for v in res["reads_img_s"].values())
    assert positive(res["optimizer_img_s"]) and positive(res["device_aug_img_s"])
    assert math.isfinite(res["optimizer_loss"]) and len(res["optimizer_epoch_seconds"]) == 2
    opt = res["optimizer_img_s"]
    assert set(res["pipelines"]) == {"device", "cache", "jpeg"}
    for kind, p in res["pipelines"].items():
        assert positive(p["loader_img_s"]) and positive(p["end_to_end_img_s"])
        assert len(p["epoch_seconds"]) == len(p["loader_epoch_seconds"]) == 2
        # img/s over the epochs after the first: 24 images in the second epoch's seconds
        assert p["end_to_end_img_s"] == pytest.approx(24 / p["epoch_seconds"][1])
        assert math.isfinite(p["last_loss"])
        # channels_last auto: measured by the run on its model (either layout may win here)
        assert p["config"]["amp"] == "none" and isinstance(p["config"]["channels_last"], bool)
        assert p["end_to_end_over_optimizer"] == pytest.approx(p["end_to_end_img_s"] / opt)
        assert p["loader_over_optimizer"] == pytest.approx(p["loader_img_s"] / opt)
        row = next(line for line in text.splitlines() if line.startswith(f"({kind})"))
        assert f"{p['loader_img_s']:.0f}" in row and f"{p['end_to_end_img_s']:.0f}" in row
    # the end-to-end run of the device pipeline went through the device path, the others not
    assert res["pipelines"]["device"]["log"][0].startswith("augment: per batch on cpu")
    assert res["pipelines"]["jpeg"]["log"] == res["pipelines"]["cache"]["log"] == []
    e = {k: v["end_to_end_img_s"] for k, v in res["pipelines"].items()}
    assert res["speedup_end_to_end"]["device"] == pytest.approx(e["device"] / e["jpeg"])
    for phrase in ("optimizer alone", "device augmentation alone", "per-image reads",
                   "picture cache (device path)", "end to end against (jpeg)",
                   "bsam train decided: amp none, channels_last "
                   f"{res['pipelines']['jpeg']['config']['channels_last']}", "CPU figures"):
        assert phrase in text
    assert "goal" not in text  # the goal is judged on CUDA only


def test_parts_and_pipelines_choose_what_runs(bench, tmp_path):
    res = bench.main(["--smoke", "--threads", "1", "--parts", "loader", "--pipelines",
                      "device", "--data-dir", str(tmp_path), "--channels-last", "on"])
    assert set(res["pipelines"]) == {"device"}
    assert set(res["pipelines"]["device"]) == {"loader_img_s", "loader_epoch_seconds"}
    assert "optimizer_img_s" not in res and "reads_img_s" not in res
    assert res["config"]["channels_last"] is True


def test_split_choice(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "DEFAULT_CSVS", (tmp_path / "absent.csv",))
    assert bench.find_csv(None) is None
    ages = bench.synthetic_ages(bench.AGEDB_TRAIN_ROWS)
    assert ages.shape == (12208,) and ages.min() >= 1 and ages.max() <= 101
    counts = np.bincount(ages.astype(int))
    assert counts.max() > 100 and (counts[counts > 0] < 20).sum() >= 10  # many- and few-shot
    path = _split_csv(tmp_path / "s.csv", 7)
    monkeypatch.setattr(bench, "DEFAULT_CSVS", (tmp_path / "absent.csv", path))
    assert bench.find_csv(None) == path
    ages, paths = bench.read_split(path)
    assert ages.tolist() == [20.0 + i for i in range(7)] and paths[2] == "AgeDB/2_x_22_f.jpg"


@pytest.mark.parametrize("argv,match", [
    (["--csv", "/nonexistent/agedb.csv"], "--csv"),
    (["--picture", "big"], None),
    (["--parts", "reads,warp"], None),
    (["--pipelines", "gpu"], None),
    (["--limit", "2"], None),
    (["--epochs", "0"], None),
    (["--amp", "fp8"], None),
])
def test_bad_arguments(bench, argv, match, capsys):
    with pytest.raises(SystemExit) as err:
        bench.main(["--smoke", *argv])
    message = str(err.value.code) if match else capsys.readouterr().err
    assert (match or argv[0]) in message
