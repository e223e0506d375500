#!/usr/bin/env bash
# The GPU check (entry point: scripts/gpu_check.sh, which runs this): our Triton kernels and a whole-model paged
# decode step, measured on a bare CUDA machine (torch, triton, safetensors, tiktoken, tokenizers, transformers; no
# vLLM/SGLang, no pip, no network). What it runs, writes and decides: benchmarks/gpu/README.md.
#
#   bash scripts/gpu_check.sh [OUTDIR]             # on a CUDA machine; OUTDIR defaults to $OUT; step limits 6 min
#   bash scripts/gpu_check.sh --dry-run [OUTDIR]   # the same steps at tiny shapes on CPU, TRITON_INTERPRET=1 (~1-2 min)
#
# Steps (each under its own time limit, all run even if one fails; exit 1 if any failed):
#   env           device, versions, which pytest                                  -> OUTDIR/env.json
#   kernel-tests  pytest tests/kernels, compiled on CUDA: the python's own pytest, else .venv/gpu-pytest
#                 (scripts/setup.sh; the GPU call carries it)                     -> OUTDIR/kernel_tests.xml
#   warm          gpu_check.py warm: every compare row built and run once, untimed, so the Triton and
#                 torch.compile compiles land in the on-disk caches               -> OUTDIR/warm.json
#   kernels       gpu_check.py kernels: attention timings against their floors   -> OUTDIR/kernels.json
#   compare       gpu_check.py compare: ours beside SDPA (cuDNN, flash), flex_attention and torch relu^2 on
#                 identical inputs, CUDA-graph replays; the verdicts per op and phase
#                 -> OUTDIR/compare.json, rewritten after every row
#   decode        paged_decode.py: 1.38B factory model, paged decode step, default ops beside the opt-in ones
#                 -> OUTDIR/decode.json
#   report        the table last; everything merged into OUTDIR/gpu_check.json
# Python: $PYTHON, else python3 (--dry-run: .venv/vllm/bin/python where it exists). The package need not be
# installed: cognica and tests import from the repository, cognica_kernels through a link to kernels/cognica_kernels/.
set -uo pipefail
KIT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$KIT/../.." && pwd)
DRY=0
OUTDIR=""
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) OUTDIR=$arg ;;
  esac
done
OUTDIR=${OUTDIR:-${OUT:-}}
if [ -z "$OUTDIR" ]; then
  echo "gpu_check.sh: give the results folder as an argument or in \$OUT" >&2
  exit 2
fi
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || exit 2
rm -f "$OUTDIR"/{env,warm,kernels,compare,decode,gpu_check}.json "$OUTDIR/kernel_tests.xml" "$OUTDIR/steps.tsv"

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ $DRY -eq 1 ] && [ -x "$REPO/.venv/vllm/bin/python" ]; then PY=$REPO/.venv/vllm/bin/python
else
  PY=""
  for candidate in python3 python; do  # the first interpreter that has torch
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import torch' 2>/dev/null; then PY=$candidate; break; fi
  done
  if [ -z "$PY" ]; then echo "gpu_check.sh: no python3/python with torch found; set PYTHON" >&2; exit 2; fi
fi
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
ln -s "$REPO/kernels/cognica_kernels" "$SHIM/cognica_kernels"  # setup.py: package_dir={"cognica_kernels": "kernels/cognica_kernels"}
# the kit's modules import each other by bare name (gpu_timing, roofline), whichever folder runs them
export PYTHONPATH="$SHIM:$KIT:$REPO${PYTHONPATH:+:$PYTHONPATH}"
# the python's own pytest, else the carried one (pure Python, from scripts/setup.sh), ahead of everything else
if "$PY" -c 'import pytest' 2>/dev/null; then PYTEST_FROM="the python's own"
elif [ -f "$REPO/.venv/gpu-pytest/pytest/__init__.py" ]; then
  PYTEST_FROM=.venv/gpu-pytest
  export PYTHONPATH="$REPO/.venv/gpu-pytest:$PYTHONPATH"
else
  PYTEST_FROM=none
  echo "gpu_check.sh: no pytest: the kernel tests will fail; run scripts/setup.sh and carry .venv/gpu-pytest" >&2
fi
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ $DRY -eq 1 ]; then
  # the interpreter must be chosen before triton is imported; CPU tensors only
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  DRYFLAG=(--dry-run)
  # scripts/test.sh runs all of tests/kernels already; here a subset, through the same pytest path
  KFLAG=(-k "decode_matches or dispatch")
  LIMITS=(60 120 120 240 120 120)  # env, kernel-tests, kernels, decode, compare, warm (s); CPU-bound, maybe shared
else
  unset TRITON_INTERPRET
  DRYFLAG=()
  KFLAG=()
  # env, kernel-tests, kernels, decode, compare, warm: 360 s in all at worst, so a rerun fits a 15-minute budget
  # with the machine's start; not yet measured on a GPU (each step writes its rows as they finish)
  LIMITS=(15 90 45 75 60 75)
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: torch sees no CUDA device; on a machine without one run: bash scripts/gpu_check.sh --dry-run DIR" >&2
    exit 2
  fi
fi
cd "$REPO" || exit 2
T0=$SECONDS
status=0
step() {  # name, limit_s, command...
  local name=$1 limit=$2; shift 2
  echo "=== [$((SECONDS - T0)) s] $name (limit ${limit} s): $*"
  local t=$SECONDS
  timeout --kill-after=10 "$limit" "$@"; local rc=$?
  [ $rc -eq 124 ] && echo "=== $name: TIMED OUT after ${limit} s"
  echo "=== [$((SECONDS - T0)) s] $name: exit $rc in $((SECONDS - t)) s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t))" >> "$OUTDIR/steps.tsv"
  [ $rc -eq 0 ] || status=1
}

COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
step env "${LIMITS[0]}" "$PY" -c '
import datetime, json, platform, sys, torch
from gpu_timing import device_info
info = device_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
try:
    import pytest
    found = {"version": pytest.__version__, "from": sys.argv[4], "path": pytest.__file__}
except ImportError:
    found = None
info.update(python=platform.python_version(), dry_run=sys.argv[2] == "1", commit=sys.argv[3], pytest=found,
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
open(sys.argv[1], "w").write(json.dumps(info, indent=1) + "\n")
print(info)' "$OUTDIR/env.json" "$DRY" "$COMMIT" "$PYTEST_FROM"
step kernel-tests "${LIMITS[1]}" "$PY" -m pytest -q -p no:cacheprovider tests/kernels \
  --junitxml="$OUTDIR/kernel_tests.xml" ${KFLAG[@]+"${KFLAG[@]}"}
step warm "${LIMITS[5]}" "$PY" "$KIT/gpu_check.py" warm --out "$OUTDIR/warm.json" ${DRYFLAG[@]+"${DRYFLAG[@]}"}
step kernels "${LIMITS[2]}" "$PY" "$KIT/gpu_check.py" kernels --out "$OUTDIR/kernels.json" ${DRYFLAG[@]+"${DRYFLAG[@]}"}
step compare "${LIMITS[4]}" "$PY" "$KIT/gpu_check.py" compare --out "$OUTDIR/compare.json" ${DRYFLAG[@]+"${DRYFLAG[@]}"}
step decode "${LIMITS[3]}" "$PY" "$KIT/paged_decode.py" --out "$OUTDIR/decode.json" ${DRYFLAG[@]+"${DRYFLAG[@]}"}
echo "=== [$((SECONDS - T0)) s] report"
"$PY" "$KIT/gpu_check.py" report "$OUTDIR" || status=1
echo "=== gpu_check.sh: $((SECONDS - T0)) s, exit $status"
exit $status
