#!/usr/bin/env bash
# Set up both venvs (idempotent) and run every test: ruff, the core, the Triton kernels (interpreter + sm_80/sm_90
# compile checks), the vLLM plugin (engine + server) and the SGLang plugin (engine + server).
# Exits non-zero if anything fails, including a pytest run that collected no tests (exit code 5).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
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
step core .venv/vllm/bin/python -m pytest -q tests/test_config.py tests/test_checkpoint.py tests/test_model.py \
  tests/test_tokenizer.py tests/test_cli.py tests/test_bad_checkpoints.py tests/test_fuzz.py tests/test_cpu_linear.py \
  tests/test_upstream_oracle.py tests/test_poe.py tests/test_first_use.py tests/test_kernel_dispatch.py \
  tests/test_chat_template.py
# the interpreter must be chosen before triton is imported, so the kernel tests get their own process
step kernels env TRITON_INTERPRET=1 .venv/vllm/bin/python -m pytest -q tests/test_kernels.py
step kernels-compile .venv/vllm/bin/python -m pytest -q tests/test_kernels_compile.py
# scripts/gpu_check.sh --dry-run (the GPU check's steps at tiny shapes on CPU, Triton interpreted): 36 s of CPU, 3 min at load 30
step gpu-check-dry-run .venv/vllm/bin/python -m pytest -q tests/test_gpu_check.py
step vllm .venv/vllm/bin/python -m pytest -q tests/test_vllm.py tests/test_vllm_eager.py \
  tests/test_vllm_release_shape.py tests/test_vllm_parallel.py tests/test_vllm_server.py tests/test_vllm_cuda_paths.py \
  tests/test_first_use_vllm.py tests/test_vllm_poe.py tests/test_vllm_config_checks.py tests/test_vllm_lora.py \
  tests/test_embedding_mode_vllm.py tests/test_vllm_request_options.py tests/test_vllm_quant.py
step sglang env SGLANG_USE_CPU_ENGINE=1 PYTHONPATH=tests/sgl_stub .venv/sglang/bin/python -m pytest -q \
  tests/test_sglang.py tests/test_sglang_cuda_paths.py tests/test_tokenizer.py tests/test_first_use_sglang.py \
  tests/test_sglang_poe.py tests/test_sglang_release_shape.py \
  tests/test_embedding_mode_sglang.py tests/test_sglang_request_options.py

echo "=== all tests: $([ $status -eq 0 ] && echo PASSED || echo FAILED)"
exit $status
