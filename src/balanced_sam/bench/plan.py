"""Planning a bench: what it runs (:class:`BenchConfig`, validated once), on which data
(:func:`bench_data_spec`, :func:`bench_defaults`), and as which runs (:class:`RunKey`: one
method, rho and seed; a run's folder label is derived from it, never the other way round)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from balanced_sam import parallel
from balanced_sam.bench.summary import CONFIDENCE, DEFAULT_BASELINE, DIVERGE_FACTOR
from balanced_sam.config import TrainConfig
from balanced_sam.data.base import BenchData
from balanced_sam.data.registry import DataSplits, default_bench_dataset, get_entry, load_data
from balanced_sam.errors import spell
from balanced_sam.experiment import train_config
from balanced_sam.methods import DEFAULT_METHODS, Method, get_method, rho_for
from balanced_sam.train import resolve_device

__all__ = ["BenchConfig", "ExecutorConfig", "EXECUTORS", "RunKey", "BenchPlan", "make_plan",
           "bench_data_spec", "load_bench_data", "bench_defaults", "QUICK", "DEFAULT_SEEDS"]

#: what ``--quick`` changes unless the dataset's recipe says otherwise (``Recipe.bench["quick"]``)
QUICK = {"seeds": (0,), "epochs": 12}
#: seeds when neither the call nor the dataset's recipe names them
DEFAULT_SEEDS = 5


# ---------------------------------------------------------------------------- the data
def bench_data_spec(dataset: str | None = None, *, csv_path: str | None = None,
                    target: str | None = None, bin_width: float | None = None,
                    train_fraction: float | None = None, cap: int | None = None,
                    data_root: str | None = None, split_seed: int = 0, dropna: bool = False,
                    **table_options: Any) -> dict[str, Any]:
    """The ``data`` section (see :func:`balanced_sam.data.registry.load_data`) that the bench's
    options describe: a registered dataset by name (``None``: the registry's default bench
    dataset, :data:`balanced_sam.data.registry.DEFAULT_BENCH_DATASET`), or a CSV table with its
    target column."""
    opts = {k: v for k, v in (("bin_width", bin_width), ("train_fraction", train_fraction),
                              ("cap", cap)) if v is not None}
    if csv_path is not None:
        if target is None:
            raise ValueError(f"a CSV table needs its target column ({spell('target', 'COL')})")
        table = {k: v for k, v in table_options.items() if v is not None}
        return {"name": "csv", "path": str(Path(csv_path).resolve()), "target": target,
                "dropna": dropna, **opts, **table, "split_seed": split_seed}
    if target is not None or table_options.get("features") is not None:
        raise ValueError(f"{spell('target', 'COL')} and the table options are only used with a "
                         f"CSV table ({spell('csv_path', 'FILE')})")
    spec: dict[str, Any] = {"name": dataset or default_bench_dataset(), **opts}
    if data_root is not None:
        root_key = "root" if get_entry(spec["name"]).needs_root else "data_root"
        spec[root_key] = str(Path(data_root).resolve())
    if split_seed:
        spec["split_seed"] = split_seed
    return spec


def load_bench_data(dataset: str | None = None, **options: Any) -> BenchData:
    """The benchmark's tensors: a registered table-like dataset by name, or any CSV table with
    a target (the options of :func:`bench_data_spec`)."""
    data = load_data(bench_data_spec(dataset, **options))
    if data.tables is None:
        raise ValueError(f"{data.name} is not a table of tensors; use load_data for it")
    return data.tables


def bench_defaults(dataset: str | None = None, csv_path: str | None = None,
                   quick: bool = False) -> dict[str, Any]:
    """What :func:`balanced_sam.bench.run_bench` runs on a dataset when not told: ``methods``,
    ``seeds``, ``epochs`` (``None``: the recipe's) and ``data`` options, from the dataset's
    ``Recipe.bench`` (``--quick``: its ``quick`` entry over :data:`QUICK`), else the bench's
    own (:data:`balanced_sam.methods.DEFAULT_METHODS`, :data:`DEFAULT_SEEDS` seeds)."""
    name = "csv" if csv_path is not None else (dataset or default_bench_dataset())
    bench = dict(get_entry(name).recipe.bench)
    out: dict[str, Any] = {"methods": tuple(bench.get("methods", DEFAULT_METHODS)),
                           "seeds": bench.get("seeds", DEFAULT_SEEDS), "epochs": None,
                           "data": {}}
    if quick:
        q = {**QUICK, **dict(bench.get("quick", {}))}
        out.update({k: q[k] for k in ("methods", "seeds", "epochs", "data") if k in q})
    seeds = out["seeds"]
    out["seeds"] = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    out["data"] = dict(out["data"])
    return out


# ---------------------------------------------------------------------------- the request
@dataclass
class BenchConfig:
    """What a bench runs, validated once when built (a bad value raises ``ValueError`` before
    any data is read).

    ``dataset``: a registered name (``None``: the registry's default bench dataset) unless
    ``csv_path`` names a table (``target``: its target column; ``impute``, ``features``,
    ``categorical``, ``max_categories``, ``max_features``: its loader's options), or unless
    ``data`` gives a whole ``data`` section as in a config (``{"name": "images", "path": ...,
    "target": ...}``: ``bsam bench --images``); ``methods`` / ``seeds`` /
    ``epochs`` default to the dataset recipe's bench choice (``quick``: its short variant).
    ``rho``: one radius or a sweep (``None``: each method's recipe rho). ``baseline``: the
    method the others are compared with seed by seed (default ``sqinv`` when among the
    methods; a named baseline must be one of them). ``jobs``: runs trained at once in worker
    processes (``None``: what the machine offers, :func:`balanced_sam.parallel.default_jobs`;
    1: in this process), each on ``threads`` CPU threads (the figures do not depend on
    ``jobs``). ``diverge_factor``: see :data:`balanced_sam.bench.summary.DIVERGENCE_RULE`.
    ``status``: the one progress line on stderr; ``progress``: a bar per epoch (only when the
    runs train in this process). ``overrides``: ``TrainConfig`` fields (e.g.
    ``{"max_grad_norm": 1.0, "interval": 5}``). ``out``: the bench's folder (default
    ``runs/bench-<timestamp>``): new, empty, or one a bench made (its finished runs are read
    back); ``overwrite``: first remove exactly what an earlier bench wrote there (the files its
    manifest lists, nothing else)."""

    dataset: str | None = None
    methods: Sequence[str] | None = None
    seeds: Sequence[int] | None = None
    epochs: int | None = None
    rho: float | Sequence[float] | None = None
    bin_width: float | None = None
    device: str = "auto"
    out: str | Path | None = None
    csv_path: str | None = None
    target: str | None = None
    train_fraction: float | None = None
    cap: int | None = None
    data_root: str | None = None
    dropna: bool = False
    select_by: str = "mae"
    quick: bool = False
    overrides: dict[str, Any] | None = None
    progress: bool = False
    plots: bool = True
    baseline: str | None = None
    jobs: int | None = 1
    threads: int = 1
    diverge_factor: float = DIVERGE_FACTOR
    confidence: float = CONFIDENCE
    #: the effect of interest of the power figures ("5%" of the baseline's error, or a number
    #: in the target's units)
    effect: float | str | None = "5%"
    status: bool = True
    impute: str | None = None
    features: Sequence[str] | None = None
    categorical: Sequence[str] | None = None
    max_categories: int | None = None
    max_features: int | None = None
    overwrite: bool = False
    #: resume the runs' ``last.pt`` even if it needs unpickling: only for files one vouches for
    #: (a previous release's, whose random state held numpy arrays)
    trust_checkpoint: bool = False
    max_features: int | None = None
    data: Mapping[str, Any] | None = None
    executor: str | ExecutorConfig = "local"

    def __post_init__(self) -> None:
        resolve_device(self.device)  # a bad device fails before any data is read
        if self.data is not None and (not isinstance(self.data, Mapping)
                                      or "name" not in self.data):
            raise ValueError(f"data must be a data section with the dataset's name (as in a "
                             f"config), got {self.data!r}")
        if self.data is not None and (self.dataset is not None or self.csv_path is not None):
            raise ValueError("data replaces dataset / csv_path: give one of them")
        if isinstance(self.executor, str):
            self.executor = ExecutorConfig(self.executor)
        if not isinstance(self.executor, ExecutorConfig):
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)} or an "
                             f"ExecutorConfig, got {self.executor!r}")
        self.executor.check(self.jobs)
        if self.methods is not None:
            self.methods = tuple(self.methods)
            _check_methods(self.methods)
        if self.seeds is not None:
            self.seeds = _checked_seeds(self.seeds)
        if self.rho is not None:
            self.rho = _checked_rhos(self.rho)
        threads, factor, confidence = self.threads, self.diverge_factor, self.confidence
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        if self.jobs is not None and (isinstance(self.jobs, bool) or not isinstance(
                self.jobs, int) or self.jobs < 1):
            raise ValueError(f"jobs must be an integer >= 1 (or None: what the machine "
                             f"offers), got {self.jobs!r}")
        if not (isinstance(factor, (int, float)) and factor > 1 and math.isfinite(factor)):
            raise ValueError(f"diverge_factor must be a finite number > 1, got {factor!r}")
        if not (isinstance(confidence, float) and 0 < confidence < 1):
            raise ValueError(f"confidence must be a number strictly between 0 and 1, got "
                             f"{confidence!r}")
        if self.baseline is not None:
            get_method(self.baseline)
        from balanced_sam.stats import parse_effect

        parse_effect(self.effect)

    def table_options(self) -> dict[str, Any]:
        """The CSV loader's options that were given."""
        return {k: v for k, v in (("impute", self.impute), ("features", self.features),
                                  ("categorical", self.categorical),
                                  ("max_categories", self.max_categories),
                                  ("max_features", self.max_features)) if v is not None}


#: where a bench's runs train (``bsam bench --executor``)
EXECUTORS = ("local", "ray", "slurm")
_SLURM_TIME = re.compile(r"^(?:(?:(?P<d>\d+)-)?(?P<h>\d+):)?(?P<m>\d+)(?::(?P<s>\d+))?$")


@dataclass
class ExecutorConfig:
    """Where and how a bench's runs train (:mod:`balanced_sam.bench.executors`).

    ``name``: ``local`` (this machine: ``jobs`` worker processes, or this process), ``ray`` (a
    Ray cluster: ``ray_address``, default ``auto`` when one runs here, else a local one the bench
    starts and stops) or ``slurm`` (one Slurm job per run through submitit, its files under
    ``out/submitit``; ``slurm_cluster="local"``: submitit's local executor, every job a process
    on this machine, for trying a set-up without Slurm). ``devices`` (local): one run per entry
    at a time, each on its device (``["cuda:0", "cuda:1"]``; ``["auto"]``: every visible GPU,
    or the CPU without one); the bench's ``jobs`` is then their number (a larger one is
    refused);
    ``gpus_per_run`` (default 1 on a CUDA machine, else 0) and ``cpus_per_run`` (default: the
    bench's ``threads``): what each remote run asks for. ``retries``: how often a remote run
    whose worker died (killed, preempted, out of memory, a lost node) is started again; it
    resumes from its ``last.pt``. A run that raised an error is not retried. ``slurm_partition``,
    ``slurm_time`` (``MINUTES``, ``HH:MM:SS`` or ``D-HH:MM:SS``), ``slurm_options`` (more
    ``sbatch`` options, ``{"account": "lab"}`` for ``--account=lab``)."""

    name: str = "local"
    devices: Sequence[str] | None = None
    ray_address: str | None = None
    gpus_per_run: float | None = None
    cpus_per_run: int | None = None
    retries: int = 2
    slurm_partition: str | None = None
    slurm_time: str = "24:00:00"
    slurm_options: dict[str, str] | None = None
    slurm_cluster: str = "slurm"

    def check(self, jobs: int | None) -> None:
        """Validate the fields (``jobs``: the bench's, for ``devices``)."""
        if self.name not in EXECUTORS:
            raise ValueError(f"{_flag('executor')} must be one of {', '.join(EXECUTORS)}, got "
                             f"{self.name!r}")
        if self.devices is not None:
            if self.name != "local":
                raise ValueError(f"{_flag('devices')} places runs on this machine's devices "
                                 f"(executor local); the {self.name} executor gives each run "
                                 f"its own ({_flag('gpus_per_run')})")
            self.devices = tuple(str(d).strip() for d in self.devices)
            if not self.devices or any(not d for d in self.devices):
                raise ValueError(f"{_flag('devices')} is empty: name devices (cuda:0,cuda:1) "
                                 "or auto")
            if "auto" in self.devices and len(self.devices) > 1:
                raise ValueError(f"{_flag('devices')}: auto stands alone (every visible GPU), got "
                                 f"{','.join(self.devices)}")
            if self.devices != ("auto",):
                for d in self.devices:
                    resolve_device(d)
                if jobs not in (None, 1, len(self.devices)):
                    raise ValueError(f"{_flag('devices')} runs one run per device at a time "
                                     f"({len(self.devices)} devices), but {_flag('jobs')} is "
                                     f"{jobs}: leave it out or name {jobs} devices (a device "
                                     "named twice takes two runs at a time)")
        for name, low in (("gpus_per_run", 0), ("cpus_per_run", 1), ("retries", 0)):
            v = getattr(self, name)
            if v is None and name != "retries":
                continue
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v < low or (name != "gpus_per_run" and v != int(v)):
                kind = "a number" if name == "gpus_per_run" else "an integer"
                raise ValueError(f"{_flag(name)} must be {kind} >= {low}, got {v!r}")
        if not isinstance(self.slurm_time, str) or not _SLURM_TIME.match(self.slurm_time) or \
                self.timeout_min() < 1:
            raise ValueError(f"{_flag('slurm_time')} must be MINUTES, HH:MM:SS or D-HH:MM:SS "
                             f"(at least a minute), got {self.slurm_time!r}")
        if self.slurm_cluster not in ("slurm", "local"):
            raise ValueError(f"{_flag('slurm_cluster')} must be slurm or local (submitit's local "
                             f"executor), got {self.slurm_cluster!r}")
        for k, v in (self.slurm_options or {}).items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", str(k)) or not isinstance(v, str):
                raise ValueError(f"{_flag('slurm_options')}: {k!r}={v!r} is not an sbatch "
                                 "option (KEY=VALUE with KEY like account or qos)")

    def timeout_min(self) -> int:
        """``slurm_time`` in minutes (seconds rounded up)."""
        m = _SLURM_TIME.match(self.slurm_time)
        assert m is not None
        d, h, mins, s = (int(m[k] or 0) for k in ("d", "h", "m", "s"))
        if m["s"] is None and m["h"] is not None and m["d"] is None:
            h, mins, s = 0, h, mins  # MM:SS, as sbatch reads two fields
        return d * 1440 + h * 60 + mins + (1 if s else 0)


def _flag(option: str) -> str:
    """How the user names ``option`` here: its flag on the command line, else the field."""
    spelled = spell(option, "X")
    return option if spelled == f"{option}='X'" else spelled


def _check_methods(methods: Sequence[str]) -> None:
    if not methods:
        raise ValueError("methods is empty: name at least one method")
    for m in methods:
        get_method(m)
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods names a method twice: {list(methods)}")


def _checked_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(s) for s in seeds)
    if not out:
        raise ValueError("seeds is empty: give at least one seed")
    repeated = sorted({s for s in out if out.count(s) > 1})
    if repeated:
        raise ValueError(f"seeds repeats seed(s) {repeated}: each seed is one run, and a "
                         "repeated one would count the same run twice")
    return out


def _checked_rhos(rho: float | Sequence[float]) -> tuple[float, ...]:
    """The rho values as floats: each finite and >= 0, no two with the same run label."""
    rhos = (float(rho),) if isinstance(rho, (int, float)) else tuple(float(r) for r in rho)
    if not rhos:
        raise ValueError("rho is empty: give a value, a list to sweep, or None (the recipe's)")
    for r in rhos:
        if not (math.isfinite(r) and r >= 0):
            raise ValueError(f"rho values must be finite numbers >= 0, got {r}")
    labels = [f"{r:g}" for r in rhos]
    if len(set(labels)) != len(labels):
        raise ValueError(f"rho names a value twice (as a run label, to 6 digits): {labels}")
    return rhos


# ---------------------------------------------------------------------------- one run
_LABEL = re.compile(r"^(?P<method>.+?)(?:-rho(?P<rho>[0-9.e+-]+))?-seed(?P<seed>-?\d+)$")


@dataclass(frozen=True, eq=False)
class RunKey:
    """One run of a bench: its method (resolved once), its rho (``None``: a method without
    one) and its seed. ``label`` names its folder (``bsam-rho0.05-seed1``)."""

    method: Method
    rho: float | None
    seed: int

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def label(self) -> str:
        return f"{self.name}{'' if self.rho is None else f'-rho{self.rho:g}'}-seed{self.seed}"

    @classmethod
    def parse(cls, label: str) -> RunKey:
        """The key of a run label (rho to the 6 digits a label keeps); ``ValueError`` when the
        label is not one."""
        m = _LABEL.match(label)
        try:
            if m is None:
                raise ValueError
            key = cls(get_method(m["method"]), None if m["rho"] is None else float(m["rho"]),
                      int(m["seed"]))
        except ValueError:
            raise ValueError(f"{label!r} is not a bench run label (METHOD[-rhoR]-seedS)") \
                from None
        if key.label != label:
            raise ValueError(f"{label!r} is not a bench run label (METHOD[-rhoR]-seedS)")
        return key

    def _id(self) -> tuple[str, float | None, int]:
        return (self.name, self.rho, self.seed)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunKey) and self._id() == other._id()

    def __hash__(self) -> int:
        return hash(self._id())

    def __repr__(self) -> str:
        return f"RunKey({self.name!r}, {self.rho!r}, {self.seed!r})"


# ---------------------------------------------------------------------------- the plan
@dataclass
class BenchPlan:
    """A bench ready to run: the data, the base training config, the methods (resolved), the
    runs, how they run and where they go."""

    config: BenchConfig
    data: DataSplits
    spec: dict[str, Any]
    cfg: TrainConfig
    methods: list[Method]
    seeds: list[int]
    sweep: list[float]
    rho_by_method: dict[str, float]
    out: Path
    baseline: str | None
    jobs: int
    keys: list[RunKey] = field(default_factory=list)
    jobs_used: int = 1  # at most jobs: no more workers than runs to train
    devices: list[str] | None = None  # the local executor's, one run per entry at a time

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.methods]

    def rhos(self, method: Method) -> list[float | None]:
        """The rho values a method runs at: the swept ones, or its recipe's; ``[None]`` for a
        method without rho."""
        if not method.uses_rho:
            return [None]
        if method.name in self.rho_by_method:
            return [self.rho_by_method[method.name]]
        return list(self.sweep)

    def keys_of(self, method: Method) -> list[RunKey]:
        return [k for k in self.keys if k.name == method.name]

    @property
    def digest(self) -> str:
        return self.data.fingerprint["digest"]


def make_plan(config: BenchConfig) -> BenchPlan:
    """The dataset's defaults for what ``config`` leaves open, the data loaded, the runs."""
    c = config
    section = dict(c.data) if c.data is not None else None
    defaults = bench_defaults(c.dataset if section is None else section["name"], c.csv_path,
                              c.quick)
    names = list(c.methods) if c.methods is not None else list(defaults["methods"])
    if c.methods is None:
        _check_methods(names)
    methods = [get_method(n) for n in names]
    seeds = list(c.seeds) if c.seeds is not None else list(_checked_seeds(defaults["seeds"]))
    epochs = c.epochs if c.epochs is not None else defaults["epochs"]
    baseline = _checked_baseline(c.baseline, names)
    jobs = parallel.default_jobs(c.device, c.threads) if c.jobs is None else c.jobs
    devices = _devices(c.executor)
    if devices:
        jobs = len(devices)
    spec = section if section is not None else bench_data_spec(
        c.dataset, csv_path=c.csv_path, target=c.target, bin_width=c.bin_width,
        train_fraction=c.train_fraction, cap=c.cap, data_root=c.data_root, dropna=c.dropna,
        **c.table_options())
    spec = {**defaults["data"], **spec}  # --quick's smaller variant, unless told otherwise
    data = load_data(spec)
    cfg = train_config(data, {"device": c.device, "select_by": c.select_by,
                              "progress": c.progress,
                              **({"epochs": int(epochs)} if epochs is not None else {}),
                              **(c.overrides or {})})
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(c.out) if c.out is not None else Path("runs") / f"bench-{stamp}"
    swept = list(c.rho) if c.rho is not None else None
    by_method: dict[str, float] = {}
    if swept is None:  # each method at its recipe's rho (a composed or interval one: its base's)
        chosen = data.recipe.rho_by_method
        by_method = {m.name: r for m in methods if (r := rho_for(m.name, chosen)) is not None}
    plan = BenchPlan(c, data, spec, cfg, methods, seeds, swept or [cfg.rho], by_method, out,
                     baseline, jobs, devices=devices)
    plan.keys = [RunKey(m, r, s) for m in methods for r in plan.rhos(m) for s in seeds]
    return plan


def _devices(executor: Any) -> list[str] | None:
    """The devices of ``--devices`` (``auto``: every visible GPU, ``None`` without one)."""
    devices = getattr(executor, "devices", None)
    if not devices:
        return None
    if tuple(devices) == ("auto",):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or None
    return list(devices)


def _checked_baseline(baseline: str | None, methods: Sequence[str]) -> str | None:
    """The baseline of the paired comparisons: a named one must be among the methods (it is
    not run implicitly: say so in ``methods``); by default ``sqinv`` when it is there."""
    if baseline is None:
        return DEFAULT_BASELINE if DEFAULT_BASELINE in methods and len(methods) > 1 else None
    if baseline not in methods:
        raise ValueError(f"the baseline {baseline!r} is not among the methods "
                         f"({', '.join(methods)}): add it to {spell('methods', list(methods))} "
                         f"or compare with one of them ({spell('baseline', methods[0])})")
    return baseline
