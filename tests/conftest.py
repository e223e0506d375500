"""Shared fixtures (factory checkpoints built once per session) and the one rule of the test layout.

Each step of `scripts/test.sh` runs one folder of tests/ (`core`, `kernels`, `kernels_compile`, `gpu_check`, `vllm`,
`vllm_v2`, `sglang`, `sglang_gpu_path`; `soak` is run by its own README command), in the venv and environment that
folder needs: the vLLM venv cannot import SGLang's test modules, nor the reverse. A test module outside these folders
fails the collection, so a new test file cannot be silently left out of the test command. Helpers shared by several
folders stay at the top of tests/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cognica.factory import make_checkpoint

STEP_FOLDERS = ("core", "kernels", "kernels_compile", "gpu_check", "vllm", "vllm_v2", "sglang", "sglang_gpu_path",
                "soak")
TESTS = Path(__file__).resolve().parent


def step_folder(path: Path) -> str | None:
    """The step folder a test module sits in (None: at the top of tests/, or in no step's folder)."""
    parts = path.resolve().relative_to(TESTS).parts
    return parts[0] if len(parts) == 2 and parts[0] in STEP_FOLDERS else None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    stray = sorted({str(item.path.relative_to(TESTS)) for item in items
                    if item.path.is_relative_to(TESTS) and step_folder(item.path) is None})
    if stray:
        raise pytest.UsageError(f"{', '.join(stray)}: not in a scripts/test.sh step folder; move it to "
                                f"tests/<step>/ with a step of {STEP_FOLDERS}")


@pytest.fixture(scope="session")
def published_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint exactly as published: tokenizer.pkl, no tokenizer.json."""
    return make_checkpoint(tmp_path_factory.mktemp("published") / "tiny", preset="tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint after `cognica convert-tokenizer`: what the engines serve."""
    from cognica.tokenizer import convert_tokenizer

    out = make_checkpoint(tmp_path_factory.mktemp("served") / "tiny", preset="tiny", seed=0, progress=False)
    convert_tokenizer(out)
    return out
