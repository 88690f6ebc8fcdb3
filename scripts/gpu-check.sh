#!/usr/bin/env bash
# One pass that proves a CUDA build of gm on a GPU machine, in priority order, each section under
# its own time limit, appending its results to OUT as it goes (a cut run still leaves what it did):
#   1) the CUDA libraries found, then `gm doctor --device cuda` (every family against the CPU);
#   2) `gm bench` train steps next to their PyTorch twins on the same GPU (scripts/bench_vs_torch.py);
#   3) one epoch of Fashion-MNIST (60,000 images) for the VAE and the DDPM UNet, with samples;
#   4) mixed precision (`--sections precision`, needs --fashion): train steps in f32, bf16 and f16
#      next to PyTorch's AMP, then the conv VAE trained in f32, bf16, and f16 from a loss scale of
#      1e12 (a forced overflow: the first steps must be skipped and the scale lowered), and the
#      DDPM in f32 and bf16, each evaluated in its units;
#   5) NCCL (`--sections nccl`, a `--nccl` build, needs --fashion): the conv VAE as one rank of a
#      WORLD_SIZE=1 NCCL launch, against the plain run: the checkpoints must be the same bytes.
#
#   bash scripts/gpu-check.sh --gm GM_BINARY[.gz] --out DIR [--fashion DIR] [--device cuda]
#        [--sections doctor,bench,epochs,precision,nccl]   (default: doctor,bench,epochs)
#
# Needs on the GPU machine: the NVIDIA driver, Python 3 with PyTorch (CUDA) and numpy — PyTorch's
# CUDA 13 wheels also provide libcublas, libcurand and libcudart for gm. Nothing is downloaded.
# `--device cpu` with a CPU build rehearses the whole script on any machine (GM_CHECK_QUICK=1
# shortens the bench and the epochs so that a rehearsal takes a few minutes).
set -uo pipefail

GM="" OUT="" FASHION="" DEVICE=cuda SECTIONS="doctor,bench,epochs"
while [ $# -gt 0 ]; do
    case "$1" in
        --sections) SECTIONS="$2"; shift 2 ;;
        --gm) GM="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --fashion) FASHION="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$GM" ] && [ -n "$OUT" ] || { echo "usage: gpu-check.sh --gm GM[.gz] --out DIR [--fashion DIR] [--device cuda|cpu]" >&2; exit 2; }
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
QUICK="${GM_CHECK_QUICK:-0}"
say() { echo "== $(date +%T) $*" | tee -a "$LOG"; }
want() { [[ ",$SECTIONS," == *",$1,"* ]]; }

if [[ "$GM" == *.gz ]]; then
    gunzip -c "$GM" > /tmp/gm-check-bin && chmod +x /tmp/gm-check-bin && GM=/tmp/gm-check-bin
fi

# --- 1) environment and the doctor -------------------------------------------------------------
say "environment"
{
    echo "host: $(uname -srm); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); cores: $(nproc)"
    if [ "$DEVICE" = cuda ]; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
        # gm links libcuda (the driver's), libcublas/libcublasLt, libcurand and libcudart.
        dirs=""
        for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13 libnccl.so.2; do
            f="$(find /usr/local/nvidia /usr/lib /usr/lib64 /usr/local /opt -name "$lib" 2>/dev/null | head -n 1)"
            if [ -n "$f" ]; then echo "found $lib: $f"; dirs="$dirs:$(dirname "$f")"; else echo "MISSING $lib"; fi
        done
        export LD_LIBRARY_PATH="${dirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
        ldd "$GM" | grep -E 'not found|cuda|cublas|curand|cudart' || true
    fi
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1
} 2>&1 | tee "$OUT/env.txt" | tee -a "$LOG"
# The exports inside the braces ran in a subshell of the pipe: repeat the search here.
if [ "$DEVICE" = cuda ]; then
    dirs=""
    for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13 libnccl.so.2; do
        f="$(find /usr/local/nvidia /usr/lib /usr/lib64 /usr/local /opt -name "$lib" 2>/dev/null | head -n 1)"
        [ -n "$f" ] && dirs="$dirs:$(dirname "$f")"
    done
    export LD_LIBRARY_PATH="${dirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

if want doctor; then
say "gm doctor --device $DEVICE"
timeout 150 "$GM" doctor --device "$DEVICE" --json "$OUT/doctor.jsonl" > "$OUT/doctor.txt" 2> >(tee -a "$LOG" >&2)
echo "doctor exit: $?" | tee -a "$OUT/doctor.txt" "$LOG"
cat "$OUT/doctor.txt" >> "$LOG"
fi

# --- 2) train steps next to PyTorch ------------------------------------------------------------
if want bench; then
say "gm bench vs PyTorch on $DEVICE"
STEPS=20; WARM=5; REP=2
[ "$QUICK" = 1 ] && { STEPS=2; WARM=1; REP=1; }
timeout 170 env PYTHONUNBUFFERED=1 python3 "$ROOT/scripts/bench_vs_torch.py" --device "$DEVICE" --gm "$GM" \
    --what models --threads "$(nproc)" --steps $STEPS --warmup $WARM --repeats $REP --presets \
    models/vae-mnist.toml models/vae-conv-mnist.toml models/pixelcnn-mnist.toml models/ddpm-mnist.toml \
    models/realnvp-mnist.toml models/dcgan-mnist.toml > "$OUT/bench.txt" 2> >(tee -a "$LOG" >&2)
echo "bench exit: $?" | tee -a "$OUT/bench.txt" "$LOG"
cat "$OUT/bench.txt" >> "$LOG"
fi

# --- 3) one epoch of Fashion-MNIST -------------------------------------------------------------
if [ -n "$FASHION" ] && want epochs; then
    for spec in "vae-mnist 128 60" "ddpm-mnist 64 120"; do
        set -- $spec
        preset=$1 batch=$2 limit=$3
        steps=$(( (60000 + batch - 1) / batch ))
        [ "$QUICK" = 1 ] && steps=10
        say "one epoch: $preset on Fashion-MNIST, $steps steps of $batch"
        run="/tmp/gm-check-$preset"
        rm -rf "$run"
        t0=$(date +%s.%N)
        timeout "$limit" "$GM" train --config "$ROOT/models/$preset.toml" --data-dir "$FASHION" --out "$run" \
            --device "$DEVICE" --quiet --set train.steps=$steps --set train.eval_every=0 \
            --set train.sample_every=0 --set train.checkpoint_every=0 --set train.eval_images=500 \
            --set train.warmup_steps=10 > "$OUT/epoch-$preset.json" 2> >(tee -a "$LOG" >&2)
        rc=$?
        t1=$(date +%s.%N)
        echo "epoch $preset: exit $rc, wall $(awk "BEGIN{printf \"%.1f\", $t1 - $t0}") s (data loading, $steps steps, final evaluation, samples, checkpoint)" | tee -a "$OUT/epochs.txt" "$LOG"
        tail -n 3 "$run/metrics.jsonl" 2>/dev/null >> "$OUT/epochs.txt"
        cat "$OUT/epoch-$preset.json" >> "$OUT/epochs.txt" 2>/dev/null
        rm -f "$OUT/epoch-$preset.json"
        last="$(ls "$run"/samples/step-*.png 2>/dev/null | tail -n 1)"
        [ -n "$last" ] && cp "$last" "$OUT/samples-$preset.png"
    done
fi
# --- 4) mixed precision ------------------------------------------------------------------------
if want precision; then
    say "train steps in f32, bf16, f16 next to PyTorch AMP on $DEVICE"
    STEPS=20; WARM=5
    [ "$QUICK" = 1 ] && { STEPS=2; WARM=1; }
    timeout 240 env PYTHONUNBUFFERED=1 python3 "$ROOT/scripts/bench_vs_torch.py" --device "$DEVICE" --gm "$GM" \
        --what models --threads "$(nproc)" --steps $STEPS --warmup $WARM --repeats 1 --precision f32 bf16 f16 \
        --presets models/vae-conv-mnist.toml models/pixelcnn-mnist.toml models/ddpm-mnist.toml \
        > "$OUT/precision-bench.txt" 2> >(tee -a "$LOG" >&2)
    echo "precision bench exit: $?" | tee -a "$OUT/precision-bench.txt" "$LOG"
    cat "$OUT/precision-bench.txt" >> "$LOG"
    if [ -n "$FASHION" ]; then
        for spec in "vae-conv-mnist f32 400" "vae-conv-mnist bf16 400" "vae-conv-mnist f16 400 1e12" \
                    "ddpm-mnist f32 300" "ddpm-mnist bf16 300"; do
            set -- $spec
            preset=$1 prec=$2 steps=$3 scale=${4:-65536}
            [ "$QUICK" = 1 ] && steps=6
            say "train $preset in $prec ($steps steps, initial loss scale $scale) on Fashion-MNIST"
            run="/tmp/gm-prec-$preset-$prec"
            rm -rf "$run"
            t0=$(date +%s.%N)
            timeout 120 "$GM" train --config "$ROOT/models/$preset.toml" --data-dir "$FASHION" --out "$run" \
                --device "$DEVICE" --quiet --set train.steps=$steps --set train.eval_every=0 \
                --set train.sample_every=0 --set train.checkpoint_every=0 --set train.eval_images=2000 \
                --set train.warmup_steps=10 --set train.log_every=1 --set "train.precision=\"$prec\"" \
                --set train.loss_scale=$scale > "$OUT/p.json" 2> "$OUT/p.err"
            rc=$?
            t1=$(date +%s.%N)
            {
                echo "$preset $prec: exit $rc, wall $(awk "BEGIN{printf \"%.1f\", $t1 - $t0}") s"
                grep -E "mixed precision|error" "$OUT/p.err"
                python3 - "$run/metrics.jsonl" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in recs if "loss" in r and "split" not in r]
test = [r for r in recs if r.get("split") == "test"]
first, last = steps[0], steps[-1]
k = 20 if len(steps) >= 40 else 1
mean = lambda rs: sum(r["loss"] for r in rs) / len(rs)
print(f"  loss: first {first['loss']:.2f}, mean of the first {k} {mean(steps[:k]):.2f}, of the last {k} {mean(steps[-k:]):.2f}")
if "loss_scale" in last:
    skipped = [r["step"] for r in steps if r.get("skipped_steps", 0) > 0][:1]
    print(f"  loss scale: {first['loss_scale']:g} after step 1 -> {last['loss_scale']:g} at step {last['step']}; "
          f"{last['skipped_steps']} steps skipped for overflow")
if test:
    t = test[-1]
    print("  test: " + ", ".join(f"{k} {v:.4f}" for k, v in t.items() if k not in ("step", "split")))
PY
            } 2>&1 | tee -a "$OUT/precision-train.txt" "$LOG"
            rm -f "$OUT/p.json" "$OUT/p.err"
        done
    fi
fi
# --- 5) NCCL, world size 1 --------------------------------------------------------------------
if want nccl && [ -n "$FASHION" ]; then
    say "NCCL world size 1 against the plain run"
    for mode in plain nccl; do
        rm -rf "/tmp/gm-nccl-$mode"
        envs=()
        [ "$mode" = nccl ] && envs=(WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29517)
        timeout 120 env "${envs[@]}" "$GM" train --config "$ROOT/models/vae-conv-mnist.toml" --data-dir "$FASHION" \
            --out "/tmp/gm-nccl-$mode" --device "$DEVICE" --quiet --set train.steps=50 --set train.eval_every=0 \
            --set train.sample_every=0 --set train.checkpoint_every=0 --set train.eval_images=500 \
            > /dev/null 2> "$OUT/nccl-$mode.err"
        echo "$mode: exit $?" | tee -a "$OUT/nccl.txt" "$LOG"
        grep -E "ranks|error" "$OUT/nccl-$mode.err" | tee -a "$OUT/nccl.txt" "$LOG"
    done
    if cmp -s /tmp/gm-nccl-plain/checkpoints/step-00000050.safetensors /tmp/gm-nccl-nccl/checkpoints/step-00000050.safetensors; then
        echo "NCCL world size 1: checkpoint identical to the plain run" | tee -a "$OUT/nccl.txt" "$LOG"
    else
        echo "NCCL world size 1: checkpoint DIFFERS from the plain run" | tee -a "$OUT/nccl.txt" "$LOG"
    fi
fi
say "done"
