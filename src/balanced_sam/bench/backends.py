"""The schedulers behind ``bsam bench --executor ray|slurm``
(:class:`balanced_sam.bench.executors.RemoteExecutor` follows the runs): a :class:`Backend`
submits a run's task, says whether it has ended, cancels, and shows its own log's tail."""

from __future__ import annotations

import contextlib
import math
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from balanced_sam import parallel
from balanced_sam.bench.plan import ExecutorConfig
from balanced_sam.outputs import FolderNotOursError, OwnedFolder

__all__ = ["Backend", "RayBackend", "SubmititBackend", "own_tree", "LOG_TAIL"]

#: the lines of a failed run's log that the bench shows
LOG_TAIL = 8


def own_tree(owned: OwnedFolder, name: str) -> Path:
    """The bench folder's sub-folder ``name`` (``logs``, ``submitit``), whose whole content the
    bench and its jobs write: listed in the manifest as a tree (``--overwrite`` removes it)
    and made. One that is a link, or that the manifest does not list already, is refused."""
    path = owned.path / name
    if path.is_symlink() or (path.exists() and not owned.owns(name)):
        raise FolderNotOursError(f"{path} is {'a symbolic link' if path.is_symlink() else 'not'}"
                                 f"{'' if path.is_symlink() else ' written by bsam'}: the bench "
                                 "writes its runs' logs and jobs there; move it away or choose "
                                 "another --out")
    owned.record(name, "tree")
    path.mkdir(exist_ok=True)
    return path


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A ``HOST:PORT`` Ray address must answer a TCP connection (Ray itself retries for
    minutes before it gives up); other forms (``auto``, ``ray://...``) are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ValueError(f"--ray-address {address}: no Ray cluster answers there ({exc}); "
                         "start one (ray start --head) or leave the option out for a local "
                         "one") from None


def _needs(extra: str, package: str, what: str) -> ModuleNotFoundError:
    err = ModuleNotFoundError(f"{what} needs the package {package}: install it with "
                              f"pip install 'balanced-sam[{extra}]'")
    err.name = package
    return err


class Backend:
    """A scheduler: ``submit`` runs (:class:`balanced_sam.bench.executors.RemoteRun`; a handle
    back for each), whether a handle has ``ended``, ``cancel`` handles, the scheduler's own
    ``log_tail`` of one, ``close``."""

    name = "?"
    #: the most runs submitted at a time (``None``: all; the scheduler queues them)
    limit: int | None = None

    def submit(self, jobs: list[Any]) -> list[Any]:
        raise NotImplementedError

    def ended(self, handle: Any) -> bool:
        raise NotImplementedError

    def cancel(self, handles: list[Any]) -> None:
        raise NotImplementedError

    def log_tail(self, handle: Any) -> str:
        return ""

    def record(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def _default_gpus(cfg: ExecutorConfig) -> float:
    if cfg.gpus_per_run is not None:
        return float(cfg.gpus_per_run)
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


class RayBackend(Backend):
    """One Ray task per run, asking for ``gpus_per_run`` GPUs and ``cpus_per_run`` CPUs, on
    the cluster at ``ray_address``; without one: the cluster running here (``auto``), else a
    local one that the bench starts and stops. A Ray session already open in this process is
    used as it is (and left open)."""

    name = "ray"

    def __init__(self, cfg: ExecutorConfig, threads: int, remote: Callable[[Any], None],
                 log: Callable[[str], None]) -> None:
        try:
            import ray
        except ModuleNotFoundError as exc:
            raise _needs("ray", "ray", "--executor ray") from exc
        self.ray = ray
        self.gpus = _default_gpus(cfg)
        self.cpus = cfg.cpus_per_run or threads
        self.mine = False
        self.started = False
        if ray.is_initialized() and cfg.ray_address is not None:
            raise ValueError(f"--ray-address {cfg.ray_address}: this process has a Ray session "
                             "open already, which the bench would use; leave the option out, "
                             "or ray.shutdown() first")
        if not ray.is_initialized():
            quiet = {"log_to_driver": False, "logging_level": "WARNING"}
            if cfg.ray_address is not None:
                _check_reachable(cfg.ray_address)
                try:
                    ray.init(address=cfg.ray_address, **quiet)
                except ConnectionError as exc:
                    raise ValueError(f"--ray-address {cfg.ray_address}: no Ray cluster answers "
                                     f"there ({exc}); start one (ray start --head) or leave "
                                     "the option out for a local one") from None
            else:
                try:
                    ray.init(address="auto", **quiet)
                except ConnectionError:
                    ray.init(num_cpus=parallel.usable_cpus(), include_dashboard=False, **quiet)
                    self.started = True
            self.mine = True
        have = ray.cluster_resources()
        self.address = "local (started by the bench)" if self.started else (
            cfg.ray_address or "auto")
        for what, need in (("GPU", self.gpus), ("CPU", float(self.cpus))):
            if need > have.get(what, 0.0):
                self.close()
                raise ValueError(f"each run asks for {need:g} {what}(s) but the Ray cluster "
                                 f"({self.address}) has {have.get(what, 0.0):g}: lower "
                                 f"--{what.lower()}s-per-run or add nodes with {what}s")
        self.task = ray.remote(remote).options(num_cpus=self.cpus, num_gpus=self.gpus,
                                                   max_retries=0)
        self.errors: dict[Any, str] = {}
        log(f"ray: cluster {self.address}, {have.get('CPU', 0):g} CPUs / "
            f"{have.get('GPU', 0):g} GPUs; each run asks for {self.cpus} CPU(s), "
            f"{self.gpus:g} GPU(s)")

    def submit(self, jobs: list[Any]) -> list[Any]:
        return [self.task.remote(job) for job in jobs]

    def ended(self, handle: Any) -> bool:
        ready, _ = self.ray.wait([handle], timeout=0)
        if not ready:
            return False
        try:
            self.ray.get(handle)
        except Exception as exc:  # noqa: BLE001 - told apart by the run's folder and log
            self.errors[handle] = f"{type(exc).__name__}: {exc}"
        return True

    def cancel(self, handles: list[Any]) -> None:
        for h in handles:
            with contextlib.suppress(Exception):
                self.ray.cancel(h, force=False)
        deadline = time.monotonic() + 10.0
        left = list(handles)
        while left and time.monotonic() < deadline:
            _, left = self.ray.wait(left, num_returns=len(left), timeout=0.5)
        for h in left:
            with contextlib.suppress(Exception):
                self.ray.cancel(h, force=True)

    def log_tail(self, handle: Any) -> str:
        return self.errors.get(handle, "")

    def record(self) -> dict[str, Any]:
        return {"address": self.address, "gpus_per_run": self.gpus, "cpus_per_run": self.cpus}

    def close(self) -> None:
        if self.mine:
            self.ray.shutdown()
            self.mine = False


class _SubmititRun:
    """The callable of a Slurm job: trains its run with ``remote``; on preemption or time-out
    submitit calls :meth:`checkpoint`, which requeues the same job (it resumes from
    ``last.pt``)."""

    def __init__(self, remote: Callable[[Any], None]) -> None:
        self.remote = remote

    def __call__(self, job: Any) -> None:
        self.remote(job)

    def checkpoint(self, job: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, job)


class SubmititBackend(Backend):
    """One Slurm job per run (submitted together as a job array), through submitit, its files
    in ``out/submitit``: ``slurm_partition``, ``slurm_time``, ``gpus_per_run``, ``cpus_per_run``
    and ``slurm_options`` (more sbatch options). ``slurm_cluster="local"``: submitit's local
    executor (a process per job on this machine) instead of Slurm."""

    name = "slurm"

    def __init__(self, cfg: ExecutorConfig, threads: int, remote: Callable[[Any], None],
                 out: Path, owned: OwnedFolder, log: Callable[[str], None]) -> None:
        try:
            import submitit
        except ModuleNotFoundError as exc:
            raise _needs("slurm", "submitit", "--executor slurm") from exc
        if cfg.slurm_cluster == "slurm" and shutil.which("sbatch") is None:
            raise ValueError("--executor slurm submits with Slurm's sbatch, which is not on this "
                             "machine's PATH: run the bench on a login node of the cluster")
        self.cluster, self.remote = cfg.slurm_cluster, remote
        self.gpus = int(math.ceil(_default_gpus(cfg)))
        self.cpus = cfg.cpus_per_run or threads
        folder = own_tree(owned, "submitit")
        self.executor = submitit.AutoExecutor(folder=folder, cluster=self.cluster,
                                              slurm_max_num_timeout=max(3, cfg.retries))
        params: dict[str, Any] = {"timeout_min": cfg.timeout_min(), "nodes": 1,
                                  "tasks_per_node": 1, "cpus_per_task": self.cpus,
                                  "gpus_per_node": self.gpus, "name": f"bsam-{out.name}"}
        if self.cluster == "slurm":
            params.update(slurm_signal_delay_s=120,
                          slurm_additional_parameters=dict(cfg.slurm_options or {}),
                          **({"slurm_partition": cfg.slurm_partition}
                             if cfg.slurm_partition else {}))
        self.executor.update_parameters(**params)
        self.partition, self.time = cfg.slurm_partition, cfg.slurm_time
        if self.cluster == "local":  # no scheduler queues them: as many as the cores take
            self.limit = max(1, parallel.usable_cpus() // self.cpus)
        log(f"slurm: {'submitit local executor' if self.cluster == 'local' else 'sbatch'}, "
            f"partition {cfg.slurm_partition or '(default)'}, time {cfg.slurm_time}, "
            f"{self.gpus} GPU(s) and {self.cpus} CPU(s) per run; files in {folder}")

    def submit(self, jobs: list[Any]) -> list[Any]:
        if len(jobs) == 1:
            return [self.executor.submit(_SubmititRun(self.remote), jobs[0])]
        handles: list[Any] = []
        with self.executor.batch():
            for job in jobs:
                handles.append(self.executor.submit(_SubmititRun(self.remote), job))
        return handles

    def ended(self, handle: Any) -> bool:
        return bool(handle.done())

    def cancel(self, handles: list[Any]) -> None:
        for h in handles:
            with contextlib.suppress(Exception):
                h.cancel(check=False)

    def log_tail(self, handle: Any) -> str:
        with contextlib.suppress(Exception):
            text = handle.stderr() or ""
            return "\n".join(text.rstrip().splitlines()[-LOG_TAIL:])
        return ""

    def record(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "partition": self.partition, "time": self.time,
                "gpus_per_run": self.gpus, "cpus_per_run": self.cpus}
