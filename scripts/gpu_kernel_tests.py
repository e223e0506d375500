"""Run tests/kernels/test_kernels.py (compiled on CUDA, interpreted on CPU) and write the outcome as JSON.

    python scripts/gpu_kernel_tests.py --out OUT/kernel_tests.json [--runner auto|pytest|builtin] [-k EXPR]
                                       [--file tests/kernels/test_kernels.py]

With pytest importable (`--runner auto`, the default) this is `pytest tests/kernels/test_kernels.py`. A GPU machine
without network may not have pytest and cannot install it, so without it the builtin runner
imports the test module itself and calls every test function: it implements exactly what tests/kernels/test_kernels.py uses
(`pytest.mark.parametrize` with ids, stacked; autouse fixtures; the `monkeypatch` argument) and raises on any
other pytest feature, so a test that starts using one fails here loudly instead of being skipped. `-k` keeps the
tests whose id contains one of the `or`-separated words (the dry run uses it to stay short).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import itertools
import json
import sys
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_FILE = REPO / "tests" / "tests/kernels/test_kernels.py"


def _selected(test_id: str, expr: str | None) -> bool:
    return expr is None or any(word.strip() in test_id for word in expr.split(" or "))


def run_with_pytest(test_file: Path, expr: str | None) -> dict[str, object]:
    import pytest

    outcomes: dict[str, str] = {}

    class Collect:
        def pytest_runtest_logreport(self, report):  # noqa: ANN001 - pytest hook
            if report.when == "call" or report.outcome != "passed":
                outcomes[report.nodeid] = report.outcome

    args = ["-q", "-p", "no:cacheprovider", str(test_file)] + (["-k", expr] if expr else [])
    rc = int(pytest.main(args, plugins=[Collect()]))
    failed = sorted(k for k, v in outcomes.items() if v == "failed")
    passed = sum(v == "passed" for v in outcomes.values())
    return {"runner": "pytest", "rc": rc, "passed": passed, "failed": len(failed), "failures": failed}


class _MonkeyPatch:
    def __init__(self) -> None:
        self._undo: list[tuple[object, str, object]] = []

    def setattr(self, target: object, name: str, value: object) -> None:
        self._undo.append((target, name, getattr(target, name)))
        setattr(target, name, value)

    def undo(self) -> None:
        for target, name, old in reversed(self._undo):
            setattr(target, name, old)
        self._undo.clear()


def _fake_pytest() -> types.ModuleType:
    """A `pytest` module with only what tests/kernels/test_kernels.py uses; anything else raises when touched."""
    mod = types.ModuleType("pytest")

    def parametrize(argnames: str, argvalues: list, ids: list[str] | None = None):
        names = [n.strip() for n in argnames.split(",")]

        def mark(fn):
            fn.__dict__.setdefault("_parametrize", []).append((names, list(argvalues), ids))
            return fn

        return mark

    def fixture(fn=None, *, autouse: bool = False):
        if not autouse:
            raise NotImplementedError("builtin runner: only autouse fixtures are supported; install pytest")

        def mark(f):
            f._autouse = True
            return f

        return mark(fn) if fn is not None else mark

    def unsupported(name: str):
        raise AttributeError(f"builtin runner: pytest.{name} is not implemented; install pytest to run these tests")

    mod.fixture = fixture
    # the module's step marker (`pytestmark = pytest.mark.kernels`, for scripts/test.sh) means nothing here
    mod.mark = types.SimpleNamespace(parametrize=parametrize, kernels="kernels")
    mod.__getattr__ = unsupported
    return mod


def _cases(fn) -> list[tuple[str, dict[str, object]]]:
    """(id suffix, kwargs) for every combination of the function's parametrize marks."""
    axes = []
    for names, values, ids in fn.__dict__.get("_parametrize", []):
        axis = []
        for i, v in enumerate(values):
            v = tuple(v) if len(names) > 1 else (v,)
            axis.append((ids[i] if ids else "-".join(map(str, v)), dict(zip(names, v, strict=True))))
        axes.append(axis)
    out = []
    for combo in itertools.product(*axes):
        kwargs: dict[str, object] = {}
        for _, kw in combo:
            kwargs.update(kw)
        out.append(("-".join(label for label, _ in reversed(combo)), kwargs))
    return out


def run_builtin(test_file: Path, expr: str | None) -> dict[str, object]:
    if "pytest" in sys.modules and not hasattr(sys.modules["pytest"], "_builtin_runner"):
        raise RuntimeError("builtin runner: the real pytest is already imported in this process")
    fake = _fake_pytest()
    fake._builtin_runner = True
    sys.modules["pytest"] = fake
    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location(f"tests.{test_file.stem}", test_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    autouse = [f for f in vars(module).values() if callable(f) and getattr(f, "_autouse", False)]
    passed, failures = 0, []
    for name, fn in vars(module).items():
        if not (name.startswith("test_") and inspect.isfunction(fn)):
            continue
        for suffix, kwargs in _cases(fn):
            test_id = f"{name}[{suffix}]" if suffix else name
            if not _selected(test_id, expr):
                continue
            patch = _MonkeyPatch()
            if "monkeypatch" in inspect.signature(fn).parameters:
                kwargs = {**kwargs, "monkeypatch": patch}
            teardown = []
            try:
                for fixture in autouse:
                    if inspect.isgeneratorfunction(fixture):  # setup up to its yield, teardown after the test
                        gen = fixture()
                        next(gen)
                        teardown.append(gen)
                    else:
                        fixture()
                fn(**kwargs)
                for gen in teardown:
                    next(gen, None)
                passed += 1
            except Exception:
                failures.append(test_id)
                print(f"FAILED {test_id}\n{traceback.format_exc()}", flush=True)
            finally:
                patch.undo()
    print(f"builtin runner: {passed} passed, {len(failures)} failed", flush=True)
    return {"runner": "builtin (pytest not installed)", "rc": 1 if failures or not passed else 0, "passed": passed,
            "failed": len(failures), "failures": failures}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runner", choices=("auto", "pytest", "builtin"), default="auto")
    parser.add_argument("-k", dest="expr", default=None)
    parser.add_argument("--file", type=Path, default=TEST_FILE, help="the test module (default tests/kernels/test_kernels.py)")
    args = parser.parse_args()
    runner = args.runner
    if runner == "auto":
        runner = "pytest" if importlib.util.find_spec("pytest") is not None else "builtin"
        if runner == "builtin":
            print("pytest is not installed here: running the test functions with the builtin runner", flush=True)
    t0 = time.time()
    test_file = args.file.resolve()
    result = run_with_pytest(test_file, args.expr) if runner == "pytest" else run_builtin(test_file, args.expr)
    result["seconds"] = round(time.time() - t0, 1)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return int(result["rc"])


if __name__ == "__main__":
    sys.exit(main())
