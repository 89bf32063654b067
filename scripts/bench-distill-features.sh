#!/usr/bin/env bash
# Feature distillation against soft labels alone, on the real-data demo's task: the small
# CNN learns the recipe's MobileNetV2 from demo/jobs/real/distill.yaml and from
# distill-features.yaml, for seeds 0..SEEDS-1, and the test and validation accuracy of each
# are printed. Needs the real demo's work dir (scripts/demo.sh --real has run: the
# recipe's model_best.pt is the teacher). About a minute per job on 2 cores.
# Usage: scripts/bench-distill-features.sh [SEEDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
SEEDS="${1:-3}"
WORK="$FERRY_ROOT/demo/work-real"
[ -f "$WORK/runs/fmnist-recipe/model_best.pt" ] || {
  echo "no $WORK/runs/fmnist-recipe/model_best.pt: run scripts/demo.sh --real first" >&2
  exit 1
}
start_ferryd "$FERRY_ROOT/target/debug" "$WORK" "${FERRY_DEMO_PORT:-7071}"
trap 'kill $FERRYD 2>/dev/null; wait $FERRYD 2>/dev/null || true' EXIT
JOBS="$(mktemp -d)"
trap 'kill $FERRYD 2>/dev/null; wait $FERRYD 2>/dev/null || true; rm -rf "$JOBS"' EXIT
for seed in $(seq 0 $((SEEDS - 1))); do
  for side in distill distill-features; do
    name="bench-$side-s$seed"
    rm -rf "$WORK/runs/$name"
    sed "s/^name: .*/name: $name/; s#^  dir: runs/.*#  dir: runs/$name#; s/^  seed: 0/  seed: $seed/" \
      "demo/jobs/real/$side.yaml" >"$JOBS/$name.yaml"
    ferryctl submit "$JOBS/$name.yaml" --wait >"$JOBS/$name.log" 2>&1 || {
      cat "$JOBS/$name.log" >&2
      exit 1
    }
    "$FERRY_PYTHON" - "$WORK/runs/$name/eval.json" "$side" "$seed" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:<17} seed {sys.argv[3]}: test {d['test']['top1'] * 100:.1f}%  val {d['val']['top1'] * 100:.1f}%")
PY
  done
done
