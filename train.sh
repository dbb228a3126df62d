#!/usr/bin/env bash
# The main job from a bare machine: install what is missing (the CPU build of torch first: an unpinned torch
# would pull a multi-GB CUDA build), then run `python train.py` with the arguments given.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$(command -v python3 || command -v python)}
"$PY" -m pip --version >/dev/null 2>&1 || "$PY" -m ensurepip --upgrade >/dev/null
if ! "$PY" -c "import psyche.recipe, psyche.sft, psyche.grpo.loop, matplotlib" 2>/dev/null; then
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install --quiet "torch==2.13.0"
  "$PY" -m pip install --quiet -e ".[plot]"
fi
exec "$PY" train.py "$@"
