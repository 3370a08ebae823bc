"""balanced_sam.integrations.wandb against a stand-in wandb module (no account, no network)."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from balanced_sam.integrations.wandb import WandbLogger, flatten_row


class FakeRun:
    def __init__(self, **kwargs):
        self.init_kwargs = kwargs
        self.logged: list[tuple[dict, int]] = []
        self.summary: dict = {}
        self.finished: list[int] = []

    def log(self, data, step=None):
        self.logged.append((dict(data), step))

    def finish(self, exit_code=0):
        self.finished.append(exit_code)


@pytest.fixture
def fake_wandb(monkeypatch):
    mod = types.ModuleType("wandb")
    mod.runs = []

    def init(**kwargs):
        run = FakeRun(**kwargs)
        mod.runs.append(run)
        return run

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return mod


def test_rows_go_to_the_run_at_their_epoch(fake_wandb, tmp_path):
    cfg = {"train": {"lr": 0.2, "method": "bsam"}}
    log = WandbLogger("agedb_bsam-seed0", config=cfg, dir=tmp_path / "wb", mode="offline",
                      tags=["paper"])
    (run,) = fake_wandb.runs
    assert run.init_kwargs == {"project": "balanced-sam", "name": "agedb_bsam-seed0",
                               "config": cfg, "dir": str(tmp_path / "wb"), "mode": "offline",
                               "tags": ["paper"]}
    assert (tmp_path / "wb").is_dir()
    log.log_row(1, {"epoch": 1, "train_loss": 0.5, "lr": 0.2, "val_mae": math.nan,
                    "improved": True, "note": "x", "val": {"few": {"mae": 9.0, "count": 3}},
                    "grad": torch.tensor(2.5)})
    log.log_row(2, {"train_loss": 0.25})
    assert run.logged == [
        ({"train_loss": 0.5, "lr": 0.2, "val/few/mae": 9.0, "val/few/count": 3, "grad": 2.5,
          "epoch": 1}, 1),
        ({"train_loss": 0.25, "epoch": 2}, 2),
    ]
    log.summary({"test": {"all": {"mae": 7.5, "gm": math.inf}}})
    assert run.summary == {"test/all/mae": 7.5}
    log.close()
    log.close()
    assert run.finished == [0]
    with pytest.raises(RuntimeError, match="after close"):
        log.log_row(3, {"train_loss": 0.1})


def test_context_manager_marks_a_failed_run(fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "dir-experiments")
    with pytest.raises(KeyError), WandbLogger("r") as log:
        raise KeyError("boom")
    (run,) = fake_wandb.runs
    assert run.init_kwargs["project"] == "dir-experiments"
    assert run.finished == [1] and log._closed


def test_missing_wandb_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'balanced-sam\[wandb\]'"):
        WandbLogger("r")


def test_bad_mode(fake_wandb):
    with pytest.raises(ValueError, match="mode must be"):
        WandbLogger("r", mode="cloud")
    assert fake_wandb.runs == []


def test_flatten_row_leaves_out_what_is_not_a_number():
    assert flatten_row({"a": 1, "b": None, "c": False, "d": {"e": 2.0, "f": "s"},
                        "g": float("-inf")}) == {"a": 1, "d/e": 2.0}


@pytest.mark.e2e
def test_bsam_train_wandb_flag_logs_every_epoch(fake_wandb, tmp_path):
    """`bsam train --wandb PROJECT` hands each epoch's row to a WandbLogger (loop interface
    log_epoch) and finishes the run."""
    import pandas as pd

    from balanced_sam.cli import main

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=g)
    frame = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2],
                          "y": (x[:, 0] * 10 + 50).round()})
    frame.to_csv(tmp_path / "t.csv", index=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{name: csv, path: {tmp_path / 't.csv'}, target: y}}\n"
                   "train: {method: sqinv, epochs: 2, batch_size: 64, progress: false}\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"),
                 "--wandb", "dir-project"]) == 0
    (run,) = fake_wandb.runs
    assert run.init_kwargs["project"] == "dir-project"
    assert [step for _, step in run.logged] == [1, 2]
    assert all("train_loss" in data for data, _ in run.logged)
    assert run.finished == [0]
