"""The SGLang plugin against the pure-torch reference (`cognica.model`) on a tiny factory checkpoint.

The tiny preset has 4 layers (S S S L), context 1024 and an S window of 256 keys before the query, so
long prompts cross the window several times. Parity runs the engine in float32 (the bf16 weights are
exact there): greedy tokens identical, per-token logprobs within 1e-3. bf16 uses the calibrated tolerance
and near-tie rule of tests/utils.py, as the vLLM tests do. The release's context and windows (2048, 512)
and retraction are in tests/sglang/test_release_shape.py.

Run in SGLang's own venv, with the plugin's `sgl_kernel` stand-in on the path (CPU machine):
    SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$(.venv/sglang/bin/cognica sglang-cpu-path)" \
        .venv/sglang/bin/python -m pytest tests/sglang/test_parity.py
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests  # noqa: E402
import sglang  # noqa: E402, F401  (a missing engine is a failure, not a skip)
import torch

from cognica.chat import TEMPLATE_PATH  # noqa: E402
from cognica.factory import make_checkpoint  # noqa: E402
from cognica.model import load_reference  # noqa: E402
from tests.launch_utils import OpenAIServerTests  # noqa: E402
from tests.server_utils import (  # noqa: E402
    check_engine_refuses_bad_checkpoints,
    check_server_refuses_bad_checkpoint,
    error_message,
    free_port,
)
from tests.sglang_utils import BOS, EngineSlot, check_parity, greedy, lps, random_prompt, run, serve_sglang  # noqa: E402
from tests.utils import FP32_LOGPROB_ATOL, assert_bf16_close, bf16_tolerance  # noqa: E402

CONTEXT = 1024
S_WINDOW = 256
CHUNK = 64  # chunked_prefill_size: a 980-token prompt is prefilled in 16 chunks


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0, tokenizer=False, progress=False)


@pytest.fixture(scope="module")
def ref(ckpt):
    return load_reference(ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def engines(ckpt):
    slot = EngineSlot(ckpt, max_total_tokens=16384, chunked_prefill_size=CHUNK)
    yield slot
    slot.close()


@pytest.fixture
def fp32(engines):
    return engines.get("fp32", dtype="float32")


def test_plugin_turns_off_the_hybrid_swa_pool_only_for_torch_native_or_a_cpu_default(ckpt):
    from sglang.srt.arg_groups.overrides import collect_model_override_declarations
    from sglang.srt.configs.model_config import is_hybrid_swa_model
    from transformers import AutoConfig

    import cognica_sglang

    cognica_sglang.register()
    hf_config = AutoConfig.from_pretrained(ckpt)
    arch = hf_config.architectures[0]
    assert is_hybrid_swa_model([arch], hf_config) and hf_config.hybrid_layer_pattern == [1, 1, 1, 0], (
        "the config should ask SGLang for the sliding-window KV pool on the S layers"
    )

    def declared(**fields):
        args = dict(device=None, attention_backend=None, prefill_attention_backend=None,
                    decode_attention_backend=None, _resolved_overrides=[])
        decls = collect_model_override_declarations(arch, SimpleNamespace(**{**args, **fields}), hf_config)
        return {k: v for _, d in decls for k, v in d.items()}

    off = {"disable_hybrid_swa_memory": True}
    assert declared(device="cpu") == off, "the CPU default (torch_native) must not use the SWA pool"
    assert declared(device="cpu", attention_backend="torch_native") == off
    assert declared(device="cuda", attention_backend="torch_native") == off
    assert declared(device="cuda", decode_attention_backend="torch_native", attention_backend="triton") == off
    assert declared(device="cuda", attention_backend="triton") == {}, "CUDA backends keep the SWA pool"
    for backend in ("fa3", "flashinfer", "trtllm_mha"):
        assert declared(device="cuda", attention_backend=backend) == {}, backend
    assert declared(device="cpu", attention_backend="triton") == {}, (
        "the triton backend translates slots into the SWA sub-pool: kept on a CPU too (Triton's interpreter)"
    )


def test_backends_that_get_the_windows_wrong_are_refused_or_not_chosen(ckpt, monkeypatch):
    import sglang.srt.runtime_context as runtime_context
    from sglang.srt.arg_groups.overrides import collect_model_override_declarations
    from transformers import AutoConfig

    import cognica_sglang

    cognica_sglang.register()
    hf_config = AutoConfig.from_pretrained(ckpt)

    def declared(**fields):
        args = dict(device="cuda", attention_backend=None, prefill_attention_backend=None,
                    decode_attention_backend=None, _resolved_overrides=[])
        decls = collect_model_override_declarations(hf_config.architectures[0], SimpleNamespace(**{**args, **fields}),
                                                    hf_config)
        return {k: v for _, d in decls for k, v in d.items()}

    for backend in ("aiter", "flex_attention", "wave"):
        with pytest.raises(ValueError, match=f"'{backend}' attention backend would give wrong tokens.*use "
                                             "--attention-backend triton"):
            declared(attention_backend=backend)
    with pytest.raises(ValueError, match="'aiter'"):
        declared(attention_backend="triton", decode_attention_backend="aiter")
    with pytest.raises(ValueError, match="smear reads the previous token.*--speculative-algorithm EAGLE"):
        declared(speculative_algorithm="EAGLE")  # refused in the first process, not in the scheduler
    assert declared() == {}, "NVIDIA: SGLang's own default (fa3, flashinfer, trtllm_mha) is kept"
    monkeypatch.setattr(runtime_context, "get_platform", lambda: SimpleNamespace(is_hip=True))
    assert declared() == {"attention_backend": "triton"}, "ROCm: triton instead of SGLang's default aiter"
    assert declared(attention_backend="triton") == {}, "a backend the user named is never replaced"


def test_window_reported_to_sglang_counts_the_query_only_for_the_triton_decode():
    from cognica_sglang.attention import engine_window_size

    assert engine_window_size(S_WINDOW, "triton") == S_WINDOW + 1, (
        "SGLang's triton decode reads min(seq_lens, size) keys with the query counted: it needs W + 1"
    )
    for backend in ("fa3", "flashinfer", "torch_native", "trtllm_mha"):
        assert engine_window_size(S_WINDOW, backend) == S_WINDOW, backend


def test_sliding_window_size_keeps_the_swa_pools_layout():
    """A layer SGLang's hybrid SWA pool holds as sliding (`cognica.hf` sets `hybrid_layer_pattern` from
    `cfg.is_sliding`, before the served context is known) keeps its window even where the served context is shorter
    than the window (the same keys: `cognica.serving.served_window_left` says full there); a full layer says -1."""
    from cognica.config import CognicaConfig
    from cognica.serving import served_window_left
    from cognica_sglang.attention import sliding_window_size

    cfg = CognicaConfig(n_layer=4, n_head=4, n_kv_head=4, n_embd=64, vocab_size=512, sequence_len=256)
    assert any(cfg.is_sliding) and not all(cfg.is_sliding), "the test needs S and L layers"
    for ctx in (2, 100, 128, 129, 130, 256):
        for i in range(cfg.n_layer):
            want = cfg.window_left[i] if cfg.is_sliding[i] else -1
            assert sliding_window_size(cfg, i, ctx) == want, (ctx, i)
            if served_window_left(cfg, i, ctx) is not None:  # where the window drops keys, it is the served one
                assert want == served_window_left(cfg, i, ctx), (ctx, i)


def test_modes_that_fill_kv_slots_without_a_forward_are_refused():
    from cognica_sglang.smear import unsupported_modes

    assert unsupported_modes(SimpleNamespace(disaggregation_mode="null")) == []
    refused = unsupported_modes(SimpleNamespace(enable_hierarchical_cache=True, speculative_algorithm="EAGLE",
                                                disaggregation_mode="prefill"))
    assert len(refused) == 3, f"hierarchical cache, speculative decoding and disaggregation must be refused: {refused}"


@pytest.mark.parametrize(
    "n_prompt, n_new",
    [(7, 24), (240, 40), (980, 40)],
    ids=["short", "decode-crosses-S-window", "long-prompt-crosses-window-and-chunks"],
)
def test_greedy_and_logprobs_match_reference(fp32, ref, n_prompt, n_new):
    prompt = random_prompt(n_prompt, seed=n_prompt)
    assert n_prompt + n_new <= CONTEXT
    (out,) = run(fp32, [prompt], n_new)
    check_parity(ref, prompt, out, n_new, f"{n_prompt}-token prompt", chunk=CHUNK)


def test_chunked_prefill_is_exact_at_chunk_boundaries(fp32, ref):
    prompt = random_prompt(3 * CHUNK + 5, seed=11)  # 3 boundaries, a partial last chunk
    (out,) = run(fp32, [prompt], 4)
    assert len(out["meta_info"]["input_token_logprobs"]) == len(prompt), "all prompt logprobs should come back"
    check_parity(ref, prompt, out, 4, "chunked prefill", chunk=CHUNK)


def test_sixteen_mixed_length_requests_match_reference(fp32, ref):
    lengths = [1, 2, 5, 17, 33, 63, 64, 65, 100, 130, 200, 255, 257, 300, 420, 511]
    prompts = [random_prompt(n, seed=1000 + n) for n in lengths]
    outs = run(fp32, prompts, 12)  # batched prefill chunks spanning several requests, then batched decode
    for n, prompt, out in zip(lengths, prompts, outs):
        check_parity(ref, prompt, out, 12, f"request with a {n}-token prompt among 16")


def test_radix_prefix_hit_then_new_tokens_in_prefill(fp32, ref):
    base = random_prompt(300, seed=21)
    run(fp32, [base], 8)
    longer = base + random_prompt(41, seed=22)[1:]
    (out,) = run(fp32, [longer], 16, start=len(base))  # prompt logprobs before `start` would forbid the hit
    cached = out["meta_info"]["cached_tokens"]
    assert cached >= len(base) - 1, f"expected a radix hit on the {len(base)}-token prefix, cached_tokens={cached}"
    check_parity(ref, longer, out, 16, "after a radix prefix hit")


def test_radix_hit_on_a_finished_request_continues_decode(fp32, ref):
    prompt = random_prompt(250, seed=31)
    (first,) = run(fp32, [prompt], 20)
    resumed = prompt + first["output_ids"]  # prompt and output are both in the radix tree now
    (out,) = run(fp32, [resumed], 30, start=len(resumed) - 1)
    cached = out["meta_info"]["cached_tokens"]
    assert cached >= len(resumed) - 2, f"expected the finished request to be cached, cached_tokens={cached}"
    check_parity(ref, resumed, out, 30, "decode past the S window after a radix hit")


def test_bits_per_byte_matches_reference(fp32, ckpt):
    """`cognica bpb --engine sglang` scores text like the reference, to 1e-3 bits per byte."""
    from cognica.bpb import WINDOW_MARGIN, bits_per_byte, reference_logprobs, split_windows
    from cognica.factory_tokenizer import train_factory_encoding
    from cognica_sglang.bpb import prompt_logprobs

    enc = train_factory_encoding(0)  # the tiny checkpoint here is written without tokenizer files
    ids = [BOS] + enc.encode_ordinary(inspect.getsource(inspect)[:6000])
    windows = split_windows(ids, CONTEXT - WINDOW_MARGIN)
    assert len(windows) >= 2, "the text should span more than one context window"
    targets = [t for w in windows for t in w[1:]]
    token_bytes = torch.tensor([len(enc.decode_single_token_bytes(i)) if i < BOS else 0 for i in range(32768)])
    ref_bpb = bits_per_byte(targets, [x for lp in reference_logprobs(ckpt, windows) for x in lp], token_bytes)
    got = bits_per_byte(targets, [x for lp in prompt_logprobs(str(ckpt), windows, engine=fp32) for x in lp],
                        token_bytes)
    assert abs(got - ref_bpb) < 1e-3, f"SGLang bpb {got:.6f} vs reference {ref_bpb:.6f}"


def test_bf16_within_calibrated_tolerance_and_differs_only_at_near_ties(engines, ckpt, ref):
    """bf16 engine vs the fp32 reference: per-token logprobs within 3x the reference's own fp32-vs-bf16 drift on
    the prompt (floor 0.05), a greedy token off the reference's argmax only at a near tie (tests/utils.py)."""
    engine = engines.get("bf16", dtype="bfloat16")
    ref16 = load_reference(ckpt, dtype=torch.bfloat16)
    n_new = 24
    for n in (9, 300, 700):
        prompt = random_prompt(n, seed=50 + n)
        tol = bf16_tolerance(ref, ref16, prompt, n_new)
        (out,) = run(engine, [prompt], n_new, start=n - 1)
        assert_bf16_close(ref, prompt, out["output_ids"], lps(out["meta_info"]["output_token_logprobs"]), tol,
                          f"bf16 SGLang, {n}-token prompt", n_new=n_new)


# SGLang 0.5.23's CPU TP needs the AMX build of sgl_kernel: here it asserts on NUMA binding and then builds a
# pynccl communicator on the CPU device (ValueError), so TP=2 is checked on 2 GPUs only.
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="TP=2 needs 2 GPUs here (see comment)")
def test_tensor_parallel_2_matches_reference(engines, ref):
    engine = engines.get("tp2", dtype="float32", tp_size=2, device="cuda", attention_backend="triton")
    prompt = random_prompt(300, seed=61)
    (out,) = run(engine, [prompt], 16)
    check_parity(ref, prompt, out, 16, "tp_size=2")


# ---- server ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, engines):
    engines.close()
    from cognica.tokenizer import convert_tokenizer

    model_dir = make_checkpoint(tmp_path_factory.mktemp("served"), preset="tiny", seed=0, tokenizer=True,
                                progress=False)
    convert_tokenizer(model_dir)
    # the opt-in nanochat template, as the README says
    with serve_sglang(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--chat-template",
                      str(TEMPLATE_PATH)) as s:
        yield s


def test_chat_completion_with_the_nanochat_template_matches_reference(server, ref):
    """`--chat-template "$(cognica chat-template)"`: the prompt is the template's ids (BOS once) and the answer is
    the reference's greedy continuation of them, cut at the first special token (the stop token ends a turn)."""
    from transformers import AutoTokenizer

    from cognica.chat import STOP_TOKEN, chat_template
    from cognica.hf import register

    register()
    tok = AutoTokenizer.from_pretrained(server.model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]
    ids = tok.apply_chat_template(messages, chat_template=chat_template(), add_generation_prompt=True,
                                  tokenize=True, return_dict=False)  # fmt: skip
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    body = {"model": "default", "messages": messages, "temperature": 0, "max_tokens": 10, "stop": [STOP_TOKEN]}
    r = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(ids), (r.json()["usage"], len(ids))
    expected = ref.generate([ids], r.json()["usage"]["completion_tokens"])[0]
    special = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(STOP_TOKEN)}
    cut = next((i for i, t in enumerate(expected) if t in special), len(expected))
    assert r.json()["choices"][0]["message"]["content"] == tok.decode(expected[:cut]), (expected, r.json())


def completions(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/v1/completions", json={"model": "default", "temperature": 0, **body}, timeout=120)


def test_server_streams_completions_with_logprobs_matching_reference(server, ref):
    url = server.url
    prompt = random_prompt(200, seed=71)
    body = {"prompt": prompt, "max_tokens": 12, "logprobs": 1, "stream": True}
    r = requests.post(f"{url}/v1/completions", json={"model": "default", "temperature": 0, **body}, stream=True,
                      timeout=120)
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert len(chunks) > 1, "a streamed completion should arrive in several chunks"
    got = [lp for c in chunks for ch in c["choices"] if ch.get("logprobs")
           for lp in ch["logprobs"]["token_logprobs"]]
    expected = ref.generate([prompt], 12)[0]
    want = ref.token_logprobs(prompt + expected)[len(prompt) - 1:]
    assert len(got) == 12, f"expected 12 streamed logprobs, got {len(got)}"
    err = max(abs(a - b) for a, b in zip(got, want))
    assert err < FP32_LOGPROB_ATOL, f"streamed logprobs off the reference by {err:.2e}"


def test_server_refuses_repetition_penalty_outside_its_range(server):
    """SGLang accepts repetition_penalty in (0, 2] only; 50 (what the vLLM server test uses) gets a 400 saying so.
    Whether an accepted penalty is applied is not asserted here: at 2.0 the served greedy tokens equalled plain greedy
    where the reference under SGLang's rule (`apply_scaling_penalties` in
    sglang/srt/sampling/penaltylib/repetition_penalty.py, output tokens only) differs at an immediate repeat (seen
    2026-11-27; open question, see the issue #14 report)."""
    r = server.complete(prompt="one two three", max_tokens=4, temperature=0, repetition_penalty=50.0)
    assert r.status_code == 400 and "repetition_penalty" in error_message(r), f"{r.status_code}: {r.text[:300]}"
    assert server.complete(prompt="still there?", max_tokens=2).status_code == 200


def test_server_prepends_bos_to_text_prompts(server):
    url = server.url
    r = requests.post(f"{url}/generate", json={"text": "Hello world", "sampling_params": greedy(1),
                                                "return_logprob": True, "logprob_start_len": 0}, timeout=120)
    assert r.status_code == 200, r.text
    first = r.json()["meta_info"]["input_token_logprobs"][0][1]
    assert first == BOS, f"the served prompt should start with <|bos|> ({BOS}), starts with {first}"


def test_server_stop_string_truncates_completion(server):
    url = server.url
    full = completions(url, prompt="The quick brown fox", max_tokens=16).json()["choices"][0]["text"]
    assert len(full) > 6, f"need some generated text to pick a stop string from, got {full!r}"
    stop = full[len(full) // 2: len(full) // 2 + 2]
    choice = completions(url, prompt="The quick brown fox", max_tokens=16, stop=[stop]).json()["choices"][0]
    assert choice["text"] == full[: full.index(stop)], f"stop {stop!r} should cut {full!r}, got {choice['text']!r}"
    assert choice["finish_reason"] == "stop", choice


def test_server_rejects_overlong_prompt_with_400_and_keeps_serving(server):
    url = server.url
    r = completions(url, prompt=random_prompt(CONTEXT + 50, seed=81), max_tokens=4)
    assert r.status_code == 400, f"an over-long prompt should be a client error, got {r.status_code}: {r.text}"
    assert "length" in r.text.lower() or "context" in r.text.lower(), f"the error should say why: {r.text}"
    ok = completions(url, prompt=random_prompt(20, seed=82), max_tokens=4)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None, "server stopped serving"


class TestOpenAIServer(OpenAIServerTests):
    """Streaming, bad requests, a disconnecting client, a short soak and the KV-allocation log line, as on vLLM."""

    engine = "sglang"


def test_triton_attention_is_chosen_on_cuda_extend_only_when_opted_in(monkeypatch):
    """The dispatch the model runs: RadixAttention by default; Triton SSSL attention for CUDA extend batches where
    COGNICA_KERNELS opts in."""
    from cognica_sglang.attention import use_triton_attention

    extend = SimpleNamespace(forward_mode=SimpleNamespace(is_extend=lambda: True))
    decode = SimpleNamespace(forward_mode=SimpleNamespace(is_extend=lambda: False))
    monkeypatch.delenv("COGNICA_KERNELS", raising=False)
    assert not use_triton_attention(True, extend), "the CUDA default must be SGLang's attention backend"
    monkeypatch.setenv("COGNICA_KERNELS", "triton")
    assert use_triton_attention(True, extend), "CUDA prefill/extend should take the Triton kernel"
    assert not use_triton_attention(True, decode), "decode stays on the (CUDA-graph captured) backend"
    assert not use_triton_attention(False, extend), "CPU runs RadixAttention"
    monkeypatch.setenv("COGNICA_KERNELS", "engine")
    assert not use_triton_attention(True, extend), "COGNICA_KERNELS=engine opts out"


def test_batched_torch_decode_attention_is_chosen_on_cpu_decode_only(monkeypatch):
    """CPU decode batches take cognica_kernels.token_pool_decode_attention instead of torch_native's loop over
    the requests; extend batches, CUDA and COGNICA_KERNELS=engine keep RadixAttention."""
    from cognica_sglang.attention import use_cpu_decode_attention

    def batch(decode: bool):
        return SimpleNamespace(forward_mode=SimpleNamespace(is_decode=lambda: decode, is_extend=lambda: not decode))

    monkeypatch.delenv("COGNICA_KERNELS", raising=False)
    assert use_cpu_decode_attention(False, batch(True))
    assert not use_cpu_decode_attention(False, batch(False)), "CPU extend stays on RadixAttention"
    assert not use_cpu_decode_attention(True, batch(True)), "CUDA decode stays on the CUDA-graph captured backend"
    monkeypatch.setenv("COGNICA_KERNELS", "engine")
    assert not use_cpu_decode_attention(False, batch(True)), "COGNICA_KERNELS=engine opts out"
    monkeypatch.setenv("COGNICA_KERNELS", "fast")
    with pytest.raises(ValueError, match="COGNICA_KERNELS"):
        use_cpu_decode_attention(False, batch(True))


def test_engine_start_on_bad_checkpoints_fails_fast_naming_the_problem(tmp_path_factory):
    """Every broken checkpoint of the corpus stops the engine in its first process with `cognica inspect`'s message."""
    check_engine_refuses_bad_checkpoints("sglang", tmp_path_factory.mktemp("bad_corpus_sglang"))


def test_launch_server_refuses_a_bad_checkpoint_with_the_one_line_message(tmp_path_factory):
    def cmd(ckpt: Path) -> list[str]:
        return [sys.executable, "-m", "sglang.launch_server", "--model-path", str(ckpt), "--device", "cpu",
                "--attention-backend", "torch_native", "--host", "127.0.0.1", "--port", str(free_port()),
                "--disable-cuda-graph", "--skip-server-warmup", "--max-total-tokens", "4096"]

    check_server_refuses_bad_checkpoint("sglang", cmd, tmp_path_factory.mktemp("bad_serve_sglang"))
