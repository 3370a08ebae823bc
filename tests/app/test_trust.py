"""Files from elsewhere are data (issue 17): no code runs from a checkpoint, no write through a
symbolic link, and bad tables, configs and options get a one-line error that names them.

Each test reproduces an item of the issue as it happened before the fix and checks what
happens now; the item's number is in the test's name."""

from __future__ import annotations

import json
import os
import shutil
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from _tables import abc_csv

from balanced_sam.cli import main


# ---------------------------------------------------------------------------- helpers
class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# the CLI tests' table, its target with noise instead of feature b
_table = partial(abc_csv, noise=True)


def _poison(src, dest, marker):
    """A genuine checkpoint with a code-running object added to its meta."""
    ck = torch.load(src, weights_only=True)
    ck["meta"]["note"] = _Payload(marker)
    torch.save(ck, dest)
    return dest


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One finished one-epoch run of ``bsam train`` (best.pt, last.pt) and its config."""
    root = tmp_path_factory.mktemp("trust_run")
    csv = _table(root / "t.csv")
    cfg = root / "cfg.yaml"
    cfg.write_text(f"data: {{name: csv, path: {csv}, target: y, bin_width: 10, cap: 20}}\n"
                   "train: {method: sqinv, epochs: 1, batch_size: 64, progress: false}\n")
    out = root / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out)]) == 0
    return {"cfg": cfg, "out": out, "csv": csv}


def _copy_run(run, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(run["out"], dest)
    return dest


# ---------------------------------------------------------------------------- item 1
@pytest.mark.e2e
def test_1_written_checkpoints_load_as_data(run):
    # before: last.pt held numpy's random state (an array), so weights_only could not read it
    for name in ("best.pt", "last.pt"):
        ck = torch.load(run["out"] / name, weights_only=True)
        assert "model" in ck
    rng = torch.load(run["out"] / "last.pt", weights_only=True)["rng"]["numpy"]
    assert rng[0] == "MT19937" and isinstance(rng[1], torch.Tensor) and rng[1].numel() == 624


def test_1_plain_makes_metadata_loadable(tmp_path):
    from pathlib import Path

    from balanced_sam.outputs import load_checkpoint, plain

    ck = plain({"model": {"w": torch.ones(2)},
                "meta": {"root": Path("/data/x"), "lr": np.float64(0.5), "n": np.int64(3),
                         "tags": {"b", "a"}, "arr": np.arange(3)}})
    torch.save(ck, tmp_path / "c.pt")
    back = load_checkpoint(tmp_path / "c.pt")
    assert back["meta"]["root"] == "/data/x" and back["meta"]["lr"] == 0.5
    assert back["meta"]["n"] == 3 and back["meta"]["tags"] == ["a", "b"]
    assert torch.equal(back["meta"]["arr"], torch.arange(3))
    with pytest.raises(TypeError, match=r"checkpoint\.meta\.obj holds a object"):
        plain({"meta": {"obj": object()}})


@pytest.mark.e2e
def test_1_library_load_checkpoint_refuses_a_payload(run, tmp_path):
    from balanced_sam.outputs import UntrustedCheckpointError, load_checkpoint

    marker = tmp_path / "ran"
    bad = _poison(run["out"] / "best.pt", tmp_path / "bad.pt", marker)
    with pytest.raises(UntrustedCheckpointError) as e:
        load_checkpoint(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert "trust=True" in str(e.value) and "posix.mkdir" in str(e.value)
    assert not marker.exists()
    # the train module re-exports the same function
    from balanced_sam.train import load_checkpoint as via_train

    with pytest.raises(UntrustedCheckpointError, match="bad.pt"):
        via_train(bad)
    assert not marker.exists()


@pytest.mark.e2e
def test_1_load_experiment_refuses_a_payload(run, tmp_path):
    from balanced_sam.experiment import load_experiment

    marker = tmp_path / "ran"
    bad = _poison(run["out"] / "best.pt", tmp_path / "bad.pt", marker)
    with pytest.raises(ValueError, match="bad.pt.*refused"):
        load_experiment(bad)
    assert not marker.exists()


@pytest.mark.e2e
def test_1_eval_refuses_a_payload(run, tmp_path, capsys):
    marker = tmp_path / "ran"
    bad = _poison(run["out"] / "best.pt", tmp_path / "bad.pt", marker)
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "--trust-checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.e2e
def test_1_analyze_refuses_a_payload(run, tmp_path, capsys):
    marker = tmp_path / "ran"
    bad = _poison(run["out"] / "best.pt", tmp_path / "bad.pt", marker)
    assert main(["analyze", "--checkpoint", str(bad), "--samples", "20", "--iters", "2",
                 "--probes", "2", "--grid", "3", "--out", str(tmp_path / "ana")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "--trust-checkpoint" in err
    assert not marker.exists()
    from balanced_sam.experiment import analyze_checkpoints

    with pytest.raises(ValueError, match="bad.pt"):
        analyze_checkpoints([bad], out=tmp_path / "ana2", log=lambda s: None)
    assert not marker.exists()


@pytest.mark.e2e
def test_1_resume_refuses_a_payload(run, tmp_path, capsys):
    out = _copy_run(run, tmp_path)
    marker = tmp_path / "ran"
    _poison(run["out"] / "last.pt", out / "last.pt", marker)
    assert main(["train", "--config", str(run["cfg"]), "--out", str(out), "--resume",
                 "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert str(out / "last.pt") in err and "--trust-checkpoint" in err
    assert not marker.exists()


@pytest.mark.e2e
def test_1_bench_read_back_refuses_a_payload(tmp_path, capsys):
    """The bench reads ``runs/<label>/last.pt`` of an unfinished run back (to decide whether it
    resumes); a poisoned one is refused, and no code runs."""
    csv = _table(tmp_path / "t.csv")
    out = tmp_path / "bench"
    args = ["bench", "--csv", str(csv), "--target", "y", "--methods", "vanilla", "--seeds",
            "1", "--epochs", "1", "--bin-width", "10", "--cap", "20", "--out", str(out),
            "--no-plots"]
    assert main(args) == 0
    capsys.readouterr()
    (run_dir,) = (out / "runs").iterdir()
    (run_dir / "result.json").unlink()  # as if the run was stopped before it finished
    marker = tmp_path / "ran"
    _poison(run_dir / "best.pt", run_dir / "last.pt", marker)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(run_dir / "last.pt") in err and "refused" in err
    assert "--trust-checkpoint" in err  # the bench's own spelling of the way out
    assert not marker.exists()


def _old_style_last(src, dest):
    """A ``last.pt`` as bsam wrote it before checkpoints were plain data: numpy's random
    state as numpy's own tuple (an array inside), which needs full unpickling."""
    ck = torch.load(src, weights_only=True)
    name, keys, *rest = ck["rng"]["numpy"]
    ck["rng"]["numpy"] = (name, keys.numpy().astype(np.uint32), *rest)
    torch.save(ck, dest)


@pytest.mark.e2e
def test_1_trust_checkpoint_loads_a_file_one_vouches_for(run, tmp_path, capsys):
    from balanced_sam.outputs import load_checkpoint

    out = _copy_run(run, tmp_path)
    _old_style_last(run["out"] / "last.pt", out / "last.pt")
    resume = ["train", "--config", str(run["cfg"]), "--out", str(out), "--resume",
              "train.epochs=2"]
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert str(out / "last.pt") in err and "numpy" in err
    assert main([*resume, "--trust-checkpoint"]) == 0
    capsys.readouterr()
    assert json.loads((out / "result.json").read_text())["config"]["epochs"] == 2
    # what it writes now is plain again
    torch.load(out / "last.pt", weights_only=True)
    # eval and the library take the same word
    ck = torch.load(run["out"] / "best.pt", weights_only=True)
    ck["meta"]["lr"] = np.float64(0.1)
    torch.save(ck, tmp_path / "np.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "np.pt")]) == 2
    assert "np.pt" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "np.pt"), "--trust-checkpoint"]) == 0
    assert load_checkpoint(tmp_path / "np.pt", trust=True)["meta"]["lr"] == 0.1


# ---------------------------------------------------------------------------- item 2
def test_2_configs_copy_never_writes_through_a_link(tmp_path, capsys):
    dest = tmp_path / "mine"
    dest.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("the user's file\n")
    link = dest / "diamonds_bsam.yaml"
    link.symlink_to(outside)
    # before: --force overwrote outside.txt through the link
    for extra in ([], ["--force"]):
        assert main(["configs", "diamonds_bsam", "--copy", str(dest), *extra]) == 2
        err = capsys.readouterr().err
        assert str(link) in err and "symbolic link" in err and len(err.splitlines()) == 1
        assert outside.read_text() == "the user's file\n" and link.is_symlink()
    # before: a dangling link was followed and a file created outside the folder
    link.unlink()
    ghost = tmp_path / "ghost.yaml"
    link.symlink_to(ghost)
    for extra in ([], ["--force"]):
        assert main(["configs", "diamonds_bsam", "--copy", str(dest), *extra]) == 2
        assert "symbolic link" in capsys.readouterr().err
        assert not ghost.exists()
    # a plain file is still copied, and replaced with --force
    link.unlink()
    assert main(["configs", "diamonds_bsam", "--copy", str(dest)]) == 0
    (dest / "diamonds_bsam.yaml").write_text("edited\n")
    assert main(["configs", "diamonds_bsam", "--copy", str(dest), "--force"]) == 0
    capsys.readouterr()
    from balanced_sam.configs import config_path

    assert (dest / "diamonds_bsam.yaml").read_text() == config_path("diamonds_bsam").read_text()
    assert sorted(p.name for p in dest.iterdir()) == ["diamonds_bsam.yaml"]


# ---------------------------------------------------------------------------- item 8
@pytest.mark.e2e
def test_8_a_target_orders_of_magnitude_off_is_refused(tmp_path, capsys):
    csv = _table(tmp_path / "t.csv", n=400)
    df = pd.read_csv(csv)
    df.loc[17, "y"] = 1e12  # before: the bench ran and reported a test MAE of ~7.7e9
    df.to_csv(csv, index=False)
    assert main(["bench", "--csv", str(csv), "--target", "y", "--methods", "vanilla",
                 "--seeds", "1", "--epochs", "1", "--out", str(tmp_path / "b"),
                 "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "row 17" in err and "line 19" in err and "1e+12" in err and "'y'" in err
    assert "drop" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b" / "results.json").exists()


def test_8_long_tails_are_left_alone():
    from balanced_sam.data.tabular import FAR_IQRS, far_targets, load_table

    g = np.random.default_rng(0)
    # a price-like log-normal tail (sigma 1) and a far heavier one (sigma 2): both genuine
    for sigma in (1.0, 2.0):
        y = np.exp(g.normal(5.0, sigma, size=100_000))
        assert far_targets(y)[0].size == 0
    # the diamonds table (when its [diamonds] extra is installed) and an ordinary synthetic
    # table load as before
    import importlib.util

    if importlib.util.find_spec("plotnine") is not None:
        from balanced_sam.data import diamonds

        assert diamonds.load().y_train.numel() > 0
    frame = pd.DataFrame({"a": g.normal(size=300), "y": g.uniform(0, 90, size=300)})
    assert load_table(frame, "y").y_train.numel() > 0
    # the rule, on the example: 1e12 among 0-90
    y = np.r_[g.uniform(0, 90, size=1000), 1e12]
    far, med, scale = far_targets(y)
    assert far.tolist() == [1000] and abs(y[1000] - med) / scale > FAR_IQRS
    frame = pd.DataFrame({"a": np.arange(1001.0), "y": y})
    with pytest.raises(ValueError, match=r"row 1000 holds 1e\+12"):
        load_table(frame, "y")


# ---------------------------------------------------------------------------- item 9
@pytest.mark.e2e
def test_9_a_mostly_numeric_column_with_strings_is_reported(tmp_path, capsys):
    g = np.random.default_rng(0)
    frame = pd.DataFrame({f"f{i}": g.normal(size=400).round(3).astype(object)
                          for i in range(20)})
    frame["y"] = g.uniform(0, 90, size=400).round(2)
    for i in range(20):  # 5% strings in every column
        frame.loc[g.choice(400, 20, replace=False), f"f{i}"] = "n/a?"
    csv = tmp_path / "mixed.csv"
    frame.to_csv(csv, index=False)
    # before: every distinct number became a one-hot category (thousands of features)
    assert main(["bench", "--csv", str(csv), "--target", "y", "--methods", "vanilla",
                 "--seeds", "1", "--epochs", "1", "--out", str(tmp_path / "b"),
                 "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "column 'f0' is mostly numbers (380 of 400 values)" in err
    assert "'n/a?'" in err and "--categorical COL" in err and "--impute median" in err
    from balanced_sam.data.tabular import TablePreprocessor

    with pytest.raises(ValueError, match="column 'f0' is mostly numbers"):
        TablePreprocessor().fit(frame.drop(columns="y"))
    # named categorical, it is one-hot encoded as asked
    pre = TablePreprocessor(categorical=[f"f{i}" for i in range(20)], max_categories=1000,
                            max_features=100_000).fit(frame.drop(columns="y"))
    assert pre.num_features > 1000


@pytest.mark.e2e
def test_9_the_one_hot_width_has_a_limit(tmp_path, capsys):
    from balanced_sam.data.tabular import TablePreprocessor, load_table

    g = np.random.default_rng(0)
    frame = pd.DataFrame({f"c{i}": [f"k{v}" for v in g.integers(0, 180, size=600)]
                          for i in range(120)})
    frame["y"] = g.uniform(0, 90, size=600).round(2)
    with pytest.raises(ValueError, match=r"encoded into \d+ features .* more than "
                                         r"max_features=10000.*max_features="):
        TablePreprocessor().fit(frame.drop(columns="y"))
    assert TablePreprocessor(max_features=30_000).fit(frame.drop(columns="y")).num_features \
        > 10_000
    csv = tmp_path / "wide.csv"
    frame.to_csv(csv, index=False)
    assert main(["bench", "--csv", str(csv), "--target", "y", "--methods", "vanilla",
                 "--seeds", "1", "--epochs", "1", "--out", str(tmp_path / "b"),
                 "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "max_features=10000" in err and "--max-features" in err
    with pytest.raises(ValueError, match="max_features must be a positive integer"):
        load_table(frame, "y", max_features=0)


# ---------------------------------------------------------------------------- item 10
@pytest.mark.e2e
def test_10_duplicate_yaml_keys_are_an_error(tmp_path, capsys):
    from balanced_sam.errors import ConfigError
    from balanced_sam.experiment import apply_overrides, load_config

    cfg = tmp_path / "twice.yaml"
    cfg.write_text("data: {name: diamonds}\ntrain: {method: bsam, epochs: 400}\n"
                   "train: {epochs: 1}\n")  # before: the second train: replaced the first
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(cfg) in str(e.value) and "duplicate key 'train'" in str(e.value)
    assert "line 3" in str(e.value) and "first on line 2" in str(e.value)
    assert main(["train", "--config", str(cfg)]) == 2
    assert "duplicate key 'train'" in capsys.readouterr().err
    nested = tmp_path / "nested.yaml"
    nested.write_text("data: {name: diamonds}\ntrain:\n  lr: 0.1\n  rho: 0.2\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr' .line 5; first on line 3"):
        load_config(nested)
    with pytest.raises(ConfigError, match="duplicate key 'ks'"):
        apply_overrides({}, ["train.lds={ks: 3, ks: 5}"])
    # every shipped config still reads
    from balanced_sam.configs import list_configs

    for name in list_configs():
        assert isinstance(load_config(name), dict)


# ---------------------------------------------------------------------------- item 11
@pytest.mark.parametrize("key", ["gamma", "momentum", "lr", "rho", "weight_decay", "p",
                                 "lr_min_factor", "max_grad_norm"])
def test_11_every_float_option_refuses_nan(key):
    from balanced_sam.config import TrainConfig
    from balanced_sam.errors import ConfigError

    # before: gamma=nan (and momentum=nan) passed validation
    with pytest.raises(ConfigError, match=rf"train\.{key}"):
        TrainConfig.from_dict({key: float("nan"), "schedule": "step"})
    with pytest.raises(ConfigError, match=rf"train\.{key}"):
        TrainConfig.from_dict({key: "nan"})  # as `--set KEY=nan` gives it


@pytest.mark.e2e
def test_11_nan_on_the_command_line(run, tmp_path, capsys):
    base = ["bench", "--csv", str(run["csv"]), "--target", "y", "--methods", "vanilla",
            "--seeds", "1", "--epochs", "1", "--out", str(tmp_path / "b"), "--no-plots"]
    assert main([*base, "--set", "schedule=step", "--set", "gamma=nan"]) == 2
    assert "train.gamma: expected a number, got NaN" in capsys.readouterr().err
    for flag in (["--lr", "nan"], ["--rho", "0.1,nan"], ["--diverge-factor", "nan"]):
        with pytest.raises(SystemExit):
            main([*base, *flag])
        assert "NaN is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    with pytest.raises(SystemExit):
        main(["analyze", "--checkpoint", str(run["out"] / "best.pt"), "--tol", "nan"])
    assert "NaN is not allowed" in capsys.readouterr().err


@pytest.mark.e2e
def test_11_analyze_threads_zero_is_refused(run, tmp_path, capsys):
    n = torch.get_num_threads()
    # before: --threads 0 was ignored (the analysis ran on every thread)
    assert main(["analyze", "--checkpoint", str(run["out"] / "best.pt"), "--threads", "0",
                 "--out", str(tmp_path / "ana")]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert torch.get_num_threads() == n and not (tmp_path / "ana").exists()


# ---------------------------------------------------------------------------- items 16, 17
@pytest.mark.e2e
def test_16_infinite_or_nan_bin_bounds_are_one_line_errors(run, tmp_path, capsys):
    from balanced_sam import LabelBins

    # before: OverflowError / "cannot convert float NaN to integer"
    for kw, name in (({"upper": float("inf")}, "upper"), ({"lower": float("nan")}, "lower"),
                     ({"upper": float("-inf"), "num_bins": 4}, "upper")):
        with pytest.raises(ValueError, match=rf"{name} must be a finite number"):
            LabelBins.from_labels([0.0, 1.0, 2.0], **({"bin_width": 1.0} | kw)
                                  if "num_bins" not in kw else kw)
    for over, where in (("bins.upper=.inf", "bins.upper"), ("bins.lower=.nan", "bins.lower")):
        assert main(["train", "--config", str(run["cfg"]), "--out", str(tmp_path / "r"),
                     "bins.bin_width=10", over]) == 2
        err = capsys.readouterr().err
        assert f"{where}: expected a finite number" in err and len(err.splitlines()) == 1


@pytest.mark.e2e
def test_17_a_negative_layer_width_is_a_one_line_error(run, tmp_path, capsys):
    from balanced_sam.models import MLP

    with pytest.raises(ValueError, match=r"hidden must be a list of layer widths.*\[-3\]"):
        MLP(4, [-3])  # before: RuntimeError: negative dimension
    assert main(["train", "--config", str(run["cfg"]), "--out", str(tmp_path / "r"),
                 "model.name=mlp", "model.hidden=[-3]"]) == 2
    err = capsys.readouterr().err
    assert "model (mlp): hidden must be" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r" / "last.pt").exists()


# ---------------------------------------------------------------------------- item 18
@pytest.mark.e2e
def test_18_an_optimizer_state_of_other_shapes_fails_at_load_time(run, tmp_path, capsys):
    out = _copy_run(run, tmp_path)
    ck = torch.load(out / "last.pt", weights_only=True)
    base = ck["optimizer"].get("base_optimizer", ck["optimizer"])
    assert base["state"], "the run's optimizer keeps a state per parameter"
    first = min(base["state"])
    for key, v in base["state"][first].items():  # same number of tensors, other shapes
        if key != "step":
            base["state"][first][key] = torch.zeros(v.numel() + 3)
    torch.save(ck, out / "last.pt")
    # before: loaded fine, then failed at the next step inside torch's sgd.py
    assert main(["train", "--config", str(run["cfg"]), "--out", str(out), "--resume",
                 "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "optimizer state" in err and "net.0.weight" in err and str(out / "last.pt") in err
    assert len(err.strip().splitlines()) == 1
    assert json.loads((out / "result.json").read_text())["config"]["epochs"] == 1  # untouched


# ---------------------------------------------------------------------------- item 19
@pytest.mark.e2e
def test_19_config_errors_name_the_key(run, tmp_path, capsys):
    cfg = ["train", "--config", str(run["cfg"]), "--out", str(tmp_path / "r")]
    cases = [
        # before: LabelBins.from_labels() got an unexpected keyword argument 'widht'
        (["bins.widht=10"], "unknown key 'widht' in bins (did you mean 'bin_width'?)"),
        (["bins.bin_width=[1]"], "bins.bin_width: expected a finite number, got [1]"),
        (["model.name=mlp", "model.hiden=[3]"],
         "unknown key 'hiden' in model (mlp) (did you mean 'hidden'?)"),
        (["train.lds={kss: 3}"], "unknown key 'kss' in train.lds (did you mean 'ks'?)"),
        (["train.lds={ks: 4}"], "train.lds.ks = 4: must be an odd integer"),
        # before: 'int' object is not a mapping
        (["train.method=ranksim", "train.plugins={ranksim: 3}"],
         "train.plugins.ranksim must be a mapping of options, got 3"),
        # before: expected str, bytes or os.PathLike object, not list / internal names
        ([f"data.path=[{run['csv']}]"], "data.path: expected a file path, got ["),
        (["data.target=[y]"], "data.target: expected a column name, got ['y']"),
        (["data.features=3"], "data.features: expected a list of column names, got 3"),
        # before: torch's "Invalid momentum value: -5", naming no key
        (["momentum=-5"], "train.momentum = -5: must be a finite number >= 0"),
    ]
    for overrides, message in cases:
        assert main([*cfg, *overrides]) == 2, overrides
        err = capsys.readouterr().err
        assert message in err, (overrides, err)
        assert len(err.strip().splitlines()) == 1
    bad = tmp_path / "five.yaml"
    bad.write_text("data: 5\n")  # before: argument of type 'int' is not iterable
    assert main(["train", "--config", str(bad)]) == 2
    assert "config section data must be a mapping, got 5" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.e2e
def test_19_a_binary_or_non_utf8_file_is_named(tmp_path, capsys):
    binary = tmp_path / "data.csv"
    binary.write_bytes(bytes(range(256)) * 8)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("a,y\n1,caf\xe9\n2,3\n".encode("latin-1"))
    for path, word in ((binary, "binary file"), (latin, "UTF-8")):
        # before: "'utf-8' codec can't decode byte ..." without the file's name
        assert main(["bench", "--csv", str(path), "--target", "y", "--out",
                     str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and word in err and len(err.strip().splitlines()) == 1
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(b"data: {name: diamonds}\n# caf\xe9\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "UTF-8" in err
