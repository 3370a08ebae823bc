"""Independent runs in worker processes (``bsam bench --jobs N``).

:func:`run_tasks` hands tasks to ``jobs`` worker processes started with the ``spawn`` method
(safe with CUDA and with OpenMP thread pools, on every platform) and reports each result as it
comes back:

* every worker pins its torch CPU threads (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` are set
  before the worker imports torch, and ``torch.set_num_threads``), so a run computes the same
  floats whichever worker, and however many workers, run it;
* the shared ``context`` (the data) is sent once per worker when it starts; torch tensors in it
  travel through shared memory instead of being copied through a pipe;
* tasks are handed out one at a time, so a worker is never more than one task ahead and an error
  stops the rest quickly; a worker's exception is raised again in the caller with the worker's
  traceback attached as a note;
* Ctrl-C (or any error) stops the workers: each gets one ``SIGINT`` (a ``KeyboardInterrupt``
  inside the task, so its ``finally`` blocks run and files are left consistent), then
  ``terminate`` after a grace period;
* a worker dies with its parent: when the process that started it ends, even by ``SIGKILL``, the
  worker exits within about a second, whatever it is doing (in a task or waiting for one). On
  Linux the kernel sends it ``SIGKILL`` (``prctl(PR_SET_PDEATHSIG)``, set when the workers are
  started from the main thread); everywhere (macOS too) a daemon thread in the worker checks
  every :data:`WATCH_S` seconds that its parent is still the process that started it.

The caller's main module must be importable without side effects (the usual
``if __name__ == "__main__":`` guard), as for any ``spawn`` pool; ``bsam`` itself is.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["run_tasks", "usable_cpus", "default_jobs", "pinned_threads", "WorkerDiedError"]

#: seconds a stopped worker gets to unwind (its ``finally`` blocks) before it is terminated
GRACE_S = 20.0
#: how often a worker checks that its parent is alive (seconds)
WATCH_S = 1.0


class WorkerDiedError(RuntimeError):
    """A worker process ended without reporting its task (killed, out of memory, crashed)."""


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_jobs(device: str = "cpu", threads: int = 1) -> int:
    """What the machine offers: on a CPU, one run per ``threads`` cores; on CUDA one run per
    visible GPU when the device names none in particular (``auto`` / ``cuda``), else 1 (several
    runs may share one GPU, but only when asked: ``--jobs N``); 1 on MPS."""
    import torch

    dev = str(device)
    if dev in ("auto", "cuda") and torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    if dev.startswith(("cuda", "mps")) or (dev == "auto" and torch.backends.mps.is_available()):
        return 1
    return max(1, usable_cpus() // max(1, threads))


@contextlib.contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """torch uses ``threads`` intra-op CPU threads inside the block (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def fork_pool(processes: int) -> Iterator[Any]:
    """A ``multiprocessing`` pool of ``processes`` workers (forked on Linux, spawned elsewhere)
    that ends by letting its workers finish: ``close`` and ``join`` once the work is done,
    ``terminate`` only when the block raises. ``with Pool()`` terminates even after success,
    and a forked worker inherits the parent's signal handlers: under a SIGTERM handler that
    does not exit (Ray's driver installs one) such a worker survives the terminate while
    another held the task queue's lock, and the join waits forever."""
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ctx.Pool(processes)
    try:
        yield pool
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables while workers start (they inherit them), then restore."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _interrupt_once() -> None:
    """The first SIGINT raises KeyboardInterrupt in the worker; later ones are ignored, so the
    task's clean-up is not itself interrupted."""

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


def _portable(exc: BaseException) -> tuple[BaseException, str]:
    text = "".join(traceback.format_exception(exc))
    try:
        pickle.loads(pickle.dumps(exc))
        return exc, text
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}"), text


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent_pid: int, kernel: bool) -> None:
    """End this worker as soon as the process ``parent_pid`` that started it is gone.

    ``kernel`` (Linux, workers started from the parent's main thread: the signal follows the
    thread that forked): ask the kernel for ``SIGKILL`` at the parent's death. In any case a
    daemon thread polls :func:`os.getppid` (the parent's death re-parents this process) and
    calls :func:`os._exit`: it also ends a worker blocked in a pipe, or in a queue's flush at
    exit, with no one left to read. The parent may have died before either was in place: it is
    checked once more after.
    """
    if kernel and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL),
                                                    0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(WATCH_S)
        os._exit(1)

    threading.Thread(target=watch, name="bsam-parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:
        os._exit(1)


def _worker(fn: Callable[..., Any], context: Any, tasks: Any, results: Any, threads: int,
            device: str | None, parent_pid: int | None = None, kernel: bool = False) -> None:
    """A worker's life: die with the parent, pin threads, then run tasks until told to stop."""
    if parent_pid is not None:
        _die_with_parent(parent_pid, kernel)
    _interrupt_once()
    import torch

    torch.set_num_threads(threads)
    parent = mp.parent_process()
    while True:
        try:
            item = tasks.get(timeout=WATCH_S)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return
            continue
        except KeyboardInterrupt:
            return
        if item is None or (parent is not None and not parent.is_alive()):
            return
        key, payload = item
        t0 = time.perf_counter()
        try:
            out = fn(context, payload, device)
        except KeyboardInterrupt:
            results.put(("interrupted", key, None))
            return
        except BaseException as exc:  # reported to the caller, who raises it
            results.put(("error", key, _portable(exc)))
            return
        results.put(("done", key, (out, time.perf_counter() - t0)))


def run_tasks(fn: Callable[[Any, Any, str | None], Any], context: Any,
              tasks: Sequence[tuple[Any, Any]], *, jobs: int, threads: int = 1,
              devices: Sequence[str | None] | None = None,
              prepare: Callable[[Any, Any], Any] | None = None,
              on_done: Callable[[Any, Any, float], None]) -> None:
    """Run ``fn(context, payload, device)`` for every ``(key, payload)`` of ``tasks`` in
    ``jobs`` spawned workers; ``on_done(key, result, seconds)`` is called in this process as
    each finishes. ``devices[i]`` is worker ``i``'s device (``None``: the task's own).
    ``prepare(key, payload)``, when given, turns a payload into what is sent, in this process,
    just before a worker takes it (so at most ``jobs`` prepared payloads exist at a time).

    Raises the first task's exception (with the worker's traceback as a note),
    :class:`WorkerDiedError` when a worker vanished, ``KeyboardInterrupt`` on Ctrl-C; in every
    case the workers are stopped first."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    ctx = mp.get_context("spawn")
    task_q, result_q = ctx.Queue(), ctx.Queue()
    n = min(jobs, len(tasks))
    devices = list(devices) if devices else [None]
    kernel = threading.current_thread() is threading.main_thread()
    procs = [ctx.Process(target=_worker, name=f"bsam-worker-{i}", args=(
        fn, context, task_q, result_q, threads, devices[i % len(devices)], os.getpid(),
        kernel)) for i in range(n)]
    pending = deque(tasks)
    with _environment(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)):
        for p in procs:
            p.start()
    running: dict[Any, bool] = {}

    def feed() -> None:
        if pending:
            key, payload = pending.popleft()
            running[key] = True
            task_q.put((key, prepare(key, payload) if prepare is not None else payload))
        else:
            task_q.put(None)

    finished = False
    try:
        for _ in procs:
            feed()
        while running:
            kind, key, value = _next_result(result_q, procs, running)
            running.pop(key, None)
            if kind == "done":
                on_done(key, *value)
                feed()
            elif kind == "error":
                exc, text = value
                exc.add_note(f"(raised in a worker process while running {key}:\n{text})")
                raise exc
            else:
                raise KeyboardInterrupt
        finished = True
    finally:
        for _ in procs:  # idle workers wait for a task: tell them there is none
            task_q.put(None)
        _stop(procs, graceful=finished)


def _next_result(result_q: Any, procs: list[Any], running: dict[Any, bool]
                 ) -> tuple[str, Any, Any]:
    """The next report from a worker; raises :class:`WorkerDiedError` if none can come."""
    while True:
        try:
            return result_q.get(timeout=0.5)
        except queue.Empty:
            pass
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead or all(not p.is_alive() for p in procs):
            with contextlib.suppress(queue.Empty):  # a last report may still be in the pipe
                return result_q.get(timeout=1.0)
            codes = ", ".join(f"{p.name} exit code {p.exitcode}" for p in procs)
            raise WorkerDiedError(f"a worker process ended while running {list(running)} "
                                  f"({codes}); finished runs are kept: run the same command "
                                  "again to resume")


def _stop(procs: list[Any], graceful: bool) -> None:
    """Join finished workers; interrupt, then terminate, those still running."""
    if not graceful:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGINT)
    deadline = time.monotonic() + (GRACE_S if not graceful else 60.0)
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5.0)
