"""An OpenAI-compatible server on 127.0.0.1 for the tests: start, wait, stop, and the request corpus shared by
the vLLM and SGLang server suites (bad requests, a bounded soak)."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from cognica.model import CognicaGPT

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    model: str
    proc: subprocess.Popen
    log: Path
    model_dir: Path | None = None  # the checkpoint served: "a correct answer" is checked against its reference

    def rss_mib(self) -> float:
        """Resident memory of the server and all its children."""
        import psutil

        p = psutil.Process(self.proc.pid)
        return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**20

    def complete(self, timeout: float = 120, **body) -> requests.Response:
        return requests.post(f"{self.url}/v1/completions", json={"model": self.model, **body}, timeout=timeout)


@contextmanager
def serve(cmd: list[str], model: str, port: int, log: Path, env: dict[str, str] | None = None,
          unset: tuple[str, ...] = (), startup_s: float = 600, model_dir: Path | None = None) -> Iterator[Server]:
    """Run `cmd` (which must listen on 127.0.0.1:`port`) until the context exits; kill its process group.
    The server gets this process's environment plus `env`, minus the names in `unset`. `model_dir` (the served
    checkpoint, with its tokenizer) lets `check_bad_request` compare answers with the reference."""
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.time() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"server not healthy after {startup_s}s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield Server(url, model, proc, log, model_dir)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def stream_text(server: Server, **body) -> tuple[str, list[str]]:
    """POST a streaming completion; return the joined text and the finish reasons seen."""
    r = requests.post(f"{server.url}/v1/completions", json={"model": server.model, "stream": True, **body},
                      stream=True, timeout=120)
    assert r.status_code == 200, r.text
    text, reasons = [], []
    for line in r.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        choice = json.loads(line[6:])["choices"][0]
        text.append(choice.get("text", ""))
        if choice.get("finish_reason"):
            reasons.append(choice["finish_reason"])
    return "".join(text), reasons


def check_streaming_equals_non_streaming(server: Server) -> None:
    """A greedy streamed completion joins to the non-streamed text and ends once with finish_reason 'length'."""
    body = dict(prompt="Once upon a time,", max_tokens=16, temperature=0)
    r = server.complete(**body)
    assert r.status_code == 200, r.text
    text, reasons = stream_text(server, **body)
    assert text == r.json()["choices"][0]["text"], "streamed text differs from the non-streamed completion"
    assert reasons == ["length"], f"stream should end once with finish_reason 'length', got {reasons}"


def disconnect_mid_stream(server: Server, prompt: str) -> None:
    """Open a long streaming request, read one chunk, and drop the connection."""
    r = requests.post(f"{server.url}/v1/completions", stream=True, timeout=120,
                      json={"model": server.model, "prompt": prompt, "max_tokens": 200, "stream": True})
    next(r.iter_lines())
    r.close()


# (name, request body, acceptable outcome): "4xx" means a clear client error, "ok" a correct answer. Every answer to
# a greedy request is checked against the reference (`check_answer`), so "a correct answer" means the right one.
BAD_REQUESTS: list[tuple[str, dict, str]] = [
    ("prompt longer than the context", {"prompt": "hello " * 1100, "max_tokens": 4}, "4xx"),
    ("empty prompt", {"prompt": "", "max_tokens": 4, "temperature": 0}, "ok_or_4xx"),
    ("token id >= vocab", {"prompt": [32759, 40000, 5], "max_tokens": 4}, "4xx"),
    ("negative token id", {"prompt": [32759, -3, 5], "max_tokens": 4}, "4xx"),
    ("max_tokens 0", {"prompt": "hi", "max_tokens": 0, "temperature": 0}, "ok_or_4xx"),
    ("max_tokens huge", {"prompt": "hi", "max_tokens": 10**9}, "ok_or_4xx"),
    ("invalid UTF-8 (lone surrogate escapes)", {"prompt": "abc\udcff\ud800 def", "max_tokens": 4}, "ok_or_4xx"),
    ("special tokens inside text", {"prompt": "a<|user_start|>b<|bos|>c", "max_tokens": 4, "temperature": 0}, "ok"),
    ("n > 1 with greedy", {"prompt": "hi", "max_tokens": 4, "n": 3, "temperature": 0}, "ok_or_4xx"),
    # On the tiny seed-0 checkpoint the greedy continuation of this prompt holds one token of three 4-byte
    # characters, "𝔘𝔫𝔦": the stop string is the middle one (check_answer asserts it occurs).
    ("stop string on a multi-byte char inside a token",
     {"prompt": "日本", "max_tokens": 8, "temperature": 0, "stop": ["𝔫"]}, "ok"),
    ("absurd logprobs", {"prompt": "hi", "max_tokens": 2, "logprobs": 10**6}, "4xx"),
    ("negative temperature", {"prompt": "hi", "max_tokens": 2, "temperature": -1}, "4xx"),
    ("wrong type for prompt", {"prompt": {"x": 1}, "max_tokens": 2}, "4xx"),
]


@functools.lru_cache(maxsize=2)
def reference_and_tokenizer(model_dir: Path) -> tuple[CognicaGPT, PreTrainedTokenizerBase]:
    """The fp32 reference model and the HF tokenizer of a served checkpoint, loaded once per directory."""
    import torch
    from transformers import AutoTokenizer

    from cognica.hf import register
    from cognica.model import load_reference

    register()
    return load_reference(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(model_dir)


def reference_text(model_dir: Path, prompt: str, max_tokens: int) -> str:
    """The reference's greedy continuation of a text prompt (tokenized as the servers do: <|bos|> once, special
    tokens in the text as special ids), decoded without special tokens as the servers return it."""
    ref, tok = reference_and_tokenizer(model_dir)
    ids = tok(prompt).input_ids
    return tok.decode(ref.generate([ids], max_tokens)[0], skip_special_tokens=True)


def check_answer(server: Server, name: str, body: dict, answer: dict) -> None:
    """A 200 to a greedy BAD_REQUESTS body must be the correct completion: the reference's greedy text (cut before
    the first stop string), once per requested choice; max_tokens 0 gives empty text."""
    if body.get("temperature") != 0:
        return  # sampled: any text is an answer
    assert server.model_dir is not None, "serve(..., model_dir=...) is needed to check answers"
    texts = [c["text"] for c in answer["choices"]]
    assert len(texts) == body.get("n", 1), f"{name}: asked for {body.get('n', 1)} choices, got {len(texts)}"
    if body["max_tokens"] == 0:
        assert texts == [""] * len(texts), f"{name}: max_tokens 0 must generate nothing, got {texts}"
        return
    want = reference_text(server.model_dir, body["prompt"], body["max_tokens"])
    for stop in body.get("stop", []):
        assert stop in want, f"{name}: precondition: the reference's greedy text {want!r} should contain {stop!r}"
        want = want[: want.index(stop)]
    assert texts == [want] * len(texts), f"{name}: expected {len(texts)} x {want!r} (the reference), got {texts}"


def error_message(r: requests.Response) -> str:
    """The message of an error response: OpenAI style {"error": {"message"}}, {"message"} or FastAPI's {"detail"}."""
    try:
        body = r.json()
    except ValueError:
        return ""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or "")
    return str(body.get("message") or body.get("detail") or err or "") if isinstance(body, dict) else ""


# The request-option tests (tests/vllm/test_request_options.py, tests/sglang/test_request_options.py): after each
# option the server must still give the reference's greedy completion of PLAIN.
PLAIN = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}


def completion(**kw: Any) -> tuple[str, dict]:
    """An OpenAI completion request (path, body) with the option(s) `kw`."""
    return "/v1/completions", {"prompt": "Hello there", "max_tokens": 4, **kw}


# (name, (path, body), expect) of the OpenAI completion options both engines answer alike: "ok" a 200, "4xx" a client
# error (a logit bias outside the vocabulary)
SHARED_COMPLETION_OPTIONS: list[tuple[str, tuple[str, dict], str]] = [
    ("logprobs", completion(logprobs=5), "ok"),
    ("echo with logprobs", completion(echo=True, logprobs=1, max_tokens=2), "ok"),
    ("n=3 sampled", completion(n=3, temperature=1.0), "ok"),
    ("seed", completion(seed=7, temperature=1.0), "ok"),
    ("logit_bias", completion(logit_bias={"100": 100.0, "5": -100.0}), "ok"),
    ("logit_bias out of vocab", completion(logit_bias={"40000": 5.0}), "4xx"),
    ("min_tokens", completion(min_tokens=4, max_tokens=6), "ok"),
    ("repetition_penalty", completion(repetition_penalty=1.5), "ok"),
    ("frequency and presence penalties", completion(frequency_penalty=1.0, presence_penalty=1.0), "ok"),
    ("top_k top_p min_p", completion(top_k=5, top_p=0.9, min_p=0.05, temperature=1.0), "ok"),
]


def check_request_option(server: Server, engine: str, name: str, request_: tuple[str, dict], expect: str,
                         plain: dict, plain_answer: str, record_property: Callable[[str, str], None]) -> None:
    """One request option of tests/test_{vllm,sglang}_request_options.py: a 200 or a 4xx with a message (a stream
    not ending in an error), the outcome `expect` pinned ("ok", "4xx" or "any"), and after it a plain greedy
    completion `plain` still equal to the reference's `plain_answer`."""
    import pytest

    path, body = request_
    try:
        r = requests.post(f"{server.url}{path}", json={"model": server.model, **body}, timeout=300)
    except requests.ConnectionError as e:
        pytest.fail(f"{name}: the connection dropped: {e}")
    code = r.status_code
    record_property("status", f"{code} {error_message(r)[:160]}")  # --junitxml: what each option did
    assert code == 200 or 400 <= code < 500, f"{name}: got {code}: {r.text[:300]}"
    if code != 200:
        assert error_message(r), f"{name}: a {code} must carry a message: {r.text[:300]}"
    elif body.get("stream"):
        assert 'data: {"error"' not in r.text, f"{name}: the stream ended in an error: {r.text[-300:]}"
    if expect == "ok":
        assert code == 200, f"{name}: {engine} answered this option before; now {code}: {r.text[:300]}"
    elif expect == "4xx":
        assert 400 <= code < 500, f"{name}: {engine} refused this option before; now {code}: {r.text[:300]}"
    after = server.complete(**plain)
    assert after.status_code == 200, f"server stopped serving after {name}: {after.status_code}: {after.text[:300]}"
    text = after.json()["choices"][0]["text"]
    assert text == plain_answer, f"after {name}, a plain greedy completion is {text!r}, the reference's " \
        f"{plain_answer!r}"


# ---- embedding mode (tests/test_embedding_mode_{vllm,sglang}.py) --------------------------------------------


def reference_embedding(ref: CognicaGPT, ids: list[int]) -> torch.Tensor:
    """The reference's last-token input of lm_head (the final normed hidden state), L2-normalised."""
    import torch

    seen: list[torch.Tensor] = []
    hook = ref.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            ref(torch.tensor([ids]))
    finally:
        hook.remove()
    return torch.nn.functional.normalize(seen[0][0, -1].float(), dim=-1)


def embeddings(server: Server, inputs: list[list[int]] | str) -> list[list[float]]:
    """/v1/embeddings of `inputs` (token-id lists, or one text), in input order."""
    r = requests.post(f"{server.url}/v1/embeddings", json={"model": server.model, "input": inputs}, timeout=300)
    assert r.status_code == 200, f"/v1/embeddings failed: {r.status_code}: {r.text[:500]}"
    return [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]


def check_embeddings_equal_reference(server: Server, prompts: list[list[int]], atol: float) -> None:
    """One request with a batch of different lengths: each embedding equals the reference's within `atol`."""
    import torch

    ref, _ = reference_and_tokenizer(server.model_dir)
    for ids, emb in zip(prompts, embeddings(server, prompts), strict=True):
        want = reference_embedding(ref, ids)
        assert len(emb) == want.numel(), f"{len(ids)} tokens: embedding has {len(emb)} dims, expected {want.numel()}"
        err = (torch.tensor(emb) - want).abs().max().item()
        assert err < atol, f"{len(ids)} tokens: embedding off the reference's normed final hidden state by {err:.2e}"


def check_text_embedding_has_bos_once(server: Server, bos: int, atol: float) -> None:
    """A text input is embedded as <|bos|> + its tokens (BOS once), as the reference embeds those ids."""
    import torch

    ref, tok = reference_and_tokenizer(server.model_dir)
    text = "The capital of France is Paris."
    ids = tok(text).input_ids
    assert ids[0] == bos and bos not in ids[1:], f"precondition: the tokenizer should prepend <|bos|> once: {ids[:4]}"
    err = (torch.tensor(embeddings(server, text)[0]) - reference_embedding(ref, ids)).abs().max().item()
    assert err < atol, f"a text input's embedding is off the reference's of <|bos|> + its tokens by {err:.2e}"


def check_embedding_alone_equals_batched(server: Server, prompts: list[list[int]], atol: float) -> None:
    alone = embeddings(server, [prompts[2]])[0]
    batched = embeddings(server, prompts)[2]
    err = max(abs(a - b) for a, b in zip(alone, batched, strict=True))
    assert err < atol, f"a prompt's embedding depends on its batch: {err:.2e}"


def check_stage_exit_embeddings(model_dir: Path, stage: int, prompts: list[list[int]], got: list[list[float]],
                                atol: float) -> None:
    """Embeddings served with `poe_exit_stage=stage` (`got`, in prompt order) equal the stage-prefix reference's:
    the normed residual stream at the stage's exit (cognica.layers.exit_tail, then the final norm), L2-normalised,
    within `atol`; and they are not the full model's (an ignored override fails here)."""
    import torch

    from cognica.model import load_reference

    stage_ref = load_reference(model_dir, dtype=torch.float32, poe_exit_stage=stage)
    full_ref = load_reference(model_dir, dtype=torch.float32)
    for ids, emb in zip(prompts, got, strict=True):
        want, full = reference_embedding(stage_ref, ids), reference_embedding(full_ref, ids)
        assert (want - full).abs().max().item() > 100 * atol, \
            f"precondition: the stage-{stage} exit's embedding should differ from the full model's ({len(ids)} tokens)"
        err = (torch.tensor(emb) - want).abs().max().item()
        assert err < atol, f"{len(ids)} tokens: embedding off the reference's normed stage-{stage} exit by {err:.2e}" \
            f" (off the full model's by {(torch.tensor(emb) - full).abs().max().item():.2e})"


def check_bad_request(server: Server, name: str, body: dict, outcome: str) -> None:
    """The server answers a `BAD_REQUESTS` entry as promised and still serves a normal request afterwards."""
    r = post_raw(server, body)
    if outcome == "4xx":
        assert 400 <= r.status_code < 500, f"{name}: expected a 4xx, got {r.status_code}: {r.text[:200]}"
        assert error_message(r), f"{name}: a 4xx must carry a message: {r.text[:200]}"
    elif outcome == "ok":
        assert r.status_code == 200, f"{name}: expected an answer, got {r.status_code}: {r.text[:200]}"
    else:
        assert r.status_code == 200 or 400 <= r.status_code < 500, f"{name}: got {r.status_code}: {r.text[:200]}"
        if r.status_code != 200:
            assert error_message(r), f"{name}: a 4xx must carry a message: {r.text[:200]}"
    if r.status_code == 200:
        check_answer(server, name, body, r.json())
    assert server.complete(prompt="still there?", max_tokens=2).status_code == 200, f"server died after: {name}"


def post_raw(server: Server, body: dict) -> requests.Response:
    """Send a body as raw JSON (lone surrogates encoded as `\\udcff` escapes, which is not valid UTF-8)."""
    data = json.dumps({"model": server.model, **body}, ensure_ascii=True)
    return requests.post(f"{server.url}/v1/completions", data=data, timeout=120,
                         headers={"Content-Type": "application/json"})


def soak(server: Server, prompts: list[str], n_requests: int, concurrency: int, max_tokens: int,
         deadline_s: float) -> dict:
    """`n_requests` greedy completions (half streamed), `concurrency` at a time, bounded by `deadline_s`.
    Each answer is compared with the same request run alone afterwards. Returns counts and latencies."""
    start = time.time()
    rss0 = server.rss_mib()

    def one(i: int) -> tuple[int, str, float]:
        t = time.time()
        prompt = prompts[i % len(prompts)]
        if i % 2:
            text, _ = stream_text(server, prompt=prompt, max_tokens=max_tokens, temperature=0)
        else:
            r = server.complete(prompt=prompt, max_tokens=max_tokens, temperature=0)
            r.raise_for_status()
            text = r.json()["choices"][0]["text"]
        return i, text, time.time() - t

    answers: dict[int, str] = {}
    latencies: list[float] = []
    failures = 0
    with cf.ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one, i) for i in range(n_requests)]
        for f in cf.as_completed(futures, timeout=deadline_s):
            try:
                i, text, dt = f.result()
                answers[i], latencies = text, [*latencies, dt]
            except Exception:  # counted and reported; the test asserts failures == 0
                failures += 1
    alone = {}
    for j in range(len(prompts)):
        r = server.complete(prompt=prompts[j], max_tokens=max_tokens, temperature=0)
        r.raise_for_status()
        alone[j] = r.json()["choices"][0]["text"]
    mismatches = [i for i, text in answers.items() if text != alone[i % len(prompts)]]
    return {"requests": n_requests, "concurrency": concurrency, "answered": len(answers), "failures": failures,
            "mismatches": mismatches, "max_latency_s": max(latencies, default=0.0), "wall_s": time.time() - start,
            "rss_before_mib": rss0, "rss_after_mib": server.rss_mib()}


# Variants of tests/core/test_bad_checkpoints.py that an engine start must refuse. The hostile tokenizer.pkl variants
# are not here: an engine converts a published tokenizer.pkl on first load through the restricted unpickler, and the
# engines' refusal of a hostile one is tested by tests/vllm/test_first_use.py / tests/sglang/test_first_use.py.
ENGINE_START_VARIANTS = (
    "missing_tensor", "unknown_tensor", "wrong_shape", "int32_dtype", "nan_scalar", "truncated_file",
    "header_wrong_span", "empty_file", "config_missing_field", "config_heads_vs_width", "config_window_letter",
    "vocab_mismatch", "symlink_escape", "sharded_and_single",
)


# The line each engine logs once its KV cache exists (`update_kv_cache_capacity` in vllm/v1/core/kv_cache_utils.py;
# `KVCache._finalize_allocation_log` in sglang/srt/mem_cache/memory_pool.py). `check_kv_allocation_logged` shows
# the servers print it.
KV_ALLOCATION_LOG = {"vllm": "KV cache size:", "sglang": "KV Cache is allocated"}


def engine_start_errors(engine: str, dirs: dict[str, Path], env: dict[str, str] | None = None,
                        timeout: float = 900) -> tuple[dict[str, dict], str]:
    """Start `engine` on each directory in one subprocess; return ({variant: {"error", "seconds", "processes"}},
    the driver's whole output)."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "tests.engine_start_driver", engine, json.dumps({k: str(v) for k, v in dirs.items()})],
        capture_output=True, text=True, cwd=root, timeout=timeout, env={**os.environ, **(env or {})},
        start_new_session=True)  # an engine's shutdown may signal its process group: keep pytest out of it
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS=")), None)
    assert line is not None, f"engine-start driver crashed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(line[len("RESULTS="):]), proc.stdout + proc.stderr


def check_engine_refuses_bad_checkpoints(engine: str, corpus: Path, env: dict[str, str] | None = None) -> None:
    """Every ENGINE_START_VARIANTS checkpoint stops the engine in its first process, before any engine process or
    KV cache exists (no process started, no KV-allocation log line), with the message `cognica inspect` gives."""
    from cognica.factory import make_checkpoint
    from tests.core.test_bad_checkpoints import VARIANTS, build_variant

    make_checkpoint(corpus / "base", preset="tiny", seed=0, progress=False)
    dirs = {name: build_variant(corpus, name)[0] for name in ENGINE_START_VARIANTS}
    results, output = engine_start_errors(engine, dirs, env)
    for name in ENGINE_START_VARIANTS:
        got = results.get(name)
        assert got and got["error"], f"{name}: {engine} started on a broken checkpoint (or never tried): {got}"
        assert VARIANTS[name][1] in got["error"], f"{name}: the error does not name the problem: {got['error'][:500]}"
        assert got["processes"] == [], f"{name}: {engine} started processes before refusing: {got['processes']}"
        assert got["seconds"] < 120, f"{name}: took {got['seconds']:.0f} s to fail"
    assert KV_ALLOCATION_LOG[engine] not in output, f"{engine} allocated a KV cache for a broken checkpoint"


def check_kv_allocation_logged(engine: str, server: Server) -> None:
    """The positive control of the check above: a server that did start logged its KV allocation."""
    assert KV_ALLOCATION_LOG[engine] in server.log.read_text(errors="replace"), (
        f"{engine} no longer logs {KV_ALLOCATION_LOG[engine]!r} when it allocates its KV cache: update the marker"
    )


def check_server_refuses_bad_checkpoint(engine: str, cmd_for: Callable[[Path], list[str]], corpus: Path,
                                        variant: str = "wrong_shape", env: dict[str, str] | None = None) -> None:
    """The engine's own server command (`cmd_for(checkpoint)`) exits non-zero on a broken checkpoint, with the
    one-line message naming the problem in its stderr, and never allocates a KV cache."""
    from cognica.factory import make_checkpoint
    from tests.core.test_bad_checkpoints import VARIANTS, build_variant

    make_checkpoint(corpus / "base", preset="tiny", seed=0, progress=False)
    ckpt = build_variant(corpus, variant)[0]
    proc = subprocess.run(cmd_for(ckpt), capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, start_new_session=True)
    assert proc.returncode != 0, f"{engine}'s server exited 0 on a broken checkpoint:\n{proc.stderr[-2000:]}"
    expected = VARIANTS[variant][1]
    assert expected in proc.stderr, f"{engine}'s server stderr does not name the problem ({expected!r}):\n" \
        f"{proc.stderr[-3000:]}"
    assert KV_ALLOCATION_LOG[engine] not in proc.stdout + proc.stderr, f"{engine} allocated a KV cache first"


def check_survives_disconnect(server: Server) -> None:
    disconnect_mid_stream(server, "Tell me a long story")
    assert server.complete(prompt="after the disconnect", max_tokens=2).status_code == 200, "server died"


SHORT_SOAK_PROMPTS = ["Hi", "A short one.", "word " * 300, "The quick brown fox " * 40, "x" * 700, "Numbers: 123 456"]


SOAK_PROMPTS = [
    "Hi", "The capital of France is", "Once upon a time, " * 8, "word " * 300, "def f(x):\n    return x\n" * 60,
    "The quick brown fox jumps over the lazy dog. " * 60, "1 2 3 4 5 6 7 8 9 10 " * 40, "x" * 900,
]


def soak_server_cmd(engine: str, model: Path, port: int, dtype: str) -> tuple[list[str], dict[str, str]]:
    """The CPU server command of `engine` for the long soak (context 2048, 16 sequences) and its environment."""
    if engine == "vllm":
        return ([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host",
                 HOST, "--port", str(port), "--max-model-len", "2048", "--gpu-memory-utilization", "0.3",
                 "--max-num-seqs", "16", "--dtype", dtype], {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"})
    return ([sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--device", "cpu",
             "--attention-backend", "torch_native", "--host", HOST, "--port", str(port), "--dtype", dtype,
             "--disable-cuda-graph", "--skip-server-warmup", "--max-total-tokens", "32768"], {})


def long_soak(engine: str, workdir: Path) -> dict:
    """The long soak (`pytest -m slow`): SOAK_REQUESTS (200) requests, SOAK_CONCURRENCY (16) at a time, mixed
    lengths past the 512-key window, half streamed, SOAK_DTYPE (float32) on the `small` factory checkpoint; every
    greedy answer compared with the same request alone; RSS before and after. Appends one JSON line to
    benchmarks/results/soak.jsonl and prints the table row."""
    import platform

    from cognica.factory import make_checkpoint
    from cognica.tokenizer import convert_tokenizer

    n, conc = int(os.environ.get("SOAK_REQUESTS", 200)), int(os.environ.get("SOAK_CONCURRENCY", 16))
    dtype, max_tokens = os.environ.get("SOAK_DTYPE", "float32"), int(os.environ.get("SOAK_MAX_TOKENS", 16))
    model = make_checkpoint(workdir / "small", preset="small", seed=0, progress=False)
    convert_tokenizer(model)
    port = free_port()
    cmd, env = soak_server_cmd(engine, model, port, dtype)
    with serve(cmd, "default" if engine == "sglang" else str(model), port, workdir / "server.log", env,
               startup_s=900) as server:  # fmt: skip
        stats = soak(server, SOAK_PROMPTS, n, conc, max_tokens, deadline_s=1800)
    root = Path(__file__).resolve().parent.parent
    stats.update(engine=engine, preset="small", dtype=dtype, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                 machine=f"{platform.machine()} {platform.processor()} cores={os.cpu_count()}",
                 commit=subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip())  # fmt: skip
    stats["mismatches"] = len(stats["mismatches"])
    print("\n| engine | dtype | requests | concurrency | answered | failures | greedy mismatches | max latency s "
          "| wall s | RSS before MiB | RSS after MiB |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
          f"| {engine} | {dtype} | {stats['requests']} | {stats['concurrency']} | {stats['answered']} | "
          f"{stats['failures']} | {stats['mismatches']} | {stats['max_latency_s']:.1f} | {stats['wall_s']:.0f} | "
          f"{stats['rss_before_mib']:.0f} | {stats['rss_after_mib']:.0f} |")  # fmt: skip
    out = root / "benchmarks" / "results" / "soak.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(stats) + "\n")
    return stats


def check_short_soak(server: Server) -> None:
    """24 greedy requests, 8 concurrent, half streamed, some past the window: all answered, each equal to the same
    request alone."""
    stats = soak(server, SHORT_SOAK_PROMPTS, n_requests=24, concurrency=8, max_tokens=8, deadline_s=600)
    assert stats["failures"] == 0 and stats["answered"] == 24, f"unanswered requests: {stats}"
    assert not stats["mismatches"], f"batched greedy answers differ from the same request alone: {stats}"


def tokenized_checkpoint(out: Path, seed: int = 0) -> Path:
    """A tiny factory checkpoint with its tokenizer converted (what a server with text prompts needs)."""
    from cognica.factory import make_checkpoint
    from cognica.tokenizer import convert_tokenizer

    model = make_checkpoint(out, preset="tiny", seed=seed, tokenizer=True, progress=False)
    convert_tokenizer(model)
    return model


class EmbeddingTests:
    """What an embedding-mode server of either engine must do; a module subclasses it beside a `server` fixture,
    with its PROMPTS (token-id prompts starting with BOS or not), BOS and ATOL."""

    PROMPTS: list[list[int]]
    BOS: int
    ATOL: float

    def test_embeddings_equal_the_reference_final_hidden_state(self, server: Server):
        check_embeddings_equal_reference(server, self.PROMPTS, self.ATOL)  # one request: a batch of lengths

    def test_text_input_is_embedded_with_bos_prepended_once(self, server: Server):
        check_text_embedding_has_bos_once(server, self.BOS, self.ATOL)

    def test_embedding_of_a_prompt_alone_equals_it_in_a_batch(self, server: Server):
        check_embedding_alone_equals_batched(server, self.PROMPTS, self.ATOL)
