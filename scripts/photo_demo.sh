#!/usr/bin/env bash
# The photograph-patch demo: every image family of gm trained on 32x32 RGB patches of the two
# sample photographs scikit-learn ships (scripts/photo_patches.py), each evaluated on the held-out
# right fifth of the photographs in bits per dimension over all 3*32*32 values, with a sample grid.
#
#   bash scripts/photo_demo.sh [DATA_DIR] [OUT_DIR]     # defaults: data/photos32 runs/photos
#
# The MNIST presets with the colour shape and smaller widths and step counts (demonstration
# budgets, minutes per family on one CPU core, far from converged); GM (default
# target/release/gm) and PYTHON (default python3) may be set, and FAMILIES="pixelcnn ddpm ..."
# runs only those (two invocations with disjoint lists use two cores). Writes OUT_DIR/NAME (a run
# directory per family), OUT_DIR/NAME.json (its gm eval: IWAE-100 for the VAE) and OUT_DIR/NAME.png
# (16 samples).
set -euo pipefail
GM=${GM:-target/release/gm}
PYTHON=${PYTHON:-python3}
DATA=${1:-data/photos32}
OUT=${2:-runs/photos}
[ -f "$DATA/train.npy" ] || "$PYTHON" scripts/photo_patches.py "$DATA"
mkdir -p "$OUT"
common=(--data-dir "$DATA" --set 'data.dataset="npy:photos32"' --set 'model.image_shape=[3,32,32]'
  --set train.eval_images=100 --set train.sample_n=16 --quiet)

# run NAME EVAL_IMAGES [gm train arguments...]: trains (unless done), evaluates, samples.
run() {
  local name=$1 n=$2
  shift 2
  if [ -n "${FAMILIES:-}" ] && [[ " $FAMILIES " != *" $name "* ]]; then return; fi
  if [ ! -d "$OUT/$name/checkpoints" ]; then
    local t0=$SECONDS
    "$GM" train --out "$OUT/$name" "${common[@]}" "$@"
    echo "$name: trained in $((SECONDS - t0)) s" >&2
  fi
  "$GM" eval --checkpoint "$OUT/$name" --data-dir "$DATA" --max-images "$n" --iwae-k 100 \
    --set eval.max_pairs=2000 > "$OUT/$name.json"
  "$GM" sample --checkpoint "$OUT/$name" --n 16 --out "$OUT/$name.png"
  echo "$name: $(cat "$OUT/$name.json")" >&2
}

unet=(--set model.unet.base_channels=16 --set model.unet.groups=4 --set train.batch_size=32)
run pixelcnn 0 --config models/pixelcnn-256-mnist.toml --set model.channels=32 \
  --set model.res_blocks=4 --set model.head_channels=32 --set train.batch_size=16 --set train.steps=800
run gated-pixelcnn 0 --config models/gated-pixelcnn-mnist.toml --set model.output='"categorical"' \
  --set data.binarize='"none"' --set model.channels=24 --set model.layers=5 \
  --set model.head_channels=32 --set train.batch_size=16 --set train.steps=800
run vae-conv 0 --config models/vae-conv-mnist.toml --set model.likelihood='"gaussian"' \
  --set data.binarize='"none"' --set data.dequantize=true --set train.lr=3e-3 --set train.steps=2000
run realnvp 0 --config models/realnvp-mnist.toml --set model.hidden=16 --set model.num_blocks=1 \
  --set train.batch_size=32 --set train.steps=500
run ddpm 100 --config models/ddpm-mnist.toml "${unet[@]}" --set train.steps=500
run flow-matching 20 --config models/flow-matching-mnist.toml "${unet[@]}" --set train.steps=500
run score 20 --config models/score-mnist.toml "${unet[@]}" --set train.steps=500 \
  --set 'model.likelihood_solver={method="dopri5",rtol=1e-5,atol=1e-5}'
run cnf 20 --config models/cnf-mnist.toml --set 'model.hidden=[32,32,32]' --set train.batch_size=16 \
  --set train.steps=100
run dcgan 0 --config models/dcgan-mnist.toml --set model.width=32 --set train.steps=1000
run vqvae 0 --config models/vqvae-mnist.toml --set model.hidden=32 --set train.batch_size=32 \
  --set train.steps=500
run vqvae-prior 0 --config models/vqvae-prior-mnist.toml --init-from "$OUT/vqvae" \
  --set model.hidden=32 --set train.batch_size=32 --set train.steps=500
