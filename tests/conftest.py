"""Shared fixtures (factory checkpoints built once per session) and the step markers of scripts/test.sh.

Every test module names the step(s) of `scripts/test.sh` that run it in a `pytestmark` line (`core`, `kernels`,
`kernels_compile`, `gpu_check`, `vllm`, `sglang`; `slow` for what the test command leaves out), and each step
selects with `-m` over the whole tests/ folder. A module whose marks cannot match the step's `-m` expression is
not even imported (the vLLM venv cannot import SGLang's test modules, nor the reverse); a module that names no
step fails the collection, so a new test file cannot be silently left out of the test command.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cognica.factory import make_checkpoint

STEPS = ("core", "kernels", "kernels_compile", "gpu_check", "vllm", "sglang", "sglang_gpu_path", "vllm_v2")
_MARKS = re.compile(r"^pytestmark\s*=\s*(.+)$", re.M)


def module_marks(path: Path) -> set[str] | None:
    """The marks a test module's `pytestmark` line names, read from its text (None: no such line)."""
    m = _MARKS.search(path.read_text())
    return set(re.findall(r"pytest\.mark\.(\w+)", m[1])) if m else None


def matches(expr: str, marks: set[str]) -> bool:
    """pytest's `-m` expression (names, and/or/not, parentheses) evaluated on a module's marks."""
    tokens = re.findall(r"\(|\)|[\w.]+|\S", expr)
    out = []
    for t in tokens:
        if t in ("and", "or", "not", "(", ")"):
            out.append(t)
        elif re.fullmatch(r"\w+", t):
            out.append(str(t in marks))
        else:
            raise pytest.UsageError(f"-m {expr!r}: cannot read {t!r}")
    return bool(eval(" ".join(out), {"__builtins__": {}}))  # only True/False/and/or/not/parentheses remain


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    expr = config.getoption("markexpr")
    if not expr or not collection_path.name.startswith("test_") or collection_path.suffix != ".py":
        return None
    marks = module_marks(collection_path)
    return True if marks is not None and not matches(expr, marks) else None


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects it
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = sorted({str(item.path.name) for item in items if not any(item.get_closest_marker(s) for s in STEPS)})
    if unmarked:
        raise pytest.UsageError(f"{', '.join(unmarked)}: no scripts/test.sh step marker; add a line "
                                f"'pytestmark = pytest.mark.<step>' with a step of {STEPS}")



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
