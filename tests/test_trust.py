"""Files from elsewhere are data (issue 17): no code runs from a checkpoint, no write through a
symbolic link, and bad tables, configs and options get a one-line error that names them.

Each test reproduces an item of the issue as it happened before the fix and checks what
happens now; the item's number is in the test's name."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from balanced_sam.cli import main


# ---------------------------------------------------------------------------- helpers
class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _table(path, n=300, seed=0):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, 3))
    y = np.clip(np.exp(0.8 * x[:, 0]) * 10 + g.normal(scale=0.3, size=n), 0, 99)
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": y.round(2)}).to_csv(
        path, index=False)
    return path


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


def test_1_load_experiment_refuses_a_payload(run, tmp_path):
    from balanced_sam.experiment import load_experiment

    marker = tmp_path / "ran"
    bad = _poison(run["out"] / "best.pt", tmp_path / "bad.pt", marker)
    with pytest.raises(ValueError, match="bad.pt.*refused"):
        load_experiment(bad)
    assert not marker.exists()


def test_1_eval_refuses_a_payload(run, tmp_path, capsys):
    marker = tmp_path / "ran"
    bad = _poison(run["out"] / "best.pt", tmp_path / "bad.pt", marker)
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "--trust-checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


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


def test_1_resume_refuses_a_payload(run, tmp_path, capsys):
    out = _copy_run(run, tmp_path)
    marker = tmp_path / "ran"
    _poison(run["out"] / "last.pt", out / "last.pt", marker)
    assert main(["train", "--config", str(run["cfg"]), "--out", str(out), "--resume",
                 "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert str(out / "last.pt") in err and "--trust-checkpoint" in err
    assert not marker.exists()


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
    assert not marker.exists()


def _old_style_last(src, dest):
    """A ``last.pt`` as bsam wrote it before checkpoints were plain data: numpy's random
    state as numpy's own tuple (an array inside), which needs full unpickling."""
    ck = torch.load(src, weights_only=True)
    name, keys, *rest = ck["rng"]["numpy"]
    ck["rng"]["numpy"] = (name, keys.numpy().astype(np.uint32), *rest)
    torch.save(ck, dest)


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
