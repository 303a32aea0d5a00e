#!/usr/bin/env bash
# One prepared run for a lent GPU (see README "Benchmarks"): installs carried wheels (.whl/), then times OPT-350M
# SFT and DPO train steps in bf16 and generation of 100 prompts x 50 tokens, printing short tables into $OUT.
set -u
OUT=${OUT:-/tmp/jaxalign-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
timeout "${TRAIN_TIMEOUT:-150}" python3 bench/train_step.py --preset opt-350m --dtype bfloat16 --steps 8 \
  --runs "${RUNS:-sft:32x512,dpo:16x1024}" 2>&1 | grep -v Warning | tee "$OUT/train_step.md"
timeout "${GENERATE_TIMEOUT:-90}" python3 bench/generate.py --preset opt-350m --prompts 100 --new-tokens 50 \
  --dtype bfloat16 --no-torch --reps 3 2>&1 | grep -v Warning | tee "$OUT/generate.md"
