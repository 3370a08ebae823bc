"""benchmarks/gpu_check.sh (issue 21): the GPU path in one command. Here, without a GPU, it must
refuse clearly, and its --cpu-dry-run must run every step (tiny) and sum them up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _repo_scripts import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable,
                                                "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_fails_clearly():
    r = run()
    assert r.returncode == 2
    assert "no CUDA GPU visible to torch" in r.stderr and "--cpu-dry-run" in r.stderr
    assert "== 1." not in r.stdout  # nothing ran


def test_bad_arguments_are_refused_by_name(tmp_path):
    r = run("--gpus", "2")
    assert r.returncode == 2 and "unknown argument '--gpus'" in r.stderr
    r = run(env={"BSAM_GPU_CHECK_DRY_RUN": "yes"})
    assert r.returncode == 2 and "BSAM_GPU_CHECK_DRY_RUN must be 0 or 1" in r.stderr
    (tmp_path / "kept.txt").write_text("a user's file")
    r = run("--cpu-dry-run", "--out", str(tmp_path))
    assert r.returncode == 2 and "is not empty" in r.stderr
    assert (tmp_path / "kept.txt").read_text() == "a user's file"
    r = run("--cpu-dry-run", env={"PYTHON": "/no/such/python"})
    assert r.returncode == 2 and "no Python interpreter" in r.stderr


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step_and_sums_up(tmp_path):
    out = tmp_path / "figures"
    r = run("--cpu-dry-run", "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = r.stdout
    for heading in ("== 1. benchmarks/throughput.py", "== 2. bsam bench --quick --device cpu",
                    "--jobs 1", "== summary (device cpu, CPU dry run: not figures)"):
        assert heading in text, heading
    res = json.loads((out / "throughput.json").read_text())
    dev = res["pipelines"]["device"]
    for v in (dev["end_to_end_img_s"], dev["loader_img_s"], res["optimizer_img_s"]):
        assert v > 0
    summary = text.split("== summary")[1]
    assert f"end to end {dev['end_to_end_img_s']:.0f} img/s" in summary
    assert f"optimizer alone {res['optimizer_img_s']:.0f} img/s" in summary
    for label in ("bench-default-jobs", "bench-jobs1"):
        seconds = float((out / f"{label}.seconds").read_text())
        assert seconds > 0
        assert json.loads((out / label / "results.json").read_text())
    assert "default --jobs:" in summary and "--jobs 1:" in summary
