#!/bin/bash
# Train DIMBA on Slurm: one `srun` task per GPU (or per CPU rank), any number of nodes.
#
#   sbatch slurm/train.sh configs/1b.json                                   # defaults below: 1 node x 8 GPUs
#   sbatch --nodes=4 --time=48:00:00 slurm/train.sh configs/1b.json training.lr=2e-4
#   sbatch --ntasks-per-node=2 --gpus-per-node=0 slurm/train.sh configs/tiny.json training.max_steps=40  # CPU
#
# Submit from the repository root (or set DIMBA_ROOT). Arguments: the config, then KEY=VALUE overrides, each
# passed to launch/train.py as `--set KEY=VALUE`. Every #SBATCH line below is a default: sbatch options given
# on the command line win. Environment knobs (exported into the job by sbatch):
#   RUN_DIR      run directory (default: runs/<job name>-<job id>; a requeued job keeps its id, so it resumes
#                there). Point it at an existing run to continue that run in a new job.
#   PYTHON       interpreter (default: python on the PATH at submit time, e.g. your virtualenv's).
#   DIMBA_ROOT   repository checkout (default: the directory sbatch was called from).
#   MAX_REQUEUES stop requeueing after this many restarts (default 50): a job that cannot make progress
#                fails instead of cycling through the queue forever.
#
# Why srun and not the deepspeed launcher: Slurm then owns every rank. Signals (pre-emption, the time-limit
# warning, scancel) reach every rank directly, a rank that dies takes the step down (--kill-on-bad-exit), no
# ssh/pdsh between nodes or hostfile is needed, and sacct accounts per task. launch/train.py reads
# SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; this script exports MASTER_ADDR / MASTER_PORT.
#
# Pre-emption and time limits: Slurm sends SIGUSR1 to every rank 180 s before the limit (--signal), and a
# pre-empting scheduler or `scontrol requeue` sends SIGTERM. Either way the ranks finish the step, save a
# checkpoint, write RUN_DIR/status.json {"state": "interrupted"} and exit 0; this script then requeues the
# job (--requeue allows it), and the requeued job resumes from the newest complete checkpoint.
#SBATCH --job-name=dimba-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -uo pipefail

die() { echo "slurm/train.sh: $*" >&2; exit 1; }

[ -n "${SLURM_JOB_ID:-}" ] || die "submit with sbatch (sbatch slurm/train.sh CONFIG [KEY=VALUE ...]), not bash"
[ $# -ge 1 ] || die "missing config: sbatch slurm/train.sh CONFIG [KEY=VALUE ...]"
ROOT=${DIMBA_ROOT:-$SLURM_SUBMIT_DIR}
[ -f "$ROOT/launch/train.py" ] || die "$ROOT/launch/train.py not found; submit from the repository root or set DIMBA_ROOT"
cd "$ROOT" || die "cannot cd to $ROOT"

CONFIG=$1; shift
[ -f "$CONFIG" ] || die "config $CONFIG not found (relative paths are taken from $ROOT)"
SETS=()
for kv in "$@"; do
  [[ "$kv" == *=* && "$kv" != -* ]] || die "override '$kv' is not KEY=VALUE (e.g. training.max_steps=1000)"
  SETS+=(--set "$kv")
done

PYTHON=${PYTHON:-python}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
MAX_REQUEUES=${MAX_REQUEUES:-50}
RESTARTS=${SLURM_RESTART_COUNT:-0}
mkdir -p "$RUN_DIR" || die "cannot create run directory $RUN_DIR"

export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

echo "[train.sh] job $SLURM_JOB_ID restart $RESTARTS: $SLURM_NTASKS tasks on $SLURM_JOB_NUM_NODES node(s)" \
     "($SLURM_JOB_NODELIST), master $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR, $(date -Is)"

# A status left by an earlier incarnation must not be mistaken for this one's.
rm -f "$RUN_DIR/status.json"

# srun does not take --cpus-per-task from sbatch in every Slurm version (22.05 does not): pass it on.
SRUN_ARGS=(--kill-on-bad-exit=1)
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
# Each task records its own exit code: with --kill-on-bad-exit, one task failing (exit 2, a config error, say) makes
# Slurm SIGTERM the others, and srun then reports their 143, which alone reads like a pre-emption during start-up.
# The wrapper's trap keeps it alive through the signals its rank gets (its rank's are the default ones).
EXITS="$RUN_DIR/.task-exit-$SLURM_JOB_ID"
export EXITS_DIR="$EXITS"
rm -rf "$EXITS" && mkdir -p "$EXITS"
srun "${SRUN_ARGS[@]}" bash -c 'trap : USR1 USR2 TERM INT; "$@"; rc=$?; echo "$rc" > "$EXITS_DIR/$SLURM_PROCID"
                                exit "$rc"' task "$PYTHON" launch/train.py --config "$CONFIG" --run-dir "$RUN_DIR" \
     "${SETS[@]}"
rc=$?
failed=$(cat "$EXITS"/* 2>/dev/null | grep -vxE '0|130|138|143' | head -n1)
rm -rf "$EXITS"
if [ -n "$failed" ] && { [ "$rc" -eq 138 ] || [ "$rc" -eq 143 ]; }; then
  echo "[train.sh] a task failed (exit code $failed) and Slurm ended the others (exit code $rc)"
  rc=$failed
fi

state=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["state"])' "$RUN_DIR/status.json" \
        2>/dev/null || echo "none")
echo "[train.sh] training exited with code $rc, state '$state', $(date -Is)"

# 138/143: a rank died of SIGUSR1/SIGTERM itself, i.e. the signal came before training could catch it
# (during start-up). Nothing new was saved, but the job is still being stopped: requeue, and resume from the
# newest complete checkpoint. A run whose status says 'finished' saved its last step: a signal after that
# (the time-limit warning landing as the ranks exit) does not undo it.
if [ "$state" = finished ] && { [ "$rc" -eq 138 ] || [ "$rc" -eq 143 ]; }; then
  echo "[train.sh] a stop signal reached the ranks after the run finished (exit code $rc); nothing to resume"
  rc=0
fi
if { [ "$rc" -eq 0 ] && [ "$state" = interrupted ]; } || [ "$rc" -eq 138 ] || [ "$rc" -eq 143 ]; then
  if [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then
    die "interrupted after $RESTARTS restarts (MAX_REQUEUES=$MAX_REQUEUES); not requeueing. Resume with" \
        "RUN_DIR=$RUN_DIR sbatch slurm/train.sh $CONFIG"
  fi
  echo "[train.sh] stopped by a signal (exit code $rc, state '$state'); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed; resume with" \
                                          "RUN_DIR=$RUN_DIR sbatch slurm/train.sh $CONFIG"
  exit 0
fi
if [ "$rc" -ne 0 ]; then
  die "training failed (exit code $rc, state '$state'); see the log above and $RUN_DIR/status.json"
fi
[ "$state" = finished ] || die "training exited 0 but $RUN_DIR/status.json says '$state' (expected 'finished')"
echo "[train.sh] finished; run directory $RUN_DIR"
