#!/bin/bash
# The demo recipe timed stage by stage from an empty data/ and out/ (docs/speed-demo.md).
# Usage, from the repository root: bash benchmarks/demo_recipe.sh LOGDIR   (deletes ./data and ./out first)
# Writes LOGDIR/<stage>.log, LOGDIR/<stage>.time (/usr/bin/time) and LOGDIR/summary: wall s, CPU s, samples/s, AUCs.
export HF_HUB_OFFLINE=1
L=${1:?usage: demo_recipe.sh LOGDIR}; mkdir -p "$L"; rm -rf data out
st() { local n=$1; shift; local s=$(date +%s.%N); /usr/bin/time -f "%e wall %U user %S sys %P cpu" "$@" > "$L/$n.log" 2> "$L/$n.time"
       echo "$n $(printf %.1f "$(echo "$(date +%s.%N) - $s" | bc)") s | $(tail -1 "$L/$n.time") | $(grep -o '[0-9.]* samples/s' "$L/$n.log" | tail -1) | load $(cut -d' ' -f1 /proc/loadavg)" >> "$L/summary"; }
echo "start $(date -u +%FT%T) commit $(git rev-parse --short HEAD) $(nproc) cores" > "$L/summary"; T0=$(date +%s.%N)
st demo python demo.py --out data/demo
st vision python pretrain_vision.py --lite
st text python pretrain_text.py
st align python align.py --lite
echo "recipe total $(printf %.1f "$(echo "$(date +%s.%N) - $T0" | bc)") s" >> "$L/summary"
st eval python evaluate.py --ckpt out/align-lite/best.pt --out out/eval
grep -h "^epoch" "$L/vision.log" "$L/text.log" "$L/align.log" >> "$L/summary"
grep -h "^macro AUC per template" "$L/eval.log" >> "$L/summary"
cat "$L/summary"
