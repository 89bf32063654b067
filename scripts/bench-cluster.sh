#!/usr/bin/env bash
# Fault recovery: ferry's cluster mode against torchrun elastic (c10d rendezvous, --nnodes 1:3,
# its defaults), with the same model, data, optimizer and per-rank batch, on three "hosts"
# (127.0.0.11-13, each a process group) and measured in the same run:
#   kill -9 a node         seconds until the survivors complete a training step again
#   SIGSTOP a node         the same, and (ferry) until the coordinator noticed
#   kill the coordinator   ferry: until another node coordinates, and the job goes on;
#   (torchrun: its store)  torchrun: whether the job survives its store host
# plus the steps lost. Each side runs alone (the other's processes are gone). Prints both
# sides' JSON lines and a table with the ratios torchrun/ferry.
# Usage: scripts/bench-cluster.sh [MODEL=cnn|mlp] [FERRY_TTL_MS=5000]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/env.sh
MODEL="${1:-cnn}"; TTL_MS="${2:-5000}"
echo "==> building release binaries" >&2
cargo build --release -q -p ferry-daemon -p ferry-ctl
REL="$FERRY_ROOT/target/release"
WORK="$(mktemp -d)"
out="$WORK/results.jsonl"
trap 'rm -rf "$WORK"' EXIT
"$FERRY_PYTHON" bench/train_throughput.py prepare "$WORK" "$MODEL"
echo "==> machine: $(nproc) cores; $(uptime)" >&2
for fault in kill stop coordinator; do
  tfault="$fault"; [ "$fault" = coordinator ] && tfault=store
  echo "==> ferry: $fault" >&2
  "$FERRY_PYTHON" bench/ferry_faults.py run "$WORK" "$fault" --bin "$REL" --ttl-ms "$TTL_MS" >>"$out"
  echo "==> torchrun: $tfault" >&2
  "$FERRY_PYTHON" bench/torchrun_faults.py run "$WORK" "$tfault" | sed 's/^{/{"system": "torchrun", /' >>"$out"
done
cat "$out"
"$FERRY_PYTHON" - "$out" "$TTL_MS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ttl = int(sys.argv[2]) / 1000
get = lambda system, fault: next((r for r in rows if r.get("system") == system and r["fault"] == fault), {})
fmt = lambda v: "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)
print(f"\nferry's node lease TTL: {ttl:.1f} s; torchrun: defaults, Gloo timeout 60 s (its default is 30 min)")
print(f"{'fault':<22} {'ferry s':>8} {'torchrun s':>11} {'torchrun/ferry':>15} {'ferry lost':>11} {'torchrun lost':>14}")
for fault, tfault, label in (("kill", "kill", "kill -9 a node"), ("stop", "stop", "SIGSTOP a node")):
    f, t = get("ferry", fault), get("torchrun", tfault)
    fs, ts = f.get("seconds_to_next_step"), t.get("seconds_to_next_step")
    ratio = f"{ts / fs:.1f}x" if fs and ts else ("torchrun did not recover" if fs else "-")
    print(f"{label:<22} {fmt(fs):>8} {fmt(ts):>11} {ratio:>15} {fmt(f.get('steps_lost')):>11} {fmt(t.get('steps_lost')):>14}")
f = get("ferry", "stop")
print(f"SIGSTOP noticed by ferry's coordinator after {fmt(f.get('seconds_to_notice'))} s (goal: TTL + 1 = {ttl + 1:.1f} s)")
f, t = get("ferry", "coordinator"), get("torchrun", "store")
print(f"coordinator killed: another ferry node coordinates after {fmt(f.get('seconds_to_coordinator'))} s "
      f"(goal: {ttl + 1:.1f} s); job survived: ferry {f.get('job_survived')}, torchrun (store host killed) {t.get('job_survived')}")
PY
