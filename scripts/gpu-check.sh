#!/usr/bin/env bash
# Every GPU check of ferry in one run, made for the device machine (one GPU, no cargo, no
# network): `ferryd doctor` (CUDA, NCCL found and loaded, a one-rank NCCL all-reduce, the
# CUDA ranks' gradient buckets after and during backward (NCCL on a side stream), bf16
# autocast), a CUDA job through ferryd --standalone and ferryctl at each precision, and the
# training benchmark: ferry against a plain PyTorch eager loop on ResNet-50, batch 128,
# synthetic 224x224 images, same precision, alternating (the peer eager, as the goal says, and
# once per precision the same TorchScript file under the JIT; ferry once more with
# model.jit_optimize: true), and the input pipeline end to end (ResNet-50 from a folder of
# JPEGs on local disk, against pre-decoded tensors and against DataLoader). Results go to
# $OUT: summary.txt as it runs, doctor.txt, ferryd.log and details.tgz (the jobs' records and
# metrics, the peer's log) at the end; few files, since the device tool returns at most 8.
# Every step has its own time limit (STEP_LIMIT seconds), so one hang costs one step only.
#
# On the device machine (binaries built here in release and carried):
#   OUT=$OUT scripts/gpu-check.sh
# A dry run on a machine without a GPU (CPU, the small CNN, tiny images) checks the plumbing:
#   FERRY_GPU_DRY=1 scripts/gpu-check.sh
# Knobs: FERRY_BIN (target/release), FERRY_GPU_PYTHON (python3 with torch and torchvision),
#        EPOCHS (4), IMAGES (2048), ROUNDS (2), STEP_LIMIT (240).
# Each side reports samples/s over all steps and over the epochs after the first (steady
# state); the ratio of each is printed, and ferry's own account is checked against the
# wall-clock windows of its progress records.
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
  DEVICE=cuda; MODEL=resnet50; SIZE=224; BATCH=128; IMAGES="${IMAGES:-2048}"; EPOCHS="${EPOCHS:-4}"
  PRECISIONS="fp32 bf16 fp16"
fi
ROUNDS="${ROUNDS:-2}"
STEP_LIMIT="${STEP_LIMIT:-240}"
THREADS="${THREADS:-$([ -n "${FERRY_GPU_DRY:-}" ] && echo 2 || echo 4)}"
TORCH_LIB="$("$PY" -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
summary="$OUT/summary.txt"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }
WORK="$(mktemp -d)"
DET="$WORK/details"
mkdir -p "$DET"
FERRYD=
finish() {
  [ -n "$FERRYD" ] && { kill "$FERRYD" 2>/dev/null; wait "$FERRYD" 2>/dev/null; }
  cp "$WORK/ferryd.log" "$OUT/" 2>/dev/null
  for m in "$WORK"/runs/*/metrics.jsonl; do
    [ -f "$m" ] && cp "$m" "$DET/$(basename "$(dirname "$m")").metrics.jsonl"
  done
  tar czf "$OUT/details.tgz" -C "$WORK" details
}
trap finish EXIT
trap "exit 143" TERM INT

{ nvidia-smi; "$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'; } \
  >"$DET/machine.txt" 2>&1
say "== ferryd doctor"
timeout "$STEP_LIMIT" "$BIN/ferryd" doctor 2>&1 | tee "$OUT/doctor.txt" | tee -a "$summary"
say "doctor exit status ${PIPESTATUS[0]}"

PORT="${FERRY_GPU_PORT:-7090}"
say "== preparing $MODEL, $IMAGES synthetic images ${SIZE}x${SIZE}"
timeout "$STEP_LIMIT" "$PY" bench/gpu_throughput.py prepare "$WORK" "$MODEL" "$IMAGES" "$SIZE" >>"$DET/prepare.txt" 2>&1 \
  || { say "prepare failed:"; cat "$DET/prepare.txt" >>"$summary"; exit 1; }
# env.sh for start_ferryd, job_samples_per_sec and epoch_rates, with this machine's python.
. scripts/env.sh
FERRY_PYTHON="$PY"
start_ferryd "$BIN" "$WORK" "$PORT" || { say "ferryd did not start"; exit 1; }
"$BIN/ferryctl" nodes | tee -a "$summary"

# ferry_job NAME PRECISION: runs the benchmark job through ferryctl; prints samples/s over
# all steps and over the epochs after the first (from the job's metrics.jsonl).
ferry_job() {
  cat >"$WORK/$1.yaml" <<YAML
name: $1
model: {arch: torchscript, path: models/$MODEL.pt, jit_optimize: ${JIT_OPTIMIZE:-false}}
data: {train: {path: data/synthetic.safetensors}, shuffle: false}
train: {epochs: $EPOCHS, batch_size: $BATCH, precision: $2, optimizer: {name: sgd, lr: 0.01, momentum: 0.9}}
resources: {device: $DEVICE, threads: $THREADS}
output: {dir: runs/$1}
YAML
  local all
  all="$(FERRY_JOB_LIMIT="$STEP_LIMIT" job_samples_per_sec "$BIN" "$WORK/$1.yaml" "$1")"
  "$BIN/ferryctl" get "$1" -o json >"$DET/$1.json"
  # The job's events: the fp16 line says how many steps were skipped and the final scale.
  "$BIN/ferryctl" logs "$1" >"$DET/$1.events.txt" 2>&1
  # A job still running after its limit would hold the node: cancel it.
  "$BIN/ferryctl" cancel "$1" >/dev/null 2>&1
  case "$all" in FAILED*) echo "$all"; return ;; esac
  local rates windows
  rates="$(epoch_rates "$WORK/runs/$1/metrics.jsonl")" || { echo "FAILED: no epoch rates"; return; }
  windows="$(window_rates "$WORK/runs/$1/metrics.jsonl")" || { echo "FAILED: no progress windows"; return; }
  echo "$all ${rates#* } $windows"
}

# window_rates METRICS_JSONL: ferry's samples/s from its progress records instead of its own
# training-time account: each record's window runs on the wall clock, from the end of the last
# report to after this one's loss read, which waits for the device. Prints "ALL STEADY" (all
# windows; those after epoch 1). A cross-check: if ferry's account left out device time (as it
# did until c6480e6, by 7-10% at fp32 and bf16 on an H200), the two disagree. Needs IMAGES
# divisible by BATCH.
window_rates() {
  "$PY" - "$1" "$BATCH" <<'PY'
import json, sys
batch, prev, acc = int(sys.argv[2]), 0, {"all": [0, 0.0], "steady": [0, 0.0]}
for r in map(json.loads, open(sys.argv[1])):
    if "samples_per_sec" in r and "step" in r:
        n, prev = (r["step"] - prev) * batch, r["step"]
        for k in ("all", "steady") if r["epoch"] > 1 else ("all",):
            acc[k][0] += n
            acc[k][1] += n / r["samples_per_sec"]
print(" ".join(f"{n / t:.2f}" if t else "nan" for n, t in acc.values()))
PY
}

# torch_run MODE PRECISION: the peer; prints samples/s over all steps and after the first epoch.
torch_run() {
  timeout "$STEP_LIMIT" "$PY" bench/gpu_throughput.py torch "$WORK" "$MODEL" "$DEVICE" "$EPOCHS" "$BATCH" "$2" "$THREADS" "$1" \
    2>>"$DET/torch.txt" || echo FAILED
}

# pair "A B ...": prints "A / B" (or a FAILED message as it is).
pair() { case "$1" in FAILED*) echo "$1" ;; *) set -- $1; echo "$1 / $2" ;; esac; }
# ferry_show "ALL STEADY WALL_ALL WALL_STEADY" (ferry_job's line): prints it for the summary.
ferry_show() { case "$1" in FAILED*) echo "$1" ;; *) set -- $1; echo "$1 / $2 (wall-clock windows $3 / $4)" ;; esac; }

[ $((IMAGES % BATCH)) -eq 0 ] || { say "IMAGES ($IMAGES) must be a multiple of BATCH ($BATCH)"; exit 1; }
say "== $MODEL, batch $BATCH, $EPOCHS epochs of $IMAGES images, device $DEVICE: ferry against PyTorch eager"
say "   samples/s as 'all steps / epochs after the first'"
for p in $PRECISIONS; do
  f=(); t=()
  for r in $(seq "$ROUNDS"); do
    f+=("$(ferry_job "bench-$p-$r" "$p")")
    t+=("$(torch_run eager "$p")")
    say "  $p round $r: ferry $(ferry_show "${f[-1]}"), pytorch eager $(pair "${t[-1]}")"
  done
  s="$(torch_run script "$p")"
  say "  $p: pytorch running the TorchScript file under the optimising JIT $(pair "$s")"
  "$PY" - "$p" "${f[@]}" -- "${t[@]}" <<'PY' | tee -a "$summary"
import statistics, sys
p, args = sys.argv[1], sys.argv[2:]
cut = args.index("--")
try:
    f = [list(map(float, a.split())) for a in args[:cut]]
    t = [list(map(float, a.split())) for a in args[cut + 1:]]
    for i, what in enumerate(("all steps", "after epoch 1")):
        fm = statistics.median(r[i] for r in f)
        wm = statistics.median(r[i + 2] for r in f)
        tm = statistics.median(r[i] for r in t)
        print(f"  {p} {what}: median ferry {fm:.1f}, pytorch eager {tm:.1f} samples/s, ratio ferry/pytorch = {fm / tm:.3f}")
        # ferry's account against its own wall-clock windows: they must agree.
        off = fm / wm - 1
        print(f"  {p} {what}: ferry's wall-clock windows {wm:.1f}, ratio {wm / tm:.3f};"
              f" its account is {off * 100:+.1f}% off them" + ("  <-- CHECK: more than 2%" if abs(off) > 0.02 else ""))
except (ValueError, IndexError):
    print(f"  {p}: a run failed; see the bench-*.json files, torch.txt and ferryd.log")
PY
done

# The same job with TorchScript's graph executor optimising (model.jit_optimize: true:
# profiling runs, autodiff subgraphs, fused kernels) instead of ferry's default, op by op as
# eager. This measurement set the default (docs/benchmarks.md); it stays to keep it true.
say "== ferry with model.jit_optimize: true"
for p in $PRECISIONS; do
  r="$(JIT_OPTIMIZE=true ferry_job "bench-jit-$p" "$p")"
  say "  $p: ferry $(ferry_show "$r")"
done

# The input pipeline end to end: the same model trained from a folder of JPEGs on local disk,
# decoded and augmented per batch (augment: imagenet) by the decode threads the machine's
# cores allow, against the same job from pre-decoded uint8 tensors and against PyTorch's
# DataLoader (as many worker processes, pin_memory) with the same transforms. The goal: the
# GPU never waits on input (ferry's data part <= 5% of the step) and ferry >= DataLoader.
E2E_PRECISION="${E2E_PRECISION:-$([ -n "${FERRY_GPU_DRY:-}" ] && echo fp32 || echo bf16)}"
E2E_MODEL="$([ -n "${FERRY_GPU_DRY:-}" ] && echo resnet18 || echo resnet50)"
E2E_IMAGES="${E2E_IMAGES:-$([ -n "${FERRY_GPU_DRY:-}" ] && echo 256 || echo 4096)}"
E2E_WORKERS="${E2E_WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}"
say "== input end to end: $E2E_MODEL at $SIZE px, batch $BATCH, $E2E_PRECISION, $EPOCHS epochs of $E2E_IMAGES JPEGs, $E2E_WORKERS decode threads / workers"
say "   samples/s as 'all epochs / after the first', then the share of step time spent waiting for input"
if timeout "$STEP_LIMIT" "$PY" scripts/bench_input_data.py "$WORK/e2e/data/jpegs" "$E2E_IMAGES" >>"$DET/e2e.txt" 2>&1 &&
   timeout "$STEP_LIMIT" "$PY" bench/input_e2e.py prepare "$WORK/e2e" "$WORK/e2e/data/jpegs" "$E2E_MODEL" "$SIZE" >>"$DET/e2e.txt" 2>&1; then
  for form in jpeg tensors; do
    name="e2e-$form"
    "$PY" bench/input_e2e.py spec "$name" "$form" e2e "$E2E_MODEL" "$DEVICE" "$SIZE" "$EPOCHS" "$BATCH" "$E2E_PRECISION" "$THREADS" "$E2E_WORKERS" >"$WORK/$name.yaml"
    r="$(FERRY_JOB_LIMIT="$STEP_LIMIT" job_samples_per_sec "$BIN" "$WORK/$name.yaml" "$name")" &&
      r="$("$PY" bench/input_e2e.py rates "$WORK/runs/$name/metrics.jsonl")"
    "$BIN/ferryctl" logs "$name" >"$DET/$name.events.txt" 2>&1
    "$BIN/ferryctl" cancel "$name" >/dev/null 2>&1
    say "  ferry from $form: $r"
  done
  r="$(timeout "$STEP_LIMIT" "$PY" bench/input_e2e.py torch "$WORK/e2e" "$WORK/e2e/data/jpegs" "$E2E_MODEL" "$DEVICE" "$SIZE" "$EPOCHS" "$BATCH" "$E2E_PRECISION" "$THREADS" "$E2E_WORKERS" 2>>"$DET/e2e.txt" || echo FAILED)"
  say "  pytorch DataLoader from JPEGs: $r"
else
  say "  preparing the JPEGs failed: see e2e.txt in details.tgz"
fi

# One GPU cannot hold two NCCL ranks: a job that asks for more ranks than the node has GPUs
# must fail at once with a reason that says so, not hang or crash.
say "== a 2-rank $DEVICE job on this node (one GPU: expected to be refused with a clear reason)"
cat >"$WORK/two-ranks.yaml" <<YAML
name: two-ranks
model: {arch: torchscript, path: models/$MODEL.pt}
data: {train: {path: data/synthetic.safetensors}}
train: {epochs: 1, batch_size: $BATCH}
resources: {device: $DEVICE, ranks: 2, threads: $THREADS}
output: {dir: runs/two-ranks}
YAML
timeout "$STEP_LIMIT" "$BIN/ferryctl" submit "$WORK/two-ranks.yaml" --wait 2>&1 | sed 's/^/  /' | tee -a "$summary"
"$BIN/ferryctl" logs two-ranks >"$DET/two-ranks.events.txt" 2>&1
"$BIN/ferryctl" cancel two-ranks >/dev/null 2>&1
"$BIN/ferryctl" get >>"$summary"
say "== done"
