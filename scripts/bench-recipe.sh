#!/usr/bin/env bash
# Model quality: does ferry's fine-tuning recipe beat plain fine-tuning, and does ferry's
# plain fine-tuning equal the same loop in PyTorch? On the real-data demo's task (ImageNet
# MobileNetV2 to Fashion-MNIST, 10 labels per class, 64 px, 15 epochs), for each seed:
# demo/jobs/real/fine-tune.yaml and recipe.yaml through a standalone ferryd, and
# bench/finetune_peer.py (fine-tune.yaml's loop in PyTorch, same files and sample order).
# Prints test (and validation) accuracy per seed, the means, and the recipe's margin.
# Usage: scripts/bench-recipe.sh [SEEDS (3)]. About 3 minutes per seed on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
. scripts/env.sh
SEEDS="${1:-3}"
WORK="${FERRY_BENCH_WORK:-/tmp/ferry-bench-recipe}"
PORT="${FERRY_BENCH_PORT:-7391}"
mkdir -p "$WORK"
rm -rf "$WORK/runs" "$WORK/.ferry" "$WORK/specs" "$WORK/data" "$WORK/models"
prepare_real "$WORK" 10
echo "machine: $(nproc) cores; $(uptime)" >&2
trap 'kill $FERRYD 2>/dev/null; wait $FERRYD 2>/dev/null || true' EXIT
start_ferryd "$FERRY_ROOT/target/debug" "$WORK" "$PORT"
mkdir -p "$WORK/specs"
: > "$WORK/results.jsonl"
for seed in $(seq 0 $((SEEDS - 1))); do
  for job in fine-tune recipe; do
    name="bench-$job-$seed"
    sed -e "s/^name: .*/name: $name/" -e "s#dir: runs/.*#dir: runs/$name#" \
      -e "s/^  seed: 0/  seed: $seed/" "demo/jobs/real/$job.yaml" > "$WORK/specs/$name.yaml"
    start=$(date +%s)
    ferryctl submit "$WORK/specs/$name.yaml" --wait >/dev/null 2>&1 || { ferryctl logs "$name" | tail -5 >&2; exit 1; }
    "$FERRY_PYTHON" -c '
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({"side": sys.argv[2], "seed": int(sys.argv[3]), "val": r["val"]["top1"], "test": r["test"]["top1"], "test_model": r["test"]["model"], "seconds": int(sys.argv[4])}))
' "$WORK/runs/$name/eval.json" "ferry $job" "$seed" "$(( $(date +%s) - start ))" | tee -a "$WORK/results.jsonl" >&2
  done
  start=$(date +%s)
  peer=$("$FERRY_PYTHON" bench/finetune_peer.py "$WORK" "$seed" 2)
  echo "$peer" | "$FERRY_PYTHON" -c '
import json, sys
r = json.loads(sys.stdin.read())
print(json.dumps({"side": "PyTorch fine-tune", "seed": r["seed"], "val": r["val"], "test": r["test"], "test_model": "final", "seconds": int(sys.argv[1])}))
' "$(( $(date +%s) - start ))" | tee -a "$WORK/results.jsonl" >&2
done
"$FERRY_PYTHON" - "$WORK/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
sides = ["ferry fine-tune", "PyTorch fine-tune", "ferry recipe"]
seeds = sorted({r["seed"] for r in rows})
at = {(r["side"], r["seed"]): r for r in rows}
print()
print(f"{'side':<20}" + "".join(f"  seed {s} test (val)" for s in seeds) + "   mean test")
for side in sides:
    cells = [at[(side, s)] for s in seeds]
    print(f"{side:<20}" + "".join(f"  {c['test']*100:6.1f}% ({c['val']*100:4.1f})" for c in cells)
          + f"   {statistics.mean(c['test'] for c in cells)*100:6.2f}%")
margins = [at[("ferry recipe", s)]["test"] - at[("ferry fine-tune", s)]["test"] for s in seeds]
peer = [at[("ferry fine-tune", s)]["test"] - at[("PyTorch fine-tune", s)]["test"] for s in seeds]
print()
print("recipe - plain (test, points): " + ", ".join(f"{m*100:+.1f}" for m in margins)
      + f"; mean {statistics.mean(margins)*100:+.2f}, smallest {min(margins)*100:+.1f}")
print("ferry plain - PyTorch plain (test, points): " + ", ".join(f"{m*100:+.1f}" for m in peer)
      + f"; mean {statistics.mean(peer)*100:+.2f}")
PY
