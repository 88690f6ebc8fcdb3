#!/usr/bin/env bash
# Trains every tiny preset for a few steps (with evaluation, samples, checkpoints and a resume)
# and prints one sha256 per file a run writes — checkpoints, state, metrics without their clock
# column, sample grids. Run it before and after a change that must not alter training, and diff
# the two listings: any line that differs names the preset and the file.
#
#   bash scripts/identical.sh GM_BINARY DATA_DIR [TEXT_DIR] > before.txt   # ... change ..., then
#   bash scripts/identical.sh GM_BINARY DATA_DIR > after.txt && diff before.txt after.txt
set -euo pipefail
GM="$1" DATA="$2"
TEXT="${3:-/usr/share/games/fortunes}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
for p in "$ROOT"/models/*-tiny.toml; do
    name="$(basename "$p" .toml)"
    run="$TMP/$name"
    args=(--config "$p" --out "$run" --quiet --device cpu --set train.steps=6 --set train.log_every=1
          --set train.eval_every=3 --set train.checkpoint_every=3 --set train.sample_every=3)
    case "$name" in
        text-*) data="$TEXT" ;;
        *) data="$DATA"; args+=(--set train.eval_images=64) ;;
    esac
    case "$name" in
        # Stage two starts from its stage-one run.
        vqvae-prior-*)
            base="$TMP/base-$name"
            "$GM" train --config "$ROOT/models/${name/-prior/}.toml" --out "$base" --quiet --device cpu \
                --data-dir "$DATA" --set train.steps=6 > /dev/null 2>> "$TMP/$name.log"
            args+=(--init-from "$base") ;;
    esac
    args+=(--data-dir "$data")
    "$GM" train "${args[@]}" > /dev/null 2> "$TMP/$name.log" || { echo "$name: train failed"; tail -n 3 "$TMP/$name.log"; continue; }
    # A resumed run must end where the uninterrupted one did.
    cp -r "$run" "$run-r"
    rm -f "$run-r"/checkpoints/step-00000006*.safetensors "$run-r/checkpoints/best.safetensors"
    "$GM" train --resume "$run-r" --data-dir "$data" --quiet --device cpu > /dev/null 2>> "$TMP/$name.log" || echo "$name: resume failed"
    for f in $(cd "$run" && find . -type f | sort); do
        case "$f" in
            *metrics.jsonl) h="$(sed -E 's/"elapsed_s":[^,}]*//' "$run/$f" | sha256sum | cut -c1-16)" ;;
            *) h="$(sha256sum < "$run/$f" | cut -c1-16)" ;;
        esac
        echo "$name $f $h"
    done
    cmp -s "$run/checkpoints/step-00000006.safetensors" "$run-r/checkpoints/step-00000006.safetensors" \
        && echo "$name resume identical" || echo "$name resume DIFFERS"
done
