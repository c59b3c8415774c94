#!/bin/bash
# One device call after the kit's setup: a burst's TTFT hop by hop in the mesh on the GPU, then
# the in-process engine at 64 streams for its own TTFT.
# Source: bench/gpu_kit/ttft.sh; bench/gpu_kit/build.sh copies it into .gpu/ (edit it there).
set -u
bash .gpu/dev.sh wait || exit 1
PY=$(command -v python3 || echo /opt/torch/.venv/bin/python3)
M=/tmp/gb/models/gemma-3-270m-q4_k_m.gguf
export PYTHONPATH=/tmp/site:$PWD/services:$PWD LLAMA_CPP_LIB_PATH=/tmp/gb/build/bin PYTHONUNBUFFERED=1
export LLAMA_SERVER=/tmp/gb/build/bin/llama-server
nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 300 "$PY" bench/mesh_ttft.py --gpu "$M" --streams 16 64 --max-tokens 128 --rounds 3 ${TTFT_EXTRA:-} \
    --out "$OUT/ttft.json" > "$OUT/ttft.log" 2>&1
echo "mesh_ttft rc=$?"; grep -v '"level"' "$OUT/ttft.log" | tail -25
timeout 240 "$PY" bench/gpu_engine.py --model "$M" --concurrency 64 --repeat 3 --servers engine \
    --out "$OUT/engine64.json" --log "$OUT/ls.log" > "$OUT/engine64.log" 2>&1
echo "gpu_engine rc=$?"; tail -12 "$OUT/engine64.log"
