#!/usr/bin/env bash
# Create .venv-trl (repository root, beside .venv, outside the code tree): Hugging Face TRL (GRPOTrainer) for bench/trl_grpo.py only.
# TRL is never a dependency of streamrl itself. The CPU wheel of torch is installed
# first so that TRL's transformers/accelerate do not pull CUDA packages; TRL then
# brings the transformers version it supports (recorded in the results).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${TRL_VENV:-$(dirname "$HERE")/.venv-trl}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TRL_SPEC="${TRL_SPEC:-trl==1.16.0}"
if [ -f "$VENV/.installed-streamrl" ]; then
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$VENV/bin/python" -m pip install --quiet "$TRL_SPEC" vaderSentiment
# streamrl itself without its dependencies: the worker imports its reward function
"$VENV/bin/python" -m pip install --quiet --no-deps -e "$(dirname "$HERE")"
"$VENV/bin/python" -c "import trl, transformers, torch; print('trl', trl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
touch "$VENV/.installed-streamrl"
