#!/usr/bin/env bash
# Time our training step on one NVIDIA GPU: bfloat16 compute and storage of the frozen LLM,
# cuDNN attention, batch sizes 64 to 512 at caption length 32.
#
#   bash bench/gpu.sh [OUT_DIR]
#
# Needs JAX with CUDA in the active environment (for example `pip install "jax[cuda12]"`) and the
# test dependencies. Writes OUT_DIR/gpu.csv (nvidia-smi), OUT_DIR/step_gpu.txt (the tables) and
# OUT_DIR/step_gpu.json; OUT_DIR defaults to $OUT, else bench_gpu.
# NOTE: no GPU has run this script yet; the CPU runs of bench/step.py cover the same code paths
# except the cuDNN attention kernel.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-${OUT:-bench_gpu}}"
mkdir -p "$out"
python -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else f"error: JAX sees no GPU: {jax.devices()}")'
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$out/gpu.csv"
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python bench/step.py \
  --dtype=bfloat16 --batch_size=256 --caption_length=32 --steps=10 --warmup=2 \
  --sweep_batch_sizes=64,128,256,512 \
  --config.model.attention=cudnn --config.model.llm_param_dtype=bfloat16 \
  --json_out="$out/step_gpu.json" | tee "$out/step_gpu.txt"
