"""A corpus of broken checkpoints, each built from one tiny factory checkpoint: `cognica inspect` must exit 1
with one line naming the problem, never a traceback, never run code from a pickle, and write nothing.

Every variant goes through `cognica.cli.main` in-process (the function the console script runs); a handful
also run as `python -m cognica inspect DIR` subprocesses, which cost a torch import (~2-5 s) each.
"""

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cognica import cli
from cognica.factory import make_checkpoint

MARKER = "PWNED"  # hostile pickles try to create this file next to the corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad_corpus")
    make_checkpoint(root / "base", preset="tiny", seed=0, progress=False)
    return root


def clone(base: Path, parent: Path) -> Path:
    """Hardlink copy of the base checkpoint; variants replace files (unlink first), never edit them in place."""
    out = parent / "ckpt"
    out.mkdir(parents=True)
    for p in base.iterdir():
        os.link(p, out / p.name)
    return out


def replace_bytes(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def rewrite_tensors(ckpt: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    change(tensors)
    (ckpt / "model.safetensors").unlink()
    save_file(tensors, ckpt / "model.safetensors")


def rewrite_header(ckpt: Path, change: Callable[[dict], object]) -> None:
    """Edit the safetensors JSON header and keep the data section as it is."""
    data = (ckpt / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    change(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    replace_bytes(ckpt / "model.safetensors", struct.pack("<Q", len(blob)) + blob + data[8 + n :])


def rewrite_config(ckpt: Path, change: Callable[[dict], object]) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    change(cfg)
    replace_bytes(ckpt / "config.json", json.dumps(cfg).encode())


def set_fields(**fields) -> Callable[[dict], object]:
    return lambda cfg: cfg.update(fields)


def drop_fields(*names: str) -> Callable[[dict], object]:
    return lambda cfg: [cfg.pop(n, None) for n in names]


class Hostile:
    """Unpickling this calls `fn(arg)`: what a malicious tokenizer.pkl would do."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def hostile_payloads(marker: Path) -> dict[str, object]:
    return {
        "os.system": Hostile(os.system, f"touch {marker}"),
        "subprocess": Hostile(subprocess.call, ["touch", str(marker)]),
        "eval": Hostile(eval, f"open({str(marker)!r}, 'w').close()"),
    }


def swap_offsets(hdr: dict) -> None:
    """Point c_k of layer 0 at c_q's bytes (same size): two tensors overlap."""
    q, k = "transformer.h.0.attn.c_q.weight", "transformer.h.0.attn.c_k.weight"
    hdr[k]["data_offsets"] = hdr[q]["data_offsets"]


def grow_offsets(hdr: dict) -> None:
    b, e = hdr["smear_lambda"]["data_offsets"]
    hdr["smear_lambda"]["data_offsets"] = [b, e + 2]


def poke(name: str, index: int, value: float) -> Callable[[dict[str, torch.Tensor]], object]:
    def change(t: dict[str, torch.Tensor]) -> None:
        t[name] = t[name].clone()
        t[name].view(-1)[index] = value

    return change


def hostile_pickle(kind: str) -> Callable[[Path, Path], None]:
    def build(ckpt: Path, parent: Path) -> None:
        replace_bytes(ckpt / "tokenizer.pkl", pickle.dumps(hostile_payloads(parent / MARKER)[kind]))

    return build


def encoding_state_pickle(state: object) -> bytes:
    """A pickle shaped like a pickled tiktoken.Encoding (GLOBAL, NEWOBJ, BUILD) carrying any state."""
    return b"\x80\x03ctiktoken.core\nEncoding\n)\x81" + pickle.dumps(state, protocol=3)[2:-1] + b"b."


def duplicate_ranks(ckpt: Path, parent: Path) -> None:
    from cognica.factory_tokenizer import train_factory_encoding

    state = train_factory_encoding(0).__getstate__()
    ranks = dict(state["mergeable_ranks"])
    ranks[b"\xff"] = ranks[b"\xfe"]  # two tokens share a rank: tiktoken's Rust core panics on this
    replace_bytes(ckpt / "tokenizer.pkl", encoding_state_pickle(state | {"mergeable_ranks": ranks}))


def symlink_out(ckpt: Path, parent: Path) -> None:
    (parent / "elsewhere").mkdir()
    os.link(ckpt / "model.safetensors", parent / "elsewhere" / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(Path("..") / "elsewhere" / "model.safetensors")


Build = Callable[[Path, Path], None]  # (checkpoint dir, its parent) -> None


def tensors(change: Callable[[dict[str, torch.Tensor]], object]) -> Build:
    return lambda ckpt, parent: rewrite_tensors(ckpt, change)


def header(change: Callable[[dict], object]) -> Build:
    return lambda ckpt, parent: rewrite_header(ckpt, change)


def config(change: Callable[[dict], object]) -> Build:
    return lambda ckpt, parent: rewrite_config(ckpt, change)


def file_bytes(name: str, make: Callable[[bytes], bytes]) -> Build:
    return lambda ckpt, parent: replace_bytes(ckpt / name, make((ckpt / name).read_bytes()))


def remove(name: str) -> Build:
    return lambda ckpt, parent: (ckpt / name).unlink()


def torch_file(name: str, make: Callable[[Path], object]) -> Build:
    def build(ckpt: Path, parent: Path) -> None:
        (ckpt / name).unlink()
        torch.save(make(parent), ckpt / name)

    return build


C_FC0 = "transformer.h.0.mlp.c_fc.weight"
INDEX = "model.safetensors.index.json"
# name -> (build, substring the error line must contain, is it the only error line?)
VARIANTS: dict[str, tuple[Build, str, bool]] = {
    "missing_tensor": (tensors(lambda t: t.pop("transformer.h.1.attn.c_v.weight")),
                       "missing 1 tensor(s): transformer.h.1.attn.c_v.weight", True),
    "unknown_tensor": (tensors(lambda t: t.update({"transformer.h.0.attn.c_attn.weight": torch.zeros(3, 128)})),
                       "unexpected tensor(s) not in the architecture: transformer.h.0.attn.c_attn.weight", True),
    "wrong_shape": (tensors(lambda t: t.update({C_FC0: torch.zeros(256, 128)})),
                    f"'{C_FC0}': expected shape [512, 128], found [256, 128]", True),
    "int32_dtype": (tensors(lambda t: t.update({"x0_lambdas": torch.ones(4, dtype=torch.int32)})),
                    "'x0_lambdas': expected a float dtype (bf16/fp16/fp32), found I32", True),
    "nan_scalar": (tensors(poke("smear_lambda", 0, float("nan"))), "tensor 'smear_lambda': 1 NaN/Inf value(s)", True),
    "inf_scalar": (tensors(poke("resid_lambdas", 2, float("inf"))), "tensor 'resid_lambdas': 1 NaN/Inf value(s)", True),
    "truncated_file": (file_bytes("model.safetensors", lambda b: b[:-4096]), "model.safetensors: truncated", True),
    "header_overlapping_offsets": (header(swap_offsets), "header lies about offsets", True),
    "header_wrong_span": (header(grow_offsets), "header lies about tensor 'smear_lambda'", True),
    "header_not_json": (file_bytes("model.safetensors", lambda b: struct.pack("<Q", 8) + b"{]{]{]{]" + bytes(64)),
                        "corrupt safetensors header (not JSON", True),
    "empty_file": (file_bytes("model.safetensors", lambda b: b""), "model.safetensors: empty file", True),
    "config_missing_field": (config(drop_fields("n_embd", "hidden_size")), "n_embd: missing", True),
    "config_heads_vs_width": (config(set_fields(n_head=3, num_attention_heads=3, n_kv_head=3, num_key_value_heads=3)),
                              "128 is not divisible by 3 heads", True),
    "config_window_letter": (config(set_fields(window_pattern="SSXL")), "window_pattern: unknown letter(s) ['X']",
                             True),
    "config_conflicting_aliases": (config(set_fields(hidden_size=256)), "n_embd: conflicting values", True),
    "config_not_json": (file_bytes("config.json", lambda b: b'{"n_layer": 4,'), "config.json: not valid JSON", True),
    "config_missing": (remove("config.json"), "config.json: missing", True),
    "vocab_mismatch": (config(set_fields(vocab_size=32000)), "vocab mismatch between config and tensors", False),
    "tokenizer_missing": (remove("tokenizer.pkl"), "tokenizer.pkl: missing, and there is no tokenizer.json", True),
    "tokenizer_os_system": (hostile_pickle("os.system"), "refusing to unpickle global 'posix.system'", True),
    "tokenizer_subprocess": (hostile_pickle("subprocess"), "refusing to unpickle global 'subprocess.call'", True),
    "tokenizer_eval": (hostile_pickle("eval"), "refusing to unpickle global 'builtins.eval'", True),
    "tokenizer_wrong_type": (file_bytes("tokenizer.pkl", lambda b: pickle.dumps({"ranks": [1, 2]})),
                             "expected a pickled tiktoken.Encoding, got dict", True),
    "tokenizer_duplicate_ranks": (duplicate_ranks, "two tokens share a rank", True),
    "tokenizer_odd_state": (file_bytes("tokenizer.pkl", lambda b: encoding_state_pickle({1: 2, "name": 3})),
                            "tokenizer.pkl", True),
    "tokenizer_truncated": (file_bytes("tokenizer.pkl", lambda b: b[:5000]), "tokenizer.pkl", True),
    "token_bytes_wrong_length": (torch_file("token_bytes.pt", lambda parent: torch.ones(1000, dtype=torch.int32)),
                                 "token_bytes.pt: expected length 32768 (vocab size), found 1000", True),
    "token_bytes_hostile": (torch_file("token_bytes.pt", lambda parent: hostile_payloads(parent / MARKER)["os.system"]),
                            "token_bytes.pt: refused: it references posix.system", True),
    "token_bytes_garbage": (file_bytes("token_bytes.pt", lambda b: b"not a torch file"), "token_bytes.pt: unreadable",
                            True),
    "symlink_escape": (symlink_out, "symlink points outside the checkpoint directory", True),
    "sharded_and_single": (lambda c, p: os.link(c / "model.safetensors", c / "model-00001-of-00002.safetensors"),
                           "keep one layout", True),
    "no_weights": (remove("model.safetensors"), "no model.safetensors", True),
    "index_is_a_directory": (lambda c, p: (c / "model.safetensors").unlink() or (c / INDEX).mkdir(),
                             f"{INDEX}: corrupt index (IsADirectoryError", True),
    "index_not_json": (lambda c, p: os.rename(c / "model.safetensors", c / "model-00001-of-00001.safetensors")
                       or (c / INDEX).write_text("{weight_map"), f"{INDEX}: corrupt index", True),
}
SUBPROCESS_VARIANTS = ("missing_tensor", "truncated_file", "tokenizer_os_system", "symlink_escape", "config_not_json")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its type, size, mtime and (for small files) content hash."""
    state = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and st.st_size < 1 << 20 else None
        state[str(p.relative_to(root))] = (p.is_symlink(), st.st_size, st.st_mtime_ns, digest)
    return state


def build_variant(corpus: Path, name: str) -> tuple[Path, Path]:
    parent = corpus / name
    ckpt = clone(corpus / "base", parent)
    VARIANTS[name][0](ckpt, parent)
    return ckpt, parent


def error_lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith("error:")]


def check_output(name: str, output: str) -> None:
    _, expected, only = VARIANTS[name]
    errors = error_lines(output)
    assert "Traceback" not in output, f"{name}: inspect printed a traceback:\n{output}"
    assert any(expected in e for e in errors), f"{name}: no error line contains {expected!r}:\n{output}"
    if only:
        assert len(errors) == 1, f"{name}: expected exactly one error line, got {len(errors)}:\n{output}"


def test_corpus_size_is_what_the_readme_says():
    """docs/testing.md's "a corpus of N variants; the engine-start tests run M of them" must match the code."""
    import re

    from tests.server_utils import ENGINE_START_VARIANTS

    readme = " ".join((Path(__file__).resolve().parents[2] / "docs" / "testing.md").read_text().split())
    m = re.search(r"builds a corpus of (\d+) variants; the engine-start tests run (\d+) of them", readme)
    assert m, "docs/testing.md no longer states the bad-checkpoint corpus size: update this test with it"
    assert (int(m[1]), int(m[2])) == (len(VARIANTS), len(ENGINE_START_VARIANTS)), \
        f"docs/testing.md says {m[1]} variants / {m[2]} at engine start; the code has {len(VARIANTS)} / " \
        f"{len(ENGINE_START_VARIANTS)}"
    assert set(ENGINE_START_VARIANTS) <= set(VARIANTS), "engine-start variants missing from the corpus"


def test_base_checkpoint_is_clean(corpus: Path, capsys):
    assert cli.main(["inspect", str(corpus / "base")]) == 0, f"the unmodified base must pass:\n{capsys.readouterr()}"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_inspect_names_the_problem(corpus: Path, name: str, capsys):
    ckpt, parent = build_variant(corpus, name)
    before = snapshot(parent)
    start = time.monotonic()
    rc = cli.main(["inspect", str(ckpt)])
    elapsed = time.monotonic() - start
    out = capsys.readouterr().out
    assert rc == 1, f"{name}: inspect must exit 1 on a bad checkpoint, got {rc}:\n{out}"
    check_output(name, out)
    assert elapsed < 20, f"{name}: inspect took {elapsed:.1f}s"
    assert snapshot(parent) == before, f"{name}: inspect changed files in or next to the checkpoint"
    assert not (parent / MARKER).exists(), f"{name}: a pickle payload ran (the marker file exists)"


@pytest.mark.parametrize("name", SUBPROCESS_VARIANTS)
def test_inspect_subprocess_exits_1_without_traceback(corpus: Path, name: str):
    ckpt, parent = corpus / name / "ckpt", corpus / name
    if not ckpt.exists():
        ckpt, parent = build_variant(corpus, name)
    before = snapshot(parent)
    proc = subprocess.run([sys.executable, "-m", "cognica", "inspect", str(ckpt)], capture_output=True, text=True,
                          cwd=parent, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, f"{name}: `python -m cognica inspect` exited {proc.returncode}:\n{output}"
    check_output(name, output)
    assert snapshot(parent) == before, f"{name}: the inspect process changed files in or next to the checkpoint"
    assert not (parent / MARKER).exists(), f"{name}: a pickle payload ran (the marker file exists)"
