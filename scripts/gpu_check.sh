#!/usr/bin/env bash
# The GPU check's entry point; the kit is benchmarks/gpu/ (README.md there: what it runs, writes and decides).
#   bash scripts/gpu_check.sh [OUTDIR]             # on a CUDA machine (carry .venv/gpu-pytest); OUTDIR defaults to $OUT
#   bash scripts/gpu_check.sh --dry-run [OUTDIR]   # the same steps at tiny shapes on CPU, Triton interpreted
exec bash "$(dirname "$0")/../benchmarks/gpu/run.sh" "$@"
