#!/usr/bin/env bash
# kvpress's presses next to kvsqueeze's methods on the same samples, in one results store (see bench/peer_kvpress.py).
#
#   bench/peer_kvpress.sh [RESULTS] [TASKS] [LENGTH] [SAMPLES] [RATIOS]
#   defaults:  results/peer.sqlite  passkey,niah_single  1024  2  0.5
#
# Environment: KVSQ_PY (kvsqueeze's python, default .venv/bin/python), KVPRESS_PY (kvpress 0.5.5's python, default
# /tmp/kvpress-venv/bin/python; create it with
#   python3 -m venv /tmp/kvpress-venv && /tmp/kvpress-venv/bin/pip install torch==2.13.0 kvpress==0.5.5 gguf),
# PRESSES (default: none,snapkv,streaming_llm,tova,knorm,expected_attention,adakv_expected_attention,kvzip),
# METHODS (kvsqueeze's, default: full,snapkv,streaming_llm,tova,knorm,pyramidkv,h2o), MODEL (default smollm2-135m).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-results/peer.sqlite}
TASKS=${2:-passkey,niah_single}
LENGTH=${3:-1024}
SAMPLES=${4:-2}
RATIOS=${5:-0.5}
MODEL=${MODEL:-smollm2-135m}
KVSQ_PY=${KVSQ_PY:-.venv/bin/python}
KVPRESS_PY=${KVPRESS_PY:-/tmp/kvpress-venv/bin/python}
PRESSES=${PRESSES:-none,snapkv,streaming_llm,tova,knorm,expected_attention,adakv_expected_attention,kvzip}
METHODS=${METHODS:-full,snapkv,streaming_llm,tova,knorm,pyramidkv,h2o}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
SAMPLES_JSONL="${RESULTS%.sqlite}.samples.jsonl"
mkdir -p "$(dirname "$RESULTS")"

# 1. kvsqueeze's samples (and its safetensors copy of the model, written on the first load_model)
"$KVSQ_PY" bench/peer_kvpress.py samples --model "$MODEL" --tasks "$TASKS" --length "$LENGTH" --samples "$SAMPLES" \
    -o "$SAMPLES_JSONL"
MODEL_DIR=$("$KVSQ_PY" -c "from kvsqueeze.models import cache_dir; print(cache_dir() / 'models' / '$MODEL')")
# 2. kvpress's presses on them (kvpress's venv), rows into the same store
"$KVPRESS_PY" bench/peer_kvpress.py run "$SAMPLES_JSONL" --results "$RESULTS" --model-dir "$MODEL_DIR" \
    --model-name "$MODEL" --presses "$PRESSES" --ratios "$RATIOS"
# 3. kvsqueeze's own methods on the same samples (same task names and sample ids), same store
"$KVSQ_PY" -m kvsqueeze.cli sweep --model "$MODEL" --methods "$METHODS" --ratios "$RATIOS" --tasks "$TASKS" \
    --length "$LENGTH" --samples "$SAMPLES" --results "$RESULTS"
# 4. side by side
"$KVSQ_PY" -m kvsqueeze.cli frontier "$RESULTS" --all
"$KVSQ_PY" -m kvsqueeze.cli report "$RESULTS" -o "${RESULTS%.sqlite}.html" --markdown
