#!/usr/bin/env bash
# Every GPU check of ferry in one run, made for the device machine (one GPU, no cargo, no
# network): `ferryd doctor` (CUDA, NCCL found and loaded, a one-rank NCCL all-reduce, the
# CUDA ranks' gradient buckets after and during backward (NCCL on a side stream), bf16
# autocast), a CUDA job through ferryd --standalone and ferryctl at each precision, and the
# training benchmark: ferry against a plain PyTorch eager loop on ResNet-50, batch 128,
# synthetic 224x224 images, same precision, alternating. Results go to $OUT.
#
# On the device machine (binaries built here in release and carried):
#   OUT=$OUT scripts/gpu-check.sh
# A dry run on a machine without a GPU (CPU, the small CNN, tiny images) checks the plumbing:
#   FERRY_GPU_DRY=1 scripts/gpu-check.sh
# Knobs: FERRY_BIN (target/release), FERRY_GPU_PYTHON (python3 with torch and torchvision),
#        EPOCHS (3), IMAGES (1024), ROUNDS (2).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
BIN="$(cd "${FERRY_BIN:-target/release}" && pwd)"
PY="${FERRY_GPU_PYTHON:-python3}"
if [ -n "${FERRY_GPU_DRY:-}" ]; then
  DEVICE=cpu; MODEL=benchcnn; SIZE=32; BATCH=32; IMAGES="${IMAGES:-256}"; EPOCHS="${EPOCHS:-2}"
  PRECISIONS="fp32 bf16"; PY="${FERRY_GPU_PYTHON:-.venv/bin/python}"
else
  DEVICE=cuda; MODEL=resnet50; SIZE=224; BATCH=128; IMAGES="${IMAGES:-1024}"; EPOCHS="${EPOCHS:-3}"
  PRECISIONS="fp32 bf16 fp16"
fi
ROUNDS="${ROUNDS:-2}"
THREADS="${THREADS:-$([ -n "${FERRY_GPU_DRY:-}" ] && echo 2 || echo 4)}"
TORCH_LIB="$("$PY" -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
summary="$OUT/summary.txt"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
say "== ferryd doctor"
"$BIN/ferryd" doctor 2>&1 | tee "$OUT/doctor.txt" | tee -a "$summary"

WORK="$(mktemp -d)"
PORT="${FERRY_GPU_PORT:-7090}"
say "== preparing $MODEL, $IMAGES synthetic images ${SIZE}x${SIZE}"
"$PY" bench/gpu_throughput.py prepare "$WORK" "$MODEL" "$IMAGES" "$SIZE" >>"$OUT/prepare.txt" 2>&1 \
  || { say "prepare failed:"; cat "$OUT/prepare.txt" >>"$summary"; exit 1; }
# env.sh for start_ferryd and job_samples_per_sec, with this machine's python.
. scripts/env.sh
FERRY_PYTHON="$PY"
trap 'kill $FERRYD 2>/dev/null; wait $FERRYD 2>/dev/null; cp "$WORK/ferryd.log" "$OUT/" 2>/dev/null' EXIT
start_ferryd "$BIN" "$WORK" "$PORT" || { say "ferryd did not start"; exit 1; }
"$BIN/ferryctl" nodes | tee -a "$summary"

# ferry_job NAME PRECISION: runs the benchmark job through ferryctl; prints samples/s.
ferry_job() {
  cat >"$WORK/$1.yaml" <<YAML
name: $1
model: {arch: torchscript, path: models/$MODEL.pt}
data: {train: {path: data/synthetic.safetensors}, shuffle: false}
train: {epochs: $EPOCHS, batch_size: $BATCH, precision: $2, optimizer: {name: sgd, lr: 0.01, momentum: 0.9}}
resources: {device: $DEVICE, threads: $THREADS}
output: {dir: runs/$1}
YAML
  job_samples_per_sec "$BIN" "$WORK/$1.yaml" "$1"
  "$BIN/ferryctl" get "$1" -o json >"$OUT/$1.json"
}

say "== $MODEL, batch $BATCH, $EPOCHS epochs of $IMAGES images, device $DEVICE: ferry against PyTorch eager"
for p in $PRECISIONS; do
  f=(); t=()
  for r in $(seq "$ROUNDS"); do
    f+=("$(ferry_job "bench-$p-$r" "$p")")
    t+=("$("$PY" bench/gpu_throughput.py torch "$WORK" "$MODEL" "$DEVICE" "$EPOCHS" "$BATCH" "$p" "$THREADS" 2>>"$OUT/torch.txt" || echo FAILED)")
    say "  $p round $r: ferry ${f[-1]} samples/s, pytorch ${t[-1]} samples/s"
  done
  "$PY" - "${f[*]}" "${t[*]}" "$p" <<'PY' | tee -a "$summary"
import statistics, sys
try:
    f = statistics.median(map(float, sys.argv[1].split()))
    t = statistics.median(map(float, sys.argv[2].split()))
    print(f"  {sys.argv[3]}: median ferry {f:.1f}, pytorch {t:.1f} samples/s, ratio ferry/pytorch = {f / t:.3f}")
except ValueError:
    print(f"  {sys.argv[3]}: a run failed; see the bench-*.json files, torch.txt and ferryd.log")
PY
done
"$BIN/ferryctl" get >>"$summary"
for m in "$WORK"/runs/*/metrics.jsonl; do cp "$m" "$OUT/$(basename "$(dirname "$m")").metrics.jsonl"; done 2>/dev/null
say "== done"
