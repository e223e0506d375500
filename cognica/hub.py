"""Hugging Face Hub ids: `cognica/Cognica-BP-v1.0-1.3B-base` works wherever a checkpoint directory does.

`resolve()` turns a repo id into its local snapshot through `huggingface_hub` (its cache, `HF_HOME` /
`HF_HUB_CACHE`, `HF_HUB_OFFLINE`, revisions, tokens), downloading what is missing unless offline. The repo's
remote-code `*.py` files are never downloaded by us, never imported, and no file of a snapshot is ever written:
snapshots are shared and may be read-only. A name that is neither a directory nor an obtainable repo gives one
`HubError` line.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from cognica.names import CheckpointError

# owner/name as the Hub spells them (huggingface_hub's validate_repo_id, minus the length limit)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
REMOTE_CODE = ["*.py"]


class HubError(CheckpointError):
    """A model name that is neither a local directory nor a Hub repo we can obtain."""


def is_repo_id(name: str | os.PathLike[str]) -> bool:
    """True for `owner/name` that is not an existing local path."""
    return not os.path.exists(name) and bool(_REPO_ID.match(str(name)))


def resolve(name: str | os.PathLike[str], revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
            token: str | bool | None = None, local_files_only: bool = False,
            allow_patterns: list[str] | None = None) -> Path:
    """A local directory as is; a Hub repo id as its snapshot directory (files in `allow_patterns`, default all but
    the remote code), fetched into the Hugging Face cache unless it is there or downloads are off."""
    if os.path.isdir(name):
        return Path(name)
    if os.path.exists(name):
        raise HubError(f"{name}: not a directory")
    if not _REPO_ID.match(str(name)):
        raise HubError(f"{name}: no such directory, and not a Hugging Face repo id (owner/name)")
    import huggingface_hub
    from huggingface_hub import snapshot_download

    offline = bool(local_files_only or huggingface_hub.constants.HF_HUB_OFFLINE)
    try:
        path = snapshot_download(str(name), revision=revision, cache_dir=cache_dir, token=token,
                                 local_files_only=offline, allow_patterns=allow_patterns, ignore_patterns=REMOTE_CODE)
    except Exception as e:  # huggingface_hub raises many types (LocalEntryNotFoundError, RepositoryNotFoundError, ...)
        where = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
        rev = f" at revision {revision!r}" if revision else ""
        if offline:
            raise HubError(f"{name}: no such directory, and no snapshot of this repo{rev} in the Hugging Face cache"
                           f" {where} (downloads are off: HF_HUB_OFFLINE=1)") from None
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise HubError(f"{name}: no such directory, and the repo{rev} cannot be downloaded from the Hugging Face Hub"
                       f" ({type(e).__name__}: {first})") from None
    return Path(path)


def cached_snapshot(name: str, config_dict: dict | None = None) -> Path | None:
    """The cached snapshot of repo `name` whose config.json equals `config_dict` (any snapshot if None), without
    touching the network; None when there is none. AutoConfig hands `from_dict` the parsed config and the name but
    not the revision, so the matching config picks the snapshot."""
    if not is_repo_id(name):
        return None
    import huggingface_hub

    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}"
    snapshots = sorted((repo / "snapshots").glob("*/config.json"))
    for cfg in snapshots:
        try:
            if config_dict is None or json.loads(cfg.read_text(encoding="utf-8")) == config_dict:
                return cfg.parent
        except (OSError, ValueError):
            continue
    return None


__all__ = ["HubError", "cached_snapshot", "is_repo_id", "resolve"]
