#!/usr/bin/env bash
# Issue-24 question 3 (docs/results.md, "Without a teacher"): does binaryvit beat baseline when
# both train on the label loss alone (config.distill.enabled=False, no fp teacher), on the study's
# 15-epoch schedule? baseline and binaryvit of seeds 0, 1, 2, two at a time, one per core
# (taskset), test set, paired by seed. Resumable: a finished run leaves DONE in its workdir and is
# skipped; an interrupted one continues from its checkpoint.
#   bash benchmarks/study_no_teacher.sh [OUT_DIR]   (default workdirs/no_teacher)
# then the report (table, paired differences, diagnostics; docs/no_teacher/, beside the main study):
#   .venv/bin/python benchmarks/ablation.py --report_only --out=OUT_DIR --presets=baseline,binaryvit \
#       --seeds=0,1,2 --docs=docs/no_teacher -- --config.distill.enabled=False
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-workdirs/no_teacher}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"

source benchmarks/study_lanes.sh

student() {  # student CORE PRESET SEED
  train "$1" "$2_s$3" --config=configs/fashion_mnist.py:"$2" --config.seed="$3" --config.distill.enabled=False
}

# a lane goes on after a failed run (its record stays in the log)
(set +e; student 0 baseline 0; student 0 binaryvit 1; student 0 baseline 2) &
(set +e; student 1 binaryvit 0; student 1 baseline 1; student 1 binaryvit 2) &
wait
