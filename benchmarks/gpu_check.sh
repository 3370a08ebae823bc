#!/usr/bin/env bash
# The GPU path measured in one command (issue 21, item 3), from a checkout, nothing installed:
#
#   sh benchmarks/gpu_check.sh                    # on a machine with a CUDA GPU
#   sh benchmarks/gpu_check.sh --cpu-dry-run      # the same steps, tiny, on the CPU (the tests)
#
# Prints, then sums up at the end:
#   1. benchmarks/throughput.py on the AgeDB-DIR stand-in (ResNet-18 BSAM, bf16, channels_last,
#      the device pipeline): end-to-end img/s, the loader alone, the optimizer alone;
#   2. the wall time of `bsam bench --quick --device cuda` with the default --jobs (one per GPU)
#      and with --jobs 1.
# Options (or environment variables):
#   --cpu-dry-run (BSAM_GPU_CHECK_DRY_RUN=1)  run every step on the CPU, tiny: throughput.py
#       --smoke, and the bench on 1 method, 1 seed, 1 epoch; for the tests, not figures
#   --out DIR (BSAM_GPU_CHECK_OUT)  keep the JSON figures and the bench folders there
#       (default: a fresh temporary folder, removed at the end)
#   --data-root DIR (BSAM_DATA_ROOT)  Fashion-MNIST IDX files for the bench on a machine that is
#       offline (else the Debian folder, or ~/.cache/balanced_sam as the bench finds them)
#   --csv FILE  the AgeDB-DIR split for throughput.py (default: shared/data/agedb.csv if any)
#   PYTHON=...  the interpreter (default: python3); it needs torch, torchvision, numpy, PIL
# Exit status: 0 when every step ran, 2 without a GPU (and no --cpu-dry-run), else the failing
# step's.
set -eu

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
DRY=${BSAM_GPU_CHECK_DRY_RUN:-0}
OUT=${BSAM_GPU_CHECK_OUT:-}
DATA_ROOT=${BSAM_DATA_ROOT:-}
CSV=
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-dry-run) DRY=1 ;;
        --out) OUT=${2:?--out needs a folder}; shift ;;
        --data-root) DATA_ROOT=${2:?--data-root needs a folder}; shift ;;
        --csv) CSV=${2:?--csv needs a file}; shift ;;
        -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (allowed: --cpu-dry-run, --out DIR," \
                "--data-root DIR, --csv FILE, --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$DRY" in 0|1) ;; *) echo "gpu_check.sh: BSAM_GPU_CHECK_DRY_RUN must be 0 or 1," \
                             "got '$DRY'" >&2; exit 2 ;; esac
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$OUT" ] && [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    echo "gpu_check.sh: --out $OUT is not empty; give a new or empty folder" >&2; exit 2
fi

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check.sh: no Python interpreter '$PY' (set PYTHON=...)" >&2; exit 2
fi
# one interpreter start for both checks (torch imports slowly on a busy machine)
status=0
"$PY" - "$DRY" >&2 <<'EOF' || status=$?
import os, sys
try:
    import numpy, PIL, torch, torchvision  # noqa: F401
except ImportError as exc:
    print(f"gpu_check.sh: {sys.executable} lacks {exc.name} (it needs torch, torchvision, "
          "numpy and PIL; set PYTHON=... to an interpreter that has them)")
    sys.exit(3)
if sys.argv[1] == "0" and not torch.cuda.is_available():
    print(f"gpu_check.sh: no CUDA GPU visible to torch here (torch {torch.__version__}, built "
          f"for CUDA {torch.version.cuda}, CUDA_VISIBLE_DEVICES="
          f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); run it on a machine with a GPU, or "
          "pass --cpu-dry-run to rehearse the same steps on the CPU")
    sys.exit(4)
EOF
[ "$status" = 0 ] || exit 2
if [ "$DRY" = 0 ]; then DEVICE=cuda; else DEVICE=cpu; fi

TMP=
if [ -z "$OUT" ]; then
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/bsam-gpu-check.XXXXXX")
    OUT=$TMP
    trap 'rm -rf "$TMP"' EXIT
fi
mkdir -p "$OUT"

now() { "$PY" -c "import time; print(f'{time.time():.3f}')"; }
echo "== gpu_check.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit" \
     "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'), device $DEVICE" \
     "$([ "$DRY" = 1 ] && echo '(CPU DRY RUN: tiny, not figures)')"
"$PY" -c "
import os, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), GPU {gpu}, '
      f'{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}')"

# 1. throughput.py: end to end, the loader alone, the optimizer alone (bf16 on the GPU)
echo; echo "== 1. benchmarks/throughput.py (AgeDB-DIR stand-in)"
set -- --json "$OUT/throughput.json" --parts optimizer,loader,end-to-end --pipelines device
[ -n "$CSV" ] && set -- "$@" --csv "$CSV"
if [ "$DRY" = 1 ]; then
    set -- "$@" --smoke --threads 1
else
    set -- "$@" --device cuda --amp bf16 --channels-last on
fi
"$PY" "$REPO/benchmarks/throughput.py" "$@"

# 2. the bench's wall time on the device, default --jobs and --jobs 1
bench() {  # $1: a label (folder name), then bsam bench's extra arguments
    label=$1; shift
    set -- --quick --device "$DEVICE" --no-plots --out "$OUT/$label" "$@"
    [ -n "$DATA_ROOT" ] && set -- "$@" --data-root "$DATA_ROOT"
    [ "$DRY" = 1 ] && set -- "$@" --methods bsam --seeds 1 --epochs 1 --threads 1
    echo; echo "== 2. bsam bench $*"
    t0=$(now)
    "$PY" -m balanced_sam.cli bench "$@"
    t1=$(now)
    "$PY" -c "print(f'{$t1 - $t0:.1f}')" > "$OUT/$label.seconds"
    echo "wall time: $(cat "$OUT/$label.seconds") s"
}
bench bench-default-jobs
bench bench-jobs1 --jobs 1

# the summary
echo; echo "== summary (device $DEVICE$([ "$DRY" = 1 ] && echo ', CPU dry run: not figures'))"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
res = json.loads((out / "throughput.json").read_text())
dev = res["pipelines"].get("device", {})
def fig(v, unit="img/s"):
    return f"{v:.0f} {unit}" if isinstance(v, (int, float)) else "-"
print(f"throughput.py on {res['device_name']}: end to end {fig(dev.get('end_to_end_img_s'))}, "
      f"loader alone {fig(dev.get('loader_img_s'))}, "
      f"optimizer alone {fig(res.get('optimizer_img_s'))} (amp {res['config']['amp']})")
for label, what in (("bench-default-jobs", "default --jobs"), ("bench-jobs1", "--jobs 1")):
    print(f"bsam bench --quick, {what}: {(out / (label + '.seconds')).read_text().strip()} s")
EOF
echo "gpu_check.sh: done$([ -z "$TMP" ] && echo "; figures in $OUT")"
