#!/usr/bin/env bash
# The whole product on the bundled corpus, on this machine: set-up -> prepare -> train with DeepSpeed -> convert
# -> sample. CPU: 2 ranks of configs/tiny.json (28 minutes on an idle 2-core machine with a 34 GFLOP/s fp32
# matmul: benchmarks/results/demo-cpu.md). GPU: every GPU of the machine.
# Re-running resumes training from runs/tiny (delete it for a fresh run). Extra args go to launch/train.py,
# e.g. tools/demo.sh --set training.max_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
python3 data_prep/shard.py --input 'data_prep/corpus/*.txt' --tokenizer data_prep/tokenizer/tokenizer.model \
    --output runs/shards --val-fraction 0.05 --shard-tokens 100000
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  RANKS=$(nvidia-smi -L | wc -l)            # every GPU
else
  RANKS=2                                   # two CPU ranks (gloo)
fi
python3 launch/train.py --ranks "$RANKS" --config configs/tiny.json --run-dir runs/tiny "$@"
python3 tools/convert.py runs/tiny --output runs/tiny/model
python3 tools/sample.py --model runs/tiny/model --prompt "Alice was beginning to get very tired" --num-samples 2 --length 48
python3 tools/sample.py --model runs/tiny/model --num-samples 2 --length 48 --seed 1
python3 tools/sample.py --model runs/tiny/model --prefix "The King and Queen of Hearts" --suffix "said the Hatter." --middle-length 16
