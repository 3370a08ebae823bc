"""Where a bench's runs train: on this machine (``local``), on a Ray cluster (``ray``) or as
Slurm jobs through submitit (``slurm``); ``bsam bench --executor``.

Every executor has one small interface, :meth:`Executor.run`: it is handed the runs left to
train (the bench read the finished ones back), trains them, reports each as it finishes, and
on Ctrl-C stops what it started (and only that) before the ``KeyboardInterrupt`` goes on.

* :class:`LocalExecutor`: this process (``jobs=1``) or ``jobs`` worker processes
  (:mod:`balanced_sam.parallel`); with ``devices``, worker ``i`` trains on ``devices[i]``, so
  each device takes one run at a time.
* :class:`RemoteExecutor` over a :class:`RayBackend` or a :class:`SubmititBackend`: each run
  is one task (one Slurm job) that reloads the bench's data from its ``data`` spec (the same
  files at the same paths: the filesystem is shared), checks their fingerprint, builds the
  run's initial weights from its seed and trains it into ``out/runs/<label>/``
  (:func:`balanced_sam.bench.run.run_remote`), so a run's figures do not depend on where it
  ran. Its outputs stay in its run folder; the bench reads its ``result.json`` back, and the
  parent alone writes ``results.json``, the table and the plots. A task writes what it does to
  ``out/logs/<label>.log`` (host, pid, the epoch it resumes from, its error's traceback).

  A run whose worker died (killed, out of memory, a lost node, a preempted or timed-out job) is
  started again, at most ``retries`` times, and resumes from its ``last.pt`` (on Slurm,
  preemption and time-out also requeue the job itself through submitit's checkpointing). A
  run that raised an error is not retried: it is named, with its log's last lines, when the
  other runs have finished (:class:`RunsFailedError`); the finished runs are kept and the same
  command trains only what is missing.

Nothing is unpickled from the bench's folder by the bench itself: Ray and submitit send the
task (its config and data spec, no tensors) the way they do (submitit through pickles in
``out/submitit``, which only its own job processes read), and results come back as the
``result.json`` each run writes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from balanced_sam import parallel
from balanced_sam.bench.backends import (
    LOG_TAIL,
    Backend,
    RayBackend,
    SubmititBackend,
    own_tree,
)
from balanced_sam.bench.plan import BenchPlan, ExecutorConfig, RunKey
from balanced_sam.config import TrainConfig
from balanced_sam.io import nan_for_null, read_json
from balanced_sam.outputs import OwnedFolder

__all__ = ["Executor", "LocalExecutor", "RemoteExecutor", "Backend", "RayBackend",
           "SubmititBackend", "RunFunctions", "RemoteRun", "make_executor", "RunsFailedError",
           "note", "own_tree", "run_state", "worker_data", "LOG_TAIL"]

#: seconds between two looks at the remote runs
POLL_S = 1.0

Finished = Callable[[RunKey, dict[str, Any], float], None]


@dataclass
class RunFunctions:
    """How one run is trained, as :mod:`balanced_sam.bench.run` does it: ``context(plan,
    jobs)`` (what every run shares), ``task(plan, key, fresh, portable=)`` (a run's task),
    ``train(context, task, device)`` (train it, return its record), ``remote(job)`` (train a
    :class:`RemoteRun` in a Ray task or a Slurm job: a module-level function, sent by
    reference) and ``devices(device)`` (the workers' devices when none are named)."""

    context: Callable[..., Any]
    task: Callable[..., Any]
    train: Callable[[Any, Any, str | None], dict[str, Any]]
    remote: Callable[[Any], None]
    devices: Callable[[str], list[str | None] | None]


class RunsFailedError(RuntimeError):
    """Some runs failed (the others finished and are kept); the message names each with the
    last lines of its log."""


class Executor:
    """Trains the runs a bench has left: ``run(todo, status, finished)`` with ``todo`` a list
    of ``(key, fresh)`` (``fresh``: the run's folder holds a run on other data, trained
    afresh), ``status`` the bench's progress line and ``finished(key, run, seconds)`` called
    as each run ends. ``record()``: what ``results.json`` says about where the runs trained."""

    name = "?"

    def run(self, todo: list[tuple[RunKey, bool]], status: Any, finished: Finished) -> None:
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        return {"name": self.name}

    def start_method(self, jobs: int) -> str:
        """How the runs were started, for ``results.json``'s ``parallel``."""
        return self.name


def make_executor(plan: BenchPlan, owned: OwnedFolder, fns: RunFunctions,
                  log: Callable[[str], None]) -> Executor:
    """The executor ``plan.config.executor`` names."""
    cfg = plan.config.executor
    assert isinstance(cfg, ExecutorConfig)
    if cfg.name == "local":
        return LocalExecutor(plan, fns)
    backend: Backend = (RayBackend(cfg, plan.config.threads, fns.remote, log)
                        if cfg.name == "ray" else
                        SubmititBackend(cfg, plan.config.threads, fns.remote, plan.out, owned,
                                        log))
    return RemoteExecutor(plan, owned, backend, cfg.retries, log)


# ---------------------------------------------------------------------------- local
class LocalExecutor(Executor):
    """This machine: in this process (``jobs`` 1) or ``jobs`` spawned worker processes, worker
    ``i`` on ``devices[i]`` (``--devices``; else the visible GPUs when the device is ``auto``
    or ``cuda``)."""

    name = "local"

    def __init__(self, plan: BenchPlan, fns: RunFunctions) -> None:
        self.plan, self.fns = plan, fns
        self.placed: dict[str, dict[str, Any]] = {}

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "jobs": self.plan.jobs_used, "devices": self.plan.devices,
                "runs": self.placed}

    def start_method(self, jobs: int) -> str:
        return "spawn" if jobs > 1 else "in-process"

    def run(self, todo: list[tuple[RunKey, bool]], status: Any, finished: Finished) -> None:
        plan, fns = self.plan, self.fns
        jobs = plan.jobs_used
        ctx = fns.context(plan, jobs)
        threads = plan.config.threads
        devices = plan.devices or fns.devices(plan.config.device)

        def done(key: RunKey, out: tuple[dict[str, Any], dict[str, Any]], seconds: float
                 ) -> None:
            run, where = out
            self.placed[key.label] = where
            finished(key, run, seconds)

        if jobs <= 1:
            device = devices[0] if devices else None
            with parallel.pinned_threads(threads):
                for key, fresh in todo:
                    status.started(key)
                    t0 = time.perf_counter()
                    task = fns.task(plan, key, fresh, portable=False)
                    out = placed_task(fns.train, ctx, task, device)
                    done(key, out, time.perf_counter() - t0)
            return

        def handed_out(key: RunKey, fresh: bool) -> Any:
            status.started(key)
            return fns.task(plan, key, fresh, portable=True)

        parallel.run_tasks(functools.partial(placed_task, fns.train), ctx, todo, jobs=jobs,
                           threads=threads, devices=devices, prepare=handed_out, on_done=done)


def placed_task(train: Callable[[Any, Any, str | None], dict[str, Any]], ctx: Any, task: Any,
                device: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``train(ctx, task, device)``, and where and when it ran (device, host, process,
    wall-clock start and end)."""
    from balanced_sam.train import resolve_device

    start = time.time()
    run = train(ctx, task, device)
    return run, {"device": str(resolve_device(device or ctx.cfg.device)),
                 "host": socket.gethostname(), "pid": os.getpid(), "start": start,
                 "end": time.time()}


# ---------------------------------------------------------------------------- one remote run
@dataclass
class RemoteRun:
    """What a remote task needs to train one run: no tensors, only where the data are (the
    ``spec`` of :func:`balanced_sam.data.registry.load_data`) and their fingerprint's
    ``digest``, the base training config, the run's ``label`` and the bench's folder."""

    label: str
    out: str
    spec: dict[str, Any]
    digest: str
    cfg: TrainConfig
    threads: int
    attempt: int = 1
    #: the user vouched for the runs' checkpoints (``--trust-checkpoint``)
    trust: bool = False


_DATA: dict[str, Any] = {}  # a worker's data by spec: a Ray worker reuses them across runs


def worker_data(spec: dict[str, Any], digest: str) -> Any:
    from balanced_sam.data.registry import load_data

    key = json.dumps(spec, sort_keys=True, default=str)
    if key not in _DATA:
        data = load_data(spec)
        got = data.fingerprint["digest"]
        if got != digest:
            raise ValueError(f"the worker on {socket.gethostname()} read other data than the "
                             f"bench (fingerprint {got[:12]} instead of {digest[:12]}): every "
                             "worker must see the same files at the same paths as the machine "
                             "that runs bsam bench")
        _DATA.clear()
        _DATA[key] = data
    return _DATA[key]


def note(path: Path, text: str) -> None:
    """Append a time-stamped line to a run's log (never through a symbolic link)."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                 0o644)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(f"[{stamp}] {text}\n")


def run_state(run_dir: Path, digest: str) -> tuple[str, int | None]:
    """``done`` (a result on these data), ``resume`` (a ``last.pt`` on these data, with its
    epoch), ``fresh`` (outputs on other data: trained again) or ``new``."""
    from balanced_sam.train import load_checkpoint

    res = run_dir / "result.json"
    if res.is_file():
        with contextlib.suppress(ValueError, OSError):
            if read_json(res).get("data_fingerprint") == digest:
                return "done", None
        return "fresh", None
    last = run_dir / "last.pt"
    if last.is_file():
        ck = load_checkpoint(last)
        if ck.get("data_fingerprint") != digest:
            return "fresh", None
        epoch = ck.get("epoch")  # the last epoch it holds, counted from 0
        return "resume", int(epoch) + 1 if isinstance(epoch, int) else None
    return "new", None


# ---------------------------------------------------------------------------- following them
def _last_event(log: Path, attempt: int) -> str | None:
    """What the run's log says of ``attempt``: started, finished, failed, stopped or None."""
    if not log.is_file():
        return None
    event = None
    prefix = f"attempt {attempt} "
    with contextlib.suppress(OSError):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            _, _, rest = line.partition("] ")
            if rest.startswith(prefix):
                event = rest[len(prefix):].split(" ", 1)[0].rstrip(":")
    return event


def _tail(log: Path, n: int = LOG_TAIL) -> str:
    if not log.is_file():
        return "(no log written: the task never started)"
    lines = log.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
    return "\n".join(lines[-n:])


def _clear_dead_lock(run_dir: Path, log: Path, attempt: int) -> None:
    """A worker that died (on another host, perhaps) leaves its run folder's lock: the next
    attempt would be refused. The scheduler says that attempt is over, so its lock (the pid
    and host the log names for it) is removed, and no other."""
    lock = run_dir / ".lock"
    if not lock.is_file() or lock.is_symlink() or not log.is_file():
        return
    want = None
    prefix = f"attempt {attempt} started on "
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        _, _, rest = line.partition("] ")
        if rest.startswith(prefix):
            host, _, pid = rest[len(prefix):].partition(" (pid ")
            want = (pid.split(")", 1)[0], host)
    with contextlib.suppress(OSError, ValueError):
        pid, host = lock.read_text().split(maxsplit=1)
        if want is not None and (pid, host.strip()) == want:
            lock.unlink()


class RemoteExecutor(Executor):
    """Submits every run left to a :class:`Backend`, follows them (one progress line: done,
    running, queued, failed, time left), starts a run whose worker died again (``retries``
    times, resuming from ``last.pt``), and names the failed runs at the end."""

    def __init__(self, plan: BenchPlan, owned: OwnedFolder, backend: Backend, retries: int,
                 log: Callable[[str], None]) -> None:
        self.plan, self.owned, self.backend, self.retries, self.log = (plan, owned, backend,
                                                                       retries, log)
        self.name = backend.name
        self.attempts: dict[str, int] = {}

    def record(self) -> dict[str, Any]:
        return {"name": self.name, **self.backend.record(), "retries": self.retries,
                "attempts": dict(self.attempts)}

    def _job(self, key: RunKey, attempt: int) -> RemoteRun:
        plan = self.plan
        return RemoteRun(key.label, str(plan.out.resolve()), plan.spec, plan.digest, plan.cfg,
                         plan.config.threads, attempt, plan.config.trust_checkpoint)

    def run(self, todo: list[tuple[RunKey, bool]], status: Any, finished: Finished) -> None:
        try:
            self._run(todo, status, finished)
        finally:
            self.backend.close()

    def _run(self, todo: list[tuple[RunKey, bool]], status: Any, finished: Finished) -> None:
        plan = self.plan
        logs = own_tree(self.owned, "logs")
        keys = [k for k, _ in todo]
        attempt = {k: 1 for k in keys}
        waiting = list(keys)  # not submitted yet (a backend with a limit takes some at a time)
        handles: dict[RunKey, Any] = {}
        since: dict[RunKey, float] = {}
        failed: dict[RunKey, str] = {}

        def submit_more() -> None:
            room = len(waiting) if self.backend.limit is None else max(
                0, self.backend.limit - len(handles))
            batch = [waiting.pop(0) for _ in range(min(room, len(waiting)))]
            if batch:
                handles.update(zip(batch, self.backend.submit(
                    [self._job(k, attempt[k]) for k in batch])))

        try:
            submit_more()
            while handles:
                running, queued = 0, len(waiting)
                for key in list(handles):
                    log = logs / f"{key.label}.log"
                    event = _last_event(log, attempt[key])
                    if not self.backend.ended(handles[key]):
                        if event != "started":  # not yet, or stopped and requeued
                            queued += 1
                        else:
                            running += 1
                            if key not in since:
                                since[key] = time.perf_counter()
                                status.started(key)
                        continue
                    handle = handles.pop(key)
                    event = _last_event(log, attempt[key])  # its last word, now that it ended
                    self.attempts[key.label] = attempt[key]
                    run = self._result(key)
                    if run is not None:
                        seconds = (time.perf_counter() - since[key] if key in since
                                   else float(run.get("train_seconds") or 0.0))
                        finished(key, run, seconds)
                    elif event == "failed" or attempt[key] > self.retries:
                        why = ("it raised an error" if event == "failed" else
                               f"its worker died {attempt[key]} time(s)")
                        extra = self.backend.log_tail(handle)
                        failed[key] = (f"{key.label}: {why}; the last lines of {log}:\n"
                                       + _tail(log) + (f"\n{extra}" if extra else ""))
                        status.failed(key, why)
                    else:
                        _clear_dead_lock(plan.out / "runs" / key.label, log, attempt[key])
                        attempt[key] += 1
                        note(log, f"attempt {attempt[key] - 1} ended without a result (its "
                                   f"worker died); starting attempt {attempt[key]} of "
                                   f"{self.retries + 1}")
                        self.log(f"{key.label}: its worker died; retrying ({attempt[key] - 1} "
                                 f"of {self.retries}), from its last.pt")
                        waiting.insert(0, key)
                        since.pop(key, None)
                        queued += 1
                submit_more()
                status.counts(running, queued, len(failed))
                if handles:
                    time.sleep(POLL_S)
        except KeyboardInterrupt:
            self.log(f"stopping the {len(handles)} run(s) this bench submitted "
                     f"({self.name}); finished runs are kept")
            self.backend.cancel(list(handles.values()))
            raise
        if failed:
            raise RunsFailedError(
                f"{len(failed)} run(s) failed (the others finished and are kept in "
                f"{plan.out}; the same command trains only what is missing):\n"
                + "\n".join(failed.values()))

    def _result(self, key: RunKey) -> dict[str, Any] | None:
        path = self.plan.out / "runs" / key.label / "result.json"
        if not path.is_file():
            return None
        try:
            run = read_json(path)
        except (ValueError, OSError):
            return None
        if not isinstance(run, dict) or run.get("data_fingerprint") != self.plan.digest:
            return None
        run["val"], run["test"] = nan_for_null(run["val"]), nan_for_null(run["test"])
        return dict(run)
