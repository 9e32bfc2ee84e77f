#!/usr/bin/env bash
# Issue-24 validation round (docs/results.md, "Tuning"): Le & Li's two switches on the baseline and
# the GRS strength options on binaryvit, against the two presets as they are, all on the validation
# split (train[:90%] / train[90%:]), seed 0, distilled from one 30-epoch fp teacher trained on the
# same split. The teacher first on both cores, then two students at a time, one per core (taskset),
# in the order of the list (a round that does not fit the time can be left out). Resumable: a
# finished run leaves DONE in its workdir and is skipped; an interrupted one continues from its
# checkpoint.
#   bash benchmarks/study_validation.sh [OUT_DIR] [SEED]   (default workdirs/validation, seed 0)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-workdirs/validation}
SEED=${2:-0}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"

source benchmarks/study_lanes.sh

VAL=(--config.data.train_split='train[:90%]' --config.data.eval_split='train[90%:]')
train 0,1 val_fp --config=configs/fashion_mnist.py:fp "${VAL[@]}"

student() {  # student CORE NAME PRESET FLAGS...
  local core=$1 name=$2 preset=$3
  shift 3
  train "$core" "${name}_s$SEED" --config=configs/fashion_mnist.py:"$preset" --config.seed="$SEED" \
    "${VAL[@]}" --config.distill.teacher_workdir="$OUT/val_fp" "$@"
}

# one lane per core; a lane goes on after a failed run (its record stays in the log)
(set +e
 student 0 baseline baseline
 student 0 binaryvit binaryvit
 student 0 grs_adaptive binaryvit --config.grs.adaptive=True
 student 0 grs_decoupled binaryvit --config.grs.coupling=decoupled --config.grs.strength=1.0
) &
(set +e
 student 1 rprelu_everywhere baseline --config.model.overrides.rprelu_everywhere=True
 student 1 attention_bypass baseline --config.model.overrides.attention_bypass=True
 student 1 grs_lr binaryvit --config.grs.schedule=lr --config.grs.strength=3e-5
 student 1 grs_nagel binaryvit --config.grs.schedule=cosine --config.grs.ramp_start_epochs=3.75 \
   --config.grs.ramp_epochs=11.25
) &
wait
