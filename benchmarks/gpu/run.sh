#!/usr/bin/env bash
# What only a GPU answers, each mode within 10 minutes on one GPU.
#
#   beforehand:  bash benchmarks/gpu/prepare.sh        (wheels -> .whl/, GPU-scale shards -> runs/compare-gpu/shards)
#   on the GPU:  bash benchmarks/gpu/run.sh check      needs .whl/                at most 9.5 minutes (limits)
#                bash benchmarks/gpu/run.sh compare S  needs .whl/ and runs/compare-gpu/shards
#                                                      S seconds of DIMBA training, as many steps for each model;
#                                                      at most 3 S seconds + 7.5 minutes (limits): S <= 90
#
# check:   1 install the carried wheels; the GPU, torch and what the fused mixer path runs on
#          2 the CUDA-only tests: fused Mamba-2 vs mamba_ssm's module and vs the chunked scan (forward, backward,
#            fp32/bf16), whole DIMBA and AR models on the fused path
#          3 the speed goal: benchmarks/bench_generate.py --scale gpu (DIMBA T = 8..128 vs AR decode of 256
#            tokens, batch 1 and 64, bf16, random init: latency does not depend on the weights)
#          4 benchmarks/bench_train.py: the GPU-scale DIMBA and configs/125m.json through DeepSpeed (tokens/s, MFU)
#          5 benchmarks/bench_mixer.py --device cuda (fused vs chunked mixer, tokens/s, MFU)
# compare: benchmarks/compare_ar.py --scale gpu --judge none, its steps fitted to S from a throughput probe;
#          likelihood, context, generation (entropy; gen-PPL needs the judge, which is not on the image) and speed
#
# Each step has its own time limit and the script goes on past a failed one; everything lands in $OUT (the folder the
# GPU machine hands back): log.txt, one JSON per measurement, and at the end summary.txt. Without $OUT (a dry run on
# a CPU machine: `bash benchmarks/gpu/run.sh check`) it writes to $DIMBA_RUNS/gpu-check (DIMBA_RUNS defaults to
# runs) and uses toy sizes; tests/test_gpu_kit.py runs both modes so.
set -uo pipefail
cd "$(dirname "$0")/../.."
MODE=${1:-check}
BUDGET=${2:-120}
ON_GPU_MACHINE=${OUT:+1}       # $OUT is set only on the prepared GPU machine
RUNS=${DIMBA_RUNS:-runs}      # where the comparison's runs go (on the GPU machine: runs/compare-gpu, its shards carried)
OUT=${OUT:-$RUNS/gpu-check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
PY=python3
STATUS=()

step() {   # step NAME SECONDS COMMAND...: run with a limit, record its exit status
  local name=$1 limit=$2; shift 2
  echo; echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  STATUS+=("$name: exit $rc in $((SECONDS - t0))s")
  echo "=== $name: exit $rc in $((SECONDS - t0))s"
}

if [ -n "$ON_GPU_MACHINE" ]; then     # the carried wheels are for the image's Python 3.12
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dimba-site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/dimba-site:$PWD
else                               # a dry run here: this machine's own packages
  export PYTHONPATH=$PWD
fi
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
$PY - <<'EOF' | tee "$OUT/env.json"
import json, torch
from dimba.model.mamba2 import fused_description
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  "mixer": fused_description()}))
EOF

if torch_cuda=$($PY -c "import torch; print(int(torch.cuda.is_available()))") && [ "$torch_cuda" = 1 ]; then
  GPU=1; MIXER=(--device cuda --d-model 1024 --seq-len 2048 8192 --batch 4); TRAIN125=(--config configs/125m.json)
  GEN=(--scale gpu); PROBE=(--scale gpu)
else   # a dry run of the script's plumbing on a CPU machine
  GPU=0; MIXER=(--seq-len 256 --iters 2); TRAIN125=(--config configs/tiny.json)
  GEN=(--scale smoke); PROBE=(--scale smoke)
fi
CORPUS=(); [ "$GPU" = 1 ] || CORPUS=(--corpus 'data_prep/corpus/*.txt')   # a dry run shards the bundled corpus

if [ "$MODE" = check ]; then
  # the limits add up to 560 s, inside one 600 s device call; what a killed step printed stays in log.txt
  step tests 120 $PY -m pytest -q -p no:cacheprovider -rs tests/test_mamba2.py tests/test_model.py -k "fused or mamba_ssm"
  step speed 180 $PY benchmarks/bench_generate.py "${GEN[@]}" --repeats 3 --out "$OUT/speed.json"
  step train-gpu-scale 90 $PY benchmarks/bench_train.py "${PROBE[@]}" --steps 10 --out "$OUT/train-gpu-scale.json"
  step train-125m 90 $PY benchmarks/bench_train.py "${TRAIN125[@]}" --steps 5 --out "$OUT/train-125m.json"
  step mixer 80 $PY benchmarks/bench_mixer.py "${MIXER[@]}"      # prints row by row; compiling is last
elif [ "$MODE" = compare ]; then
  SCALE=gpu; [ "$GPU" = 1 ] || SCALE=smoke
  step probe 90 $PY benchmarks/bench_train.py --scale $SCALE --steps 10 --out "$OUT/probe.json"
  STEPS=$($PY -c "import json; r = json.load(open('$OUT/probe.json'))[0]; print(max(20, int($BUDGET / r['step_s'])))") \
    || { echo "no throughput probe: not starting the comparison"; exit 1; }
  echo "fitting $BUDGET s of DIMBA training: $STEPS steps for each model"
  SLACK=300; [ "$GPU" = 1 ] || SLACK=900       # a CPU dry run trains and evaluates three toy models
  step compare $((3 * BUDGET + SLACK)) $PY benchmarks/compare_ar.py --scale $SCALE --judge none \
    --out "$RUNS/compare-$SCALE" "${CORPUS[@]}" \
    --sections likelihood,context,generation,speed --set "training.max_steps=$STEPS" \
    --set "training.warmup_steps=$((STEPS / 10 + 1))" --set "training.checkpoint_every=$STEPS" \
    --set "evaluation.val_every=$STEPS"
  for f in report.json report.md; do     # (no compare.png: its panels need gen-PPL, and --judge none has none)
    cp "$RUNS/compare-$SCALE/$f" "$OUT/" 2>/dev/null
  done
else
  echo "usage: bash benchmarks/gpu/run.sh check | compare SECONDS"; exit 2
fi

{ echo "mode $MODE"; cat "$OUT/env.json"; printf '%s\n' "${STATUS[@]}"; } | tee "$OUT/summary.txt"
