#!/usr/bin/env bash
# All-reduce bus bandwidth: ferry's ring against torch.distributed + Gloo, same machine,
# fp32, 2 and 4 processes, 4 KB / 1 MB / 64 MB, measured in the same run (alternating sides,
# ROUNDS rounds, median). The ring runs as ranks on one host do (bulk data through shared
# memory, control over TCP) and with TCP only (FERRY_RING_SHM=0, as between hosts, here
# over loopback). Prints busbw and the ratios against Gloo.
# Usage: scripts/bench-allreduce.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/env.sh
ROUNDS="${1:-3}"
SIZES="4096,1048576,67108864"
cargo build --release -q -p ferry-cluster --example allreduce_bench
RING="$FERRY_ROOT/target/release/examples/allreduce_bench"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
for world in 2 4; do
  for r in $(seq "$ROUNDS"); do
    "$RING" "$world" "$SIZES" 20 | sed "s/^/ring $world /" >>"$out"
    FERRY_RING_SHM=0 "$RING" "$world" "$SIZES" 20 | sed "s/^/tcp $world /" >>"$out"
    "$FERRY_PYTHON" bench/allreduce_gloo.py "$world" "$SIZES" 20 | sed "s/^/gloo $world /" >>"$out"
  done
done
"$FERRY_PYTHON" - "$out" <<'PY'
import collections, statistics, sys
bw = collections.defaultdict(list)
for line in open(sys.argv[1]):
    side, world, size, _, busbw = line.split()
    bw[(side, int(world), int(size))].append(float(busbw))
print(f"{'procs':>5} {'size':>8} {'ring GB/s':>10} {'tcp-only':>10} {'gloo GB/s':>10} {'ring/gloo':>10} {'tcp/gloo':>9}")
for world in (2, 4):
    for size in (4096, 1 << 20, 64 << 20):
        r, t, g = (statistics.median(bw[(side, world, size)]) for side in ("ring", "tcp", "gloo"))
        label = {4096: "4 KB", 1 << 20: "1 MB", 64 << 20: "64 MB"}[size]
        print(f"{world:>5} {label:>8} {r:>10.3f} {t:>10.3f} {g:>10.3f} {r / g:>10.2f} {t / g:>9.2f}")
PY
