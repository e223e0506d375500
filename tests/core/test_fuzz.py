"""Bounded fuzzing of the three parsers that read untrusted input: config.json, safetensors headers and the
tokenizer pickle. Each may only raise its own error type (ConfigError, CheckpointError, TokenizerError) or
return a valid result; the pickle loader must never call anything the file names."""

import json
import pickle
import struct
import tempfile
from pathlib import Path

import pytest
import tiktoken
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from cognica.checkpoint import read_safetensors_header
from cognica.config import _ALIASES, POE_MODES, CognicaConfig, ConfigError
from cognica.names import CheckpointError
from cognica.tokenizer import TokenizerError, load_tiktoken_pickle, make_encoding

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRIPWIRE_CALLS: list[object] = []


def tripwire(*args: object) -> None:
    """Any pickle that manages to call this proves the unpickler ran a global it should have refused."""
    TRIPWIRE_CALLS.append(args)


@pytest.fixture(scope="module")
def scratch() -> Path:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def json_values(max_leaves: int = 8) -> st.SearchStrategy:
    scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=8), inner, max_size=4), max_leaves=max_leaves)


# ---- config.json ------------------------------------------------------------------------------------------

VALID = {"n_layer": 4, "n_head": 2, "n_kv_head": 2, "n_embd": 128, "vocab_size": 64, "sequence_len": 64}
FIELD_NAMES = sorted({s for spellings in _ALIASES.values() for s in spellings} | {"head_dim", "architectures"})
field_values = (st.integers(-4, 300) | st.sampled_from(["SSSL", "L", "S", "SL", "sssl", "X", "", "none", "flat"])
                | json_values())
config_dicts = st.one_of(
    st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), field_values, max_size=12),
    st.dictionaries(st.sampled_from(FIELD_NAMES), field_values, max_size=6).map(lambda d: VALID | d),
)


@FUZZ
@given(raw=config_dicts | json_values())
@example(raw=VALID | {"n_layer": 10**30})
@example(raw=VALID | {"head_dim": float("nan")})
@example(raw=VALID | {"window_pattern": "ß"})
def test_config_from_dict_raises_only_config_error(raw):
    try:
        cfg = CognicaConfig.from_dict(raw)
    except ConfigError:
        return
    assert cfg.n_embd % cfg.n_head == 0 and cfg.n_head % cfg.n_kv_head == 0, f"inconsistent heads accepted: {raw}"
    assert set(cfg.window_pattern) <= {"S", "L"} and len(cfg.window_pattern) <= cfg.n_layer, f"bad pattern: {raw}"
    assert cfg.poe_mode in POE_MODES and min(cfg.n_layer, cfg.vocab_size, cfg.sequence_len) > 0, f"accepted {raw}"
    if cfg.n_layer <= 1000:
        assert len(cfg.window_left) == cfg.n_layer and cfg.window_letters[-1] == "L", f"derived windows: {raw}"


# ---- safetensors headers ----------------------------------------------------------------------------------

VALID_FILE = save({"a": torch.arange(3, dtype=torch.float32), "b": torch.ones(2, 2, dtype=torch.bfloat16)})
header_entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "BF16", "I64", "BOOL", "Q4"]) | json_values(2),
    "shape": st.lists(st.integers(-2, 5) | json_values(1), max_size=3) | json_values(2),
    "data_offsets": st.lists(st.integers(-4, 40) | json_values(1), max_size=3) | json_values(2),
})


def with_header(header: object, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def mutate(blob: bytes, data: st.DataObject) -> bytes:
    out = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        i = data.draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "flip" and out:
            out[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del out[i:]
        elif op == "insert":
            out[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif out:
            del out[i : i + data.draw(st.integers(1, 8))]
    return bytes(out)


def check_header(path: Path, blob: bytes) -> None:
    path.write_bytes(blob)
    try:
        entries = read_safetensors_header(path)
    except CheckpointError:
        return
    for e in entries.values():
        assert 8 <= e.begin <= e.end <= len(blob), f"accepted offsets outside the file: {e}"


@FUZZ
@given(blob=st.binary(max_size=300))
@example(blob=struct.pack("<Q", 20000) + b"[" * 20000)
@example(blob=with_header({"x": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 4]}}, bytes(4)))
@example(blob=with_header({"x": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4)))
def test_header_of_arbitrary_bytes_raises_only_checkpoint_error(scratch, blob):
    check_header(scratch / "arbitrary.safetensors", blob)


@FUZZ
@given(header=st.dictionaries(st.text(max_size=6), header_entries | json_values(2), max_size=4),
       size=st.integers(0, 48))
def test_fuzzed_header_fields_raise_only_checkpoint_error(scratch, header, size):
    check_header(scratch / "fields.safetensors", with_header(header, bytes(size)))


# ---- tokenizer.pkl ----------------------------------------------------------------------------------------

SMALL_ENCODING = pickle.dumps(make_encoding({bytes([i]): i for i in range(256)}))


def encoding_pickle(state: object) -> bytes:
    """A pickle shaped exactly like a pickled tiktoken.Encoding (GLOBAL, NEWOBJ, BUILD) with an arbitrary state."""
    body = pickle.dumps(state, protocol=3)[2:-1]  # the state's opcodes, without PROTO and STOP
    return b"\x80\x03ctiktoken.core\nEncoding\n)\x81" + body + b"b."


class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def check_pickle(path: Path, blob: bytes) -> None:
    path.write_bytes(blob)
    before = len(TRIPWIRE_CALLS)
    try:
        enc = load_tiktoken_pickle(path)
    except TokenizerError:
        pass
    else:
        assert isinstance(enc, tiktoken.Encoding), f"returned {type(enc).__name__}"
    assert len(TRIPWIRE_CALLS) == before, "the pickle called a global the restricted unpickler must refuse"


@FUZZ
@given(blob=st.binary(max_size=300))
@example(blob=pickle.dumps(_Call(tripwire, "ran")))
@example(blob=pickle.dumps({"ok": _Call(tripwire, "nested")}))
@example(blob=pickle.dumps(_Call(tripwire, "ran"), protocol=0))
def test_tokenizer_pickle_of_arbitrary_bytes_raises_only_tokenizer_error(scratch, blob):
    check_pickle(scratch / "arbitrary.pkl", blob)


encoding_states = st.fixed_dictionaries({}, optional={
    "name": st.text(max_size=5) | json_values(1),
    "pat_str": st.sampled_from([r"\w+|\s+", "(", r"\p{L}+", ""]) | json_values(1),
    "mergeable_ranks": st.dictionaries(st.binary(max_size=3), st.integers(-3, 300), max_size=6) | json_values(2),
    "special_tokens": st.dictionaries(st.text(max_size=6), st.integers(-3, 300), max_size=3) | json_values(2),
}) | json_values(3)


@FUZZ
@given(state=encoding_states | st.dictionaries(st.integers() | st.text(max_size=3), st.none(), max_size=3))
@example(state={1: None, "name": None})
@example(state={"name": "x", "pat_str": r"\w+", "mergeable_ranks": {b"a": 0, b"b": 0}, "special_tokens": {}})
@example(state={"name": "x", "pat_str": r"\w+", "mergeable_ranks": {b"a": -1}, "special_tokens": {"<s>": -5}})
def test_fuzzed_encoding_state_raises_only_tokenizer_error(scratch, state):
    check_pickle(scratch / "state.pkl", encoding_pickle(state))


# ---- a valid file of each, mutated -----------------------------------------------------------------------

MUTATED = [(check_header, VALID_FILE, "mutated.safetensors"), (check_pickle, SMALL_ENCODING, "mutated.pkl")]


@FUZZ
@given(data=st.data())
@pytest.mark.parametrize("check,valid,name", MUTATED, ids=["safetensors_header", "encoding_pickle"])
def test_mutated_valid_file_raises_only_its_parsers_error(scratch, check, valid, name, data):
    check(scratch / name, mutate(valid, data))


def test_small_encoding_pickle_loads(scratch):
    path = scratch / "ok.pkl"
    path.write_bytes(SMALL_ENCODING)
    assert load_tiktoken_pickle(path).encode_ordinary("hi") == [104, 105], "the unmutated pickle is the baseline"
