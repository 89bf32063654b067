#!/usr/bin/env bash
# Training throughput: ferry (a job through a release ferryd) against PyTorch on the same
# TorchScript model, data, per-rank batch size and threads per rank, measured in the same
# run, alternating, ROUNDS times each. With RANKS = 1 the peer is a plain PyTorch loop; with
# more, it is torchrun + DistributedDataParallel over Gloo, and ferry (whose default is
# train.overlap_grad_sync: auto) also runs a third time with overlap_grad_sync: always, to
# show what all-reducing during backward is worth here. Prints the medians and the ratios.
# Usage: scripts/bench.sh [EPOCHS] [BATCH] [THREADS] [ROUNDS] [RANKS] [MODEL=cnn|mlp]
# (mlp: a 10.5M-parameter MLP whose steps are dominated by gradient communication.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/env.sh
EPOCHS="${1:-2}"; BATCH="${2:-64}"; THREADS="${3:-2}"; ROUNDS="${4:-5}"; RANKS="${5:-1}"; MODEL="${6:-cnn}"

bench_ferryd "${FERRY_BENCH_PORT:-7079}"
"$FERRY_PYTHON" bench/train_throughput.py prepare "$WORK" "$MODEL"

# ferry_round NAME [OVERLAP_GRAD_SYNC (default: the spec's default)]
ferry_round() {
  local name="bench-$1"
  cat >"$WORK/$name.yaml" <<YAML
name: $name
model: {arch: torchscript, path: models/bench.pt}
data: {train: {path: data/bench.safetensors}, shuffle: false}
train:
  epochs: $EPOCHS
  batch_size: $BATCH
${2:+  overlap_grad_sync: $2
}  optimizer: {name: sgd, lr: 0.01, momentum: 0.9}
resources: {ranks: $RANKS, threads: $THREADS}
output: {dir: runs/$name}
YAML
  job_samples_per_sec "$REL" "$WORK/$name.yaml" "$name"
}

ferry=(); torch=(); always=()
torch_round() {
  if [ "$RANKS" -eq 1 ]; then
    "$FERRY_PYTHON" bench/train_throughput.py torch "$WORK" "$EPOCHS" "$BATCH" "$THREADS"
  else
    "$FERRY_PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$RANKS" \
      bench/train_throughput.py ddp "$WORK" "$EPOCHS" "$BATCH" "$THREADS" 2>/dev/null
  fi
}
# Alternate which side goes first (and, with ranks, the order of ferry's two runs), so
# drift in the machine's load hits every side alike.
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then
    ferry+=("$(ferry_round "$r")"); torch+=("$(torch_round)")
    [ "$RANKS" -eq 1 ] || always+=("$(ferry_round "$r-always" always)")
  else
    [ "$RANKS" -eq 1 ] || always+=("$(ferry_round "$r-always" always)")
    torch+=("$(torch_round)"); ferry+=("$(ferry_round "$r")")
  fi
  line="round $r: ferry ${ferry[-1]} samples/s, pytorch ${torch[-1]} samples/s"
  [ "$RANKS" -eq 1 ] || line="$line, ferry with overlap always ${always[-1]} samples/s"
  echo "$line" >&2
done
"$FERRY_PYTHON" - "${ferry[*]}" "${torch[*]}" "$EPOCHS" "$BATCH" "$THREADS" "$RANKS" "$MODEL" "${always[*]:-}" <<'PY'
import statistics, sys
f = statistics.median(map(float, sys.argv[1].split()))
t = statistics.median(map(float, sys.argv[2].split()))
ranks = int(sys.argv[6])
peer = "pytorch" if ranks == 1 else "ddp"
print(f"training throughput, {'BenchMLP' if sys.argv[7] == 'mlp' else 'BenchCNN'} 3x32x32, {ranks} rank(s) x batch {sys.argv[4]} x {sys.argv[5]} threads, "
      f"{sys.argv[3]} epochs of 4096 samples (median of rounds)")
print(f"  ferry   {f:10.1f} samples/s")
print(f"  {peer:<7} {t:10.1f} samples/s")
print(f"  ratio ferry/{peer} = {f / t:.3f}")
if sys.argv[8]:
    s = statistics.median(map(float, sys.argv[8].split()))
    print(f"  ferry with overlap_grad_sync: always {s:.1f} samples/s: "
          f"ratio to {peer} {s / t:.3f}, always/default {s / f:.3f}")
PY
