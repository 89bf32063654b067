#!/usr/bin/env bash
# The ferry demo: sets everything up, starts a standalone ferryd on the embedded store, and
# runs a real transfer-learning experiment through ferryctl on scikit-learn's handwritten
# digits: learn digits 0-5, then digits 6-9 from 3 labels per class three ways (scratch,
# feature extraction, fine-tuning), then distil the fine-tuned model into a much smaller
# student through a teacher service, using unlabelled target images, and compare them all.
# `scripts/demo.sh --real` runs the second demo instead (scripts/demo-real.sh): ImageNet's
# MobileNetV2 transferred to Fashion-MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--real" ]; then
  exec scripts/demo-real.sh
fi
scripts/setup.sh
. scripts/env.sh

WORK="$FERRY_ROOT/demo/work"
PORT="${FERRY_DEMO_PORT:-7070}"
rm -rf "$WORK"
mkdir -p "$WORK"
echo "==> preparing data and TorchScript models (PyTorch, scikit-learn)" >&2
"$FERRY_PYTHON" demo/prepare.py "$WORK" "${FERRY_DEMO_SHOTS:-3}"

echo "==> starting ferryd --standalone on 127.0.0.1:$PORT (log: $WORK/ferryd.log)" >&2
trap 'kill $FERRYD 2>/dev/null; wait $FERRYD 2>/dev/null || true' EXIT
start_ferryd "$FERRY_ROOT/target/debug" "$WORK" "$PORT"

echo "==> step 1: the source task" >&2
ferryctl submit demo/jobs/source.yaml --wait
for job in scratch feature-extraction fine-tune; do
  echo "==> step 2: the target task, $job" >&2
  ferryctl submit "demo/jobs/target-$job.yaml" --wait
done

echo "==> step 3: a small student, from the few labels alone, then distilled from the fine-tuned model" >&2
ferryctl submit demo/jobs/student-scratch.yaml --wait
ferryctl submit demo/jobs/student-distill.yaml --wait

echo >&2
ferryctl get
for name in digits-scratch digits-feature-extraction digits-fine-tune tiny-scratch tiny-distilled; do
  ferryctl get "$name" -o json | tr -d '\n'
  echo
done | "$FERRY_PYTHON" demo/report.py
echo
echo "Trained models are in $WORK/runs/*/ (model.safetensors, model.pt for torch.jit.load, metrics.jsonl)."
