#!/usr/bin/env bash
# Run on a machine with network access and the project set up, for a GPU machine without it: puts into .whl/ the
# Python 3.12 wheels that machine's image lacks and writes the GPU-scale shards of benchmarks/compare_ar.py.
# Then, on the GPU machine, with .whl/ and runs/compare-gpu/shards copied over: `bash benchmarks/gpu/run.sh check`
# (benchmarks/gpu/run.sh says what it measures). Idempotent; about a minute the first time.
#
# The image has torch, triton, einops, numpy, sentencepiece, safetensors, tensorboard, transformers, sacrebleu,
# matplotlib, pytest, psutil, msgpack, ninja, py-cpuinfo, nvidia-ml-py, tqdm, absl-py, six, click, joblib, regex
# (what the GPU machine's image lists). Missing, and carried:
#   mamba-ssm     built here without its CUDA extensions (pure Python): its Mamba-2 Triton kernels are all the
#                 fused path needs (dimba/model/mamba2.py loads them without the package's Mamba-1 __init__);
#                 causal-conv1d is not carried (a CUDA build): the conv then runs in PyTorch
#   deepspeed     built here with DS_BUILD_OPS=0 (pure Python; DIMBA steps torch's fused AdamW, nothing JIT-builds)
#   hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions   (deepspeed's)
#   webdataset braceexpand   (the loader)      rouge-score nltk   (dimba.evaluation.prompted)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHL=.whl
mkdir -p "$WHL"
# pure-Python wheels built from source distributions, whatever this machine's Python is
[ -n "$(ls $WHL/mamba_ssm-*.whl 2>/dev/null)" ] || MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
  "$PY" -m pip wheel -q --no-deps --no-build-isolation "mamba-ssm==2.3.2.post1" -w "$WHL"
[ -n "$(ls $WHL/deepspeed-*.whl 2>/dev/null)" ] || DS_BUILD_OPS=0 \
  "$PY" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==0.19.8" -w "$WHL"
[ -n "$(ls $WHL/rouge_score-*.whl 2>/dev/null)" ] || "$PY" -m pip wheel -q --no-deps "rouge-score==0.1.2" -w "$WHL"
# binary or universal wheels for CPython 3.12 on x86-64 Linux (the image's python3)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$WHL" \
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0 \
  hjson==3.1.0 webdataset==1.0.2 braceexpand==0.1.7 nltk==3.9.2
ls -1 "$WHL"
du -sh "$WHL"
# the GPU-scale comparison's shards (../shared/data/gutenberg, else the bundled corpus): the GPU machine reaches no data
"$PY" benchmarks/compare_ar.py --scale gpu --stage data
du -sh runs/compare-gpu/shards
