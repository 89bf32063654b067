#!/usr/bin/env bash
# Training throughput: ferry (a job through a release ferryd) against PyTorch on the same
# TorchScript model, data, per-rank batch size and threads per rank, measured in the same
# run, alternating, ROUNDS times each. With RANKS = 1 the peer is a plain PyTorch loop; with
# more, it is torchrun + DistributedDataParallel over Gloo. Prints both medians and the ratio.
# Usage: scripts/bench.sh [EPOCHS] [BATCH] [THREADS] [ROUNDS] [RANKS]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/env.sh
EPOCHS="${1:-2}"; BATCH="${2:-64}"; THREADS="${3:-2}"; ROUNDS="${4:-5}"; RANKS="${5:-1}"

bench_ferryd "${FERRY_BENCH_PORT:-7079}"
"$FERRY_PYTHON" bench/train_throughput.py prepare "$WORK"

ferry_round() {
  local name="bench-$1"
  cat >"$WORK/$name.yaml" <<YAML
name: $name
model: {arch: torchscript, path: models/bench.pt}
data: {train: {path: data/bench.safetensors}, shuffle: false}
train:
  epochs: $EPOCHS
  batch_size: $BATCH
  optimizer: {name: sgd, lr: 0.01, momentum: 0.9}
resources: {ranks: $RANKS, threads: $THREADS}
output: {dir: runs/$name}
YAML
  job_samples_per_sec "$REL" "$WORK/$name.yaml" "$name"
}

ferry=(); torch=()
torch_round() {
  if [ "$RANKS" -eq 1 ]; then
    "$FERRY_PYTHON" bench/train_throughput.py torch "$WORK" "$EPOCHS" "$BATCH" "$THREADS"
  else
    "$FERRY_PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$RANKS" \
      bench/train_throughput.py ddp "$WORK" "$EPOCHS" "$BATCH" "$THREADS" 2>/dev/null
  fi
}
# Alternate which side goes first, so drift in the machine's load hits both alike.
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then
    ferry+=("$(ferry_round "$r")"); torch+=("$(torch_round)")
  else
    torch+=("$(torch_round)"); ferry+=("$(ferry_round "$r")")
  fi
  echo "round $r: ferry ${ferry[-1]} samples/s, pytorch ${torch[-1]} samples/s" >&2
done
"$FERRY_PYTHON" - "${ferry[*]}" "${torch[*]}" "$EPOCHS" "$BATCH" "$THREADS" "$RANKS" <<'PY'
import statistics, sys
f = statistics.median(map(float, sys.argv[1].split()))
t = statistics.median(map(float, sys.argv[2].split()))
ranks = int(sys.argv[6])
peer = "pytorch" if ranks == 1 else "ddp"
print(f"training throughput, BenchCNN 3x32x32, {ranks} rank(s) x batch {sys.argv[4]} x {sys.argv[5]} threads, "
      f"{sys.argv[3]} epochs of 4096 samples (median of rounds)")
print(f"  ferry   {f:10.1f} samples/s")
print(f"  {peer:<7} {t:10.1f} samples/s")
print(f"  ratio ferry/{peer} = {f / t:.3f}")
PY
