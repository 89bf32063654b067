#!/usr/bin/env bash
# Fault recovery: ferry's cluster mode against torchrun elastic (c10d rendezvous, --nnodes 1:3,
# its defaults), with the same model, data, optimizer and per-rank batch, on three "hosts"
# (127.0.0.11-13, each a process group) and measured in the same run:
#   kill -9 a node         seconds until the survivors complete a training step again
#   SIGSTOP a node         the same, and (ferry) until the coordinator noticed
#   kill the coordinator   ferry: until another node coordinates, and the job goes on;
#   (torchrun: its store)  torchrun: whether the job survives its store host
# plus the steps lost and ferry's etcd traffic while it trains. Each side runs alone (the
# other's processes are gone), ROUNDS times, alternating. Prints every JSON line and a table
# of medians over the runs that recovered, how many did, and the ratios torchrun/ferry.
# Usage: scripts/bench-cluster.sh [MODEL=cnn|mlp] [FERRY_TTL_MS=5000] [ROUNDS=1]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/env.sh
MODEL="${1:-cnn}"; TTL_MS="${2:-5000}"; ROUNDS="${3:-1}"
echo "==> building release binaries" >&2
cargo build --release -q -p ferry-daemon -p ferry-ctl
REL="$FERRY_ROOT/target/release"
WORK="$(mktemp -d)"
out="$WORK/results.jsonl"
trap 'rm -rf "$WORK"' EXIT
"$FERRY_PYTHON" bench/train_throughput.py prepare "$WORK" "$MODEL"
echo "==> machine: $(nproc) cores; $(uptime)" >&2
for round in $(seq "$ROUNDS"); do
  for fault in kill stop coordinator; do
    tfault="$fault"; [ "$fault" = coordinator ] && tfault=store
    echo "==> round $round, ferry: $fault" >&2
    "$FERRY_PYTHON" bench/ferry_faults.py run "$WORK" "$fault" --bin "$REL" --ttl-ms "$TTL_MS" >>"$out"
    echo "==> round $round, torchrun: $tfault" >&2
    "$FERRY_PYTHON" bench/torchrun_faults.py run "$WORK" "$tfault" | sed 's/^{/{"system": "torchrun", /' >>"$out"
  done
done
cat "$out"
"$FERRY_PYTHON" - "$out" "$TTL_MS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ttl = int(sys.argv[2]) / 1000
runs = lambda system, fault: [r for r in rows if r.get("system") == system and r["fault"] == fault]
def med(system, fault, key):
    v = [r[key] for r in runs(system, fault) if r.get(key) is not None]
    return statistics.median(v) if v else None
def ok(system, fault):
    r = runs(system, fault)
    return f"{sum(x['recovered'] for x in r)}/{len(r)}"
fmt = lambda v: "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)
print(f"\nferry's node lease TTL: {ttl:.1f} s; torchrun: defaults, Gloo timeout 60 s (its default is 30 min)")
print("medians over the runs that recovered; recovered: runs that trained again / runs")
print(f"{'fault':<16} {'ferry s':>8} {'recovered':>10} {'torchrun s':>11} {'recovered':>10} {'torchrun/ferry':>15} {'lost: ferry':>12} {'torchrun':>9}")
for fault, label in (("kill", "kill -9 a node"), ("stop", "SIGSTOP a node")):
    fs, ts = med("ferry", fault, "seconds_to_next_step"), med("torchrun", fault, "seconds_to_next_step")
    ratio = f"{ts / fs:.1f}x" if fs and ts else "-"
    print(f"{label:<16} {fmt(fs):>8} {ok('ferry', fault):>10} {fmt(ts):>11} {ok('torchrun', fault):>10} {ratio:>15} "
          f"{fmt(med('ferry', fault, 'steps_lost')):>12} {fmt(med('torchrun', fault, 'steps_lost')):>9}")
print(f"SIGSTOP noticed by ferry's coordinator after {fmt(med('ferry', 'stop', 'seconds_to_notice'))} s (goal: TTL + 1 = {ttl + 1:.1f} s)")
print(f"coordinator killed: another ferry node coordinates after {fmt(med('ferry', 'coordinator', 'seconds_to_coordinator'))} s "
      f"(goal: {ttl + 1:.1f} s); the job survived in {ok('ferry', 'coordinator')} runs; "
      f"torchrun with its store host killed: {ok('torchrun', 'store')}")
print(f"ferry's etcd traffic while training: {fmt(med('ferry', 'kill', 'etcd_requests_per_s'))} requests/s at "
      f"{fmt(med('ferry', 'kill', 'steps_per_s'))} steps/s (ranks send none; progress is written once a second)")
PY
