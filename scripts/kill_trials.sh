#!/usr/bin/env bash
# Random `kill -9` trials against `gm train`, run by hand (not in CI: timing-dependent):
# each trial starts a tiny run that checkpoints every 5 steps, kills it with SIGKILL after a random
# delay, then checks that every complete checkpoint loads and evaluates, that `--resume` finishes
# the run, that no temporary file is left, and that the final weights equal an uninterrupted run's
# byte for byte.
#
#   bash scripts/kill_trials.sh DATA_DIR [TRIALS] [GM_BINARY]
set -uo pipefail
DATA="${1:?usage: kill_trials.sh DATA_DIR [TRIALS] [GM_BINARY]}"
TRIALS="${2:-20}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
GM="${3:-$ROOT/target/release/gm}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
SETS=(--set train.steps=40 --set train.checkpoint_every=5 --set train.keep_last=3
      --set train.eval_every=10 --set train.eval_images=64 --set train.sample_every=0)
train() { "$GM" train --config "$ROOT/models/vae-tiny.toml" --data-dir "$DATA" --out "$1" --quiet --device cpu "${SETS[@]}"; }

t0=$(date +%s.%N)
train "$WORK/whole" 2>/dev/null >/dev/null || { echo "the uninterrupted run failed" >&2; exit 1; }
whole_s=$(awk "BEGIN{print $(date +%s.%N) - $t0}")
final="checkpoints/step-00000040.safetensors"
killed=0 finished_first=0 corrupt=0 resumed=0 identical=0 temps=0
for i in $(seq 1 "$TRIALS"); do
    run="$WORK/t$i"
    # gm itself in the background (a shell function would put a subshell between: killing it
    # would leave gm running).
    "$GM" train --config "$ROOT/models/vae-tiny.toml" --data-dir "$DATA" --out "$run" --quiet \
        --device cpu "${SETS[@]}" 2>/dev/null >/dev/null &
    pid=$!
    sleep "$(awk -v s="$RANDOM" -v w="$whole_s" 'BEGIN{srand(s); print rand() * w}')"
    if kill -9 "$pid" 2>/dev/null; then killed=$((killed + 1)); else finished_first=$((finished_first + 1)); fi
    wait "$pid" 2>/dev/null
    for w in "$run"/checkpoints/step-*[0-9].safetensors; do
        [ -e "$w" ] || continue
        [ -e "${w%.safetensors}.state.safetensors" ] || continue
        if ! err="$("$GM" eval --checkpoint "$w" --data-dir "$DATA" --iwae-k 2 --max-images 16 --device cpu 2>&1 >/dev/null)"; then
            corrupt=$((corrupt + 1)); echo "trial $i: $w does not load: $(echo "$err" | tail -n 1)" >&2
        fi
    done
    if [ -e "$run/${final%.safetensors}.state.safetensors" ]; then
        resumed=$((resumed + 1))   # the kill came after the last checkpoint: nothing to resume
    elif ls "$run"/checkpoints/step-*.state.safetensors >/dev/null 2>&1; then
        "$GM" train --resume "$run" --data-dir "$DATA" --quiet --device cpu >/dev/null 2>&1 && resumed=$((resumed + 1))
    else
        rm -rf "$run"; train "$run" 2>/dev/null >/dev/null && resumed=$((resumed + 1))   # killed before any checkpoint
    fi
    [ -n "$(find "$run" -name '.*.tmp-*')" ] && temps=$((temps + 1))
    cmp -s "$run/$final" "$WORK/whole/$final" && identical=$((identical + 1))
done
echo "trials $TRIALS: killed $killed (finished before the kill $finished_first); checkpoints that failed to load: $corrupt; runs complete after resume: $resumed; final weights byte-identical to the uninterrupted run: $identical; runs with temporary files left: $temps"
