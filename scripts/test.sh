#!/usr/bin/env bash
# Runs gm's test suite. Sets up .venv with PyTorch (for the gm <-> PyTorch interop test) unless
# GM_PYTHON already points at a Python with torch; GM_SKIP_TORCH=1 skips that step.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${GM_PYTHON:-}" ] && [ "${GM_SKIP_TORCH:-0}" != 1 ]; then
  if ! .venv/bin/python -c "import torch, safetensors, numpy" 2>/dev/null; then
    echo "test.sh: installing torch, numpy, safetensors into .venv (once)"
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check torch numpy safetensors
  fi
  export GM_PYTHON="$PWD/.venv/bin/python"
fi
cargo test --workspace "$@"
