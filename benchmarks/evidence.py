"""The long-run evidence record: the default bench's data and model trained for 30 epochs.

The default ``bsam bench`` (15 epochs, 5 seeds) is sized to run in minutes on 2 CPU cores, and
at that length its paired intervals cannot see an effect of the paper's size. This script runs
the same data and model longer and with more seeds (sqinv, sam, imbsam, bsam; 30 epochs;
10 paired seeds), then writes what it found to ``docs/evidence/<label>/``:

* ``README.md``: the machine, the date, the commit, the command, the wall time, the bench's
  table, and the paired comparisons of every method against SQINV and against SAM with their
  power (the smallest effect the seeds could have detected, and the seeds the paper's 5% would
  need);
* ``results.json`` (the bench's record, with the comparisons and their power) and
  ``per_bin_mae.png`` / ``paired_differences.png``.

It is resumable: the runs go to ``--out`` (default ``runs/evidence-<label>``), and running the
same command again after an interruption trains only what is missing (``bsam bench``'s own
resume). It runs unchanged on a machine with a GPU (``--device cuda --label gpu``); the GPU's
figures then go beside the CPU's.

    python benchmarks/evidence.py                    # ~1-2 h on 2 CPU cores (--jobs 2)
    nohup python benchmarks/evidence.py > evidence.log 2>&1 &   # in the background
    python benchmarks/evidence.py --device cuda --label gpu --jobs 1
    python benchmarks/evidence.py --report-only      # rewrite docs/evidence from --out
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = "sqinv,sam,imbsam,bsam"
BASELINES = ("sqinv", "sam")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="cpu", help="names the record: docs/evidence/LABEL/")
    p.add_argument("--out", default=None, help="the bench's folder (default runs/evidence-LABEL)")
    p.add_argument("--docs", default=str(ROOT / "docs" / "evidence"),
                   help="where the record goes (default docs/evidence)")
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--seeds", default="10")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--effect", default="5%",
                   help="the effect of interest for the seeds-needed figure (default 5%%)")
    p.add_argument("--note", default="",
                   help="a line for the record, e.g. that other jobs shared the machine")
    p.add_argument("--report-only", action="store_true",
                   help="do not train; write the record from the finished runs in --out")
    return p.parse_args(argv)


def _bench_command(a: argparse.Namespace, out: Path) -> list[str]:
    return [sys.executable, "-m", "balanced_sam.cli", "bench", "--methods", a.methods,
            "--seeds", a.seeds, "--epochs", str(a.epochs), "--jobs", str(a.jobs),
            "--device", a.device, "--out", str(out)]


def _layout(results: dict) -> str:
    """The bench's ``layout`` record (``channels_last: auto``), or what a bench before it used."""
    lay = results.get("layout")
    if not isinstance(lay, dict):
        return "NCHW (a bench before the layout was measured: balanced_sam.layout)"
    name = "channels_last" if lay.get("channels_last") else "NCHW"
    if lay.get("nchw_ms") is not None:
        return (f"{name} (measured: NCHW {lay['nchw_ms']:.1f} ms, channels_last "
                f"{lay['channels_last_ms']:.1f} ms per step)")
    return f"{name} ({lay.get('reason', 'given')})"


def _machine(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    text = (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), "
            f"Python {platform.python_version()}, torch {torch.__version__}")
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _comparisons(results: dict, effect: str) -> str:
    from balanced_sam.stats import format_comparisons, paired_comparisons

    unit = results.get("config", {}).get("target_unit", "")
    blocks = []
    for base in BASELINES:
        if base not in results.get("methods", {}):
            continue
        cmp = paired_comparisons(results, base, effect=effect, unpaired="skip")
        blocks.append(format_comparisons(cmp, base, unit=unit, power=True))
    return "\n\n".join(blocks)


def write_record(a: argparse.Namespace, out: Path, seconds: float | None, table: str) -> Path:
    """Write docs/evidence/LABEL/ from the finished bench in ``out``."""
    results_path = out / "results.json"
    if not results_path.exists():
        raise SystemExit(f"evidence: {results_path} does not exist: run the bench first "
                         "(without --report-only)")
    results = json.loads(results_path.read_text())
    dest = Path(a.docs) / a.label
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "per_bin_mae.png", "paired_differences.png"):
        if (out / name).exists():
            shutil.copyfile(out / name, dest / name)
    cmd = " ".join(["python benchmarks/evidence.py", f"--label {a.label}", f"--jobs {a.jobs}",
                    f"--device {a.device}"])
    wall = f"{seconds / 3600:.2f} h ({seconds:.0f} s)" if seconds is not None else "not timed"
    lines = [
        f"# Long-run evidence ({a.label})", "",
        f"- date: {_dt.date.today().isoformat()}; commit {_commit()}",
        f"- machine: {_machine(a.device)}; device {a.device}, {a.jobs} run(s) at a time",
        f"- command: `{cmd}` (resumable: the same command continues an interrupted run)",
        f"- bench: `bsam bench --methods {a.methods} --seeds {a.seeds} --epochs {a.epochs}`",
        f"- wall time of this invocation: {wall}" + (f"; {a.note}" if a.note else ""),
        f"- memory layout of the runs: {_layout(results)}", "",
        "## Table", "", "```", table.strip() or "(see results.json)", "```", "",
        "## Paired comparisons with power", "",
        "Each line: method - baseline over paired seeds, 95% Student-t interval, wins; under "
        f"it, the smallest effect these seeds detect with 80% power, and the seeds an effect of "
        f"{a.effect} of the baseline's error would need.", "",
        "```", _comparisons(results, a.effect), "```", "",
        "Plots: `per_bin_mae.png` (test MAE per label bin), `paired_differences.png`.", "",
    ]
    (dest / "README.md").write_text("\n".join(lines))
    return dest


def _stdout_file(out: Path) -> Path:
    """Where the bench's printout is kept: beside its folder, which holds only what it wrote."""
    return out.parent / f"{out.name}.stdout.txt"


def _table_from(stdout: str) -> str:
    """The bench's printed table: from its header line to the paired differences."""
    keep, on = [], False
    for line in stdout.splitlines():
        if line.startswith("Paired differences"):
            break
        if "MAE" in line and "Few" in line:
            on = True
        if on:
            keep.append(line)
    return "\n".join(keep)


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    out = Path(a.out) if a.out else ROOT / "runs" / f"evidence-{a.label}"
    seconds = None
    table = ""
    if not a.report_only:
        cmd = _bench_command(a, out)
        print("evidence: " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=ROOT)
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        if proc.wait() != 0:
            print(f"evidence: the bench stopped (exit {proc.returncode}); run the same command "
                  "again to resume", file=sys.stderr)
            return proc.returncode
        seconds = time.perf_counter() - t0
        table = _table_from("".join(lines))
        _stdout_file(out).write_text("".join(lines))
    elif _stdout_file(out).exists():
        table = _table_from(_stdout_file(out).read_text())
    dest = write_record(a, out, seconds, table)
    print(f"evidence: wrote {dest}/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
