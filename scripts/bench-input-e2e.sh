#!/usr/bin/env bash
# End-to-end input benchmark, measured in one run, alternating, ROUNDS times each:
#  - ferry training from a folder of N JPEGs of mixed sizes, decoded and augmented on the fly
#    (`augment: imagenet` at SIZE px: random resized crop and flip; ImageNet normalisation),
#    WORKERS decode threads;
#  - ferry training the same job from the same images decoded once beforehand (a uint8
#    safetensors file at SIZE x SIZE: no decoding, no augmentation): what the input costs;
#  - PyTorch: DataLoader over torchvision's ImageFolder with WORKERS worker processes and the
#    same transforms, training the same model (eager torchvision, the same initial weights).
# The model is torchvision's MODEL (TorchScript for ferry), SGD with momentum, BATCH per step,
# THREADS intra-op threads on each side. Prints samples/s (all steps / epochs after the
# first), each side's share of step time spent waiting for input, and the ratios.
# On a 2-core machine decoding and training share the same cores: the JPEG job is slower than
# the pre-decoded one by what decoding costs, and the ratio says how much.
# Usage: scripts/bench-input-e2e.sh [N] [SIZE] [EPOCHS] [ROUNDS] [WORKERS] [THREADS] [MODEL] [BATCH]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
. scripts/env.sh
N="${1:-1024}"; SIZE="${2:-112}"; EPOCHS="${3:-2}"; ROUNDS="${4:-2}"; WORKERS="${5:-2}"
THREADS="${6:-2}"; MODEL="${7:-resnet18}"; BATCH="${8:-32}"
BIN="${FERRY_BIN:-$FERRY_ROOT/target/debug}"
echo "==> uptime: $(uptime)"
WORK="$(mktemp -d)"
trap 'kill $FERRYD 2>/dev/null; wait $FERRYD 2>/dev/null; rm -rf "$WORK"' EXIT
echo "==> generating $N JPEGs, the $MODEL model and the pre-decoded set in $WORK"
"$FERRY_PYTHON" scripts/bench_input_data.py "$WORK/data/jpegs" "$N"
"$FERRY_PYTHON" bench/input_e2e.py prepare "$WORK" "$WORK/data/jpegs" "$MODEL" "$SIZE"
start_ferryd "$BIN" "$WORK" "${FERRY_BENCH_PORT:-7081}"
echo "==> ferry: $BIN (debug unless FERRY_BIN says otherwise; the decoder is optimised in every build)"

# ferry_round NAME jpeg|tensors: prints "ALL STEADY DATA_SHARE".
ferry_round() {
  local name="e2e-$1" out
  "$FERRY_PYTHON" bench/input_e2e.py spec "$name" "$2" . "$MODEL" cpu "$SIZE" "$EPOCHS" "$BATCH" fp32 "$THREADS" "$WORKERS" >"$WORK/$name.yaml"
  out="$(job_samples_per_sec "$BIN" "$WORK/$name.yaml" "$name")" || { echo "$name $out"; return 1; }
  "$FERRY_PYTHON" bench/input_e2e.py rates "$WORK/runs/$name/metrics.jsonl"
}
torch_round() {
  "$FERRY_PYTHON" bench/input_e2e.py torch "$WORK" "$WORK/data/jpegs" "$MODEL" cpu "$SIZE" "$EPOCHS" "$BATCH" fp32 "$THREADS" "$WORKERS"
}

jpeg=(); tensors=(); torch=()
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then
    jpeg+=("$(ferry_round "$r-jpeg" jpeg)"); tensors+=("$(ferry_round "$r-tensors" tensors)"); torch+=("$(torch_round)")
  else
    torch+=("$(torch_round)"); tensors+=("$(ferry_round "$r-tensors" tensors)"); jpeg+=("$(ferry_round "$r-jpeg" jpeg)")
  fi
  case "${jpeg[-1]} ${tensors[-1]} ${torch[-1]}" in *FAILED*|"  "*) echo "round $r: a run failed: ${jpeg[-1]} ${tensors[-1]} ${torch[-1]}" >&2; exit 1 ;; esac
  echo "round $r: ferry JPEG ${jpeg[-1]}, ferry pre-decoded ${tensors[-1]}, pytorch DataLoader ${torch[-1]} (samples/s all, steady, data share)" >&2
done
"$FERRY_PYTHON" - "$N" "$SIZE" "$EPOCHS" "$BATCH" "$THREADS" "$WORKERS" "$MODEL" "${jpeg[*]}" "${tensors[*]}" "${torch[*]}" <<'PY'
import statistics, sys
n, size, epochs, batch, threads, workers, model = sys.argv[1:8]
def med(s, i):
    rows = [list(map(float, s.split()[k:k + 3])) for k in range(0, len(s.split()), 3)]
    return statistics.median(r[i] for r in rows)
sides = {"ferry, JPEGs": sys.argv[8], "ferry, pre-decoded": sys.argv[9], "pytorch DataLoader": sys.argv[10]}
print(f"\nend to end: {model} at {size} px, batch {batch}, {threads} threads, {workers} decode threads/workers, "
      f"{epochs} epochs of {n} JPEGs (median of rounds)")
print("| side | samples/s, all | samples/s, after epoch 1 | data wait share |")
print("|---|---|---|---|")
for k, v in sides.items():
    print(f"| {k} | {med(v, 0):.1f} | {med(v, 1):.1f} | {med(v, 2) * 100:.1f}% |")
j, t, p = (med(v, 1 if int(epochs) > 1 else 0) for v in sides.values())
print(f"ferry JPEGs / ferry pre-decoded = {j / t:.3f}; ferry JPEGs / pytorch DataLoader = {j / p:.3f}")
PY
