#!/usr/bin/env bash
# The accelerator runs behind the GPU tables in docs/benchmarks.md and
# docs/export.md (raw outputs: docs/gpu_h200/): the train-step benchmark for
# DeiT-S at batch 256 in bfloat16 and float32, then the packed-inference
# benchmark. Every output is teed into OUT_DIR. Compiling takes most of the
# time (on an H200: ~25 s per fp step, ~55-65 s per binaryvit step).
#
#   bash benchmarks/gpu.sh OUT_DIR      # needs a CUDA jax and requirements.txt's other packages
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_results}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$py -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, 'orbax', o.__version__, jax.devices())" 2>&1 | tee -a "$out/gpu.txt"

# binaryvit:nokd gives the teacher forward's share; :tbf16 the teacher in bfloat16; :batchnorm / :affine the foldable branch norms
for dtype in bfloat16 float32; do
    $py benchmarks/train_step.py --variants deit_small --presets fp,binaryvit,binaryvit:nokd,binaryvit:tbf16,binaryvit:batchnorm,binaryvit:affine \
        --dtype $dtype --reps 5 \
        --json "$out/train_step_deit_small_$dtype.json" 2>&1 | tee "$out/train_step_deit_small_$dtype.txt"
done
$py benchmarks/packed_inference.py --min_time 0.5 --branch_norms=layernorm,batchnorm,affine 2>&1 | tee "$out/packed_inference.txt"
