#!/usr/bin/env bash
# The 10-seed study for one accelerator: fp, baseline and binaryvit (configs/fashion_mnist.py's
# chosen settings), seeds 0-9, each student distilled from the fp teacher of its own seed, at
# three sizes -- the config's model (width 96, depth 4) and the larger w192_d6 and w192_d12 (width
# 192, depth 6 / 12; heads, patch and schedule unchanged) -- trained on the training set and
# evaluated on the test set, 16 trainings at once; then the paired report of each size
# (OUT_DIR/report/results.md, results.json with the per-seed binaryvit - baseline differences;
# the larger sizes in OUT_DIR/report/w192_d6/ and .../w192_d12/). 90 runs, 843,720 train steps.
#
#   bash benchmarks/study_sweep.sh OUT_DIR [ablation.py flags] [-- train.py flags]
#   PARALLEL=8 SIZES=default bash benchmarks/study_sweep.sh OUT_DIR   # fewer at once / one size
#   MPS=0 bash benchmarks/study_sweep.sh OUT_DIR   # without the CUDA MPS daemon (default: start it if none runs)
#
# Resumable: the same command after a stop (Ctrl-C, the end of a lease) keeps the finished runs
# (re-evaluated only) and resumes the others from their checkpoints (one per epoch), so a
# session that runs out of time loses at most an epoch per running training. Every run logs to
# train.log in its workdir; OUT_DIR/runs.jsonl records each run's start, end and exit status.
#
# Cost (docs/results.md, "Sweep for an accelerator", has the table and the arithmetic). Measured
# here, on 2 Intel Xeon cores shared with another job, seconds per train step at batch 128 (the
# fastest 10-step window of 20-200 steps): default size fp 0.096, baseline 0.26, binaryvit 0.21;
# w192_d6 fp 0.61, baseline 0.53, binaryvit 0.77; w192_d12 fp 1.07, baseline 1.99, binaryvit
# 2.18 -- about 185 hours of these 2 cores for the whole plan. An H200 was not measured on these
# models: they are far too small for it to be compute-bound (a w192_d12 student step with its
# teacher forward is ~0.1 TFLOP, ~1 ms at the 91 TFLOP/s the H200 ran DeiT-S at, docs/gpu_h200/),
# so a step costs about one small kernel per XLA op. The compiled steps have 1,150 (fp) and 4,130
# (binaryvit, teacher forward included) top-level ops at the default size, 3,170 and 12,050 at
# w192_d12 (counted in the CPU executable; assumed: a GPU step launches as many kernels, baseline
# as many as binaryvit, depth 6 linearly in between). At an assumed 1.5-3 us per small kernel
# that is ~4.0 billion kernels, 99-199 min
# of GPU time for the plan (default size alone: 19-37 min) when the processes' kernels do not
# overlap (without MPS the GPU time-slices between processes), and 6-12 min (+ compiles) when 16
# processes' kernels run side by side under MPS (132 SMs; one host core per process). Hence MPS
# by default (MPS=0: off), the compile cache shared by the runs (the seeds of one preset and size
# compile the same program), and the larger sizes listed first: their teacher -> student chains
# (21,093 steps in a row) are the longest. By this estimate the whole plan takes about 10-15 min
# with MPS and does not fit 10 minutes without it; the command resumes where a session stopped.
# The plan the tool prints at the start (and on a resume, from the step times the runs logged)
# is the measured estimate.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/study_sweep.sh OUT_DIR [flags]}
shift
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

mkdir -p "$out"
# MPS lets the kernels of the concurrent trainings run at the same time; started here only when
# no daemon runs (and quit at the end), skipped where the tool is missing or cannot start.
# (pgrep -x matches the 15-character process name of both the control daemon and the server.)
if [ "${MPS:-1}" = 1 ] && command -v nvidia-cuda-mps-control > /dev/null && ! pgrep -x nvidia-cuda-mps > /dev/null; then
    if nvidia-cuda-mps-control -d; then
        trap 'echo quit | nvidia-cuda-mps-control' EXIT
        echo "started the CUDA MPS daemon" | tee -a "$out/gpu.txt"
    else
        echo "could not start the CUDA MPS daemon: the runs time-slice the GPU" | tee -a "$out/gpu.txt"
    fi
fi
# One compilation per (preset, size) instead of one per run.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$out/jax_cache}
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/gpu.txt"
fi

$py benchmarks/ablation.py \
    --presets=fp,baseline,binaryvit \
    --seeds=0,1,2,3,4,5,6,7,8,9 \
    --sizes="${SIZES:-w192_d12,w192_d6,default}" \
    --parallel="${PARALLEL:-16}" \
    --split=test \
    --out="$out" \
    --docs="$out/report" \
    --regime=fashion_mnist_p7_10seeds_own_teacher \
    "$@"
