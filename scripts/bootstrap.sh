#!/bin/sh
# Create (or reuse) the virtual environment at .venv with balanced-sam and everything the
# `bsam` command, the tests, the docs build and CI need (the `dev` extra). Safe to run again:
# it does nothing when .venv is complete.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.bsam-complete
# The default benchmark's images (rotated Fashion-MNIST): Debian's dataset-fashion-mnist package
# where apt is available to us (tried once per .venv; without it the bench falls back to
# torchvision's download when online, and otherwise says what to do).
FASHION=/usr/share/datasets/fashion-mnist
TRIED=.venv/.fashion-mnist-tried
if [ ! -d "$FASHION" ] && [ ! -f "$TRIED" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && SUDO="sudo -n"; }
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    echo "bootstrap: installing Debian's dataset-fashion-mnist (the default benchmark's images)" >&2
    { $SUDO apt-get install -y -q dataset-fashion-mnist \
      || { $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist; }; } \
      >/dev/null 2>&1 || echo "bootstrap: dataset-fashion-mnist could not be installed; \`bsam bench\` will try torchvision's download" >&2
  else
    echo "bootstrap: for the default benchmark's images run \`sudo apt-get install dataset-fashion-mnist\` (else torchvision downloads them when online)" >&2
  fi
  mkdir -p .venv && : > "$TRIED"
fi
# The stamp records what the environment was built from; a change to pyproject.toml rebuilds it.
WANT=$("$PY" -c 'import hashlib,sys; print(hashlib.sha256(open("pyproject.toml","rb").read()).hexdigest())')
# Fast path (well under a second): the stamp matches and the main packages are findable; they
# are not imported (importing torch alone takes seconds). The stamp is written only after a
# complete install, so presence is enough.
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && .venv/bin/python -c '
import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ("balanced_sam", "torch", "pytest", "mkdocs")))
' 2>/dev/null; then
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
