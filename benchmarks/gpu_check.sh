#!/usr/bin/env bash
# The CUDA checks, as one script for a lent GPU machine (issue 8, item 4):
#   1) the gpu-marked tests (engine vs transformers on the GPU, CUDA graphs vs eager, paged
#      decode on CUDA vs HF, tiny models CUDA vs CPU);
#   2) benchmarks/throughput.py on CUDA: shardline (CUDA graphs, async scheduling) vs
#      transformers generate (batch 16) in one run; then shardline without async scheduling,
#      without CUDA graphs, with 256 requests, and once with the phase timers on;
#   3) benchmarks/cuda_step_profile.py: one decode step, graph vs eager, and its GPU profile.
# Usage: benchmarks/gpu_check.sh MODEL_DIR   (a SmolLM2 directory; with only its config and
# tokenizer, random weights of its shape are generated). Python packages missing on the
# machine may sit as wheels in .whl/ (installed into /tmp/site). Logs go to $OUT.
set -u
MODEL=${1:?usage: gpu_check.sh MODEL_DIR}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD/benchmarks:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
date -u
timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider -W ignore::DeprecationWarning \
    tests/engine/test_engine_gpu.py tests/model/test_tiny_models.py tests/worker/test_model_runner.py \
    2>&1 | tail -40
bench() {  # bench NAME ARGS...: one throughput.py run, its log and JSON under $OUT
    local name=$1; shift
    timeout 200 python3 benchmarks/throughput.py --model "$MODEL" --random-weights --device cuda --rate 0 --hf-omp-policies default \
        --out "$OUT/$name.json" "$@" 2>&1 | grep -v -e "shardline-worker" -e "Loading weights"
}
bench throughput_cuda --repeat 3                       # CUDA graphs + async scheduling vs HF generate (median of 3; the first round is a cold start)
bench throughput_cuda_sync --skip-hf --no-async-scheduling
bench throughput_cuda_eager --skip-hf --enforce-eager
bench throughput_cuda_256 --skip-hf --num-requests 256
SHARDLINE_STEP_TIMING_FILE=$OUT/phases bench throughput_cuda_phases --skip-hf
for f in "$OUT"/phases.*; do echo "== $f"; cat "$f"; echo; done
date -u
# One decode step, CUDA graph vs eager, per context length, and its GPU-time profile.
timeout 120 python3 benchmarks/cuda_step_profile.py "$MODEL" 2>&1 | grep -v -e "Loading weights" -e "UserWarning" -e "_warn_once"
date -u
