#!/usr/bin/env bash
# Installs everything DIMBA needs into the current Python (idempotent; a few seconds when already done).
#   CPU machines: torch==2.13.0 (a CPU build), then the project with its test tools.
#   GPU machines: bring your CUDA build of torch first; then `pip install -e ".[gpu,dev]"` adds mamba-ssm.
# Slurm for the cluster tests is installed by the tests themselves (slurm/local/start.sh, needs root + apt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
DS_BUILD_OPS=0 "$PY" -m pip install -q -e ".[dev]"
echo "setup: $("$PY" -c 'import torch, deepspeed; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}")')"
