#!/usr/bin/env bash
# Peak resident memory of a training rank reading JPEGs: the same job (torchvision's MODEL,
# TorchScript, `augment: imagenet` at SIZE px, batch 32, 2 decode threads) for STEPS steps on
# a folder of N JPEGs and on one of 10 x N, through ferryd --standalone. The rank's peak RSS
# (its metrics.jsonl's max_rss_mb) should not grow with the data set: it is bounded by the
# input queue (decode threads x (prefetch_batches + 1) batches). For reference, the same job
# on the N images decoded beforehand (a uint8 safetensors file at SIZE: no decode threads):
# what the model and its training take without the pipeline.
# Usage: scripts/bench-input-rss.sh [N=2000] [SIZE=224] [STEPS=30] [MODEL=resnet18]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
. scripts/env.sh
N="${1:-2000}"; SIZE="${2:-224}"; STEPS="${3:-30}"; MODEL="${4:-resnet18}"
BIG=$((N * 10))
BIN="${FERRY_BIN:-$FERRY_ROOT/target/debug}"
DATA="${FERRY_BENCH_DATA:-/tmp/ferry-bench-input}"
echo "==> uptime: $(uptime)"
WORK="$(mktemp -d)"
trap 'kill $FERRYD 2>/dev/null; wait $FERRYD 2>/dev/null; rm -rf "$WORK"' EXIT
echo "==> generating $N and $BIG JPEGs in $DATA (kept for later runs)"
for n in "$N" "$BIG"; do
  "$FERRY_PYTHON" scripts/bench_input_data.py "$DATA/n$n" "$n"
  mkdir -p "$WORK/n$n/data"
  # The job's paths are confined to its data root (links refused): a hard-linked copy.
  cp -al "$DATA/n$n" "$WORK/n$n/data/jpegs"
done
# The model (in n$N/models) and the N images decoded once (n$N/data/decoded.safetensors).
"$FERRY_PYTHON" bench/input_e2e.py prepare "$WORK/n$N" "$WORK/n$N/data/jpegs" "$MODEL" "$SIZE" 2>/dev/null
start_ferryd "$BIN" "$WORK" "${FERRY_BENCH_PORT:-7082}"
for run in "$N jpeg" "$BIG jpeg" "$N tensors"; do
  set -- $run
  name="rss-$1-$2"
  "$FERRY_PYTHON" bench/input_e2e.py spec "$name" "$2" "n$1" "$MODEL" cpu "$SIZE" 1 32 fp32 2 2 "$STEPS" |
    sed "s|n$1/models/|n$N/models/|" >"$WORK/$name.yaml"
  out="$(job_samples_per_sec "$BIN" "$WORK/$name.yaml" "$name")" || { echo "$name: $out"; exit 1; }
  "$FERRY_PYTHON" - "$WORK/runs/$name/metrics.jsonl" "$1" "$2" "$out" <<'PY'
import json, sys
rss = [json.loads(l)["max_rss_mb"] for l in open(sys.argv[1]) if "max_rss_mb" in l]
what = "JPEGs" if sys.argv[3] == "jpeg" else "images, pre-decoded"
print(f"{int(sys.argv[2]):>6} {what}: rank 0 peak RSS {rss[-1]:.0f} MB ({sys.argv[4]} samples/s)")
PY
done
