#!/usr/bin/env bash
# Builds the `gm` binary with CUDA on a machine that may have no GPU and no CUDA install:
# NVIDIA's CUDA 13.0 compiler and runtime wheels from PyPI go into a local folder, a link stub
# stands in for the driver library (libcuda.so.1, which only a GPU machine has), and cargo builds
# with `--features cuda` for compute capability 9.0 (H100/H200) unless CUDA_COMPUTE_CAP says
# otherwise. Idempotent: a second run reuses the wheels and the stub and rebuilds incrementally.
#
#   bash scripts/build-cuda.sh                 # -> target/cuda/release/gm (CUDA build)
#   bash scripts/build-cuda.sh --nccl          # with NCCL: gm train --ranks N over N GPUs
#   CUDA_COMPUTE_CAP=86 bash scripts/build-cuda.sh
#   GM_CUDA_DIR=/opt/gm-cuda bash scripts/build-cuda.sh --tests   # also build the test binaries
#
# --nccl compiles with candle's `nccl` feature (cudarc loads libnccl.so.2 at run time, so nothing
# more is needed to build) and installs NVIDIA's NCCL wheel (`nvidia-nccl-cu13`, 200 MB) into the
# venv for running here; a GPU machine with PyTorch's CUDA wheels has libnccl.so.2 already.
#
# With a normal CUDA toolkit installed (nvcc on PATH, CUDA_HOME set, a real libcuda), skip this
# script: `cargo build --release -p gm-train --features cuda` is all it takes.
#
# At run time the binary needs the driver's libcuda.so.1 and libcublas/libcublasLt (13),
# libcurand (10), libcudart (13): on a GPU machine with PyTorch's CUDA wheels, point
# LD_LIBRARY_PATH at their folders (`find / -name libcublas.so.13`).
set -euo pipefail
TESTS=0 NCCL=0
for a in "$@"; do
    case "$a" in
        --tests) TESTS=1 ;;
        --nccl) NCCL=1 ;;
        *) echo "build-cuda: unknown argument $a (--tests, --nccl)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${GM_CUDA_DIR:-$ROOT/.cuda}"
PY="${PYTHON:-python3}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"

if [ ! -x "$DIR/venv/bin/pip" ]; then
    echo "build-cuda: creating $DIR/venv"
    "$PY" -m venv "$DIR/venv"
fi
SITE="$("$DIR/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
C="$SITE/nvidia/cu13"
if [ ! -x "$C/bin/nvcc" ]; then
    echo "build-cuda: installing the CUDA 13.0 wheels into $DIR/venv"
    "$DIR/venv/bin/pip" install --quiet --no-deps \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
        nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
fi
[ -x "$C/bin/nvcc" ] || { echo "build-cuda: no nvcc under $C after installing the wheels" >&2; exit 1; }

# Unversioned names for the linker.
( cd "$C/lib"
  for l in cudart cublas cublasLt nvrtc; do [ -e "lib$l.so" ] || ln -sf "lib$l.so.13" "lib$l.so"; done
  [ -e libcurand.so ] || ln -sf libcurand.so.10 libcurand.so )

# The link stub: every cu* entry point cudarc declares, as an empty function, soname libcuda.so.1.
STUB="$C/lib/stubs/libcuda.so"
if [ ! -e "$STUB" ]; then
    echo "build-cuda: generating the libcuda link stub"
    (cd "$ROOT" && cargo fetch --quiet)
    SYS="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-*/src/driver/sys/mod.rs' | sort | tail -n 1)"
    [ -n "$SYS" ] || { echo "build-cuda: cudarc's driver/sys/mod.rs not found (cargo fetch failed?)" >&2; exit 1; }
    mkdir -p "$C/lib/stubs"
    grep -oE '^ *pub unsafe fn cu[A-Za-z0-9_]+\(' "$SYS" | sed -E 's/.*fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
        | awk '{print "void " $1 "(void) {}"}' > "$C/lib/stubs/stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB" "$C/lib/stubs/stub.c"
fi

export CUDA_HOME="$C" PATH="$C/bin:$PATH"
export LIBRARY_PATH="$C/lib:$C/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
cd "$ROOT"
# A target folder of its own: the CPU build in target/ stays as it is.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cuda}"
FEATURES=cuda
if [ "$NCCL" = 1 ]; then
    FEATURES="cuda nccl"
    if ! ls "$SITE"/nvidia/nccl/lib/libnccl.so.2 >/dev/null 2>&1 && ! ls "$SITE"/nvidia/cu13/lib/libnccl.so.2 >/dev/null 2>&1; then
        echo "build-cuda: installing NCCL (nvidia-nccl-cu13) into $DIR/venv"
        "$DIR/venv/bin/pip" install --quiet --no-deps nvidia-nccl-cu13==2.32.6
    fi
    NCCL_LIB="$(find "$SITE/nvidia" -name 'libnccl.so.2' | head -n 1)"
    [ -n "$NCCL_LIB" ] || { echo "build-cuda: no libnccl.so.2 after installing nvidia-nccl-cu13" >&2; exit 1; }
    # cudarc links -lnccl: an unversioned name for the linker; at run time libnccl.so.2 is found
    # on LD_LIBRARY_PATH (the wheel's folder here, PyTorch's NCCL on a GPU machine).
    ln -sf libnccl.so.2 "$(dirname "$NCCL_LIB")/libnccl.so"
    export LIBRARY_PATH="$(dirname "$NCCL_LIB"):$LIBRARY_PATH"
    echo "build-cuda: NCCL: $NCCL_LIB"
fi
echo "build-cuda: cargo build --release -p gm-train --features \"$FEATURES\" (compute capability $CUDA_COMPUTE_CAP)"
cargo build --release -p gm-train --features "$FEATURES"
if [ "$TESTS" = 1 ]; then
    cargo test --release --workspace --features "$FEATURES" --no-run
fi
echo "build-cuda: built $CARGO_TARGET_DIR/release/gm"
