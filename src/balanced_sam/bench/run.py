"""Running a bench: every run of the plan read back or trained (here, or in worker processes
through :mod:`balanced_sam.parallel`), with one progress line; then :func:`run_bench` writes the
results and prints the report."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import socket
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from balanced_sam import parallel
from balanced_sam.bench.executors import (
    Executor,
    LocalExecutor,
    RemoteRun,
    RunFunctions,
    make_executor,
    note,
    run_state,
    worker_data,
)
from balanced_sam.bench.folder import (
    LAYOUT_FILE,
    claim_bench_folder,
    folder_runs,
    read_back,
    start_results,
)
from balanced_sam.bench.plan import BenchConfig, BenchPlan, RunKey, make_plan
from balanced_sam.bench.report import (
    WIDTH,
    bench_table,
    comparison_text,
    csv_row,
    draw_plots,
    fit_lines,
)
from balanced_sam.bench.summary import DEFAULT_BASELINE, finish_results
from balanced_sam.config import TrainConfig
from balanced_sam.device_pipeline import auto_settings
from balanced_sam.io import FolderLock, read_json, write_csv, write_json
from balanced_sam.layout import LayoutChoice, choose_layout, input_shape
from balanced_sam.metrics import NonFinitePredictionsError
from balanced_sam.outputs import OwnedFolder, output_path
from balanced_sam.runtime import resolve_device
from balanced_sam.train import fit, seed_everything

__all__ = ["run_bench", "BenchInterrupted", "train_task", "run_remote", "Context", "Task",
           "make_context", "make_task", "worker_devices"]


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the bench; the message says how to resume it."""


def run_bench(config: BenchConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark that ``config`` describes and write its files into ``config.out``;
    returns the results of its methods, as printed (see :mod:`balanced_sam.bench`). The
    folder's ``results.json`` and ``results.csv`` hold those and every other run finished in
    the folder on the same data: a narrower ``methods`` never drops an earlier bench's."""
    t_start = time.perf_counter()
    plan = make_plan(config)
    with FolderLock(plan.out, name=".bench.lock", what="bench"):
        owned = claim_bench_folder(plan, log)
        results = start_results(plan, owned, log)
        stored = results.pop("record_config")
        layout = decide_layout(plan, owned, log)
        if layout is not None:
            results["layout"] = layout.to_dict()
        done, executor = _run_all(plan, owned, log)
        results["methods"] = {m.name: {"runs": [done[k] for k in plan.keys_of(m)]}
                              for m in plan.methods}
        finish_results(results, baseline=plan.baseline, factor=config.diverge_factor,
                       confidence=config.confidence, effect=config.effect)
        results["parallel"] = {"jobs": plan.jobs_used, "threads_per_run": config.threads,
                               "start_method": executor.start_method(plan.jobs_used)}
        results["executor"] = executor.record()
        results["total_seconds"] = time.perf_counter() - t_start
        record = _folder_record(plan, owned, results, stored)
        write_json(record, owned.record("results.json"))
        write_csv([csv_row(name, run) for name, m in record["methods"].items()
                   for run in m["runs"]], owned.record("results.csv"))
        pngs: list[str] = []  # the plots this bench drew, named in its last line

        def plot_path(name: str) -> Path:
            pngs.append(name)
            return owned.record(name)

        if config.plots:
            draw_plots(results, plan.data, plot_path, log)
    log("")
    log(bench_table(results))
    log("")
    log(comparison_text(results))
    more = [m for m in record["methods"] if m not in results["methods"]]
    if more:
        log(fit_lines(f"\nresults.json also holds the finished runs of {', '.join(more)} "
                      f"(earlier benches in {plan.out}); bsam compare shows them all"))
    log(fit_lines(f"\nwrote into {plan.out} ({results['total_seconds']:.0f} s in all):"))
    log(fit_lines("  " + ", ".join(["results.json", "results.csv", *pngs])))
    return results


def _run_order(run: dict[str, Any]) -> tuple[bool, float, int]:
    rho = run.get("rho")
    return (rho is not None, float(rho) if isinstance(rho, (int, float)) else 0.0,
            int(run.get("seed") or 0))


def _folder_record(plan: BenchPlan, owned: OwnedFolder, results: dict[str, Any],
                   stored: dict[str, Any]) -> dict[str, Any]:
    """What the folder's ``results.json`` holds: this bench's results, and every other run
    finished in the folder (other methods, seeds or rho of earlier benches), summarised and
    compared together. ``results`` itself when the folder holds nothing else."""
    methods: dict[str, list[dict[str, Any]]] = {
        name: list(entry["runs"]) for name, entry in results["methods"].items()}
    extra = False
    for name, runs in folder_runs(plan, owned).items():
        mine = methods.setdefault(name, [])
        seen = {(r["rho"], r["seed"]) for r in mine}
        new = sorted((r for r in runs if (r.get("rho"), r.get("seed")) not in seen),
                     key=_run_order)
        mine += new
        extra = extra or bool(new)
    if not extra:
        return results
    record = copy.deepcopy({k: v for k, v in results.items() if k != "methods"})
    record["methods"] = {name: {"runs": copy.deepcopy(runs)} for name, runs in methods.items()}
    record["config"].update(methods=list(methods), seeds=stored["seeds"],
                            rho_by_method=stored["rho_by_method"])
    baseline = plan.baseline or (DEFAULT_BASELINE if DEFAULT_BASELINE in methods
                                 and len(methods) > 1 else None)
    finish_results(record, baseline=baseline, factor=plan.config.diverge_factor,
                   confidence=plan.config.confidence, unpaired="skip",
                   effect=plan.config.effect)
    record["config"]["this_bench"] = {"methods": plan.names, "seeds": plan.seeds}
    return record


# ---------------------------------------------------------------------------- one run
@dataclass
class Context:
    """What every run of a bench shares; sent once to each worker process (tensors through
    shared memory). ``template``: a model of the bench's architecture, whose weights each task
    replaces with its own."""

    train: Any
    val: Any
    test: Any
    bins: Any
    target_scaler: Any
    dense: bool
    name: str
    fingerprint: dict[str, Any]
    spec: dict[str, Any]
    cfg: TrainConfig
    out: str
    template: nn.Module | None = None
    #: load the runs' ``last.pt`` even if it needs unpickling (``--trust-checkpoint``)
    trust: bool = False


@dataclass
class Task:
    """One run to train: its key, whether it starts afresh, and its initial weights (a module
    in this process; for a worker, the ``torch.save`` bytes of its state dict, loaded there with
    ``weights_only=True`` into a copy of the context's template)."""

    key: RunKey
    fresh: bool
    model: nn.Module | bytes

    @property
    def label(self) -> str:
        return self.key.label


def make_task(plan: BenchPlan, key: RunKey, fresh: bool, *, portable: bool) -> Task:
    """The run's task with its initial weights, built from its seed alone (the same for every
    method of a seed, whatever ran before); ``portable``: as bytes for a worker process."""
    seed_everything(key.seed)
    model: nn.Module | bytes = plan.data.make_model()
    if portable:
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        model = buf.getvalue()
    return Task(key, fresh, model)


def _model(ctx: Context, task: Task) -> nn.Module:
    if isinstance(task.model, nn.Module):
        return task.model
    if ctx.template is None:
        raise ValueError("a task with its weights as bytes needs the context's template model")
    model = copy.deepcopy(ctx.template)
    model.load_state_dict(torch.load(io.BytesIO(task.model), weights_only=True))
    return model


def train_task(ctx: Context, task: Task, device: str | None) -> dict[str, Any]:
    """Train one run (here or in a worker process) and write its ``result.json``. A run whose
    predictions turn NaN/inf (it diverged) is recorded as such, with NaN figures, and the bench
    goes on: :func:`balanced_sam.bench.summary.finish_results` marks it † and leaves it out."""
    key = task.key
    cfg = replace(ctx.cfg, method=key.name, seed=key.seed,
                  rho=key.rho if key.rho is not None else ctx.cfg.rho,
                  **({"device": device} if device is not None else {}))
    run_dir = Path(ctx.out) / "runs" / task.label
    t0 = time.perf_counter()
    try:
        res = fit(_model(ctx, task), ctx.train, ctx.val, ctx.bins, cfg, test_data=ctx.test,
                  out_dir=run_dir, resume=not task.fresh, overwrite=task.fresh,
                  target_scaler=ctx.target_scaler, depth=ctx.dense,
                  meta={"dataset": ctx.name, "bench_out": ctx.out,
                        "spec": {"data": ctx.spec, "train": cfg.to_dict()},
                        "data": ctx.fingerprint},
                  data_fingerprint=ctx.fingerprint["digest"], trust_checkpoint=ctx.trust,
                  log=lambda s: None)
    except NonFinitePredictionsError as exc:
        run = _diverged_run(key, time.perf_counter() - t0, str(exc), ctx.fingerprint["digest"])
    else:
        run = {"seed": key.seed, "rho": key.rho, "best_epoch": res.best_epoch,
               "train_seconds": res.train_seconds, "skipped_steps": res.skipped_steps,
               "val": res.val, "test": res.test, "test_per_bin": res.test_per_bin,
               "data_fingerprint": ctx.fingerprint["digest"]}
    write_json(run, output_path(run_dir / "result.json"))
    (run_dir / "last.pt").unlink(missing_ok=True)  # finished: best.pt suffices
    return run


#: the report of a run without figures (it diverged): every region and metric NaN
_REGIONS, _METRICS = ("all", "many", "medium", "few"), ("mae", "mse", "rmse", "gm", "bmae")


def _diverged_run(key: RunKey, seconds: float, error: str, digest: str) -> dict[str, Any]:
    nan = {region: {m: math.nan for m in _METRICS} for region in _REGIONS}
    return {"seed": key.seed, "rho": key.rho, "best_epoch": None, "train_seconds": seconds,
            "skipped_steps": None, "val": copy.deepcopy(nan), "test": copy.deepcopy(nan),
            "test_per_bin": None, "data_fingerprint": digest,
            "failure": "training diverged: its predictions became NaN/inf", "error": error}


def run_remote(job: RemoteRun) -> None:
    """Train one run in a Ray task or a Slurm job (:mod:`balanced_sam.bench.executors`):
    resume it from its ``last.pt``, or do nothing when it has finished already. Writes what it
    does to ``out/logs/<label>.log``; an error is written there with its traceback and
    raised."""
    out = Path(job.out)
    log = out / "logs" / f"{job.label}.log"
    attempt = f"attempt {job.attempt}"
    try:
        with parallel.pinned_threads(job.threads):
            run_dir = out / "runs" / job.label
            state, epoch = run_state(run_dir, job.digest)
            what = {"done": "finished earlier", "new": "from the start",
                    "fresh": "afresh (its folder held a run on other data)",
                    "resume": f"resuming from last.pt ({epoch} epoch(s) done)"}[state]
            note(log, f"{attempt} started on {socket.gethostname()} (pid {os.getpid()}), "
                       f"device {job.cfg.device}: {what}")
            if state != "done":
                data = worker_data(job.spec, job.digest)
                key = RunKey.parse(job.label)
                ctx = Context(data.train, data.val, data.test, data.bins, data.target_scaler,
                              data.dense, data.name, data.fingerprint, job.spec, job.cfg,
                              job.out, trust=job.trust)
                seed_everything(key.seed)
                run = train_task(ctx, Task(key, state == "fresh",
                                                       data.make_model()), None)
                if run.get("failure"):
                    note(log, f"{attempt}: {run['failure']}")
        note(log, f"{attempt} finished")
    except Exception as exc:
        text = "".join(traceback.format_exception(exc)).rstrip()
        note(log, f"{attempt} failed: {type(exc).__name__}: {exc}\n"
                   + "\n".join("    " + line for line in text.splitlines()))
        raise
    except BaseException as exc:  # stopped: Ctrl-C, a cancel, a requeue's exit
        with contextlib.suppress(OSError):
            note(log, f"{attempt} stopped ({type(exc).__name__})")
        raise


# ---------------------------------------------------------------------------- the layout
def decide_layout(plan: BenchPlan, owned: OwnedFolder, log: Callable[[str], None]
                  ) -> LayoutChoice | None:
    """``channels_last: auto`` decided once for every run of a bench on this machine (the
    runs' figures are then comparable to the last digit): the folder's earlier decision on the
    same kind of device, else measured here (:func:`balanced_sam.layout.choose_layout`, with the
    runs' thread count) and recorded in ``layout.json``. ``plan.cfg`` then names it. With
    ``--devices`` of one kind it is measured on the first. Runs on other machines (Ray, Slurm)
    or on local devices of several kinds decide for themselves (``None``)."""
    if plan.cfg.channels_last != "auto" or plan.config.executor.name != "local":
        return None
    devices = [resolve_device(d) for d in plan.devices or [plan.cfg.device]]
    if len({d.type for d in devices}) != 1:
        return None
    device = devices[0]
    path = plan.out / LAYOUT_FILE
    choice = None
    if owned.owns(LAYOUT_FILE) and path.is_file() and not path.is_symlink():
        try:
            before = LayoutChoice.from_dict(read_json(path))
            if before.device == device.type:
                choice = replace(before, reason="bench")
        except (KeyError, TypeError, ValueError):
            choice = None  # not a record of ours: measured again
    if choice is None:
        with torch.random.fork_rng(), parallel.pinned_threads(plan.config.threads):
            model = plan.data.make_model().to(device)
            choice = choose_layout("auto", model, input_shape(plan.data.train),
                                   plan.cfg.batch_size, device,
                                   amp=auto_settings(plan.cfg.amp, False, device)[0])
        if choice.reason in ("measured", "cached"):
            write_json(choice.to_dict(), owned.record(LAYOUT_FILE))
    if choice.reason not in ("no-conv2d", "not-images"):
        log(fit_lines(f"{choice.describe()}; every run trains in it"))
    plan.cfg = replace(plan.cfg, channels_last=choice.channels_last)
    return choice


# ---------------------------------------------------------------------------- every run
def make_context(plan: BenchPlan, jobs: int) -> Context:
    d = plan.data
    template = None
    if jobs > 1:
        seed_everything(plan.keys[0].seed if plan.keys else 0)
        template = d.make_model()
    return Context(d.train, d.val, d.test, d.bins, d.target_scaler, d.dense, d.name,
                   d.fingerprint,
                   plan.spec, replace(plan.cfg, progress=plan.cfg.progress and jobs <= 1),
                   str(plan.out), template, trust=plan.config.trust_checkpoint)


def _run_all(plan: BenchPlan, owned: OwnedFolder, log: Callable[[str], None]
             ) -> tuple[dict[RunKey, dict[str, Any]], Executor]:
    """Every run of the plan by key: read back, or trained by the plan's executor (here, in
    worker processes, on a Ray or a Slurm cluster: :mod:`balanced_sam.bench.executors`)."""
    done: dict[RunKey, dict[str, Any]] = {}
    todo: list[tuple[RunKey, bool]] = []
    for key in plan.keys:
        got = read_back(plan, key, log)
        if isinstance(got, dict):
            done[key] = got
        else:
            todo.append((key, got))
    # looked up now, so that a stand-in for train_task (tests) is the one that runs
    fns = RunFunctions(make_context, make_task, train_task, run_remote, worker_devices)
    executor = make_executor(plan, owned, fns, log) if todo else LocalExecutor(plan, fns)
    local = isinstance(executor, LocalExecutor)
    jobs = plan.jobs_used = max(1, min(plan.jobs, len(todo))) if local else max(1, len(todo))
    if plan.cfg.progress and (jobs > 1 or not local):
        log("(a progress bar per epoch needs the runs in one process, jobs=1; the bench's "
            "own line counts the runs)")
    threads = plan.config.threads
    status = _Status([k for k, _ in todo], len(done), jobs, threads, plan.config.status, log,
                     remote=None if local else executor.name)

    def finished(key: RunKey, run: dict[str, Any], seconds: float) -> None:
        done[key] = run
        status.finished(key, run, seconds)

    try:
        executor.run(todo, status, finished)
    except KeyboardInterrupt:
        status.close()
        raise BenchInterrupted(
            f"bench interrupted: {len(done)} of {status.total} runs finished and kept in "
            f"{plan.out}. To resume, run the same bench again into that folder (bsam bench ... "
            f"--out {plan.out}): finished runs are read back and an interrupted one continues "
            "from its last.pt") from None
    status.close()
    return done, executor


def worker_devices(device: str) -> list[str | None] | None:
    """Spread the workers over the visible GPUs when the device names none in particular."""
    if device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return None


# ---------------------------------------------------------------------------- progress
def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (
        f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


class _Status:
    """The bench's one progress line on stderr: runs done / total, time left (each method's
    mean run time so far, spread over the workers), the run that finished last. Rewritten in
    place on a terminal, one line per finished run otherwise; ``enabled`` False sends the
    finished runs to ``log`` instead."""

    def __init__(self, todo: list[RunKey], read_back: int, jobs: int, threads: int,
                 enabled: bool, log: Callable[[str], None], remote: str | None = None) -> None:
        self.pending = Counter(k.name for k in todo)
        self.total, self.done, self.jobs = len(todo) + read_back, read_back, max(1, jobs)
        self.seconds: dict[str, list[float]] = {}
        self.running: dict[RunKey, float] = {}  # key -> when it was handed out
        self.enabled, self.log, self.stream = enabled, log, sys.stderr
        self.tty = self.enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.wrote = False
        # remote runs (Ray, Slurm): how many run, wait in the queue, failed (see counts)
        self.remote, self.shown = remote, (0, len(todo), 0)
        if self.enabled and todo:
            self._write(f"bench: {self.done}/{self.total} runs done; {len(todo)} to train, "
                        + (f"{self.jobs} at a time, {threads} CPU thread(s) each" if not remote
                           else f"submitted to {remote}, {threads} CPU thread(s) each"))

    def counts(self, running: int, queued: int, failed: int) -> None:
        """A remote executor's look at its runs: the line changes when the counts do."""
        self.jobs = max(1, running)
        if (running, queued, failed) != self.shown:
            self.shown = (running, queued, failed)
            if self.enabled:
                self._write(f"bench: {self.done}/{self.total} runs done, {self._queue()}"
                            f"{self._left() if self.seconds else 'time left: after a run'}")

    def _queue(self) -> str:
        if not self.remote:
            return ""
        running, queued, failed = self.shown
        return f"{running} running, {queued} queued, {failed} failed; "

    def failed(self, key: RunKey, why: str) -> None:
        """A remote run failed (named with its log at the end); the others go on."""
        self.pending[key.name] -= 1
        self.running.pop(key, None)
        self.shown = (max(0, self.shown[0] - 1), self.shown[1], self.shown[2] + 1)
        what = f"{key.label} FAILED: {why}"
        if not self.enabled:
            self.log(what)
            return
        self._write(f"bench: {self.done}/{self.total} runs done, {self._queue()}"
                    f"{self._left()} | {what}")

    def started(self, key: RunKey) -> None:
        self.running[key] = time.perf_counter()

    def finished(self, key: RunKey, run: dict[str, Any], seconds: float) -> None:
        self.done += 1
        self.pending[key.name] -= 1
        self.running.pop(key, None)
        self.seconds.setdefault(key.name, []).append(seconds)
        self.shown = (max(0, self.shown[0] - 1), *self.shown[1:])  # it ran until now
        t = run["test"]["all"]["mae"]
        what = f"{key.label}: test MAE {t:.4g} (few {run['test']['few']['mae']:.4g}), " \
               f"epoch {run['best_epoch']}, {seconds:.0f}s"
        if run.get("failure"):
            what = f"{key.label}: {run['failure']}, {seconds:.1f}s"
        if not self.enabled:
            self.log(fit_lines(what))
            return
        self._write(f"bench: {self.done}/{self.total} runs done, {self._queue()}{self._left()}"
                    f" | {what}")

    def _left(self) -> str:
        remaining = sum(self.pending.values())
        if not remaining:
            return "all trained"
        if not self.seconds:
            return "time left: after a run"
        every = statistics.fmean(x for v in self.seconds.values() for x in v)

        def cost(method: str) -> float:
            return statistics.fmean(self.seconds[method]) if method in self.seconds else every

        # the runs under way have done part of their work already
        now = time.perf_counter()
        work = sum(n * cost(m) for m, n in self.pending.items() if n > 0)
        work -= sum(min(now - t0, cost(key.name)) for key, t0 in self.running.items())
        return f"about {_duration(max(0.0, work) / min(self.jobs, remaining))} left"

    def _write(self, line: str) -> None:
        if self.tty:  # one line, rewritten in place: cut to the width
            line = line if len(line) <= WIDTH else line[:WIDTH - 1] + "…"
        self.stream.write(("\r\x1b[K" + line) if self.tty else fit_lines(line) + "\n")
        self.stream.flush()
        self.wrote = True

    def close(self) -> None:
        if self.tty and self.wrote:
            self.stream.write("\n")
            self.stream.flush()
            self.tty = False
