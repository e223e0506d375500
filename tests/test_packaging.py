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
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.core

REPO = Path(__file__).resolve().parent.parent
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
