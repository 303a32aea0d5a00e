#!/usr/bin/env bash
# One prepared run for a lent GPU (see README "Benchmarks"), at most ~9.5 minutes: installs the carried wheels
# (.whl/), times OPT-350M SFT, prefix-shared DPO and reward-model train steps in bf16 at the study's packed batch
# shapes (MFU), projects the study's wall time from them, compares with TRL on the same card, runs the study's SFT and
# DPO stages for real on the HH file (train.py, bench/study_config.py: wall time per stage, compile included), and
# with GENERATE=1 times generation of 100 prompts x 50 tokens (measured before: BENCHMARKS.md). Each part has its
# own time limit and writes under $OUT, so one failing part loses only itself. Run with timeout_s 600.
#
# Before the call, on the development machine (both folders are git-ignored; name them in `carry`):
#   mkdir -p .whl .benchdata && cp ../shared/wheels/py312/*.whl .whl/ && pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --platform manylinux2014_x86_64 -d .whl trl==1.16.0
#   mkdir -p .benchdata/harmless-base && cp ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz .benchdata/ && \
#     cp .benchdata/test.jsonl.gz .benchdata/harmless-base/ && cp -r ../shared/data/tokenizers/opt/hf \
#     .benchdata/tokenizer && cp ../shared/data/paper-2509.09055/data/prompts/*.json .benchdata/
set -u
OUT=${OUT:-/tmp/jaxalign-gpu}
DATA=${BENCH_DATA:-.benchdata}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
part() {  # part NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output into $OUT/NAME.md
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warnings.warn" | tee "$OUT/$name.md"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$OUT/gpu.txt"
}
part train_step "${TRAIN_TIMEOUT:-180}" python3 bench/train_step.py --preset opt-350m --dtype bfloat16 --steps 10 \
  --runs "${RUNS:-sft:10x512,sft:32x128,dpo-shared:12x1024,dpo-shared:4x2048,reward:8x512}" \
  --json "$OUT/train_step.jsonl"
for recipe in study paper; do
  part "estimate_$recipe" 60 python3 bench/study_estimate.py --recipe "$recipe" --measured "$OUT/train_step.jsonl" \
    --data "$DATA/test.jsonl.gz" --tokenizer "$DATA/tokenizer"
done
# JAX takes 75% of the card by default; leave room for PyTorch in the same process.
part trl "${TRL_TIMEOUT:-170}" env XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 python3 bench/trl_compare.py --gpu \
  --data "$DATA/test.jsonl.gz" --tokenizer "$DATA/tokenizer" --rounds 4 --steps 2 --sft-steps 2
part study "${STUDY_TIMEOUT:-170}" python3 train.py --config "bench/study_config.py:$DATA" --workdir /tmp/study \
  --config.stages='("sft","dpo")'
for stage in sft dpo; do  # seconds per part, compilations, held-out metrics (at most 8 files come back: append)
  echo "$stage: $(tr -d '\n ' <"/tmp/study/$stage/done.json" 2>/dev/null)" | tee -a "$OUT/gpu.txt"
done
if [ "${GENERATE:-0}" = 1 ]; then
  part generate 60 python3 bench/generate.py --preset opt-350m --prompts 100 --new-tokens 50 --dtype bfloat16 \
    --no-torch --reps 3 --paper-prompts "$DATA/harmful_prompts.json" "$DATA/helpful_prompts.json" \
    --tokenizer "$DATA/tokenizer"
fi
