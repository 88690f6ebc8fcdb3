#!/usr/bin/env bash
# Runs gm's test suite. Sets up .venv with the peers the tests compare against — PyTorch (the
# gm <-> PyTorch interop test), diffusers (samplers and the imported UNet), tensorboard (its
# event reader checks gm's event files), torchmetrics and prdc (KID, precision/recall) — unless
# GM_PYTHON already points at a Python with them; GM_SKIP_TORCH=1 skips that step. With GM_REQUIRE_PEERS=1
# (as .ci/run sets) a peer test fails instead of skipping when its peer is missing.
# Then runs the model and core tests a second time with GM_KERNELS=portable: the composition of
# candle ops that CUDA and Metal run, on the CPU (GM_SKIP_PORTABLE=1 skips that pass).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${GM_PYTHON:-}" ] && [ "${GM_SKIP_TORCH:-0}" != 1 ]; then
  if ! .venv/bin/python -c "import torch, safetensors, numpy, diffusers, tensorboard, torchmetrics, prdc" 2>/dev/null; then
    echo "test.sh: installing torch, numpy, safetensors, diffusers, tensorboard, torchmetrics, prdc into .venv (once)"
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check torch numpy safetensors diffusers tensorboard torchmetrics prdc
  fi
  export GM_PYTHON="$PWD/.venv/bin/python"
fi
# gm-py is a Python extension (libpython unlinked): Python tests it below.
cargo test --workspace --exclude gm-py "$@"
if [ "${GM_SKIP_PORTABLE:-0}" != 1 ] && [ $# -eq 0 ]; then
  echo "test.sh: the model and core tests again on the portable path (GM_KERNELS=portable)"
  # --workspace keeps the feature set of the first pass, so nothing is rebuilt.
  GM_KERNELS=portable cargo test --workspace --exclude gm-py --lib --test autoregressive --test diffusion \
    --test flows --test gan --test text --test conv --test conv_second_order --test ops \
    --test norm --test cnf
fi
if [ $# -eq 0 ]; then
  # gm from Python: the extension in the dev profile, in the workspace's target folder, without
  # the HTTPS download stack; then a user's calls (train, load, sample, log_prob, eval, errors).
  if [ -n "${GM_PYTHON:-}" ] && "$GM_PYTHON" -c "import numpy" 2>/dev/null; then
    echo "test.sh: gm's Python extension (cargo build -p gm-py), called from Python"
    start=$(date +%s)
    cargo build -p gm-py
    "$GM_PYTHON" scripts/test_gm_py.py target/debug/libgm_py.so
    echo "test.sh: the Python extension took $(( $(date +%s) - start )) s"
  elif [ "${GM_REQUIRE_PEERS:-0}" = 1 ]; then
    echo "test.sh: GM_REQUIRE_PEERS=1 but no Python with numpy for gm's extension" >&2
    exit 1
  else
    echo "test.sh: SKIPPED gm's Python extension test (no GM_PYTHON with numpy)"
  fi
fi
