"""What a user's import system sees from the repository root (`python -m ...` from the checkout, as the README's CPU
commands and the test command run; pytest's default import mode puts the root on `sys.path` too).

PyPI's `kernels` package owns the top-level import name `kernels`; transformers >= 5.25 requires it and imports it in
`transformers/integrations/hub_kernels.py`, and SGLang's FA3 loader imports it. Our `kernels/` folder is the design's
kernels folder but no package: the package is `kernels/cognica_kernels/` (setup.py `package_dir`), so it can never
shadow PyPI's. Checked in a subprocess with the newest transformers (`.venv/transformers-newest`, made by
`scripts/setup.sh`, ahead on PYTHONPATH) beside this venv's torch, run from the repository root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NEWEST = REPO / ".venv" / "transformers-newest"

PROBE = """
import json, sys
import cognica  # registers the config, model and tokenizer with transformers
import kernels
import transformers
import transformers.integrations.hub_kernels as hub_kernels
from kernels import CUDAProperties  # the name transformers 5.25's hub_kernels needs from PyPI's kernels
import cognica_kernels
print(json.dumps({"transformers": transformers.__version__, "kernels": kernels.__file__,
                  "cognica_kernels": cognica_kernels.__file__, "hub_kernels": hub_kernels.__name__,
                  "root_on_path": any(p in ("", ".") or p == sys.argv[1] for p in sys.path)}))
"""


def test_import_cognica_from_the_repo_root_leaves_pypi_kernels_to_transformers():
    assert (NEWEST / "transformers").is_dir() and (NEWEST / "kernels").is_dir(), (
        f"{NEWEST} is missing: run `bash scripts/setup.sh transformers-newest`"
    )
    env = {**os.environ, "PYTHONPATH": str(NEWEST)}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(REPO)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"`import cognica` + transformers' hub_kernels from the repo root failed:\n" \
                                 f"{proc.stderr[-3000:]}"
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["root_on_path"], "the probe must run with the repository root on sys.path, as `python -m` does"
    assert got["transformers"] == "5.25.0", got
    assert Path(got["kernels"]).resolve().is_relative_to(NEWEST.resolve()), f"`kernels` came from {got['kernels']}"
    assert Path(got["cognica_kernels"]).resolve().parent == (REPO / "kernels" / "cognica_kernels").resolve(), got


def test_the_kernels_folder_is_not_a_package():
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/ must stay no package: it would shadow PyPI's"
    assert (REPO / "kernels" / "cognica_kernels" / "__init__.py").exists()


def cognica_import_graph() -> dict[str, set[str]]:
    """Module -> the `cognica.*` modules it imports (at the top or inside a function), read from the sources."""
    import ast

    root = REPO / "cognica"
    modules = {p.stem for p in root.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        me = "cognica" if path.stem == "__init__" else f"cognica.{path.stem}"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "cognica":
                deps |= {f"cognica.{a.name}" if a.name in modules else "cognica" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cognica."):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "cognica"}
        graph[me] = deps - {me}
    return graph


def test_the_core_modules_import_each_other_without_a_cycle():
    graph = cognica_import_graph()
    assert {"cognica.checkpoint", "cognica.quantization", "cognica.model", "cognica.generation"} <= graph.keys()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path[path.index(dep):], dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_sglang_cpu_stand_in_ships_as_data_never_as_a_top_level_sgl_kernel(tmp_path: Path):
    """`cognica sglang-cpu-path` (the README's CPU command puts it on PYTHONPATH) names a folder holding the stand-in
    `sgl_kernel`, and the built wheel carries it under `cognica_sglang/cpu_stub/` only: a top-level `sgl_kernel` in
    the wheel would shadow the real CUDA one on a GPU machine."""
    import zipfile

    proc = subprocess.run([sys.executable, "-m", "cognica", "sglang-cpu-path"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = Path(proc.stdout.strip())
    assert (folder / "sgl_kernel" / "__init__.py").is_file(), f"no sgl_kernel stand-in under {folder}"
    assert folder.resolve() == (REPO / "cognica_sglang" / "cpu_stub").resolve()
    # built from a copy of the sources: setuptools writes build/ beside setup.py, and a checkout's stale build/lib
    # (a module since removed) would go into the wheel
    src, dist = tmp_path / "src", tmp_path / "dist"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(REPO / name, src / name)
    for package in ("cognica", "cognica_vllm", "cognica_sglang", "kernels"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = zipfile.ZipFile(next(dist.glob("*.whl")))
    names = wheel.namelist()
    assert "cognica_sglang/cpu_stub/sgl_kernel/__init__.py" in names, "the stand-in is missing from the wheel"
    assert not [n for n in names if n.startswith("sgl_kernel/")], "the wheel installs a top-level sgl_kernel"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "sglang-cpu = cognica_sglang.cpu_stub:stub_path" in wheel.read(entry_points).decode()
