#!/usr/bin/env bash
# The README's main job: set up, then train an fp teacher and a BinaryViT
# student (with KD) on the real Fashion-MNIST, printing the model summary and
# both test accuracies, then exports the student as a 1-bit .bvit file and prints
# its size and batch-1 latency against fp32 on this machine. A shortened schedule of the study regime
# (docs/results.md: the config defaults train the teacher 30 epochs and the
# student 15): the teacher 7 epochs, the student 6, evaluated at the end, so
# both fit in 10 minutes on 2 cores. Workdirs (checkpoints, metrics.jsonl,
# TensorBoard logs) land in workdirs/. Extra flags are passed to both runs, e.g.
#   bash scripts/quickstart.sh --config.seed=1
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=${WORKDIRS:-workdirs}
mkdir -p "$OUT"

QUICK=(--config.eval_every_steps=0 --config.diagnostics_every_steps=0)
$PY train.py --config=configs/fashion_mnist.py:fp --workdir="$OUT/fmnist_fp" \
  --config.total_epochs=7 "${QUICK[@]}" "$@" | tee "$OUT/fp.log"
$PY train.py --config=configs/fashion_mnist.py:binaryvit --workdir="$OUT/fmnist_binaryvit" \
  --config.total_epochs=6 --config.distill.teacher_workdir="$OUT/fmnist_fp" "${QUICK[@]}" "$@" | tee "$OUT/binaryvit.log"

# What binarization buys: the student as a 1-bit file, its size and its latency against fp32, on this machine.
echo
$PY -m bvit_jax.deploy.export --workdir="$OUT/fmnist_binaryvit" --out="$OUT/student.bvit" --latency | tee "$OUT/export.log"

echo
echo "Fashion-MNIST test accuracy (top-1):"
for run in fp binaryvit; do
  printf '  %-10s %s\n' "$run" "$(grep '^final eval' "$OUT/$run.log" | tail -1)"
done
echo "Workdirs: $OUT/fmnist_fp $OUT/fmnist_binaryvit (metrics.jsonl, tensorboard/, checkpoints/, best/);"
echo "the 1-bit student: $OUT/student.bvit (bvit-predict --model=$OUT/student.bvit IMAGE...)"
