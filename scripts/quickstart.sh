#!/usr/bin/env bash
# The README's main job: set up, then train an fp teacher and a BinaryViT
# student (with KD) on the real Fashion-MNIST, printing the model summary and
# both test accuracies. Workdirs (checkpoints, metrics.jsonl, TensorBoard
# logs) land in workdirs/. Extra flags are passed to both runs, e.g.
#   bash scripts/quickstart.sh --config.total_epochs=5
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=${WORKDIRS:-workdirs}
mkdir -p "$OUT"

$PY train.py --config=configs/fashion_mnist.py:fp --workdir="$OUT/fmnist_fp" "$@" | tee "$OUT/fp.log"
$PY train.py --config=configs/fashion_mnist.py:binaryvit --workdir="$OUT/fmnist_binaryvit" \
  --config.distill.teacher_workdir="$OUT/fmnist_fp" "$@" | tee "$OUT/binaryvit.log"

echo
echo "Fashion-MNIST test accuracy (top-1):"
for run in fp binaryvit; do
  printf '  %-10s %s\n' "$run" "$(grep '^final eval' "$OUT/$run.log" | tail -1)"
done
echo "Workdirs: $OUT/fmnist_fp $OUT/fmnist_binaryvit (metrics.jsonl, tensorboard/, checkpoints/, best/)"
