"""Shared fixtures: factory checkpoints built once per session (random weights, published layout)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cognica.factory import make_checkpoint


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
