#!/usr/bin/env bash
# Distillation benchmarks, all measured in one run against a release ferryd --standalone:
#  1. student samples/s with a remote teacher (cache off: a round trip every step) against
#     the same student without distillation, alternating, ROUNDS times each; one thread for
#     the student and one for the teacher, so the teacher has a core of its own;
#  2. bytes on the wire per sample: index and tensor mode, top-10 and all 100 classes;
#  3. epoch-2 samples/s with the soft-label cache against epoch 1.
# Usage: scripts/bench-distill.sh [EPOCHS] [BATCH] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/env.sh
EPOCHS="${1:-2}"; BATCH="${2:-64}"; ROUNDS="${3:-3}"

bench_ferryd "${FERRY_BENCH_PORT:-7078}"
"$FERRY_PYTHON" bench/distill.py prepare "$WORK"

# run NAME EPOCHS [DISTILL-YAML]: runs a job to its end and prints its samples/s.
run() {
  local name="$1" epochs="$2" distill="${3:-}"
  {
    echo "name: $name"
    echo "model: {arch: torchscript, path: models/student.pt}"
    echo "data: {train: {path: data/bench.safetensors}, shuffle: false}"
    echo "train: {epochs: $epochs, batch_size: $BATCH, optimizer: {name: sgd, lr: 0.01, momentum: 0.9}}"
    echo "resources: {ranks: 1, threads: 1}"
    echo "output: {dir: runs/$name}"
    [ -n "$distill" ] && printf 'distill:\n  teacher: {arch: torchscript, path: models/teacher.pt, threads: 1}\n%s\n' "$distill"
  } >"$WORK/$name.yaml"
  job_samples_per_sec "$REL" "$WORK/$name.yaml" "$name"
}

: >"$WORK/throughput.txt"
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then
    p="$(run "plain-$r" "$EPOCHS")"; d="$(run "distill-$r" "$EPOCHS" "  cache: false")"
  else
    d="$(run "distill-$r" "$EPOCHS" "  cache: false")"; p="$(run "plain-$r" "$EPOCHS")"
  fi
  echo "round $r: plain $p samples/s, distilled $d samples/s" >&2
  echo "$r $p $d" >>"$WORK/throughput.txt"
done
for mode in index tensor; do
  for k in 10 0; do
    run "bytes-$mode-$k" 1 "  mode: $mode
  top_k: $k
  cache: false" >/dev/null
  done
done
run cache 2 "  cache: true" >/dev/null
"$FERRY_PYTHON" bench/distill.py report "$WORK"
