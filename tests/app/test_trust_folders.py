"""Issue 17's folder and process cases, each reproduced: output folders that belong to the project
(items 3 and 4: a manifest, refusal of foreign folders, --overwrite removing exactly what bsam
wrote, symbolic links), workers that die with their bench (7), and one-line errors for a
read-only --out (13) and a full disk during a checkpoint write (14)."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _repo_scripts import ROOT
from _tables import abc_csv as table

from balanced_sam.cli import main

SRC = ROOT / "src"
MANIFEST = ".bsam-manifest.json"


@pytest.fixture()
def cfg(tmp_path) -> Path:
    csv = table(tmp_path / "t.csv")
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data: {{name: csv, path: {csv}, target: y, bin_width: 10, cap: 20}}\n"
                    "train: {method: sqinv, epochs: 2, batch_size: 64, progress: false}\n")
    return path


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (links not followed) with its bytes (``None``: a folder)."""
    got: dict[str, bytes | None] = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            got[rel] = b"-> " + os.readlink(p).encode()
        else:
            got[rel] = p.read_bytes() if p.is_file() else None
    return got


def one_line_error(err: str, *needles: str) -> None:
    lines = [s for s in err.splitlines() if s.strip()]
    assert lines and "Traceback" not in err, err
    assert lines[-1].startswith("bsam ") and ": error: " in lines[-1], err
    for n in needles:
        assert n in lines[-1], (n, err)


# ---------------------------------------------------------------------------- 3: foreign folders
@pytest.mark.e2e
def test_train_refuses_a_folder_holding_a_users_result_and_log(cfg, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "result.json").write_text('{"my": "result"}\n')
    (out / "log.csv").write_text("epoch,my_loss\n1,0.5\n2,0.25\n")
    before = snapshot(out)
    code, _, err = run(["train", "--config", cfg, "--out", out], capsys)
    assert code == 2
    one_line_error(err, str(out), "--out", "not written by bsam")
    assert snapshot(out) == before  # byte for byte, and nothing added
    code, _, err = run(["train", "--config", cfg, "--out", out, "--overwrite"], capsys)
    assert code == 2 and snapshot(out) == before  # --overwrite removes only what bsam wrote
    one_line_error(err, "--out")


@pytest.mark.e2e
def test_a_run_whose_checkpoints_were_deleted_is_not_clobbered(cfg, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", "--config", cfg, "--out", out], capsys)[0] == 0
    (out / "best.pt").unlink()
    (out / "last.pt").unlink()  # to save space
    before = snapshot(out)
    code, _, err = run(["train", "--config", cfg, "--out", out], capsys)
    assert code == 2
    one_line_error(err, "holds an earlier run", "--resume", "--overwrite")
    assert snapshot(out) == before
    listed = json.loads((out / MANIFEST).read_text())
    assert listed["kind"] == "run"
    assert {"best.pt", "last.pt", "log.csv", "result.json"} <= set(listed["entries"])
    # ours, so --overwrite replaces it
    assert run(["train", "--config", cfg, "--out", out, "--overwrite"], capsys)[0] == 0
    assert (out / "best.pt").exists() and (out / "last.pt").exists()
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0] == before["log.csv"].decode().splitlines()[0] and len(rows) == 1 + 2


@pytest.mark.e2e
def test_library_fit_refuses_a_foreign_folder(tmp_path):
    from balanced_sam.bins import LabelBins
    from balanced_sam.models import MLP
    from balanced_sam.train import TrainConfig, fit

    x, y = torch.randn(64, 3), torch.rand(64) * 50
    bins = LabelBins.from_labels(y, bin_width=10)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by bsam") as info:
        fit(MLP(3, (8,)), (x, y), (x, y), bins, TrainConfig(epochs=1, progress=False),
            out_dir=out, overwrite=True, log=lambda s: None)
    assert "out_dir" in str(info.value)
    assert sorted(os.listdir(out)) == ["notes.txt"]


@pytest.mark.e2e
def test_an_earlier_releases_run_is_adopted_on_resume_only(cfg, tmp_path, capsys):
    out = tmp_path / "old"
    assert run(["train", "--config", cfg, "--out", out], capsys)[0] == 0
    (out / MANIFEST).unlink(missing_ok=True)  # what the previous release left: no manifest
    before = snapshot(out)
    for extra in ([], ["--overwrite"]):
        code, _, err = run(["train", "--config", cfg, "--out", out, *extra], capsys)
        assert code == 2, extra
        one_line_error(err, "earlier bsam release", "--resume")
        assert snapshot(out) == before
    code, out_text, _ = run(["train", "--config", cfg, "--out", out, "--resume"], capsys)
    assert code == 0 and "adopted" in out_text
    entries = json.loads((out / MANIFEST).read_text())["entries"]
    assert {"best.pt", "last.pt", "log.csv", "result.json"} <= set(entries)
    # a folder whose "last.pt" is no checkpoint is not adopted, even on resume
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "last.pt").write_text("my notes, not a checkpoint")
    (fake / "log.csv").write_text("a,b\n1,2\n")
    before = snapshot(fake)
    code, _, err = run(["train", "--config", cfg, "--out", fake, "--resume"], capsys)
    assert code == 2 and snapshot(fake) == before
    one_line_error(err, "does not adopt it", str(fake / "last.pt"))


@pytest.mark.e2e
def test_a_bench_folder_is_not_a_run_folder(cfg, tmp_path, capsys):
    from balanced_sam.outputs import claim_folder

    out = tmp_path / "bench"
    claim_folder(out, "bench").record("results.json")
    (out / "results.json").write_text("{}")
    code, _, err = run(["train", "--config", cfg, "--out", out, "--overwrite"], capsys)
    assert code == 2 and (out / "results.json").read_text() == "{}"
    one_line_error(err, "holds a bsam bench, not a run")


# ---------------------------------------------------------------------------- the mechanism
def test_clear_removes_exactly_the_listed_entries(tmp_path):
    from balanced_sam.outputs import OwnedFolder, claim_folder

    root = tmp_path / "b"
    owned = claim_folder(root, "bench", resume=True)
    for rel in ("results.json", "plots/a.png"):
        p = owned.record(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rel)
    run_dir = root / "runs" / "x"
    owned.record("runs/x", "folder")
    inner = claim_folder(run_dir, "run")
    inner.record("best.pt").write_text("w")
    inner.record("tb", "tree").mkdir()
    (run_dir / "tb" / "events").write_text("e")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (run_dir / "tb" / "link").symlink_to(outside, target_is_directory=True)
    (run_dir / ".best.pt.123-0123abcd.tmp").write_text("half")  # an interrupted write
    (run_dir / "user.txt").write_text("u")  # a user's file in a run folder
    (root / "runs" / "y").mkdir()  # a folder bsam does not list
    (root / "runs" / "y" / "z.txt").write_text("z")
    (root / "plots" / "mine.png").write_text("m")
    removed = owned.clear()
    assert (outside / "keep.txt").read_text() == "keep"  # a link inside a tree: not followed
    assert snapshot(root) == {
        MANIFEST: (root / MANIFEST).read_bytes(), "plots": None, "plots/mine.png": b"m",
        "runs": None, "runs/x": None, f"runs/x/{MANIFEST}": (run_dir / MANIFEST).read_bytes(),
        "runs/x/user.txt": b"u", "runs/y": None, "runs/y/z.txt": b"z"}
    assert root / "results.json" in removed and run_dir / "tb" in removed
    assert OwnedFolder.read(root).entries == {"runs/x": "folder"}  # still ours, still listed
    assert OwnedFolder.read(run_dir).entries == {}
    with pytest.raises(ValueError, match="relative path inside"):
        owned.record("../escape")


def test_output_path_records_before_writing(tmp_path):
    from balanced_sam.io import write_json
    from balanced_sam.outputs import FolderNotOursError, OwnedFolder, claim_folder, output_path

    claim_folder(tmp_path / "r", "run")
    write_json({"a": 1}, output_path(tmp_path / "r" / "result.json"))
    assert OwnedFolder.read(tmp_path / "r").entries == {"result.json": "file"}
    (tmp_path / "plain").mkdir()
    with pytest.raises(FolderNotOursError, match="carries no"):
        output_path(tmp_path / "plain" / "x.json")


@pytest.mark.e2e
def test_rnc_lists_its_pretrain_folder_and_overwrite_clears_only_what_it_wrote(tmp_path):
    from balanced_sam.bins import LabelBins
    from balanced_sam.models import MLP
    from balanced_sam.outputs import OwnedFolder, RunExistsError
    from balanced_sam.train import TrainConfig, fit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 5, generator=g)
    y = (torch.exp(0.9 * x[:, 0]) * 6).clamp(0, 39)
    data = (x[:80], y[:80]), (x[80:], y[80:])
    bins = LabelBins.from_labels(data[0][1], bin_width=4, lower=0, upper=40)
    cfg = TrainConfig(method="rnc+sqinv", epochs=1, batch_size=32, progress=False,
                      device="cpu", plugins={"rnc": {"pretrain_epochs": 1}})
    out = tmp_path / "rnc"

    def train(**kw):
        return fit(MLP(5, (16,)), *data, bins, cfg, out_dir=out, log=lambda s: None, **kw)

    train()
    assert OwnedFolder.read(out).entries["pretrain"] == "folder"
    assert {"last.pt", "best.pt"} <= set(OwnedFolder.read(out / "pretrain").entries)
    with pytest.raises(RunExistsError, match="holds an earlier run"):
        train()
    (out / "pretrain" / "mine.txt").write_text("mine")
    train(overwrite=True)
    assert (out / "pretrain" / "mine.txt").read_text() == "mine"
    assert (out / "pretrain" / "last.pt").exists() and (out / "last.pt").exists()


# ---------------------------------------------------------------------------- 4: tb/ and links
@pytest.mark.e2e
def test_overwrite_never_deletes_a_users_tb_folder(cfg, tmp_path, capsys):
    # a folder that is not ours: refused, the user's tb/ kept
    mine = tmp_path / "mine"
    (mine / "tb").mkdir(parents=True)
    (mine / "tb" / "events.out.tfevents.1").write_bytes(b"my experiment")
    before = snapshot(mine)
    code, _, err = run(["train", "--config", cfg, "--out", mine, "--overwrite"], capsys)
    assert code == 2 and snapshot(mine) == before
    one_line_error(err, "--out")
    # a run folder of ours where the user put a tb/ that no run wrote: refused, nothing removed
    out = tmp_path / "run"
    assert run(["train", "--config", cfg, "--out", out], capsys)[0] == 0
    if "tb" not in json.loads((out / MANIFEST).read_text())["entries"]:
        (out / "tb").mkdir()
        (out / "tb" / "notes.txt").write_text("mine")
        before = snapshot(out)
        code, _, err = run(["train", "--config", cfg, "--out", out, "--overwrite"], capsys)
        assert code == 2 and snapshot(out) == before
        one_line_error(err, str(out / "tb"), "not written by bsam")


@pytest.fixture()
def linked_tb(cfg, tmp_path, capsys):
    """A run folder of ours whose tb/ is a link to a folder of the user's elsewhere."""
    out = tmp_path / "run"
    assert run(["train", "--config", cfg, "--out", out], capsys)[0] == 0
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    if (out / "tb").exists():
        import shutil

        shutil.rmtree(out / "tb")
    (out / "tb").symlink_to(target, target_is_directory=True)
    return out, target


@pytest.mark.e2e
def test_a_symlinked_tb_is_unlinked_by_overwrite_when_bsam_listed_it(linked_tb, cfg, capsys):
    from balanced_sam.outputs import OwnedFolder

    out, target = linked_tb
    OwnedFolder.read(out).record("tb", "tree")  # a run with tensorboard installed lists it
    code, _, err = run(["train", "--config", cfg, "--out", out, "--resume"], capsys)
    assert code == 2  # resume would write through the link: refused
    one_line_error(err, str(out / "tb"), "symbolic link")
    code, _, err = run(["train", "--config", cfg, "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "tb").is_symlink()
    assert snapshot(target) == {"precious.txt": b"keep me"}


@pytest.mark.e2e
def test_an_unlisted_symlinked_tb_is_refused_cleanly(linked_tb, cfg, capsys):
    out, target = linked_tb
    code, _, err = run(["train", "--config", cfg, "--out", out, "--overwrite"], capsys)
    assert code == 2
    one_line_error(err, str(out / "tb"))
    assert (out / "tb").is_symlink() and snapshot(target) == {"precious.txt": b"keep me"}


# ---------------------------------------------------------------------------- 7: workers
def _session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of the session ``sid``, whoever their parent is now."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            pids.append(int(d.name))
    return pids


def _is_worker(pid: int) -> bool:
    try:
        return b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_workers_die_with_a_killed_bench(tmp_path):
    csv = table(tmp_path / "t.csv", n=400)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    bench = subprocess.Popen(
        [sys.executable, "-m", "balanced_sam.cli", "bench", "--csv", str(csv), "--target", "y",
         "--methods", "vanilla,sqinv", "--seeds", "1", "--epochs", "3000", "--bin-width", "10",
         "--cap", "20", "--jobs", "2", "--no-plots", "--out", str(tmp_path / "b")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while time.monotonic() < deadline and bench.poll() is None:
            workers = [p for p in _session_members(bench.pid) if _is_worker(p)]
            runs = list((tmp_path / "b" / "runs").glob("*/log.csv"))
            if len(workers) >= 2 and runs:  # both started, and training
                break
            time.sleep(0.5)
        assert bench.poll() is None and len(workers) >= 2, "the bench's workers never started"
        os.kill(bench.pid, signal.SIGKILL)  # the parent only
        bench.wait()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20 and _session_members(bench.pid):
            time.sleep(0.5)
        alive = _session_members(bench.pid)
        assert not alive, f"still alive 20 s after the bench was killed: {alive}"
    finally:
        for pid in _session_members(bench.pid):  # never leave one behind, even on failure
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if bench.poll() is None:
            bench.kill()
            bench.wait()


def test_a_worker_exits_when_its_parent_is_gone(monkeypatch):
    """The portable watch (macOS has no PR_SET_PDEATHSIG): once the process that started the
    worker is no longer its parent, the worker calls os._exit; also when that happened before
    the watch was in place."""
    from balanced_sam import parallel

    exits: list[int] = []
    monkeypatch.setattr(parallel.os, "_exit", exits.append)
    monkeypatch.setattr(parallel, "WATCH_S", 0.05)
    parent = os.getppid()
    parallel._die_with_parent(parent + 10**6, kernel=False)  # already gone
    assert 1 in exits
    exits.clear()
    parallel._die_with_parent(parent, kernel=False)  # alive: nothing happens
    time.sleep(0.3)
    assert exits == []
    monkeypatch.setattr(parallel.os, "getppid", lambda: 1)  # re-parented: the parent died
    t0 = time.monotonic()
    while not exits and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    assert exits == [1]


# ---------------------------------------------------------------------------- 13: read-only
@pytest.fixture()
def read_only(monkeypatch):
    """``read_only(folder)``: writes under ``folder`` fail as on a read-only file system (by
    permission bits when not root; root writes anyway, so then by failing the opens)."""

    def make(folder: Path) -> Path:
        folder = folder.resolve()
        if os.geteuid() != 0:
            folder.chmod(0o555)  # (the test makes it writable again)
            return folder

        def under(p) -> bool:
            try:
                return Path(os.fspath(p)).resolve().is_relative_to(folder)
            except (TypeError, ValueError):
                return False

        def fail(p):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(p))

        real_os_open, real_path_open, real_mkdir = os.open, pathlib.Path.open, os.mkdir
        writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

        def os_open(p, flags, *a, **k):
            if flags & writing and under(p):
                fail(p)
            return real_os_open(p, flags, *a, **k)

        def path_open(self, mode="r", *a, **k):
            if any(c in mode for c in "wax+") and under(self):
                fail(self)
            return real_path_open(self, mode, *a, **k)

        def mkdir(p, *a, **k):
            if under(p) and not Path(p).exists():
                fail(p)
            return real_mkdir(p, *a, **k)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(pathlib.Path, "open", path_open)
        monkeypatch.setattr(os, "mkdir", mkdir)
        return folder

    return make


@pytest.mark.e2e
def test_eval_json_into_a_read_only_folder_is_one_line(cfg, tmp_path, capsys, read_only):
    out = tmp_path / "run"
    assert run(["train", "--config", cfg, "--out", out], capsys)[0] == 0
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(ro)
    try:
        code, text, err = run(["eval", "--checkpoint", out / "best.pt", "--json",
                               ro / "ev.json"], capsys)
    finally:
        ro.chmod(0o755)
    assert code == 2 and "test set of" in text  # the table was printed first
    one_line_error(err, f"cannot write {ro / 'ev.json'}")
    assert not any(ro.iterdir())  # no temporary file left either


@pytest.mark.e2e
def test_train_into_a_read_only_folder_is_one_line(cfg, tmp_path, capsys, read_only):
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(ro)
    try:
        code, _, err = run(["train", "--config", cfg, "--out", ro], capsys)
    finally:
        ro.chmod(0o755)
    assert code == 2
    one_line_error(err, f"cannot write {ro}")
    assert not any(ro.iterdir())


# ---------------------------------------------------------------------------- 14: full disk
@pytest.mark.e2e
@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    OSError(errno.ENOSPC, "No space left on device")], ids=["torch-writer", "enospc"])
def test_a_full_disk_during_a_checkpoint_write_is_one_line(cfg, tmp_path, capsys, monkeypatch,
                                                           failure):
    out = tmp_path / "run"
    real_save = torch.save
    seen = {"last": 0}
    good: dict[str, bytes] = {}

    def save(obj, f, *a, **k):
        name = Path(os.fspath(f)).name if isinstance(f, (str, os.PathLike)) else ""
        if name.startswith(".last.pt."):
            seen["last"] += 1
            if seen["last"] == 2:  # epoch 1's last.pt: the disk fills up half-way
                good["last.pt"] = (out / "last.pt").read_bytes()
                Path(f).write_bytes(b"PK\x03\x04half a zip")
                raise failure
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    code, _, err = run(["train", "--config", cfg, "--out", out], capsys)
    assert code == 2
    one_line_error(err, f"cannot write {out / 'last.pt'}")
    assert "disk full" in err or "No space left" in err
    assert (out / "last.pt").read_bytes() == good["last.pt"]  # the last good one, intact
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["epoch"] == 0
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # no half file left
