# Shared by the study scripts (source it; it is not run on its own): one training run per call,
# pinned to the cores it is given, skipped once it has finished.
#   train CORES NAME FLAGS...   trains into $OUT/NAME (log: $OUT/NAME.log) unless $OUT/NAME/DONE exists
# A finished run leaves DONE in its workdir; an interrupted one continues from its checkpoint when
# the script runs again (the trainer resumes from the workdir). Needs OUT and PY set by the caller.

train() {
  local cores=$1 name=$2
  shift 2
  [[ -e "$OUT/$name/DONE" ]] && { echo "skip  $name (done)"; return 0; }
  echo "start $name on cores $cores ($(date +%T))"
  if taskset -c "$cores" "$PY" train.py --workdir="$OUT/$name" "$@" > "$OUT/$name.log" 2>&1; then
    touch "$OUT/$name/DONE"
    echo "done  $name ($(date +%T)): $(grep '^final eval' "$OUT/$name.log" | tail -1)"
  else
    echo "FAILED $name ($(date +%T)): see $OUT/$name.log"
    return 1
  fi
}
