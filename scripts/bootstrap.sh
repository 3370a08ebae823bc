#!/bin/sh
# Create (or reuse) the virtual environment at .venv with balanced-sam and everything the
# `bsam` command and the tests need. Safe to run again: it does nothing when .venv is complete.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.bsam-complete
# The stamp records what the environment was built from; a change to pyproject.toml rebuilds it.
WANT=$("$PY" -c 'import hashlib,sys; print(hashlib.sha256(open("pyproject.toml","rb").read()).hexdigest())')
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && .venv/bin/python -c 'import balanced_sam, torch' 2>/dev/null; then
  exit 0
fi
echo "bootstrap: setting up .venv (first time: a few minutes, mostly PyTorch)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch 2.14.1 / torchvision 0.29.1 are the versions this project is tested with.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "$WANT" > "$STAMP"
echo "bootstrap: .venv ready" >&2
