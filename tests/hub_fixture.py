"""An offline Hugging Face hub cache holding a factory checkpoint exactly as the Hub delivers the published repo.

`HF_HOME/hub/models--cognica--Cognica-BP-v1.0-1.3B-base/{blobs/<sha256>, refs/main, snapshots/<rev>/<file> ->
../../blobs/<sha256>}`: config.json and tokenizer_config.json with their remote-code `auto_map`, tokenizer.pkl and
no tokenizer.json, and the three `*_cognica_poe.py` files, each of which writes a marker file if it is ever
imported. Blobs and snapshot are made read-only (root ignores that, so `snapshot_state` lets tests assert that
nothing was written). Used by tests/test_first_use*.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

BP_REPO = "cognica/Cognica-BP-v1.0-1.3B-base"
POE_REPO = "cognica/Cognica-PoE-v1.0-1.3B-base"
REVISION = "3f1c0b9e2d4a5b6c7d8e9f00112233445566778a"  # a commit hash, as refs/main holds
REMOTE_CODE_FILES = ("configuration_cognica_poe.py", "modeling_cognica_poe.py", "tokenization_cognica_poe.py")
CARD_PROMPT = "Once upon a time,"  # the model card's curl request


@dataclass
class HubRepo:
    hf_home: Path
    repo_id: str
    snapshot: Path
    marker: Path  # created by any import of the remote code

    def env(self) -> dict[str, str]:
        """Environment for a process that must see this cache (and a private converted-tokenizer cache)."""
        return {"HF_HOME": str(self.hf_home), "HF_HUB_OFFLINE": "1",
                "COGNICA_CACHE_DIR": str(self.hf_home / "cognica-cache")}


def _remote_code(marker: Path) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('remote code was imported')\n"


def make_hub_repo(hf_home: Path, repo_id: str, ckpt: Path) -> HubRepo:
    """Lay `ckpt` (a factory checkpoint directory) out as the cached snapshot of `repo_id` under `hf_home`."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / REVISION
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    marker = hf_home / f"REMOTE_CODE_IMPORTED-{repo_id.replace('/', '--')}"
    files = {p.name: p.read_bytes() for p in sorted(ckpt.iterdir()) if p.is_file()}
    files |= {name: _remote_code(marker).encode() for name in REMOTE_CODE_FILES}
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / digest)
    for p in [*blobs.iterdir(), blobs, snapshot]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return HubRepo(hf_home, repo_id, snapshot, marker)


def published_checkpoint(out: Path, poe: bool = False) -> Path:
    """A tiny factory checkpoint in float32 whose config says float32 (so dtype "auto" is exact against the fp32
    reference), with the published tokenizer files and no tokenizer.json."""
    from cognica.factory import make_checkpoint

    overrides = {"poe_mode": "flat"} if poe else {}
    ckpt = make_checkpoint(out, preset="tiny", seed=0, dtype=torch.float32, progress=False, **overrides)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["torch_dtype"] = "float32"
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    assert not (ckpt / "tokenizer.json").exists() and (ckpt / "tokenizer.pkl").exists()
    return ckpt


def make_hostile(ckpt: Path, marker: Path) -> None:
    """Replace tokenizer.pkl with a pickle whose loading would run `touch marker`."""

    class Touch:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / "tokenizer.pkl").write_bytes(pickle.dumps(Touch()))


def hostile_hub_repo(tmp_path_factory) -> tuple[HubRepo, Path]:
    """A hub cache of the BP id whose tokenizer.pkl would `touch` the returned marker path if it were unpickled."""
    hf_home = tmp_path_factory.mktemp("hostile_hf_home")
    ran = hf_home / "PICKLE_RAN"
    ckpt = published_checkpoint(tmp_path_factory.mktemp("hostile_src") / "bp")
    make_hostile(ckpt, ran)
    return make_hub_repo(hf_home, BP_REPO, ckpt), ran


def bp_hub(tmp_path_factory) -> tuple[HubRepo, dict[str, tuple[str, str]]]:
    """The BP id's hub cache and its snapshot state (to assert later that nothing was written)."""
    ckpt = published_checkpoint(tmp_path_factory.mktemp("src") / "bp")
    repo = make_hub_repo(tmp_path_factory.mktemp("hf_home"), BP_REPO, ckpt)
    return repo, snapshot_state(repo.snapshot)


def assert_server_refuses_hostile_pickle(cmd: list[str], env: dict[str, str], kv_allocation_log: str,
                                          tmp_path_factory) -> None:
    """An engine's server started on a hub id whose tokenizer.pkl is hostile exits non-zero before it allocates its KV
    cache, with one line naming the file and the refused global, and nothing from the repo runs."""
    repo, ran = hostile_hub_repo(tmp_path_factory)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **env, **repo.env()},
                          start_new_session=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"the server started on a hostile tokenizer.pkl:\n{out[-2000:]}"
    # vLLM's ModelConfig (pydantic) reports the config's error as "Value error, <message>": match inside the line
    pkl = str(repo.snapshot / "tokenizer.pkl")
    errors = [x for x in out.splitlines() if f"{pkl}: refusing to unpickle global 'posix.system'" in x]
    assert errors, f"the refusal must be one line naming the file and the refused global:\n{out[-3000:]}"
    assert kv_allocation_log not in out, "the engine allocated its KV cache before the refusal"
    assert not ran.exists() and not repo.marker.exists(), "code from the hostile repo ran"


def snapshot_state(snapshot: Path) -> dict[str, tuple[str, str]]:
    """name -> (symlink target, sha256 of content) for every entry of the snapshot and of the blobs it links to."""
    out = {}
    for p in sorted(snapshot.iterdir()):
        out[p.name] = (os.readlink(p) if p.is_symlink() else "", hashlib.sha256(p.read_bytes()).hexdigest())
    blobs = snapshot.parent.parent / "blobs"
    out |= {f"blobs/{p.name}": ("", hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(blobs.iterdir())}
    return out


def run_python(code: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter of this venv (HF_HOME must be set before huggingface_hub is imported)."""
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=root,
                          env={**os.environ, **env})


# Damage a converted-tokenizer cache entry (`cognica.tokenizer.converted_tokenizer`'s directory) as a user's disk might:
# `truncated` cuts tokenizer.json in half (a full disk, a copy cut short), `remapped` leaves it valid JSON that maps
# text to other ids (edited, or another converter's output), `no_tokenizer_config` deletes tokenizer_config.json.
CACHE_DAMAGES = ("truncated", "remapped", "no_tokenizer_config")


def damage_cache_entry(entry: Path, how: str) -> None:
    tok = entry / "tokenizer.json"
    if how == "truncated":
        data = tok.read_bytes()
        tok.write_bytes(data[: len(data) // 2])
    elif how == "remapped":
        spec = json.loads(tok.read_text(encoding="utf-8"))
        vocab = spec["model"]["vocab"]
        top = max(vocab.values())
        # reverse the merged tokens' ids: still a bijection, so it loads, but each merged token gets another's id
        spec["model"]["vocab"] = {t: i if i < 256 else 256 + top - i for t, i in vocab.items()}
        tok.write_text(json.dumps(spec), encoding="utf-8")
    elif how == "no_tokenizer_config":
        (entry / "tokenizer_config.json").unlink()
    else:
        raise ValueError(f"unknown damage {how!r}; expected one of {CACHE_DAMAGES}")


def damaged_cache(repo: HubRepo, tmp: Path, how: str) -> tuple[dict[str, str], Path]:
    """`repo.env()` with a fresh COGNICA_CACHE_DIR holding the converted tokenizer of the repo's tokenizer.pkl,
    damaged `how`: (env, the damaged entry)."""
    from cognica.tokenizer import converted_tokenizer

    env = {**repo.env(), "COGNICA_CACHE_DIR": str(tmp / "damaged-cache")}
    with mock.patch.dict(os.environ, env):
        entry = converted_tokenizer(repo.snapshot / "tokenizer.pkl")
    damage_cache_entry(entry, how)
    return env, entry


def unwritable_cache_dir(tmp: Path) -> Path:
    """A COGNICA_CACHE_DIR that cannot be created, by root either (chmod does not stop root): a path under a file."""
    blocker = tmp / "not-a-directory"
    blocker.write_text("a regular file: nothing can be created under it\n")
    return blocker / "cognica"


def assert_server_answers_with_unwritable_cache(cmd: list[str], port: int, env: dict[str, str], tmp: Path,
                                                **serve_kwargs) -> None:
    """An engine's server (`cmd`, listening on `port`) started with a COGNICA_CACHE_DIR that cannot be created answers
    the card's prompt, and its log names the location it could not write and COGNICA_CACHE_DIR."""
    from tests.server_utils import serve

    location, log = unwritable_cache_dir(tmp), tmp / "server.log"
    with serve(cmd, BP_REPO, port, log, {**env, "COGNICA_CACHE_DIR": str(location)}, **serve_kwargs) as server:
        r = server.complete(prompt=CARD_PROMPT, max_tokens=4, temperature=0)
    assert r.status_code == 200 and r.json()["choices"][0]["text"], f"no answer: {r.text[:300]}"
    warned = [x for x in log.read_text().splitlines() if str(location) in x and "COGNICA_CACHE_DIR" in x]
    assert warned, f"the log must name {location} and COGNICA_CACHE_DIR:\n{log.read_text()[-3000:]}"
