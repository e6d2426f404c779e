#!/bin/bash
# Evaluate one DIMBA checkpoint on Slurm with tools/eval.py (one task, one GPU by default).
#
#   sbatch slurm/eval.sh runs/dimba-train-1234/checkpoints/step-00010000
#   sbatch slurm/eval.sh runs/dimba-train-1234                      # its newest complete checkpoint
#   sbatch --gpus-per-node=0 slurm/eval.sh RUN/checkpoints/step-00000040 --data data/shards   # CPU
#
# Submit from the repository root (or set DIMBA_ROOT). The first argument is a checkpoint folder or a run
# directory; the rest go to tools/eval.py unchanged. Unless given, defaults come from the run directory:
#   --data     the shards the run trained on (data.shards in RUN_DIR/config.json)
#   --output   RUN_DIR/eval/<checkpoint>.json
#   --run-dir  RUN_DIR, so the metrics also land in the run's tensorboard at the checkpoint's step
# Every #SBATCH line is a default that sbatch options on the command line override. PYTHON picks the
# interpreter (default: python on the PATH at submit time).
#SBATCH --job-name=dimba-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -uo pipefail

die() { echo "slurm/eval.sh: $*" >&2; exit 1; }

[ -n "${SLURM_JOB_ID:-}" ] || die "submit with sbatch (sbatch slurm/eval.sh CHECKPOINT_OR_RUN_DIR [tools/eval.py options])"
[ $# -ge 1 ] || die "missing checkpoint: sbatch slurm/eval.sh CHECKPOINT_OR_RUN_DIR [tools/eval.py options]"
ROOT=${DIMBA_ROOT:-$SLURM_SUBMIT_DIR}
[ -f "$ROOT/tools/eval.py" ] || die "$ROOT/tools/eval.py not found; submit from the repository root or set DIMBA_ROOT"
cd "$ROOT" || die "cannot cd to $ROOT"
PYTHON=${PYTHON:-python}

MODEL=${1%/}; shift
[ -d "$MODEL" ] || die "checkpoint or run directory $MODEL not found (relative paths are taken from $ROOT)"
if [ -d "$MODEL/checkpoints" ]; then                      # a run directory: its newest complete checkpoint
  RUN_DIR=$MODEL
  [ -f "$RUN_DIR/checkpoints/latest" ] || die "run directory $RUN_DIR has no complete checkpoint yet"
  CKPT=$RUN_DIR/checkpoints/$(cat "$RUN_DIR/checkpoints/latest")
elif [ "$(basename "$(dirname "$MODEL")")" = checkpoints ]; then   # RUN_DIR/checkpoints/step-XXXXXXXX
  CKPT=$MODEL
  RUN_DIR=$(dirname "$(dirname "$MODEL")")
else
  CKPT=$MODEL
  RUN_DIR=""
fi

has() { local flag=$1; shift; for a in "$@"; do [[ "$a" == "$flag" || "$a" == "$flag="* ]] && return 0; done; return 1; }
ARGS=("$@")
if [ -n "$RUN_DIR" ]; then
  has --output "$@" || ARGS+=(--output "$RUN_DIR/eval/$(basename "$CKPT").json")
  has --run-dir "$@" || ARGS+=(--run-dir "$RUN_DIR")
  if ! has --data "$@" && [ -f "$RUN_DIR/config.json" ]; then
    DATA=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["data"]["shards"])' "$RUN_DIR/config.json") \
      || die "cannot read data.shards from $RUN_DIR/config.json; pass --data SHARDS_DIR"
    ARGS+=(--data "$DATA")
  fi
  mkdir -p "$RUN_DIR/eval"
fi
has --data "${ARGS[@]}" || die "no --data given and no run directory config to take it from; pass --data SHARDS_DIR"
has --output "${ARGS[@]}" || die "no --output given for checkpoint $CKPT outside a run directory; pass --output FILE.json"

echo "[eval.sh] job $SLURM_JOB_ID: evaluating $CKPT on $(hostname -s), $(date -Is)"
srun --kill-on-bad-exit=1 --ntasks=1 "$PYTHON" tools/eval.py --model "$CKPT" "${ARGS[@]}"
rc=$?
[ "$rc" -eq 0 ] || die "evaluation of $CKPT failed (exit code $rc); see the log above"
echo "[eval.sh] done: $CKPT, $(date -Is)"
