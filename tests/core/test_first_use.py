"""First use without an engine: the model card's transformers snippets, `cognica inspect`/`bpb` on the Hub id, the
PoE twin's id, a hostile tokenizer.pkl, on an offline hub cache laid out exactly as the Hub delivers the repo (run in
.venv/vllm; the engine servers on the same layout are in tests/vllm/test_first_use.py and _sglang.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from cognica.model import load_reference
from cognica.tokenizer import BOS, load_tiktoken_pickle
from tests.hub_fixture import (
    BP_REPO,
    POE_REPO,
    HubRepo,
    hostile_hub_repo,
    make_hub_repo,
    published_checkpoint,
    run_python,
    snapshot_state,
)
from tests.launch_utils import BOS_ID, CONVERTED

# The card's transformers snippets, verbatim apart from dropping trust_remote_code=True (and .cuda(): CPU), after
# `import cognica`; then the PoE twin's id and an unsupported generate keyword. Prints one JSON line.
CARD_SNIPPETS = f'''
import json
import cognica
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

pipe = pipeline("text-generation", model="{BP_REPO}")
model = AutoModelForCausalLM.from_pretrained("{BP_REPO}", dtype="auto")

# the card's "Usage" block
import torch
model16 = AutoModelForCausalLM.from_pretrained(
"{BP_REPO}",
torch_dtype=torch.bfloat16,
).eval()
tok = AutoTokenizer.from_pretrained(
"{BP_REPO}",
)
prompt = "<|bos|>The capital of France is"
ids = tok.encode(prompt, return_tensors="pt")
out16 = model16.generate(ids, max_new_tokens=40, do_sample=False,
                         repetition_penalty=1.15, pad_token_id=tok.eos_token_id)
print(tok.decode(out16[0]))

# the same call on the dtype="auto" model (float32 here), compared with the reference by the test
out = model.generate(ids, max_new_tokens=40, do_sample=False,
                     repetition_penalty=1.15, pad_token_id=tok.eos_token_id)

piped = pipe("The capital of France is", max_new_tokens=8, do_sample=False)[0]["generated_text"]
try:
    model.generate(ids, max_new_tokens=2, num_beams=2)
    refused = None
except ValueError as e:
    refused = str(e)
poe_tok = AutoTokenizer.from_pretrained("{POE_REPO}")
poe = AutoModelForCausalLM.from_pretrained("{POE_REPO}", dtype="auto")
poe_out = poe.generate(poe_tok.encode(prompt, return_tensors="pt"), max_new_tokens=6, do_sample=False)
print("RESULT=" + json.dumps({{
    "ids": ids[0].tolist(), "out": out[0].tolist(), "dtype": str(model.dtype), "tok": type(tok).__name__,
    "dtype16": str(model16.dtype), "out16_len": out16.shape[1],
    "piped": piped, "refused": refused, "poe_mode": poe.config.poe_mode, "poe_out": poe_out[0].tolist(),
}}))
'''
SECOND_LOAD = f'''
import cognica
from transformers import AutoTokenizer
print("RESULT=" + str(AutoTokenizer.from_pretrained("{BP_REPO}").encode("<|bos|>The capital of France is")))
'''
HOSTILE_LOADS = f'''
import json
import cognica
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline
errors = {{}}
for name, load in [("AutoTokenizer", AutoTokenizer.from_pretrained), ("AutoConfig", AutoConfig.from_pretrained),
                   ("AutoModelForCausalLM", AutoModelForCausalLM.from_pretrained),
                   ("pipeline", lambda m: pipeline("text-generation", model=m))]:
    try:
        load("{BP_REPO}")
        errors[name] = None
    except Exception as e:
        errors[name] = type(e).__name__ + ": " + str(e)
print("RESULT=" + json.dumps(errors))
'''


def result(proc: subprocess.CompletedProcess) -> object:
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT=")), None)
    assert line is not None, \
        f"the script failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    payload = line[len("RESULT="):]
    try:
        return json.loads(payload)
    except ValueError:
        return payload


class Hub(NamedTuple):
    bp: HubRepo
    poe: HubRepo
    state: dict  # the BP snapshot's state before any test touched it


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Hub:
    """The BP and PoE repos in one offline HF_HOME, and the BP snapshot's state before any test touched it."""
    src, hf_home = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("hf_home")
    bp = make_hub_repo(hf_home, BP_REPO, published_checkpoint(src / "bp"))
    poe = make_hub_repo(hf_home, POE_REPO, published_checkpoint(src / "poe", poe=True))
    return Hub(bp, poe, snapshot_state(bp.snapshot))


@pytest.fixture(scope="module")
def card_run(hub) -> tuple[dict, str]:
    bp, _, _ = hub
    proc = run_python(CARD_SNIPPETS, bp.env(), timeout=600)
    return result(proc), proc.stderr


def reference_greedy(ref: torch.nn.Module, ids: list[int], n: int, repetition_penalty: float = 1.0) -> list[int]:
    """Greedy decoding by full forwards (no KV cache) with transformers' own repetition-penalty processor."""
    from transformers import RepetitionPenaltyLogitsProcessor

    penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty)
    seq = torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(n):
            scores = penalty(seq, ref(seq)[:, -1].float())
            seq = torch.cat([seq, scores.argmax(-1, keepdim=True)], dim=1)
            if int(seq[0, -1]) == BOS_ID:  # generation_config.json's eos_token_id
                break
    return seq[0].tolist()


def assert_generate_is_reference_greedy(snapshot: Path, prompt: list[int], out: list[int], n: int, what: str,
                                        repetition_penalty: float = 1.0) -> None:
    """`out` (a generate() output: prompt and continuation) is the fp32 reference's greedy `n` tokens after
    `prompt`, the reference loaded from `snapshot`."""
    want = reference_greedy(load_reference(snapshot, dtype=torch.float32), prompt, n, repetition_penalty)
    assert out == want, f"{what} differs from the reference:\n{out}\n{want}"


def test_card_tokenizer_prepends_bos_once_and_matches_tiktoken(hub, card_run):
    bp, _, _ = hub
    got, _ = card_run
    enc = load_tiktoken_pickle(bp.snapshot / "tokenizer.pkl")
    assert got["tok"] == "CognicaPoETokenizerFast", f"AutoTokenizer gave {got['tok']}"
    assert got["ids"] == [BOS_ID, *enc.encode_ordinary("The capital of France is")], \
        f"'{BOS}The capital...' must be <|bos|> once then tiktoken's ids, got {got['ids']}"


def test_card_generate_equals_reference_with_repetition_penalty(hub, card_run):
    got, _ = card_run
    assert got["dtype"] == "torch.float32", f"dtype='auto' must follow config.json's torch_dtype, got {got['dtype']}"
    assert_generate_is_reference_greedy(hub.bp.snapshot, got["ids"], got["out"], 40, "generate()",
                                        repetition_penalty=1.15)
    assert got["dtype16"] == "torch.bfloat16", f"torch_dtype=torch.bfloat16 must load bf16, got {got['dtype16']}"
    assert len(got["ids"]) < got["out16_len"] <= len(got["ids"]) + 40, "the card's bf16 generate must generate"


def test_card_pipeline_continues_like_the_reference(hub, card_run):
    bp, _, _ = hub
    got, _ = card_run
    ref = load_reference(bp.snapshot, dtype=torch.float32)
    want = reference_greedy(ref, got["ids"], 8)
    continuation = load_tiktoken_pickle(bp.snapshot / "tokenizer.pkl").decode(want[len(got["ids"]):])
    assert got["piped"] == "The capital of France is" + continuation, \
        f"pipeline text differs from the reference's greedy continuation: {got['piped']!r} vs {continuation!r}"


def test_generate_refuses_an_unsupported_keyword(card_run):
    got, _ = card_run
    assert got["refused"] and "num_beams=2" in got["refused"], \
        f"generate(num_beams=2) must raise naming the keyword, got {got['refused']!r}"


def test_poe_twin_id_takes_the_same_path(hub, card_run):
    got, _ = card_run
    assert got["poe_mode"] == "flat", f"the PoE id must load its own config, got poe_mode={got['poe_mode']!r}"
    assert_generate_is_reference_greedy(hub.poe.snapshot, got["poe_out"][:len(got["ids"])], got["poe_out"], 6,
                                        "PoE generate")


def test_first_load_converts_once_and_a_second_load_does_not(hub, card_run):
    bp, _, _ = hub
    _, stderr = card_run
    converted = [line for line in stderr.splitlines() if CONVERTED in line and str(bp.snapshot) in line]
    assert len(converted) == 1, f"the first process must convert the BP tokenizer.pkl exactly once:\n{converted}"
    cache = Path(bp.env()["COGNICA_CACHE_DIR"]) / "tokenizers"
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("*/tokenizer.json")}
    proc = run_python(SECOND_LOAD, bp.env())
    assert result(proc)[:1] == [BOS_ID], f"the second load must give the same tokenizer: {proc.stdout[-500:]}"
    assert CONVERTED not in proc.stderr, f"the second load converted again:\n{proc.stderr[-2000:]}"
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*/tokenizer.json")} == before, "cache was rewritten"


def test_inspect_and_bpb_take_the_hub_id(hub, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from cognica import cli

    bp, _, _ = hub
    # what HF_HOME=<hf_home> HF_HUB_OFFLINE=1 gives a fresh `cognica` process (huggingface_hub reads them at import)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(bp.hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert cli.main(["inspect", BP_REPO]) == 0, f"inspect <id> failed:\n{capsys.readouterr()}"
    out = capsys.readouterr().out
    assert "ok: no problems found" in out and str(bp.snapshot) in out, f"inspect must read the snapshot:\n{out}"
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time, there was a tokenizer.")
    assert cli.main(["bpb", BP_REPO, "--text", str(text)]) == 0, f"bpb <id> failed:\n{capsys.readouterr()}"
    assert capsys.readouterr().out.startswith("bpb "), "bpb <id> must print its result"
    assert cli.main(["inspect", "cognica/No-Such-Model"]) == 1, "an unknown id must fail"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, f"an unknown id must give one line: {lines}"
    assert "cognica/No-Such-Model" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0], f"unclear: {lines[0]}"


def test_hostile_tokenizer_pkl_is_refused_by_every_transformers_entry(tmp_path_factory):
    repo, ran = hostile_hub_repo(tmp_path_factory)
    errors = result(run_python(HOSTILE_LOADS, repo.env()))
    for entry, error in errors.items():
        assert error and "TokenizerError" in error, f"{entry} did not refuse the hostile tokenizer.pkl: {error}"
        assert str(repo.snapshot / "tokenizer.pkl") in error and "posix.system" in error, \
            f"{entry}: the error must name the file and the refused global: {error}"
        assert "\n" not in error, f"{entry}: one line expected: {error}"
    assert not ran.exists(), "the hostile pickle's payload ran"
    assert not repo.marker.exists(), "the repo's remote code was imported"


def test_remote_code_never_imported_and_snapshot_unchanged(hub, card_run):
    bp, poe, state = hub
    assert not bp.marker.exists() and not poe.marker.exists(), "a *_cognica_poe.py file of the repo was imported"
    assert snapshot_state(bp.snapshot) == state, "the hub snapshot was modified"


def test_converted_tokenizer_lives_in_the_cognica_cache_keyed_by_content(hub, tmp_path, monkeypatch):
    import hashlib

    from cognica.tokenizer import converted_tokenizer

    bp, _, _ = hub
    monkeypatch.delenv("COGNICA_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    pkl = bp.snapshot / "tokenizer.pkl"
    out = converted_tokenizer(pkl)
    digest = hashlib.sha256(pkl.read_bytes()).hexdigest()
    assert out.parent == tmp_path / ".cache" / "cognica" / "tokenizers" and out.name.startswith(digest), \
        f"converted tokenizer at {out}, expected ~/.cache/cognica/tokenizers/{digest}-v*"
    assert (out / "tokenizer.json").is_file() and not (bp.snapshot / "tokenizer.json").exists()


def test_generate_sampling_keywords_follow_transformers(hub):
    from cognica.generation import generate

    bp, _, _ = hub
    ref = load_reference(bp.snapshot, dtype=torch.float32)
    ids = torch.tensor([[BOS_ID, 1914, 8445, 433]])
    greedy = generate(ref, ids, None, max_new_tokens=6, do_sample=False)
    assert greedy.shape == (1, 10) and greedy[0].tolist() == reference_greedy(ref, ids[0].tolist(), 6)
    for kw in ({"top_k": 1}, {"top_p": 1e-9}, {"temperature": 1e-4, "top_k": 0}):
        torch.manual_seed(0)
        sampled = generate(ref, ids, None, max_new_tokens=6, do_sample=True, **kw)
        assert torch.equal(sampled, greedy), f"do_sample with {kw} must pick the argmax like transformers' warpers"
    with pytest.raises(ValueError, match="frobnicate"):
        generate(ref, ids, None, max_new_tokens=2, frobnicate=True)
    with pytest.raises(ValueError, match="pad on the left"):  # left padding works (tests/core/test_hf_training.py)
        generate(ref, ids, None, max_new_tokens=2, attention_mask=torch.tensor([[1, 1, 1, 0]]))
