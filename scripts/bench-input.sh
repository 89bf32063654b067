#!/usr/bin/env bash
# Input-pipeline benchmark, measured in one run:
#  1. decoded, augmented 224x224 images per second into normalised float batches: ferry's
#     pipeline (`ferryd bench-input`, native decode threads) against PyTorch's DataLoader over
#     torchvision's ImageFolder with the same transforms and as many worker processes, for
#     each thread count in THREADS, on a generated folder of N JPEGs of mixed sizes;
#  2. peak RSS of the pipeline reading a whole epoch of N images and of 10 x N images: it is
#     bounded by the queue, not by the data set.
# The machine's own yardstick is printed first: PIL decoding one JPEG and resizing it, in a
# loop on one core (what a DataLoader worker does per image).
# Usage: scripts/bench-input.sh [N] [THREADS] [BATCHES]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
. scripts/env.sh
N="${1:-2000}"; THREADS="${2:-1,2,4}"; BATCHES="${3:-40}"
DATA="${FERRY_BENCH_DATA:-/tmp/ferry-bench-input}"
echo "==> uptime: $(uptime)"
echo "==> generating $N JPEGs in $DATA/n$N (kept for later runs)"
"$FERRY_PYTHON" scripts/bench_input_data.py "$DATA/n$N" "$N"
"$FERRY_PYTHON" - "$DATA/n$N" <<'PY'
import glob, sys, time
from PIL import Image
files = sorted(glob.glob(sys.argv[1] + "/*/*.jpg"))[:200]
t = time.perf_counter()
for f in files:
    Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR)
print(f"==> yardstick: PIL decode + resize to 224, one core: {(time.perf_counter() - t) / len(files) * 1e3:.2f} ms per image")
PY
SPEC="{\"train\":{\"path\":\"$DATA/n$N\"},\"image_size\":224,\"augment\":{\"preset\":\"imagenet\",\"color_jitter\":{\"brightness\":0.4,\"contrast\":0.4,\"saturation\":0.4}},\"normalize\":{\"mean\":[0.485,0.456,0.406],\"std\":[0.229,0.224,0.225]}}"
ferry="$(mktemp)"; torch="$(mktemp)"; trap 'rm -f "$ferry" "$torch"' EXIT
echo "==> ferry: ferryd bench-input (debug build, as scripts/setup.sh builds it)"
ferryd bench-input --data "$SPEC" --batch 32 --batches "$BATCHES" --threads "$THREADS" | tee "$ferry"
echo "==> PyTorch: DataLoader + torchvision ImageFolder, same transforms"
"$FERRY_PYTHON" scripts/bench_input.py --data "$DATA/n$N" --jitter 0.4 --batch 32 --batches "$BATCHES" --workers "$THREADS" | tee "$torch"
"$FERRY_PYTHON" - "$ferry" "$torch" <<'PY'
import json, sys
f = [json.loads(l) for l in open(sys.argv[1])]
t = [json.loads(l) for l in open(sys.argv[2])]
print("\n| threads | ferry images/s | DataLoader images/s | ferry / DataLoader |")
print("|---|---|---|---|")
for a, b in zip(f, t):
    print(f"| {a['threads']} | {a['images_per_sec']:.1f} | {b['images_per_sec']:.1f} | {a['images_per_sec'] / b['images_per_sec']:.2f} |")
PY
if [ "${FERRY_BENCH_MEMORY:-1}" = 1 ]; then
  BIG=$((N * 10))
  echo "==> memory: one epoch of $N and of $BIG images (generating $BIG JPEGs the first time)"
  "$FERRY_PYTHON" scripts/bench_input_data.py "$DATA/n$BIG" "$BIG"
  for n in "$N" "$BIG"; do
    spec="${SPEC//n$N/n$n}"
    ferryd bench-input --data "$spec" --batch 32 --batches 100000 --threads 2 |
      "$FERRY_PYTHON" -c "import json,sys; r=json.loads(sys.stdin.read()); print(f\"{r['images']} images in {r['seconds']:.0f} s ({r['images_per_sec']:.0f}/s): peak RSS {r['max_rss_mb']:.0f} MB\")"
  done
fi
