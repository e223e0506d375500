"""The folder to put first on PYTHONPATH to run SGLang on a CPU: `cognica sglang-cpu-path` prints it.

SGLang imports names from `sgl_kernel` at module level even on its CPU path, and the real `sglang-kernel` wheel
loads CUDA libraries at import, which fails without libcuda. This folder holds a stand-in `sgl_kernel` (every name
a stub that raises if called, so a path that needs a real kernel fails loudly; the pure-Python `scalar_type` comes
from the real wheel). It ships as package data under this package, never as a top-level `sgl_kernel`: on a GPU
machine the real wheel must win, so nothing puts this folder on the path unless a user asks for it on a CPU.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def stub_path() -> str:
    """The folder that holds the stand-in `sgl_kernel` package (the `cognica.paths` entry point `sglang-cpu`)."""
    return str(FOLDER)
