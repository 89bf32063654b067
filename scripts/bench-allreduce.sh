#!/usr/bin/env bash
# All-reduce bus bandwidth: ferry's collectives against torch.distributed + Gloo on the same
# machine, fp32, measured in the same run (alternating sides, ROUNDS rounds, median):
#   limits   one TCP stream over loopback and a single-threaded memcpy (what bounds the rest)
#   ring     2 and 4 processes on one host: bulk data through shared memory, control over TCP
#   tcp      the same ring with TCP only (FERRY_RING_SHM=0), as between hosts, over loopback
#   bf16     the TCP-only ring with bf16 on the wire (train.grad_compression: bf16)
#   hier     2 "hosts" x 2 ranks (127.0.0.11-12): shared memory within a host, TCP between,
#            the hierarchical all-reduce, in f32 and with bf16 between the hosts; and the flat
#            ring over the same 4 ranks
#   gloo     bench/allreduce_gloo.py with the same processes
# at 4 KB, 1 MB, 64 MB and 256 MB. Then, unless E2E=0, data-parallel training of BenchMLP
# across two loopback hosts with one rank each (every gradient over TCP): ferry's cluster mode
# on etcd, with and without bf16, against torchrun + DDP (Gloo), ROUNDS times alternating.
# Prints the tables and the ratios.
# Usage: scripts/bench-allreduce.sh [ROUNDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/env.sh
ROUNDS="${1:-3}"
SIZES="4096,1048576,67108864,268435456"
cargo build --release -q -p ferry-cluster --example allreduce_bench
RING="$FERRY_ROOT/target/release/examples/allreduce_bench"
# The raw lines stay in target/bench-allreduce.txt (one per measurement).
out="$FERRY_ROOT/target/bench-allreduce.txt"
: >"$out"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "==> machine: $(nproc) cores; $(uptime)" >&2
for r in $(seq "$ROUNDS"); do
  echo "==> round $r" >&2
  "$RING" limits | sed "s/^/limits 0 /" >>"$out"
  for world in 2 4; do
    "$RING" "$world" "$SIZES" 20 | sed "s/^/ring $world /" >>"$out"
    FERRY_RING_SHM=0 "$RING" "$world" "$SIZES" 20 | sed "s/^/tcp $world /" >>"$out"
    FERRY_RING_SHM=0 FERRY_BENCH_WIRE=bf16 "$RING" "$world" "$SIZES" 20 | sed "s/^/bf16 $world /" >>"$out"
    "$FERRY_PYTHON" bench/allreduce_gloo.py "$world" "$SIZES" 20 | sed "s/^/gloo $world /" >>"$out"
  done
  FERRY_BENCH_HOSTS=2 FERRY_BENCH_ALGO=hier "$RING" 4 "$SIZES" 20 | sed "s/^/hier 4 /" >>"$out"
  FERRY_BENCH_HOSTS=2 FERRY_BENCH_ALGO=hier FERRY_BENCH_WIRE=bf16 "$RING" 4 "$SIZES" 20 | sed "s/^/hierbf16 4 /" >>"$out"
  FERRY_BENCH_HOSTS=2 "$RING" 4 "$SIZES" 20 | sed "s/^/flat2h 4 /" >>"$out"
done
if [ "${E2E:-1}" != 0 ]; then
  echo "==> building release binaries for the end-to-end runs" >&2
  cargo build --release -q -p ferry-daemon -p ferry-ctl
  "$FERRY_PYTHON" bench/train_throughput.py prepare "$WORK" mlp
  for r in $(seq "$ROUNDS"); do
    echo "==> end to end, round $r" >&2
    runs=(ferry-none torchrun ferry-bf16)
    [ $((r % 2)) -eq 0 ] && runs=(ferry-bf16 torchrun ferry-none)
    for run in "${runs[@]}"; do
      case "$run" in
        torchrun) "$FERRY_PYTHON" bench/cluster_throughput.py torchrun "$WORK" --epochs 3 ;;
        *) "$FERRY_PYTHON" bench/cluster_throughput.py ferry "$WORK" --epochs 3 \
             --bin "$FERRY_ROOT/target/release" --compression "${run#ferry-}" ;;
      esac | sed "s/^/e2e 0 /" >>"$out"
    done
  done
fi
"$FERRY_PYTHON" - "$out" <<'PY'
import collections, json, statistics, sys
bw, e2e, limits = collections.defaultdict(list), collections.defaultdict(list), ([], [])
for line in open(sys.argv[1]):
    side, world, rest = line.split(" ", 2)
    if side == "limits":
        lo, mc = rest.split()
        limits[0].append(float(lo)); limits[1].append(float(mc))
    elif side == "e2e":
        j = json.loads(rest)
        e2e[f"{j['system']}-{j['compression']}"].append(j["samples_per_sec"])
    else:
        size, _, busbw = rest.split()
        bw[(side, int(world), int(size))].append(float(busbw))
med = lambda side, world, size: statistics.median(bw[(side, world, size)])
loop = statistics.median(limits[0])
print(f"limits: one loopback TCP stream {loop:.3f} GB/s, memcpy {statistics.median(limits[1]):.3f} GB/s")
label = {4096: "4 KB", 1 << 20: "1 MB", 64 << 20: "64 MB", 256 << 20: "256 MB"}
print(f"\n{'procs':>5} {'size':>7} {'ring':>7} {'tcp':>7} {'bf16':>7} {'gloo':>7} {'ring/g':>7} {'tcp/g':>7} {'bf16/g':>7} {'tcp/loop':>8}   (busbw GB/s)")
for world in (2, 4):
    for size in label:
        r, t, b, g = (med(s, world, size) for s in ("ring", "tcp", "bf16", "gloo"))
        print(f"{world:>5} {label[size]:>7} {r:>7.3f} {t:>7.3f} {b:>7.3f} {g:>7.3f} {r / g:>7.2f} {t / g:>7.2f} {b / g:>7.2f} {t / loop:>8.2f}")
print(f"\n2 hosts x 2 ranks against Gloo with 4 processes (busbw GB/s)")
print(f"{'size':>7} {'hier':>7} {'hier bf16':>9} {'flat ring':>9} {'gloo':>7} {'hier/g':>7} {'bf16/g':>7} {'flat/g':>7}")
for size in label:
    h, hb, f, g = (med(s, 4, size) for s in ("hier", "hierbf16", "flat2h", "gloo"))
    print(f"{label[size]:>7} {h:>7.3f} {hb:>9.3f} {f:>9.3f} {g:>7.3f} {h / g:>7.2f} {hb / g:>7.2f} {f / g:>7.2f}")
if e2e:
    t = statistics.median(e2e["torchrun-none"])
    print(f"\nBenchMLP, 2 hosts x 1 rank over TCP, samples/s (median of {len(e2e['torchrun-none'])})")
    for k in ("ferry-none", "ferry-bf16", "torchrun-none"):
        v = statistics.median(e2e[k])
        print(f"  {k:<14} {v:8.1f}   ratio to torchrun {v / t:.3f}")
PY
