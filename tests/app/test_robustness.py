"""Issue 8's application cases, each reproduced: data fingerprints (5), outliers and bins (6),
one bMAE balance (7), output folders (8) and clear errors (10)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from _tables import abc_csv as table

from balanced_sam.bench import BenchConfig, run_bench
from balanced_sam.cli import main
from balanced_sam.experiment import run_training
from balanced_sam.io import FolderLock

pytestmark = pytest.mark.e2e  # every test here runs the application end to end


def config(tmp_path, csv, **train):
    values = {"method": "bsam", "epochs": 2, "batch_size": 64, "progress": False, **train}
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data: {{name: csv, path: {csv}, target: y, bin_width: 10, cap: 20}}\n"
                    f"train: {json.dumps(values)}\n")
    return path


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------- 5: fingerprints
def test_bench_trains_again_the_runs_whose_data_changed(tmp_path):
    csv = table(tmp_path / "t.csv")
    kw = dict(csv_path=str(csv), target="y", methods=["sqinv"], seeds=[0], epochs=2,
              bin_width=10, cap=20, plots=False)
    first = run_bench(BenchConfig(out=tmp_path / "b", **kw), log=lambda s: None)
    table(csv, shift=3.0)  # same shape, other feature values
    logs = []
    again = run_bench(BenchConfig(out=tmp_path / "b", **kw), log=logs.append)
    fresh = run_bench(BenchConfig(out=tmp_path / "fresh", **kw), log=lambda s: None)
    assert any("data changed" in s and "training it again" in s for s in logs)
    assert again["fingerprint"]["digest"] != first["fingerprint"]["digest"]
    mae = [r["methods"]["sqinv"]["runs"][0]["test"]["all"]["mae"] for r in (again, fresh)]
    assert mae[0] == mae[1]  # before: the stale run was read back
    logs = []
    run_bench(BenchConfig(out=tmp_path / "b", **kw), log=logs.append)
    assert any("read back" in s for s in logs)  # same data again: reused


def test_eval_and_resume_refuse_changed_data_unless_allowed(tmp_path, capsys):
    csv = table(tmp_path / "t.csv")
    cfg = config(tmp_path, csv)
    out = tmp_path / "run"
    assert run(["train", "--config", cfg, "--out", out], capsys)[0] == 0
    table(csv, shift=3.0)
    code, _, err = run(["eval", "--checkpoint", out / "best.pt"], capsys)
    assert code == 2 and "other data" in err and "--allow-data-change" in err
    assert run(["eval", "--checkpoint", out / "best.pt", "--allow-data-change"], capsys)[0] == 0
    code, _, err = run(["train", "--config", cfg, "--out", out, "--resume", "train.epochs=3"],
                       capsys)
    assert code == 2 and "data changed" in err and "--allow-data-change" in err
    assert run(["train", "--config", cfg, "--out", out, "--resume", "train.epochs=3",
                "--allow-data-change"], capsys)[0] == 0
    ck = torch.load(out / "best.pt", weights_only=True)
    assert ck["data_fingerprint"] and ck["meta"]["data"]["params"]["cap"] == 20


# ---------------------------------------------------------------------------- 6: bins
def test_an_outlier_no_longer_collapses_the_default_bins(tmp_path):
    # (an outlier of 1e9 among 0-99 is refused now, issue 17 item 8: tests/app/test_trust.py;
    # 2e4, about 1,800 interquartile ranges out, still stretches the default bins 200-fold)
    csv = table(tmp_path / "t.csv", n=600, outlier=2e4)
    logs = []
    res = run_bench(BenchConfig(csv_path=str(csv), target="y", methods=["sqinv"], seeds=[0],
                                epochs=2, out=tmp_path / "b", plots=False), log=logs.append)
    counts = np.array(res["bins"]["counts"])
    assert (counts > 0).mean() > 0.5  # before: 99 of 101 bins empty
    assert res["config"]["bins"].get("clamp") is True
    assert any("beyond the default bins" in w for w in res["warnings"])
    assert res["methods"]["sqinv"]["runs"][0]["test"]["all"]["mae"] < 50  # before: 135,939


@pytest.mark.parametrize("width,warning", [(0.01, "hold no training sample"),
                                           (1000.0, "a single label bin")])
def test_bench_warns_about_useless_bins(tmp_path, width, warning):
    logs = []
    res = run_bench(BenchConfig(csv_path=str(table(tmp_path / "t.csv")), target="y",
                                methods=["vanilla"], seeds=[0], epochs=1, bin_width=width, cap=20,
                                out=tmp_path / "b", plots=False), log=logs.append)
    assert any(warning in w for w in res["warnings"])
    assert any(s.startswith("warning:") and warning in s for s in logs)


# ---------------------------------------------------------------------------- 7: one balance
@pytest.mark.parametrize("integer,balance", [(False, "bin"), (True, "label")])
def test_bmae_balances_the_same_way_in_train_eval_and_bench(tmp_path, capsys, integer,
                                                             balance):
    csv = table(tmp_path / "t.csv", integer=integer)
    bench = run_bench(BenchConfig(csv_path=str(csv), target="y", methods=["bsam"], seeds=[0],
                                  epochs=2, bin_width=1 if integer else 10, cap=20,
                                  out=tmp_path / "b", plots=False), log=lambda s: None)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {{name: csv, path: {csv}, target: y, bin_width: "
                   f"{1 if integer else 10}, cap: 20}}\ntrain: {{method: bsam, epochs: 2, "
                   "batch_size: 64, progress: false}\n")
    assert run(["train", "--config", cfg, "--out", tmp_path / "r"], capsys)[0] == 0
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert bench["config"]["train"]["balance"] == result["balance"] == balance
    assert run(["eval", "--checkpoint", tmp_path / "r" / "best.pt", "--json",
                tmp_path / "ev.json"], capsys)[0] == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["all"]["bmae"] == pytest.approx(result["test"]["all"]["bmae"], rel=1e-9)
    if balance == "bin":  # per label on a continuous target would be the MAE again
        assert result["test"]["all"]["bmae"] != pytest.approx(result["test"]["all"]["mae"])


# ---------------------------------------------------------------------------- 8: folders
def test_overwrite_clears_the_old_runs_outputs_first(tmp_path):
    csv = table(tmp_path / "t.csv")
    out = tmp_path / "run"
    spec = {"data": {"name": "csv", "path": str(csv), "target": "y", "bin_width": 10,
                     "cap": 20}, "train": {"epochs": 1, "batch_size": 64, "progress": False}}
    run_training(spec, out=out, log=lambda s: None)  # an earlier run: the folder is ours
    (out / "notes.txt").write_text("mine")

    class Kill:
        def log_epoch(self, row):
            raise KeyboardInterrupt  # killed after the first epoch

        def close(self):
            pass

    spec["train"]["epochs"] = 3
    with pytest.raises(KeyboardInterrupt):
        run_training(spec, out=out, overwrite=True, loggers=[Kill()], log=lambda s: None)
    assert not (out / "result.json").exists()
    assert (out / "notes.txt").read_text() == "mine"  # not ours: kept
    assert len((out / "log.csv").read_text().splitlines()) == 1 + 1  # the new run's epoch 0
    assert not (out / ".lock").exists()
    FolderLock(out).acquire().release()  # released: it can be taken again


def lock_holder(folder) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until it is killed."""
    code = ("import sys, time; from balanced_sam.io import FolderLock; "
            f"lock = FolderLock({str(folder)!r}).acquire(); print('held', flush=True); "
            "time.sleep(60)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=env)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_folder_is_refused(tmp_path, capsys):
    cfg = config(tmp_path, table(tmp_path / "t.csv"))
    out = tmp_path / "run"
    out.mkdir()
    sleeper = lock_holder(out)
    try:
        code, _, err = run(["train", "--config", cfg, "--out", out], capsys)
        assert code == 2 and f"in use by process {sleeper.pid} on {socket.gethostname()}" in err
        assert str(out) in err
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder was killed: the operating system dropped its lock and the run goes ahead
    assert run(["train", "--config", cfg, "--out", out], capsys)[0] == 0


def test_resume_refuses_changed_settings_and_replans_more_epochs(tmp_path, capsys):
    cfg = config(tmp_path, table(tmp_path / "t.csv"), epochs=3)
    out = tmp_path / "run"
    assert run(["train", "--config", cfg, "--out", out], capsys)[0] == 0
    code, _, err = run(["train", "--config", cfg, "--out", out, "--resume", "train.lr=0.1"],
                       capsys)
    assert code == 2 and "lr: saved" in err and "num_workers" in err  # says what may change
    code, out_text, _ = run(["train", "--config", cfg, "--out", out, "--resume",
                             "train.epochs=5", "train.eval_batch_size=7"], capsys)
    assert code == 0 and "3 -> 5 epochs" in out_text
    lrs = pd.read_csv(out / "log.csv")["lr"].tolist()
    assert len(lrs) == 5 and all(b <= a for a, b in zip(lrs, lrs[1:]))  # never back up


# ---------------------------------------------------------------------------- 10: errors
def test_bad_device_and_bad_types_are_clear_errors(tmp_path, capsys):
    csv = table(tmp_path / "t.csv")
    code, _, err = run(["bench", "--csv", csv, "--target", "y", "--device", "tpu", "--out",
                        tmp_path / "b"], capsys)
    assert code == 2 and "'tpu'" in err and "--device cpu" in err and "Traceback" not in err
    cfg = config(tmp_path, csv)
    code, _, err = run(["train", "--config", cfg, "--out", tmp_path / "r", "train.device=tpu"],
                       capsys)
    assert code == 2 and "train.device" in err and "'tpu'" in err
    code, _, err = run(["train", "--config", cfg, "--out", tmp_path / "r", "train.lr=abc"],
                       capsys)
    assert code == 2 and "train.lr: expected a number, got 'abc' (str)" in err
    code, _, err = run(["train", "--config", cfg, "--out", tmp_path / "r", "train.lrr=1"],
                       capsys)
    assert code == 2 and "did you mean lr?" in err
    assert run(["train", "--config", cfg, "--out", tmp_path / "r", "train.lr=1e-2"],
               capsys)[0] == 0  # YAML reads 1e-2 as text: a number all the same


def test_a_model_that_does_not_fit_its_weights_is_a_clear_error(tmp_path, capsys):
    cfg = config(tmp_path, table(tmp_path / "t.csv"))
    out = tmp_path / "run"
    assert run(["train", "--config", cfg, "--out", out], capsys)[0] == 0
    code, _, err = run(["eval", "--checkpoint", out / "best.pt", "model.hidden=[8]"], capsys)
    assert code == 2 and "do not fit the model" in err and "net.0.weight" in err
    code, _, err = run(["train", "--config", cfg, "--out", out, "--resume", "model.hidden=[8]",
                        "train.epochs=3"], capsys)
    assert code == 2 and "do not fit the model" in err


def test_cli_errors_name_cli_flags(tmp_path, capsys):
    csv = table(tmp_path / "t.csv")
    df = pd.read_csv(csv)
    df.loc[[1, 2], "y"] = np.nan
    df.to_csv(tmp_path / "nan.csv", index=False)
    code, _, err = run(["bench", "--csv", tmp_path / "nan.csv", "--target", "y"], capsys)
    assert code == 2 and "--dropna" in err and "dropna=True" not in err
    cfg = config(tmp_path, tmp_path / "nan.csv")
    code, _, err = run(["train", "--config", cfg, "--out", tmp_path / "r"], capsys)
    assert code == 2 and "data.dropna=true" in err
    df = pd.read_csv(csv)
    df.loc[[3, 4], "a"] = np.nan
    df.to_csv(tmp_path / "gap.csv", index=False)
    code, _, err = run(["bench", "--csv", tmp_path / "gap.csv", "--target", "y"], capsys)
    assert code == 2 and "--impute median" in err and "impute='median'" not in err
    code, _, _ = run(["bench", "--csv", tmp_path / "gap.csv", "--target", "y", "--impute",
                      "median", "--methods", "vanilla", "--seeds", "1", "--epochs", "1",
                      "--no-plots", "--out", tmp_path / "ok"], capsys)
    assert code == 0


def test_a_repeated_seed_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--seeds", "0,0"])
    assert e.value.code == 2 and "repeated" in capsys.readouterr().err
    with pytest.raises(ValueError, match="repeats seed"):
        run_bench(BenchConfig(csv_path="x.csv", target="y", seeds=[1, 0, 1]))


def test_a_missing_extra_gives_the_install_hint(tmp_path, capsys, monkeypatch):
    csv = table(tmp_path / "t.csv")
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    monkeypatch.delitem(sys.modules, "balanced_sam.data.tabular", raising=False)
    monkeypatch.delenv("BSAM_DEBUG", raising=False)
    code, _, err = run(["bench", "--csv", csv, "--target", "y", "--out", tmp_path / "b"], capsys)
    assert code == 2 and "pip install 'balanced-sam[cli]'" in err and "pandas" in err
