"""The training loop, the methods, the bench runner and the `bsam` command."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from _tables import long_tail as synthetic
from _tables import thirds as split
from _tables import write_long_tail_csv as write_csv

from balanced_sam import LabelBins
from balanced_sam.bench import BenchConfig, run_bench
from balanced_sam.cli import main
from balanced_sam.data.scaling import TargetScaler
from balanced_sam.methods import METHODS, build_stepper, get_method
from balanced_sam.models import MLP
from balanced_sam.train import RunExistsError, TrainConfig, batches, fit, seed_everything

REPORT_KEYS = {"all", "many", "medium", "few"}
METRIC_KEYS = {"mae", "mse", "rmse", "gm", "bmae", "count"}


def quick_cfg(**kw):
    base = dict(epochs=2, batch_size=64, lr=0.05, progress=False, rho=0.05)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_one_epoch(name):
    x, y = synthetic(300)
    tr, va, te = split(x, y)
    bins = LabelBins.from_labels(tr[1], bin_width=5, lower=0, upper=100)
    seed_everything(0)
    model = MLP(5, (16,))
    before = [p.detach().clone() for p in model.parameters()]
    res = fit(model, tr, va, bins, quick_cfg(method=name, epochs=1), test_data=te,
              target_scaler=TargetScaler.fit(tr[1]), log=lambda s: None)
    assert set(res.test) == REPORT_KEYS and METRIC_KEYS <= set(res.test["all"])
    assert np.isfinite(res.test["all"]["mae"]) and res.test["all"]["count"] == len(te[1])
    # a two-stage method (rnc) lists its pre-training epoch first, marked as such
    head = [r for r in res.history if r.get("stage") != "pretrain"]
    assert res.best_epoch == 1 and len(head) == 1
    assert len(res.history) == (2 if get_method(name).plugins == ("rnc",) else 1)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_methods_build_the_right_optimizers():
    x, y = synthetic(100)
    bins = LabelBins.from_labels(y, bin_width=5, lower=0, upper=100)
    cfg = quick_cfg()
    for name, cls, pert, upd in [("bsam", "BalancedSAM", "sqrt_inv", "sqrt_inv"),
                                 ("vanilla-bsam", "BalancedSAM", "sqrt_inv", None),
                                 ("inv-bsam", "BalancedSAM", "inv", "inv"),
                                 ("sam", "SAM", None, "sqrt_inv"),
                                 ("vanilla-sam", "SAM", None, None),
                                 ("imbsam", "ImbSAM", None, "sqrt_inv"),
                                 ("ccsam", "CCSAM", None, "sqrt_inv")]:
        opt, _ = build_stepper(get_method(name), MLP(5, (4,)).parameters(), bins, cfg)
        assert type(opt).__name__ == cls, name
        assert opt.perturbation_weighting == pert and opt.update_weighting == upd, name
    with pytest.raises(ValueError, match="unknown method"):
        get_method("bsam2")


@pytest.mark.e2e
def test_seeded_runs_are_deterministic():
    x, y = synthetic(300)
    tr, va, te = split(x, y)
    bins = LabelBins.from_labels(tr[1], bin_width=5, lower=0, upper=100)
    results = []
    for _ in range(2):
        seed_everything(3)
        model = MLP(5, (16,), dropout=0.1)
        res = fit(model, tr, va, bins, quick_cfg(method="bsam", seed=3), test_data=te,
                  log=lambda s: None)
        results.append((res.test, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.e2e
def test_resume_after_kill_matches_unbroken_run(tmp_path):
    x, y = synthetic(400)
    tr, va, te = split(x, y)
    bins = LabelBins.from_labels(tr[1], bin_width=5, lower=0, upper=100)
    cfg = quick_cfg(method="bsam", epochs=5, seed=1)

    def run(out, kill_after=None, resume=False, model_seed=1):
        seed_everything(model_seed)
        model = MLP(5, (16,), dropout=0.2)  # dropout: the RNG state must be restored too

        def killer(epoch, row):
            if kill_after is not None and epoch == kill_after:
                raise KeyboardInterrupt

        res = fit(model, tr, va, bins, cfg, test_data=te, out_dir=out, resume=resume,
                  on_epoch_end=killer, log=lambda s: None)
        return res, model

    unbroken, m1 = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", kill_after=2)
    assert (tmp_path / "b" / "last.pt").exists()
    with pytest.raises(RunExistsError, match="resume"):
        run(tmp_path / "b")
    resumed, m2 = run(tmp_path / "b", resume=True, model_seed=99)
    assert resumed.test == unbroken.test
    assert resumed.best_epoch == unbroken.best_epoch
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    rows = (tmp_path / "b" / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 5  # header + one row per epoch, no duplicate after the resume
    with pytest.raises(ValueError, match="another config"):
        fit(MLP(5, (16,), dropout=0.2), tr, va, bins, quick_cfg(method="sqinv", epochs=5,
                                                                 seed=1),
            out_dir=tmp_path / "b", resume=True, log=lambda s: None)


def test_batches_shard_like_distributed_sampler():
    data = (torch.arange(10).float(), torch.arange(10).float())
    single = [b[0] for b in batches(data, 4, shuffle=True, seed=5, epoch=2)]
    r0 = [b[0] for b in batches(data, 2, shuffle=True, seed=5, epoch=2, rank=0, world_size=2)]
    r1 = [b[0] for b in batches(data, 2, shuffle=True, seed=5, epoch=2, rank=1, world_size=2)]
    for s, a, b in zip(single, r0, r1):
        assert sorted(s.tolist()) == sorted(a.tolist() + b.tolist())
    other = [b[0] for b in batches(data, 4, shuffle=True, seed=5, epoch=3)]
    assert not all(torch.equal(a, b) for a, b in zip(single, other))


def _ddp_worker(rank, world, init_file, out_file, scope):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    try:
        torch.set_num_threads(1)
        x, y = synthetic(256)
        tr, va, te = split(x, y)
        bins = LabelBins.from_labels(tr[1], bin_width=5, lower=0, upper=100)
        seed_everything(0)
        model = MLP(5, (16,))
        fit(model, tr, va, bins, quick_cfg(method="bsam", batch_size=16, scope=scope, epochs=2),
            log=lambda s: None)
        if rank == 0:
            torch.save(model.state_dict(), out_file)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.e2e
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_process_global_scope_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    results = {}
    for scope in ("global", "local"):
        out = tmp_path / f"{scope}.pt"
        mp.spawn(_ddp_worker, args=(2, str(tmp_path / f"init-{scope}"), str(out), scope),
                 nprocs=2, join=True)
        results[scope] = torch.load(out)
    x, y = synthetic(256)
    tr, va, te = split(x, y)
    bins = LabelBins.from_labels(tr[1], bin_width=5, lower=0, upper=100)
    seed_everything(0)
    model = MLP(5, (16,))
    fit(model, tr, va, bins, quick_cfg(method="bsam", batch_size=32, epochs=2),
        log=lambda s: None)
    single = model.state_dict()
    for k, v in single.items():
        torch.testing.assert_close(results["global"][k], v, rtol=1e-5, atol=1e-6)
    # local scope perturbs each replica with its own gradient: a different trajectory
    assert any(not torch.allclose(results["local"][k], v, atol=1e-6) for k, v in single.items())


@pytest.mark.e2e
def test_bench_results_schema_and_resume(tmp_path):
    csv = tmp_path / "table.csv"
    write_csv(csv)
    out = tmp_path / "bench"
    logs = []
    res = run_bench(BenchConfig(csv_path=str(csv), target="target", methods=["vanilla", "bsam"],
                                seeds=[0, 1], epochs=2, rho=[0.05, 0.2], bin_width=10, cap=20,
                                out=out), log=logs.append)
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk) >= {"dataset", "config", "split", "methods", "bins"}
    sp = on_disk["split"]
    assert {"train", "val", "test", "bins", "regions"} <= set(sp)
    assert sp["train"] + sp["val"] + sp["test"] == 900
    assert set(sp["regions"]) == {"many", "medium", "few"}
    assert sp["val"] == sp["test"]
    assert set(on_disk["methods"]) == {"vanilla", "bsam"}
    bsam = on_disk["methods"]["bsam"]
    assert len(bsam["runs"]) == 4 and {r["rho"] for r in bsam["runs"]} == {0.05, 0.2}
    assert len(on_disk["methods"]["vanilla"]["runs"]) == 2
    for run in bsam["runs"]:
        assert {"seed", "rho", "best_epoch", "train_seconds", "val", "test"} <= set(run)
        assert set(run["test"]) == REPORT_KEYS and METRIC_KEYS <= set(run["test"]["all"])
        assert len(run["test_per_bin"]["mae"]) == sp["bins"]
    assert set(bsam["mean"]) == REPORT_KEYS and set(bsam["std"]) == REPORT_KEYS
    assert bsam["selected_rho"] in (0.05, 0.2)
    sel = [r["test"]["all"]["mae"] for r in bsam["runs"] if r["rho"] == bsam["selected_rho"]]
    assert bsam["mean"]["all"]["mae"] == pytest.approx(sum(sel) / 2)
    for f in ("results.csv", "label_histogram.png", "per_bin_mae.png", "rho_sweep.png"):
        assert (out / f).stat().st_size > 0, f
    table = "\n".join(logs)
    assert "| bsam (rho" in table and "| vanilla |" in table
    # a second run with the same --out reads the finished runs back: same numbers
    logs2 = []
    again = run_bench(BenchConfig(csv_path=str(csv), target="target", methods=["vanilla", "bsam"],
                                  seeds=[0, 1], epochs=2, rho=[0.05, 0.2], bin_width=10, cap=20,
                                  out=out, plots=False), log=logs2.append)
    assert sum("read back" in s for s in logs2) == 6
    assert again["methods"]["bsam"]["mean"] == res["methods"]["bsam"]["mean"]
    with pytest.raises(RunExistsError, match="another configuration"):
        run_bench(BenchConfig(csv_path=str(csv), target="target", methods=["vanilla"], seeds=[0],
                              epochs=3, bin_width=10, cap=20, out=out), log=lambda s: None)


@pytest.mark.e2e
def test_cli_bench_bad_input(tmp_path, capsys):
    import pandas as pd

    csv = tmp_path / "t.csv"
    df = write_csv(csv, n=300)
    assert main(["bench", "--csv", str(csv), "--target", "price", "--out",
                 str(tmp_path / "o")]) == 2
    assert "price" in capsys.readouterr().err
    bad = df.copy()
    bad["target"] = bad["target"].astype(str)
    bad.loc[3, "target"] = "expensive"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    assert main(["bench", "--csv", str(tmp_path / "bad.csv"), "--target", "target"]) == 2
    assert "expensive" in capsys.readouterr().err
    nan = df.copy()
    nan.loc[[1, 2], "target"] = np.nan
    nan.to_csv(tmp_path / "nan.csv", index=False)
    assert main(["bench", "--csv", str(tmp_path / "nan.csv"), "--target", "target"]) == 2
    assert "NaN" in capsys.readouterr().err
    pd.DataFrame({"a": [1.0, 2.0], "target": [1.0, 2.0]}).to_csv(tmp_path / "tiny.csv",
                                                                 index=False)
    assert main(["bench", "--csv", str(tmp_path / "tiny.csv"), "--target", "target"]) == 2
    assert "split" in capsys.readouterr().err.lower()
    assert main(["bench", "--methods", "bsam,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["bench", "--csv", str(csv)]) == 2
    assert "--target" in capsys.readouterr().err


@pytest.mark.e2e
def test_cli_train_eval_resume(tmp_path, capsys):
    csv = tmp_path / "table.csv"
    write_csv(csv)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"data: {{name: csv, path: {csv}, target: target, bin_width: 10, cap: 20}}\n"
        "train: {method: bsam, epochs: 2, batch_size: 64, progress: false}\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "train.rho=0.1"]) == 0
    text = capsys.readouterr().out
    assert "| bsam |" in text
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["rho"] == 0.1 and result["best_epoch"] >= 1
    # eval rebuilds model and data from the checkpoint alone
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--json",
                 str(tmp_path / "ev.json")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["all"]["mae"] == pytest.approx(result["test"]["all"]["mae"], rel=1e-9)
    # the checkpoint holds the target scaler once; one written before it (only the older
    # ``target_stats`` pair) still loads with the same scaling
    from balanced_sam.experiment import load_experiment

    ck = torch.load(out / "best.pt", weights_only=False)
    last = torch.load(out / "last.pt", weights_only=False)
    assert "target_stats" not in ck and "amp_scaler" in last and "scaler" not in last
    saved = TargetScaler(**ck["target_scaler"])
    assert not saved.is_identity
    old = {k: v for k, v in ck.items() if k != "target_scaler"}
    old["target_stats"] = (saved.mean, saved.std)
    assert load_experiment(old).target_scaler == saved == load_experiment(ck).target_scaler
    # an existing run is not overwritten silently
    assert main(["train", "--config", str(cfg), "--out", str(out), "train.rho=0.1"]) == 2
    assert "resume" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--out", str(out), "train.rho=0.1",
                 "train.epochs=3", "--resume"]) == 0
    assert json.loads((out / "result.json").read_text())["config"]["epochs"] == 3
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "train.lr=-1", "--out",
                 str(tmp_path / "x")]) == 2
    assert "lr" in capsys.readouterr().err


def test_help_explains_every_command(capsys):
    for cmd in ("bench", "train", "eval", "analyze", "data"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.count("--") >= 1 and "usage: bsam" in out
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "vanilla-bsam" in listing and "diamonds" in listing


@pytest.mark.e2e
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")
def test_amp_needs_cuda():
    x, y = synthetic(100)
    tr, va, _ = split(x, y)
    bins = LabelBins.from_labels(tr[1], bin_width=5, lower=0, upper=100)
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the guard does not apply")
    with pytest.raises(ValueError, match="CUDA"):
        fit(MLP(5, (4,)), tr, va, bins, quick_cfg(amp="bf16", device="cpu"), log=print)
    os.environ.pop("BSAM_DEBUG", None)


@pytest.mark.e2e
def test_bench_uses_the_datasets_rho_per_method_unless_told(tmp_path, monkeypatch):
    from balanced_sam.data import REGISTRY, BenchData, DatasetEntry, Recipe, table_loader
    from balanced_sam.data.registry import TABLE_RECIPE

    x, y = synthetic(400)
    tr, va, te = split(x, y)

    def load(**_):
        return BenchData("tiny", tr[0], tr[1], va[0], va[1], te[0], te[1],
                         bins={"bin_width": 5.0, "lower": 0.0, "upper": 100.0})

    recipe = Recipe(train={**TABLE_RECIPE.train, "epochs": 1, "batch_size": 64, "rho": 0.3},
                    rho_by_method={"bsam": 0.07}, model={"name": "mlp", "hidden": [8]})
    monkeypatch.setitem(REGISTRY, "tiny-test",
                        DatasetEntry("tiny-test", table_loader(load), recipe, "", "a test table"))
    res = run_bench(BenchConfig(dataset="tiny-test", methods=["bsam", "sam"], seeds=[0],
                                out=tmp_path / "a", plots=False), log=lambda s: None)
    assert res["methods"]["bsam"]["runs"][0]["rho"] == 0.07
    assert res["methods"]["sam"]["runs"][0]["rho"] == 0.3  # no entry: the dataset's rho
    assert res["config"]["rho_by_method"] == {"bsam": 0.07, "sam": 0.3}
    res = run_bench(BenchConfig(dataset="tiny-test", methods=["bsam"], seeds=[0], rho=0.01,
                                out=tmp_path / "b", plots=False), log=lambda s: None)
    assert res["methods"]["bsam"]["runs"][0]["rho"] == 0.01


@pytest.mark.e2e
def test_torchrun_train_command(tmp_path):
    """`torchrun --nproc_per_node 2 -m balanced_sam.cli train` joins a gloo group on the CPU,
    trains with DDP and writes the results once (rank 0)."""
    import subprocess

    csv = tmp_path / "t.csv"
    write_csv(csv)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {{name: csv, path: {csv}, target: target, bin_width: 10, cap: 20}}\n"
                   "train: {method: bsam, epochs: 2, batch_size: 32, progress: false}\n")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "-m", "balanced_sam.cli", "train", "--config", str(cfg),
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("| bsam |") == 1  # only rank 0 prints the table
    result = json.loads((out / "result.json").read_text())
    assert result["best_epoch"] in (1, 2) and np.isfinite(result["test"]["all"]["mae"])
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 3
