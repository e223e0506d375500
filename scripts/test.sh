#!/usr/bin/env bash
# Set up both venvs (idempotent) and run every test: ruff, the core, the Triton kernels (interpreter + sm_80/sm_90
# compile checks), the vLLM plugin (engine + server) and the SGLang plugin (engine + server).
# Exits non-zero if anything fails, including a pytest run that collected no tests (exit code 5).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# SGLang on this CPU: the plugin's stand-in for the CUDA-only sgl_kernel wheel (README, "On a CPU")
SGL_CPU="$(.venv/sglang/bin/cognica sglang-cpu-path)" || exit 1
status=0
step() {  # name, command...
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@"; local rc=$?
  echo "=== $name: exit $rc in $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
}

step ruff .venv/vllm/bin/ruff check cognica cognica_vllm cognica_sglang kernels tests benchmarks
# Each step runs its folder of tests/ (tests/conftest.py: a test module outside the step folders fails the collection).
step core .venv/vllm/bin/python -m pytest -q tests/core
# the interpreter must be chosen before triton is imported, so the kernel tests get their own process
step kernels env TRITON_INTERPRET=1 .venv/vllm/bin/python -m pytest -q tests/kernels
step kernels-compile .venv/vllm/bin/python -m pytest -q tests/kernels_compile
# the same compile check on Triton 3.6.0, torch 2.11's, which scripts/gpu_check.sh targets (.venv/triton36 from scripts/setup.sh)
step kernels-compile-triton36 env PYTHONPATH=.venv/triton36 COGNICA_TRITON_VERSION=3.6.0 .venv/vllm/bin/python -m pytest \
  -q tests/kernels_compile
# scripts/gpu_check.sh --dry-run (the GPU check's steps at tiny shapes on CPU, Triton interpreted)
step gpu-check-dry-run .venv/vllm/bin/python -m pytest -q tests/gpu_check
# the V2 compatibility checks run on 0.32 too
step vllm .venv/vllm/bin/python -m pytest -q tests/vllm tests/vllm_v2/test_compat.py
# the tokenizer tests run on SGLang's transformers too
step sglang env SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$SGL_CPU" .venv/sglang/bin/python -m pytest -q \
  tests/sglang tests/core/test_tokenizer.py
# SGLang's GPU attention path (triton backend, hybrid SWA pool) run by Triton's interpreter: its own process, as the
# interpreter must be chosen before triton is imported
step sglang-gpu-path env TRITON_INTERPRET=1 SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$SGL_CPU" \
  .venv/sglang/bin/python -m pytest -q tests/sglang_gpu_path
# vLLM 0.34's V2 runner and Triton attention on this CPU, Triton interpreted (.venv/vllm-v2 and its test-only plugin
# tests/vllm_v2_shim, which checks this environment: CUDA_VISIBLE_DEVICES set and empty keeps vLLM's Triton on)
step vllm-v2 env TRITON_INTERPRET=1 VLLM_TARGET_DEVICE=cpu CUDA_VISIBLE_DEVICES= .venv/vllm-v2/bin/python -m pytest -q \
  tests/vllm_v2

echo "=== all tests: $([ $status -eq 0 ] && echo PASSED || echo FAILED)"
exit $status
