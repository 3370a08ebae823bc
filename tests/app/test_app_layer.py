"""The shape of the application layer: one dataset registry, a run API, one vocabulary, one
place for thresholds, scaling, losses and file I/O, and the structural rules of issue 10."""

from __future__ import annotations

import ast
import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _repo_scripts import ROOT

from balanced_sam import LabelBins
from balanced_sam.cli import build_parser, main
from balanced_sam.data import REGISTRY, TargetScaler, build_model, get_entry, load_data
from balanced_sam.io import FolderLock, FolderLockedError, append_csv_row, read_json, write_json
from balanced_sam.methods import METHODS, Method, build_stepper, get_method
from balanced_sam.models import MLP
from balanced_sam.train import LRPlan, TrainConfig, batches, fit, seed_everything

SRC = ROOT / "src" / "balanced_sam"


# ---------------------------------------------------------------------------- structure
def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder,forbidden", [
    ("data", {"balanced_sam.train", "balanced_sam.train_state", "balanced_sam.runtime",
              "balanced_sam.bench", "balanced_sam.cli", "balanced_sam.experiment"}),
    ("analysis", {"balanced_sam.bench", "balanced_sam.cli", "balanced_sam.experiment",
                  "balanced_sam.train", "balanced_sam.train_state", "balanced_sam.runtime"}),
])
def test_lower_layers_do_not_import_upper_ones(folder, forbidden):
    for path in (SRC / folder).rglob("*.py"):
        bad = _imports(path) & forbidden
        assert not bad, f"{path.name} imports {bad}"


# the library core: optimizers, bins, losses, metrics. It must stay usable on its own (and is
# type-checked strictly on its own), so it imports nothing of the application layer.
CORE = ("optim", "bins.py", "losses.py", "metrics.py")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _internal_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of this package that ``path`` imports anywhere (top level, inside functions,
    under TYPE_CHECKING): ``from pkg import name`` counts as pkg.name when that is a module."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
    return out & set(modules)


def test_the_core_imports_nothing_of_the_application_layer():
    modules = _package_modules()
    core = {m for m in modules if any(
        m == f"balanced_sam.{c.removesuffix('.py')}" or m.startswith(f"balanced_sam.{c}.")
        for c in CORE)}
    assert {"balanced_sam.optim", "balanced_sam.optim.sam", "balanced_sam.bins",
            "balanced_sam.metrics"} <= core
    for name in sorted(core):
        outside = _internal_imports(modules[name], modules) - core
        assert not outside, f"{name} (core) imports {sorted(outside)}"


def test_no_import_cycles():
    modules = _package_modules()
    graph = {m: _internal_imports(p, modules) - {m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


# ---------------------------------------------------------------------------- private names
#: crossings that remain on this branch, keyed "file: what" (no line numbers); the optim/
#: restructure (issue 18) removes them: ImbSAM imports SAM's private pass context and plan.
#: This list only shrinks.
PRIVATE_CROSSINGS_BEING_REMOVED: set[str] = set()  # empty since the optim restructure


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_crossings(src: Path) -> list[tuple[str, int, str]]:
    """``(file, line, what)`` for every private name that crosses a module line under ``src``
    (the package folder): ``from M import _x`` of another module ``M``, an attribute
    ``m._x`` of an imported module ``m``, an import of a private module (``pkg._mod``) from
    outside ``pkg``, and ``getattr(obj, "_" + ...)``, a private name built from a string."""
    root = src.parent

    def name_of(path: Path) -> str:
        parts = path.relative_to(root).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(p): p for p in src.rglob("*.py")}
    found = []
    for mod, path in sorted(modules.items()):
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        where = path.relative_to(root).as_posix()

        def outside(target: str, pkg: str = pkg) -> bool:
            parts = target.split(".")
            owners = [".".join(parts[:i]) for i, seg in enumerate(parts) if _is_private(seg)]
            return any(pkg != o and not pkg.startswith(o + ".") for o in owners)

        tree = ast.parse(path.read_text())
        bound: dict[str, str] = {src.name: src.name}  # local name -> the module it names
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                if target.split(".")[0] != src.name:
                    continue
                if outside(target):
                    found.append((where, node.lineno, f"from {target} import ..."))
                for a in node.names:
                    if f"{target}.{a.name}" in modules:
                        bound[a.asname or a.name] = f"{target}.{a.name}"
                    if _is_private(a.name) and target != mod:
                        found.append((where, node.lineno, f"from {target} import {a.name}"))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == src.name:
                        if outside(a.name):
                            found.append((where, node.lineno, f"import {a.name}"))
                        if a.asname:
                            bound[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                chain, v = [], node.value
                while isinstance(v, ast.Attribute):
                    chain.append(v.attr)
                    v = v.value
                if isinstance(v, ast.Name) and v.id in bound:
                    target = ".".join([bound[v.id], *reversed(chain)])
                    if target in modules and target != mod:
                        found.append((where, node.lineno, f"{target}.{node.attr}"))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id == "getattr" and len(node.args) >= 2
                  and isinstance(node.args[1], ast.BinOp)
                  and isinstance(node.args[1].left, ast.Constant)
                  and str(node.args[1].left.value).startswith("_")):
                found.append((where, node.lineno, "getattr(..., '_' + ...)"))
    return found


def test_no_private_name_crosses_a_module_line():
    found = _private_crossings(SRC)
    keys = {f"{f}: {what}" for f, _, what in found}
    new = [f"{f}:{line}: {what}" for f, line, what in found
           if f"{f}: {what}" not in PRIVATE_CROSSINGS_BEING_REMOVED]
    assert not new, "private names used across modules:\n" + "\n".join(new)
    gone = PRIVATE_CROSSINGS_BEING_REMOVED - keys
    assert not gone, f"remove these from PRIVATE_CROSSINGS_BEING_REMOVED: {sorted(gone)}"


def test_the_private_name_check_finds_each_kind_of_crossing(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def _helper():\n    pass\n\n\ndef ok():\n    _helper()\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub._inner import x\n")  # its own: fine
    (pkg / "sub" / "_inner.py").write_text("x = 1\n")
    (pkg / "b.py").write_text(
        "from pkg.a import _helper\n"
        "from pkg import a\n"
        "from pkg.sub._inner import x\n"
        "import pkg.a as alias\n\n\n"
        "def f(obj, name):\n"
        "    a._helper()\n"
        "    alias._helper()\n"
        "    obj._own()\n"  # an object's attribute: not a module's
        "    return getattr(obj, '_' + name)\n")
    found = sorted((f, line, what) for f, line, what in _private_crossings(pkg))
    assert found == [
        ("pkg/b.py", 1, "from pkg.a import _helper"),
        ("pkg/b.py", 3, "from pkg.sub._inner import ..."),
        ("pkg/b.py", 8, "pkg.a._helper"),
        ("pkg/b.py", 9, "pkg.a._helper"),
        ("pkg/b.py", 11, "getattr(..., '_' + ...)"),
    ]


def test_no_function_in_src_is_over_80_lines():
    allowed: set[str] = set()
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80 and node.name not in allowed:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert not long


#: modules allowed over the 600-line limit (none since cli.py and data/registry.py were
#: split); the list only shrinks: a listed file at or under the limit fails the test
OVER_600_LINES_UNTIL_SPLIT: set[str] = set()


def test_no_module_in_src_is_over_600_lines():
    lines = {p.relative_to(SRC).as_posix(): len(p.read_text().splitlines())
             for p in SRC.rglob("*.py")}
    long = {f: n for f, n in lines.items() if n > 600 and f not in OVER_600_LINES_UNTIL_SPLIT}
    assert not long, f"modules over 600 lines (split them): {long}"
    unknown = OVER_600_LINES_UNTIL_SPLIT - set(lines)
    assert not unknown, f"OVER_600_LINES_UNTIL_SPLIT names no module: {sorted(unknown)}"
    done = {f: lines[f] for f in OVER_600_LINES_UNTIL_SPLIT & set(lines) if lines[f] <= 600}
    assert not done, f"remove these from OVER_600_LINES_UNTIL_SPLIT (now short enough): {done}"


def test_one_registry_serves_every_command(capsys):
    names = {"diamonds", "rotated-mnist", "rotated-fashion-mnist", "csv", "agedb", "imdb-wiki",
             "nyud2"}
    assert names <= set(REGISTRY)
    from balanced_sam.data import prepare

    assert set(prepare.NAMES) == {n for n, e in REGISTRY.items() if e.prepare}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    data_cmd = sub.choices["data"]
    prep = next(a for a in data_cmd._actions if a.dest == "data_command").choices["prepare"]
    assert set(next(a for a in prep._actions if a.dest == "name").choices) == set(prepare.NAMES)
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert all(n in listing for n in names)
    for name in names:  # every entry has the protocol's parts
        e = get_entry(name)
        assert e.recipe.train and e.recipe.model.get("name") and e.description
    with pytest.raises(ValueError, match="data.bogus is not an option of dataset 'diamonds'"):
        load_data({"name": "diamonds", "bogus": 1})


def test_data_modules_name_no_method():
    method_names = set(METHODS)
    for path in (SRC / "data").rglob("*.py"):
        if path.name == "recipes.py":  # the recipes (rho per method) live here
            continue
        text = path.read_text()
        assert "RHO_BY_METHOD" not in text, path.name
        strings = {n.value for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Constant)}
        assert not (strings & (method_names - {"lds", "inv"})), path.name


def test_model_factory_reaches_every_resnet():
    for name in ("resnet18", "resnet34", "resnet50"):
        model = build_model(None, {"name": name})
        assert model.arch == name
    with pytest.raises(ValueError, match="resnet101"):
        build_model(None, {"name": "resnet101"})


# ---------------------------------------------------------------------------- vocabulary
def test_method_vocabulary():
    bsam = get_method("bsam")
    assert (bsam.sharpness, bsam.perturbation_weighting, bsam.update_weighting) == (
        "bsam", "sqrt_inv", "sqrt_inv")
    assert get_method("sqinv").sharpness == "none"
    assert get_method("vanilla").update_weighting is None  # unweighted is None, one spelling
    assert get_method("fds+vanilla+sam").update_weighting is None  # "vanilla" parsed into it
    m = Method("x", "none", "inv", optimizer_options={"nesterov": True})
    assert m.optimizer_options == {"nesterov": True} and Method("b", "bsam").uses_rho
    assert Method("b", "bsam").perturbation_weighting == "sqrt_inv"
    with pytest.raises(ValueError, match="update_weighting must be None"):
        Method("w", "none", "none")
    with pytest.raises(TypeError):
        Method("x", optimizer="base")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="perturbation_weighting needs sharpness 'bsam'"):
        Method("y", "sam", "sqrt_inv", "sqrt_inv")
    with pytest.raises(ValueError, match="sharpness must be one of"):
        Method("z", "adam")


def test_method_optimizer_options_reach_the_optimizer():
    bins = LabelBins.from_labels(torch.arange(50.0), bin_width=5)
    cfg = TrainConfig(eta=20)
    m = Method("imbsam-eta5", "imbsam", "sqrt_inv", optimizer_options={"eta": 5})
    opt, _ = build_stepper(m, MLP(3, (4,)).parameters(), bins, cfg)
    assert opt.eta == 5
    opt, _ = build_stepper(get_method("imbsam"), MLP(3, (4,)).parameters(), bins, cfg)
    assert opt.eta == 20


def test_one_hessian_default_for_library_and_cli():
    from balanced_sam.analysis import analyze_model, hessian_top_eigenvalue
    from balanced_sam.analysis.hessian import DEFAULT_SOLVER
    from balanced_sam.experiment import analyze_checkpoints

    for fn in (hessian_top_eigenvalue, analyze_model, analyze_checkpoints):
        assert inspect.signature(fn).parameters["solver"].default == DEFAULT_SOLVER
    args = build_parser().parse_args(["analyze", "--checkpoint", "x.pt"])
    assert args.solver == DEFAULT_SOLVER == "lanczos"


def test_analysis_uses_the_library_losses():
    from balanced_sam import analysis, losses
    from balanced_sam.analysis import _common

    assert analysis.l1_per_sample is losses.l1_loss and analysis.mse_per_sample is losses.mse_loss
    src = inspect.getsource(_common)
    assert "def l1_per_sample" not in src and "def mse_per_sample" not in src


# ---------------------------------------------------------------------------- one place each
def test_region_thresholds_live_on_the_bins():
    bins = LabelBins.from_labels(torch.arange(100.0).repeat(3), bin_width=10)
    assert bins.thresholds() == (100, 20)
    assert bins.set_thresholds(25, 5) is bins
    assert bins.thresholds() == (25, 5) and bins.to_dict()["many"] == 25
    with pytest.raises(ValueError, match="few"):
        bins.set_thresholds(10, 30)
    from balanced_sam.train import evaluate

    rep = evaluate(torch.nn.Linear(1, 1), (torch.zeros(4, 1), torch.tensor([1., 2., 3., 4.])),
                   bins)
    assert rep["many"]["count"] == 4  # 30 per bin > 25: many, by the bins' thresholds


def test_one_region_check_for_every_entry_point():
    from balanced_sam.analysis import analyze_model, select
    from balanced_sam.bins import check_region
    from balanced_sam.experiment import analyze_checkpoints

    bins = LabelBins.from_labels(torch.arange(50.0), bin_width=5)
    y = torch.arange(10.0)
    assert [check_region(r) for r in ("all", "many", "medium", "few")] == [
        "all", "many", "medium", "few"]
    message = "region must be one of all, many, medium, few; got 'tail'"
    calls = [lambda: bins.region_mask(y, "tail"), lambda: select(y, bins, region="tail"),
             lambda: analyze_model(MLP(1, (2,)), y[:, None], y, bins, regions=["all", "tail"]),
             lambda: analyze_checkpoints(["x.pt"], regions=["tail"])]
    for call in calls:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message


def test_target_scaler_round_trip():
    y = torch.tensor([1.0, 3.0, 5.0])
    s = TargetScaler.fit(y)
    assert s.mean == 3.0 and s.std == 2.0
    assert torch.allclose(s.unscale(s.scale(y)), y)
    assert TargetScaler.from_stats((3.0, 2.0)) == s == TargetScaler.from_stats(s.to_dict())
    model = torch.nn.Linear(1, 1)
    wrapped = s.wrap(model)
    x = torch.randn(2, 1)
    assert torch.allclose(wrapped(x), model(x) * 2 + 3)
    assert TargetScaler().wrap(model) is model and TargetScaler.from_stats(None).is_identity
    with pytest.raises(ValueError, match="std > 0"):
        TargetScaler(0.0, 0.0)


def test_io_json_csv_and_atomic_writes(tmp_path):
    path = write_json({"a": math.nan, "b": [1.5, math.inf], "c": torch.tensor(2.0).item()},
                      tmp_path / "x.json")
    assert read_json(path) == {"a": None, "b": [1.5, None], "c": 2.0}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary left behind
    log = tmp_path / "log.csv"
    for e in (1, 2, 3):
        append_csv_row(log, {"epoch": e, "loss": e / 10})
    append_csv_row(log, {"epoch": 2, "loss": 0.25})  # a resumed run redoes epoch 2
    assert log.read_text().splitlines() == ["epoch,loss", "1,0.1", "2,0.25"]


@pytest.mark.e2e
def test_folder_lock_refuses_a_live_holder_and_goes_with_a_killed_one(tmp_path):
    code = ("import time; from balanced_sam.io import FolderLock; "
            f"lock = FolderLock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
            "time.sleep(60)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        for _ in range(2):  # a refused attempt leaves the holder named for the next one
            with pytest.raises(FolderLockedError, match=f"{tmp_path} is in use by process "
                               f"{holder.pid}"):
                FolderLock(tmp_path).acquire()
    finally:
        holder.kill()  # no release: the operating system drops the lock
        holder.wait()
    with FolderLock(tmp_path) as lock:
        assert lock.held and (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(FolderLockedError, match=f"process {os.getpid()}"):
            FolderLock(tmp_path).acquire()  # a second lock in the same process too
    assert not (tmp_path / ".lock").exists()


# ---------------------------------------------------------------------------- loop options
def test_cosine_ref_runs_the_references_epochs_1_to_E():
    plan = LRPlan("cosine_ref", 4, lr_min_factor=1e-3)
    factors = [plan(e) for e in range(4)]
    want = [1e-3 + (1 - 1e-3) * (1 + math.cos(math.pi * k / 4)) / 2 for k in (1, 2, 3, 4)]
    assert factors == pytest.approx(want, rel=1e-12)
    assert factors[-1] == pytest.approx(1e-3, rel=1e-12) and factors[0] < 1
    ours = LRPlan("cosine", 4, lr_min_factor=1e-3)
    assert ours(0) == 1.0 and ours(3) > 1e-3  # the other convention: epochs 0..E-1


def test_a_longer_resumed_run_never_raises_the_learning_rate():
    for schedule in ("cosine", "cosine_ref"):
        done = LRPlan(schedule, 40)
        finished = done.extended(45, 40)  # a finished 40-epoch run, 5 more epochs
        last = done(39)
        assert all(finished(e) <= last + 1e-15 for e in range(40, 45)), schedule
        killed = LRPlan(schedule, 10).extended(20, 4)  # killed at epoch 4, now 20 epochs
        lrs = [killed(e) for e in range(4, 20)]
        assert all(b <= a + 1e-15 for a, b in zip(lrs, lrs[1:])), schedule
        assert lrs[0] <= LRPlan(schedule, 10)(3) + 1e-15
        assert lrs[-1] == pytest.approx(1e-3 if schedule == "cosine_ref" else lrs[-1])


class _Noisy(torch.utils.data.Dataset):
    """A random 'augmentation' per read, as an image transform does."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return torch.rand(3) + i, torch.tensor(float(i))


def test_workers_and_persistence_do_not_change_the_batches():
    one = [b[0] for b in batches(_Noisy(), 4, shuffle=True, seed=3, epoch=1)]
    two = [b[0] for b in batches(_Noisy(), 4, shuffle=True, seed=3, epoch=1, num_workers=2,
                                 prefetch_factor=3)]
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    other = [b[0] for b in batches(_Noisy(), 4, shuffle=True, seed=3, epoch=2)]
    assert not all(torch.equal(a, b) for a, b in zip(one, other))
    state = torch.get_rng_state()
    list(batches(_Noisy(), 4, shuffle=True, seed=3, epoch=1))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone


@pytest.mark.e2e
def test_fit_takes_extra_loggers():
    class Rows:
        def __init__(self):
            self.rows, self.closed = [], False

        def log_epoch(self, row):
            self.rows.append(dict(row))

        def close(self):
            self.closed = True

    x = torch.randn(60, 3)
    y = (x[:, 0] * 10 + 50).clamp(0, 99)
    bins = LabelBins.from_labels(y, bin_width=10, lower=0, upper=100)
    sink = Rows()
    seed_everything(0)
    fit(MLP(3, (4,)), (x, y), (x, y), bins, TrainConfig(epochs=2, batch_size=16, progress=False),
        loggers=[sink], log=lambda s: None)
    assert [r["epoch"] for r in sink.rows] == [1, 2] and "val_mae" in sink.rows[0]
    assert sink.closed
