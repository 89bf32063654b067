#!/usr/bin/env bash
# TorchScript execution in ferry's ranks: op by op (the default, as PyTorch eager runs a
# model) against the graph executor's optimisation (model.jit_optimize: true: profiling
# runs, then autodiff subgraphs and fused kernels), the same job otherwise, alternating,
# ROUNDS times each, on this machine's CPU. Prints the medians of the first epoch's samples/s
# (warm-up included) and of the epochs after it, and the ratios op-by-op / optimised.
# Usage: scripts/bench-jit.sh [EPOCHS=4] [BATCH=64] [THREADS=2] [ROUNDS=4] [MODEL=cnn|mlp]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/env.sh
EPOCHS="${1:-4}"; BATCH="${2:-64}"; THREADS="${3:-2}"; ROUNDS="${4:-4}"; MODEL="${5:-cnn}"
[ "$EPOCHS" -ge 2 ] || { echo "EPOCHS must be at least 2 (the first is warm-up)" >&2; exit 2; }

bench_ferryd "${FERRY_BENCH_PORT:-7081}"
"$FERRY_PYTHON" bench/train_throughput.py prepare "$WORK" "$MODEL"

# jit_round NAME JIT_OPTIMIZE: prints "FIRST STEADY" samples/s of one job.
jit_round() {
  cat >"$WORK/$1.yaml" <<YAML
name: $1
model: {arch: torchscript, path: models/bench.pt, jit_optimize: $2}
data: {train: {path: data/bench.safetensors}, shuffle: false}
train: {epochs: $EPOCHS, batch_size: $BATCH, optimizer: {name: sgd, lr: 0.01, momentum: 0.9}}
resources: {threads: $THREADS}
output: {dir: runs/$1}
YAML
  # Inside $(...) set -e is off: a failed job must stop the benchmark, not count.
  job_samples_per_sec "$REL" "$WORK/$1.yaml" "$1" >&2 || { echo "job $1 failed; see $WORK/ferryd.log" >&2; return 1; }
  epoch_rates "$WORK/runs/$1/metrics.jsonl"
}

eager=(); optimised=()
for r in $(seq "$ROUNDS"); do
  eager+=("$(jit_round "op-by-op-$r" false)") || exit 1
  optimised+=("$(jit_round "optimised-$r" true)") || exit 1
  echo "round $r: op by op ${eager[-1]/ / \/ }, jit_optimize ${optimised[-1]/ / \/ } samples/s (first epoch / after it)"
done
"$FERRY_PYTHON" - "${eager[@]}" -- "${optimised[@]}" <<'PY'
import statistics, sys
a = sys.argv[1:]
cut = a.index("--")
e = [list(map(float, x.split())) for x in a[:cut]]
o = [list(map(float, x.split())) for x in a[cut + 1:]]
for i, what in enumerate(("first epoch", "after it")):
    em, om = statistics.median(r[i] for r in e), statistics.median(r[i] for r in o)
    print(f"{what}: op by op {em:.1f}, jit_optimize {om:.1f} samples/s, ratio {em / om:.3f}")
PY
