#!/usr/bin/env bash
# Issue-24 question 2 (docs/results.md, "The short budget"): at the quick start's budget (the fp
# teacher 7 epochs, each student 6 epochs with its cosine over those 6), does binaryvit beat
# baseline? One 7-epoch teacher (seed 0) on both cores, then baseline and binaryvit of seeds
# 0, 1, 2 two at a time, one per core (taskset), test set, paired by seed. Resumable: a finished
# run leaves DONE in its workdir and is skipped; an interrupted one continues from its checkpoint.
#   bash benchmarks/study_short_budget.sh [OUT_DIR]   (default workdirs/short_budget)
# then the report (table, paired differences, diagnostics; docs/short_budget/, beside the main study):
#   .venv/bin/python benchmarks/ablation.py --report_only --out=OUT_DIR --presets=fp,baseline,binaryvit \
#       --seeds=0,1,2 --teacher_seed=0 --docs=docs/short_budget -- --config.total_epochs=6
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-workdirs/short_budget}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"

source benchmarks/study_lanes.sh

student() {  # student CORE PRESET SEED
  train "$1" "$2_s$3" --config=configs/fashion_mnist.py:"$2" --config.seed="$3" \
    --config.total_epochs=6 --config.distill.teacher_workdir="$OUT/fp_s0"
}

train 0,1 fp_s0 --config=configs/fashion_mnist.py:fp --config.seed=0 --config.total_epochs=7
# a lane goes on after a failed run (its record stays in the log); a failed teacher stops everything
(set +e; student 0 baseline 0; student 0 binaryvit 1; student 0 baseline 2) &
(set +e; student 1 binaryvit 0; student 1 baseline 1; student 1 binaryvit 2) &
wait
