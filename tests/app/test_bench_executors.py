"""The bench on Ray, on Slurm (submitit's local executor standing in) and over several devices
(issue 19): the same per-run figures whichever executor trains a run, a killed or preempted
worker retried from its last.pt, failed runs named with their log, Ctrl-C cancels only what
the bench submitted."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from balanced_sam import parallel
from balanced_sam.bench import (
    BenchConfig,
    BenchInterrupted,
    ExecutorConfig,
    RunsFailedError,
    backends,
    run_bench,
)
from balanced_sam.bench import executors as ex
from balanced_sam.bench import run as bench_run
from balanced_sam.cli import main

pytestmark = pytest.mark.e2e  # every test here runs a bench

# the tiny long-tailed table of test_bench (600 rows, 5 features), 2 epochs, 2 seeds
TABLE = dict(target="target", bin_width=10, cap=20, epochs=2, rho=0.05)
METHODS, SEEDS = ["sqinv", "bsam"], [0, 1]


def _write_table(path: Path, n: int = 600, seed: int = 0) -> Path:
    import numpy as np
    import pandas as pd

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (torch.exp(0.8 * x[:, 0]) * 10 + x[:, 1] + 0.3 * torch.randn(n, generator=g)).clamp(0, 99)
    df = pd.DataFrame(x.numpy(), columns=[f"f{i}" for i in range(5)])
    df["kind"] = np.where(x[:, 2].numpy() > 0, "a", "b")
    df["target"] = y.numpy().round(2)
    df.to_csv(path, index=False)
    return path


def _per_run(results):
    return {(m, r["seed"], r["rho"]): json.dumps([r["best_epoch"], r["val"], r["test"],
                                                  r["test_per_bin"]])
            for m, e in results["methods"].items() for r in e["runs"]}


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    return _write_table(tmp_path_factory.mktemp("tbl") / "table.csv")


def _config(table, out, **kw):
    opts = {"csv_path": str(table), "methods": METHODS, "seeds": SEEDS, "out": out,
            "plots": False, **TABLE}
    opts.update(kw)
    return BenchConfig(**opts)


@pytest.fixture(scope="module")
def serial(table, tmp_path_factory):
    torch.set_num_threads(1)
    return run_bench(_config(table, tmp_path_factory.mktemp("serial") / "b", jobs=1),
                     log=lambda s: None)


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray cluster (2 CPUs) for the module: its start-up takes seconds here."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------------------- same figures
def test_ray_gives_the_same_per_run_figures_as_jobs_1(serial, table, tmp_path, ray_session,
                                                       capsys):
    res = run_bench(_config(table, tmp_path / "r", executor="ray"), log=lambda s: None)
    assert _per_run(res) == _per_run(serial) and len(_per_run(res)) == 4
    assert res["comparisons"] == serial["comparisons"]
    assert res["executor"]["name"] == "ray" and res["parallel"]["start_method"] == "ray"
    assert res["executor"]["gpus_per_run"] == 0.0  # no CUDA here: the default is 0
    assert set(res["executor"]["attempts"].values()) == {1}
    # the session the test opened is used and left open
    assert ray_session.is_initialized()
    err = capsys.readouterr().err
    assert "bench: 0/4 runs done; 4 to train, submitted to ray" in err
    assert re.search(r"bench: 4/4 runs done, \d running, \d queued, 0 failed; all trained", err)
    log = (tmp_path / "r" / "logs" / "sqinv-seed0.log").read_text()
    assert "attempt 1 started on" in log and "from the start" in log
    assert "attempt 1 finished" in log


def test_submitit_local_executor_gives_the_same_per_run_figures(serial, table, tmp_path):
    pytest.importorskip("submitit")
    res = run_bench(_config(table, tmp_path / "s", executor=ExecutorConfig(
        "slurm", slurm_cluster="local", slurm_time="10")), log=lambda s: None)
    assert _per_run(res) == _per_run(serial)
    assert res["executor"]["cluster"] == "local"
    assert any((tmp_path / "s" / "submitit").glob("*_log.out"))  # submitit's files under --out
    # a second bench into the folder submits nothing: every run is read back
    logs: list[str] = []
    again = run_bench(_config(table, tmp_path / "s", executor=ExecutorConfig(
        "slurm", slurm_cluster="local")), log=logs.append)
    assert _per_run(again) == _per_run(serial)
    assert sum("done earlier, read back" in s for s in logs) == 4
    assert not any(s.startswith("slurm:") for s in logs)  # no executor was even set up


# ---------------------------------------------------------------------------- faults
def _kill_when_saved(out: Path, label: str, sig: int, after_epoch: int = 1) -> threading.Thread:
    """A thread that waits for the run's last.pt (after ``after_epoch`` epochs, as its log.csv
    says), then sends ``sig`` to the process the run's log names."""
    def watch() -> None:
        run, log = out / "runs" / label, out / "logs" / f"{label}.log"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            rows = (run / "log.csv").read_text().count("\n") - 1 if (
                run / "log.csv").is_file() else 0
            if (run / "last.pt").is_file() and rows >= after_epoch and log.is_file():
                pid = int(log.read_text().split("(pid ")[1].split(")")[0])
                os.kill(pid, sig)
                return
            time.sleep(0.01)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


LONG = dict(TABLE, epochs=30)  # long enough to be caught part-way


@pytest.fixture(scope="module")
def long_serial(table, tmp_path_factory):
    torch.set_num_threads(1)
    return run_bench(_config(table, tmp_path_factory.mktemp("long") / "b", jobs=1,
                             methods=["bsam"], seeds=[0], **LONG), log=lambda s: None)


def test_a_killed_ray_worker_is_retried_and_resumes_with_the_same_figures(
        long_serial, table, tmp_path, ray_session):
    out = tmp_path / "k"
    killer = _kill_when_saved(out, "bsam-rho0.05-seed0", signal.SIGKILL, after_epoch=2)
    logs: list[str] = []
    res = run_bench(_config(table, out, executor="ray", methods=["bsam"], seeds=[0], **LONG),
                    log=logs.append)
    killer.join(1)
    log = (out / "logs" / "bsam-rho0.05-seed0.log").read_text()
    assert "attempt 2 started" in log, log
    resumed = int(log.split("attempt 2 started")[1].split("last.pt (")[1].split(" epoch")[0])
    assert 1 <= resumed < 30  # it went on from its last.pt, not from the start
    assert res["executor"]["attempts"] == {"bsam-rho0.05-seed0": 2}
    assert any("its worker died; retrying (1 of 2)" in s for s in logs)
    assert _per_run(res) == _per_run(long_serial)


def test_a_preempted_submitit_job_requeues_and_resumes_with_the_same_figures(
        long_serial, table, tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "p"
    # SIGUSR2 is what Slurm sends before a preemption or the time limit
    killer = _kill_when_saved(out, "bsam-rho0.05-seed0", signal.SIGUSR2, after_epoch=2)
    res = run_bench(_config(table, out, executor=ExecutorConfig("slurm", slurm_cluster="local"),
                            methods=["bsam"], seeds=[0], **LONG), log=lambda s: None)
    killer.join(1)
    log = (out / "logs" / "bsam-rho0.05-seed0.log").read_text()
    assert "attempt 1 stopped" in log, log
    assert log.count("attempt 1 started") == 2 and "resuming from last.pt (" in log
    assert _per_run(res) == _per_run(long_serial)


class _FakeBackend(ex.Backend):
    """Runs each submitted run at once in this process; ``die`` / ``fail``: labels whose
    attempts end without a result (a dead worker), or with a failure in their log."""

    name = "fake"

    def __init__(self, die=(), fail=(), interrupt_at=None):
        self.die, self.fail, self.interrupt_at = set(die), set(fail), interrupt_at
        self.submitted, self.cancelled, self.looks = [], [], 0

    def submit(self, jobs):
        for job in jobs:
            self.submitted.append((job.label, job.attempt))
            log = Path(job.out) / "logs" / f"{job.label}.log"
            if job.label in self.fail:
                ex.note(log, f"attempt {job.attempt} started on h (pid 1), device cpu: new")
                ex.note(log, f"attempt {job.attempt} failed: ValueError: out of luck")
            elif job.label not in self.die and self.interrupt_at is None:
                bench_run.run_remote(job)
        return [(job.label, job.attempt) for job in jobs]

    def ended(self, handle):
        self.looks += 1
        if self.interrupt_at is not None and self.looks >= self.interrupt_at:
            raise KeyboardInterrupt
        return self.interrupt_at is None

    def cancel(self, handles):
        self.cancelled += handles


def _with_backend(monkeypatch, backend):
    def make(plan, owned, fns, log):
        if plan.config.executor.name == "local":
            return ex.make_executor(plan, owned, fns, log)
        return ex.RemoteExecutor(plan, owned, backend, plan.config.executor.retries, log)

    monkeypatch.setattr(bench_run, "make_executor", make)


def test_a_failed_run_is_named_with_its_log_and_the_others_go_on(serial, table, tmp_path,
                                                                 monkeypatch):
    backend = _FakeBackend(die={"sqinv-seed1"}, fail={"bsam-rho0.05-seed0"})
    _with_backend(monkeypatch, backend)
    out = tmp_path / "f"
    with pytest.raises(RunsFailedError) as err:
        run_bench(_config(table, out, executor=ExecutorConfig("ray", retries=1)),
                  log=lambda s: None)
    text = str(err.value)
    assert text.startswith("2 run(s) failed")
    assert "bsam-rho0.05-seed0: it raised an error" in text and "out of luck" in text
    assert "sqinv-seed1: its worker died 2 time(s)" in text  # retried once, then given up
    assert ("sqinv-seed1", 2) in backend.submitted and ("sqinv-seed1", 3) not in backend.submitted
    assert ("bsam-rho0.05-seed0", 2) not in backend.submitted  # an error is not retried
    for done in ("sqinv-seed0", "bsam-rho0.05-seed1"):
        assert (out / "runs" / done / "result.json").is_file()
    # the same command (here: on this machine) trains only the two that failed
    logs: list[str] = []
    res = run_bench(_config(table, out), log=logs.append)
    assert sum("done earlier, read back" in s for s in logs) == 2
    assert _per_run(res) == _per_run(serial)


def test_ctrl_c_cancels_what_the_bench_submitted_and_only_that(table, tmp_path, monkeypatch):
    out = tmp_path / "c"
    kw = dict(methods=["sqinv"], seeds=[0, 1])
    run_bench(_config(table, out, **{**kw, "seeds": [0]}), log=lambda s: None)  # one finished
    backend = _FakeBackend(interrupt_at=3)
    _with_backend(monkeypatch, backend)
    with pytest.raises(BenchInterrupted, match="1 of 2 runs finished"):
        run_bench(_config(table, out, executor="ray", **kw), log=lambda s: None)
    assert backend.submitted == [("sqinv-seed1", 1)]  # the finished run is not submitted again
    assert backend.cancelled == [("sqinv-seed1", 1)]
    assert (out / "runs" / "sqinv-seed0" / "result.json").is_file()


def test_a_dead_workers_lock_is_cleared_only_when_the_log_names_it(tmp_path):
    run, log = tmp_path / "run", tmp_path / "x.log"
    run.mkdir()
    ex.note(log, "attempt 1 started on node7 (pid 4242), device cuda: from the start")
    (run / ".lock").write_text("999 node7")
    ex._clear_dead_lock(run, log, 1)
    assert (run / ".lock").is_file()  # another process's lock stays
    (run / ".lock").write_text("4242 node7")
    ex._clear_dead_lock(run, log, 1)
    assert not (run / ".lock").exists()


# ---------------------------------------------------------------------------- devices
def _placed(folder, payload, device):
    """A task that waits until ``payload`` tasks run at once (each leaves a file in
    ``folder``), so that the pool must run them side by side."""
    (Path(folder) / f"{os.getpid()}-{payload}-{time.time()}").write_text(str(device))
    deadline = time.monotonic() + 120
    while len(list(Path(folder).iterdir())) < payload and time.monotonic() < deadline:
        time.sleep(0.05)
    return device, os.getpid(), len(list(Path(folder).iterdir()))


def test_devices_give_each_concurrent_run_its_own_device(tmp_path):
    # CPU stand-ins for a device list: the pool hands worker i devices[i], one run at a time
    got = {}
    parallel.run_tasks(_placed, str(tmp_path), [(i, 3) for i in range(3)], jobs=3,
                       devices=["dev0", "dev1", "dev2"],
                       on_done=lambda k, v, s: got.__setitem__(k, v))
    assert all(n >= 3 for _, _, n in got.values())  # the three ran at the same time
    assert sorted(d for d, _, _ in got.values()) == ["dev0", "dev1", "dev2"]
    assert len({pid for _, pid, _ in got.values()}) == 3


def test_a_bench_over_devices_records_where_each_run_trained(serial, table, tmp_path):
    res = run_bench(_config(table, tmp_path / "d", executor=ExecutorConfig(
        devices=["cpu", "cpu"])), log=lambda s: None)
    assert res["parallel"]["jobs"] == 2 and res["executor"]["devices"] == ["cpu", "cpu"]
    runs = res["executor"]["runs"]
    assert set(runs) == {"sqinv-seed0", "sqinv-seed1", "bsam-rho0.05-seed0",
                         "bsam-rho0.05-seed1"}
    assert {r["device"] for r in runs.values()} == {"cpu"}
    assert len({r["pid"] for r in runs.values()}) == 2  # two workers, one device each
    assert _per_run(res) == _per_run(serial)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_devices_auto_puts_runs_on_the_gpus(table, tmp_path):
    res = run_bench(_config(table, tmp_path / "g", device="cuda", executor=ExecutorConfig(
        devices=["auto"])), log=lambda s: None)
    n = torch.cuda.device_count()
    assert res["parallel"]["jobs"] == min(n, 4)
    devices = {r["device"] for r in res["executor"]["runs"].values()}
    assert devices <= {f"cuda:{i}" for i in range(n)} and len(devices) == min(n, 4)


# ---------------------------------------------------------------------------- options
def test_executor_options_are_checked_before_any_data_is_read(table, tmp_path, capsys):
    base = ["bench", "--csv", str(table), "--target", "target", "--out", str(tmp_path / "o")]
    for extra, message in [
        (["--executor", "mesos"], "invalid choice"),
        (["--devices", "cpu,cpu", "--jobs", "3"],
         "--devices runs one run per device at a time (2 devices), but --jobs is 3"),
        (["--executor", "ray", "--devices", "cpu"], "--devices places runs on this machine"),
        (["--executor", "slurm", "--slurm-time", "soon"], "--slurm-time must be MINUTES"),
        (["--executor", "slurm", "--slurm-option", "account"], "--slurm-option takes KEY=VALUE"),
        (["--executor", "ray", "--gpus-per-run", "-1"], "--gpus-per-run must be a number >= 0"),
        (["--executor", "ray", "--retries", "-2"], "--retries must be an integer >= 0"),
    ]:
        with pytest.raises(SystemExit) if message == "invalid choice" else _nothing():
            assert main(base + extra) == 2
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "o").exists()
    assert ExecutorConfig(slurm_time="1-02:30:00").timeout_min() == 1590
    assert ExecutorConfig(slurm_time="90").timeout_min() == 90
    assert ExecutorConfig(slurm_time="05:30").timeout_min() == 6  # MM:SS, rounded up
    with pytest.raises(ValueError, match="^retries must be an integer >= 0"):  # the library's
        ExecutorConfig(retries=-1).check(None)


def test_slurm_without_sbatch_says_where_to_run(table, tmp_path, monkeypatch, capsys):
    pytest.importorskip("submitit")
    monkeypatch.setattr(backends.shutil, "which", lambda name: None)
    assert main(["bench", "--csv", str(table), "--target", "target", "--epochs", "1",
                 "--seeds", "1", "--methods", "sqinv", "--executor", "slurm", "--no-plots",
                 "--out", str(tmp_path / "n")]) == 2
    assert "login node of the cluster" in capsys.readouterr().err


def test_a_missing_extra_names_it(table, tmp_path, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ModuleNotFoundError("No module named 'ray'", name="ray")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert main(["bench", "--csv", str(table), "--target", "target", "--epochs", "1",
                 "--seeds", "1", "--methods", "sqinv", "--executor", "ray", "--no-plots",
                 "--out", str(tmp_path / "m")]) == 2
    assert "pip install 'balanced-sam[ray]'" in capsys.readouterr().err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_logs_folder_is_the_benchs_and_overwrite_removes_it(table, tmp_path, monkeypatch):
    from balanced_sam.outputs import FolderNotOursError

    _with_backend(monkeypatch, _FakeBackend())
    out = tmp_path / "l"
    run_bench(_config(table, out, executor="ray", methods=["sqinv"], seeds=[0]),
              log=lambda s: None)
    manifest = json.loads((out / ".bsam-manifest.json").read_text())
    assert manifest["entries"]["logs"] == "tree"
    assert "attempt 1 finished" in (out / "logs" / "sqinv-seed0.log").read_text()
    # overwrite removes the bench's logs with the rest of what it wrote
    run_bench(_config(table, out, methods=["sqinv"], seeds=[0], overwrite=True),
              log=lambda s: None)
    assert not (out / "logs").exists()
    # a logs/ the bench did not write is refused, not written into
    (out / "logs").mkdir()
    (out / "logs" / "mine.txt").write_text("notes")
    with pytest.raises(FolderNotOursError, match="logs is not written by bsam"):
        run_bench(_config(table, out, executor="ray", methods=["sqinv"], seeds=[1]),
                  log=lambda s: None)
    assert (out / "logs" / "mine.txt").read_text() == "notes"


def test_a_ray_address_that_does_not_answer_is_one_line(table, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # checked before Ray is asked (it would retry for minutes)
    with pytest.raises(ValueError, match=f"--ray-address 127.0.0.1:{port}: no Ray cluster "
                                         "answers there"):
        backends._check_reachable(f"127.0.0.1:{port}")
    backends._check_reachable("auto")  # left to Ray
    # an explicit address while this process holds a Ray session is refused, not ignored
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        assert main(["bench", "--csv", str(table), "--target", "target", "--epochs", "1",
                     "--seeds", "1", "--methods", "sqinv", "--executor", "ray",
                     "--ray-address", "10.0.0.1:6379", "--no-plots",
                     "--out", str(tmp_path / "a")]) == 2
        assert "has a Ray session open already" in capsys.readouterr().err
