"""LoRA on vLLM against the reference with merged weights (run in .venv/vllm).

Adapters are written here in the PEFT file format (adapter_config.json + adapter_model.safetensors, tensors named
`base_model.model.<nanochat module path>.lora_A.weight` / `lora_B.weight`, `lora_embedding_A` / `lora_embedding_B`
for an embedding), as peft would save them for nanochat's GPT; peft itself is not in .venv/vllm. The oracle is the
fp32 reference whose weights are W + (alpha / r) * B @ A (PEFT's merge). One compiled float32 engine, chunked
prefill in 64-token steps; prompts of 700 tokens cross the 256-key S windows, and every layer with a value
embedding (1, 3) and the smear run under the adapters.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from cognica.model import CognicaGPT, load_reference
from tests.adapters import write_adapter, write_adapter_set
from tests.utils import assert_fp32_parity, assert_prompt_logprobs_parity, random_prompts

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm import LLM  # noqa: E402  (after the env defaults above)
from vllm.lora.request import LoRARequest  # noqa: E402

from tests.vllm_utils import greedy, prompt_logprobs, tiny_llm  # noqa: E402

CHUNK = 64
NEW = 16
RANK = 8


@pytest.fixture(scope="module")
def ref32(tiny_ckpt: Path) -> CognicaGPT:
    return load_reference(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, ref32: CognicaGPT) -> dict[str, tuple[LoRARequest, CognicaGPT]]:
    """name -> (request, merged reference): zero-B on every projection; every projection of every layer; a second
    adapter of another rank on a few projections; the input embedding and the head."""
    written = write_adapter_set(tmp_path_factory.mktemp("adapters"), ref32, RANK)
    return {name: (LoRARequest(name, i, path), ref) for i, (name, (path, ref)) in enumerate(written.items(), start=1)}


@pytest.fixture(scope="module")
def llm(tiny_ckpt: Path):
    # max_loras one above the adapters a batch uses, and `run` unloads every adapter first, so the last slot is never
    # written: vLLM's CPU punica ops (lora.ops.torch_ops bgmv_shrink / bgmv_expand, via PunicaWrapperCPU) index the
    # stacked slots with each token's slot, and a base-model token's -1 selects the LAST slot, whose weights
    # LoRAModelManager._deactivate_adapter never clears; compute_meta's no_lora skips only an all-base batch. So a
    # base request batched with adapter requests runs under the last slot's (current or evicted) adapter: seen here
    # with max_loras=2, the base's logprobs equal those of the adapter in slot 1 (2.9e-6) and diverge from the base
    # at its first decode step. The CUDA kernels skip -1.
    llm = tiny_llm(tiny_ckpt, max_num_batched_tokens=CHUNK, max_num_seqs=8, enable_lora=True, max_loras=3,
                   max_cpu_loras=4, max_lora_rank=RANK, skip_tokenizer_init=False)
    yield llm
    del llm
    gc.collect()


def run(llm: LLM, prompts: list[list[int]], loras: list[LoRARequest | None], n: int = NEW,
        with_prompt_logprobs: bool = False):
    """One generate call (one batch) of greedy requests, each with its own adapter (None: the base model), after
    unloading every adapter (see the `llm` fixture)."""
    for lora_id in llm.llm_engine.list_loras():
        llm.llm_engine.remove_lora(lora_id)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(n, with_prompt_logprobs),
                        lora_request=loras, use_tqdm=False)
    got = []
    for o in outs:
        c = o.outputs[0]
        got.append((list(c.token_ids), [d[t].logprob for t, d in zip(c.token_ids, c.logprobs, strict=True)], o))
    return got


def test_zero_b_adapter_gives_the_base_models_tokens_and_logprobs(llm, ref32, adapters):
    request, _ = adapters["zero"]
    prompts = random_prompts([700, 9], seed=21)
    base = run(llm, prompts, [None, None])
    zero = run(llm, prompts, [request, request])
    for prompt, (tokens, logprobs, _), (z_tokens, z_logprobs, _) in zip(prompts, base, zero):
        assert_fp32_parity(ref32, prompt, tokens, logprobs, f"base model, {len(prompt)}-token prompt", n_new=NEW)
        assert z_tokens == tokens, f"B = 0 adapter changed the greedy tokens of a {len(prompt)}-token prompt"
        worst = max(abs(a - b) for a, b in zip(z_logprobs, logprobs))
        assert worst == 0.0, f"B = 0 adapter moved a logprob by {worst:.2e} ({len(prompt)}-token prompt)"


@pytest.mark.parametrize("adapter,seed,what", [("all", 22, "adapter on all projections"),
                                               ("vocab", 23, "adapter on wte and lm_head")],
                         ids=["every_projection", "wte_and_lm_head"])
def test_adapter_matches_the_merged_reference(llm, adapters, adapter, seed, what):
    request, ref = adapters[adapter]
    [prompt] = random_prompts([700], seed=seed)
    tokens, logprobs, out = run(llm, [prompt], [request], with_prompt_logprobs=True)[0]
    assert_fp32_parity(ref, prompt, tokens, logprobs, what, n_new=NEW)
    assert_prompt_logprobs_parity(ref, prompt, prompt_logprobs(out, prompt), what, chunk=CHUNK)


def test_two_adapters_and_the_base_in_one_batch_each_match_their_reference(llm, ref32, adapters):
    (all_req, all_ref), (some_req, some_ref) = adapters["all"], adapters["some"]
    prompts = random_prompts([700, 300, 650, 5], seed=24)
    cases = [(all_req, all_ref, "all"), (some_req, some_ref, "some"), (None, ref32, "base"),
             (some_req, some_ref, "some")]
    got = run(llm, prompts, [c[0] for c in cases], n=40)  # decode runs past the window for the 300-token prompt
    for prompt, (_, ref, name), (tokens, logprobs, _) in zip(prompts, cases, got):
        assert_fp32_parity(ref, prompt, tokens, logprobs, f"{name} in a mixed batch, {len(prompt)}-token prompt",
                           n_new=40)


def test_adapter_on_a_value_embedding_is_refused_and_the_engine_still_serves(llm, ref32, adapters, tmp_path):
    write_adapter(tmp_path / "ve", ref32, ["value_embeds.1"], RANK, 16.0, seed=9)
    with pytest.raises(ValueError, match=r"targets value_embeds\.1, which this model cannot adapt"):
        llm.llm_engine.add_lora(LoRARequest("ve", 99, str(tmp_path / "ve")))
    request, ref = adapters["some"]
    [prompt] = random_prompts([40], seed=25)
    tokens, logprobs, _ = run(llm, [prompt], [request])[0]
    assert_fp32_parity(ref, prompt, tokens, logprobs, "an adapter after the refused one", n_new=NEW)


@pytest.fixture(scope="module")
def lora_server(tiny_ckpt: Path, adapters, tmp_path_factory: pytest.TempPathFactory):
    """`vllm serve DIR --enable-lora --lora-modules all=ADAPTER`, as a user starts it (eager: the compiled path is
    the in-process engine's above), with runtime adapter loading on."""
    import sys

    from tests.server_utils import free_port, serve

    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_ckpt), "--host",
           "127.0.0.1", "--port", str(port), "--max-model-len", "1024", "--gpu-memory-utilization", "0.3",
           "--max-num-seqs", "8", "--block-size", "32", "--dtype", "float32", "--enforce-eager", "--enable-lora",
           "--max-loras", "2", "--max-lora-rank", str(RANK), "--lora-modules", f"all={adapters['all'][0].lora_path}"]
    log = tmp_path_factory.mktemp("vllm_lora_server") / "server.log"
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    with serve(cmd, "all", port, log, env, model_dir=tiny_ckpt) as s:
        yield s


def test_server_serves_a_lora_module_and_refuses_a_value_embedding_adapter(lora_server, adapters, ref32, tmp_path):
    import requests

    from tests.server_utils import error_message

    [prompt] = random_prompts([300], seed=26)

    def completion(model: str) -> tuple[list[int], list[float]]:
        r = lora_server.complete(model=model, prompt=prompt, max_tokens=NEW, temperature=0, logprobs=0,
                                 return_tokens_as_token_ids=True)
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        return [int(t.split(":")[1]) for t in lp["tokens"]], lp["token_logprobs"]

    tokens, logprobs = completion("all")
    assert_fp32_parity(adapters["all"][1], prompt, tokens, logprobs, "server, --lora-modules all=...", n_new=NEW)
    write_adapter(tmp_path / "ve", ref32, ["value_embeds.3"], RANK, 16.0, seed=9)
    r = requests.post(f"{lora_server.url}/v1/load_lora_adapter", json={"lora_name": "ve",
                                                                       "lora_path": str(tmp_path / "ve")}, timeout=60)
    # vLLM answers 500: OpenAIServingModels.load_lora_adapter maps every add_lora failure but a missing adapter to
    # InternalServerError (so for the in-tree Llama too); the engine keeps serving
    assert r.status_code == 500 and "value_embeds.3, which this model cannot adapt" in error_message(r), \
        f"a value-embedding adapter should be refused with our line, got {r.status_code}: {r.text[:300]}"
    tokens, logprobs = completion(str(lora_server.model_dir))  # the base model, under its path
    assert_fp32_parity(ref32, prompt, tokens, logprobs, "server base model after the refused adapter", n_new=NEW)
