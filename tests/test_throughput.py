"""benchmarks/throughput.py: its smoke mode runs on the CPU and reports every figure it promises."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("throughput_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["throughput_bench"] = mod  # DataLoader workers would pickle its classes
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("throughput_bench", None)


def _split_csv(path: Path, n_train: int) -> Path:
    rows = ["age,path,split"]
    rows += [f"{20 + i % 50},AgeDB/{i}.jpg,train" for i in range(n_train)]
    rows += [f"{30 + i},AgeDB/v{i}.jpg,val" for i in range(5)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_smoke_reports_every_figure(bench, tmp_path, capsys):
    csv = _split_csv(tmp_path / "agedb.csv", 40)
    out = tmp_path / "r.json"
    res = bench.main(["--smoke", "--threads", "1", "--csv", str(csv), "--json", str(out),
                      "--data-dir", str(tmp_path / "data")])
    text = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["split_csv"] == str(csv) and res["images"] == 24  # --smoke takes 24 rows

    def positive(v):
        return isinstance(v, float) and math.isfinite(v) and v > 0

    assert all(positive(v) for v in res["reads_img_s"].values())
    assert set(res["reads_img_s"]) == {"jpeg_decode", "jpeg_decode_resize", "cache_record",
                                       "cache_record_pil", "cache_batch"}
    assert positive(res["optimizer_img_s"]) and positive(res["device_aug_img_s"])
    assert math.isfinite(res["optimizer_loss"])
    opt = res["optimizer_img_s"]
    assert set(res["pipelines"]) == {"jpeg", "cache+cpu", "cache+device"}
    for kind, p in res["pipelines"].items():
        assert positive(p["loader_img_s"]) and positive(p["end_to_end_img_s"])
        assert math.isfinite(p["last_loss"])
        assert p["end_to_end_over_optimizer"] == pytest.approx(p["end_to_end_img_s"] / opt)
        assert p["loader_over_optimizer"] == pytest.approx(p["loader_img_s"] / opt)
        # the printed row carries the measured figures
        row = next(line for line in text.splitlines() if line.startswith(
            {"jpeg": "(a)", "cache+cpu": "(b)", "cache+device": "(c)"}[kind]))
        assert f"{p['loader_img_s']:.0f}" in row and f"{p['end_to_end_img_s']:.0f}" in row
    e = {k: v["end_to_end_img_s"] for k, v in res["pipelines"].items()}
    assert res["speedup_end_to_end"]["cache+device/jpeg"] == pytest.approx(
        e["cache+device"] / e["jpeg"])
    for phrase in ("optimizer alone", "device augmentation alone", "per-image reads",
                   "end to end: (b)/(a)", "CPU figures"):
        assert phrase in text

    # the cache holds what pipeline (a) decodes, resized and centre-cropped like `cache: true`
    from PIL import Image
    from torchvision.transforms import functional as TF

    side = res["cache_side"]
    cache = np.load(next((tmp_path / "data").glob("cache-*.npy")), mmap_mode="r")
    with Image.open(next((tmp_path / "data").glob("jpeg-*")) / "000003.jpg") as im:
        expected = TF.center_crop(TF.resize(im.convert("RGB"), side), [side, side])
    assert np.array_equal(cache[3], np.asarray(expected))


def test_parts_and_batch_reader(bench, tmp_path):
    res = bench.main(["--smoke", "--threads", "1", "--parts", "reads,augment",
                      "--data-dir", str(tmp_path)])
    assert "reads_img_s" in res and "device_aug_img_s" in res
    assert "optimizer_img_s" not in res and res["pipelines"] == {}
    # a batch item of the cache+device loader: records and labels in the same (sorted) order
    cache = next(tmp_path.glob("cache-*.npy"))
    ages = np.arange(24, dtype=np.float32)
    ds = bench.CacheBatchDataset(cache, ages)
    x, y = ds[[5, 1, 3]]
    assert x.dtype == torch.uint8 and x.shape[0] == 3 and x.shape[-1] == 3
    assert y.tolist() == [1.0, 3.0, 5.0]
    assert torch.equal(x[0], torch.from_numpy(np.load(cache, mmap_mode="r")[1].copy()))
    sampler = bench.RandomBatches(10, 4, count=5, seed=0)
    batches = list(sampler)
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    flat = [i for b in batches[:2] for i in b]
    assert len(set(flat)) == 8  # no repeats within an epoch


def test_split_choice(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "DEFAULT_CSVS", (tmp_path / "absent.csv",))
    assert bench.find_csv(None) is None
    ages = bench.synthetic_ages(bench.AGEDB_TRAIN_ROWS)
    assert ages.shape == (12208,) and ages.min() >= 1 and ages.max() <= 101
    counts = np.bincount(ages.astype(int))
    assert counts.max() > 100 and (counts[counts > 0] < 20).sum() >= 10  # many- and few-shot
    csv = _split_csv(tmp_path / "s.csv", 7)
    monkeypatch.setattr(bench, "DEFAULT_CSVS", (tmp_path / "absent.csv", csv))
    assert bench.find_csv(None) == csv
    assert bench.read_train_ages(csv).tolist() == [20.0 + i for i in range(7)]


@pytest.mark.parametrize("argv,match", [
    (["--csv", "/nonexistent/agedb.csv"], "--csv"),
    (["--picture", "big"], None),
    (["--parts", "reads,warp"], None),
    (["--limit", "2"], None),
    (["--steps", "0"], None),
])
def test_bad_arguments(bench, argv, match, capsys):
    with pytest.raises(SystemExit) as err:
        bench.main(["--smoke", *argv])
    message = str(err.value.code) if match else capsys.readouterr().err
    assert (match or argv[0]) in message
