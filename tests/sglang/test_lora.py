"""LoRA on SGLang against the reference with merged weights (run in .venv/sglang).

Adapters are written in the PEFT file format on nanochat's module paths, as tests/vllm/test_lora.py writes them
(`base_model.model.transformer.h.{i}.attn.c_q.lora_A.weight`, `lora_embedding_A` / `_B` for `transformer.wte`); the
oracle is the fp32 reference whose weights are W + (alpha / r) * B @ A. One float32 engine with the torch_native
LoRA backend, chunked prefill in 64-token steps; 320-token prompts cross the 256-key S windows, and every layer
with a value embedding and the smear run under the adapters.

SGLang 0.5.23's LoRA layers pin host memory, which raises on a machine without a CUDA driver (the plugin refuses
LoRA there: `cognica_sglang.lora.check_lora_server_args`). So that this CPU machine can test the plugin's names and
the LoRA math, the engine runs with `pin_memory` a no-op (`NO_PIN`, also in the scheduler process through a
sitecustomize on PYTHONPATH); pinning only places host memory, it changes no value.

    SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$(.venv/sglang/bin/cognica sglang-cpu-path)" \
        .venv/sglang/bin/python -m pytest tests/sglang/test_lora.py
"""

from __future__ import annotations

import os
import sys

import pytest
import sglang  # noqa: E402, F401  (a missing engine is a failure, not a skip)
import torch

from cognica.factory import make_checkpoint  # noqa: E402
from cognica.model import CognicaGPT, load_reference  # noqa: E402
from tests.adapters import write_adapter, write_adapter_set  # noqa: E402
from tests.sglang_utils import EngineSlot, check_parity, greedy, lps, random_prompt  # noqa: E402

CHUNK = 64
NEW = 16
RANK = 8
NO_PIN = '''
import functools
import torch
if not torch.cuda.is_available():
    def _no_pin(f):
        @functools.wraps(f)
        def g(*args, **kwargs):
            kwargs.pop("pin_memory", None)
            return f(*args, **kwargs)
        return g
    for _name in ("tensor", "zeros", "empty", "arange", "ones", "full"):
        setattr(torch, _name, _no_pin(getattr(torch, _name)))
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
'''


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("lora"), preset="tiny", seed=0, tokenizer=False, progress=False)


@pytest.fixture(scope="module")
def ref32(ckpt) -> CognicaGPT:
    return load_reference(ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, ref32) -> dict[str, tuple[str, CognicaGPT]]:
    """name -> (path, merged reference): zero-B on every projection; every projection of every layer; another rank
    on a few projections (layer 1: c_k alone, the other parts of its qkv zero); the input embedding and the head."""
    return write_adapter_set(tmp_path_factory.mktemp("adapters"), ref32, RANK)


@pytest.fixture(scope="module")
def no_pin(tmp_path_factory):
    """pin_memory a no-op in this process and (sitecustomize on PYTHONPATH) in the engine's processes."""
    site = tmp_path_factory.mktemp("no_pin")
    (site / "sitecustomize.py").write_text(NO_PIN)
    saved = {n: getattr(torch, n) for n in ("tensor", "zeros", "empty", "arange", "ones", "full")}
    saved_pin, saved_path = torch.Tensor.pin_memory, os.environ.get("PYTHONPATH")
    exec(compile(NO_PIN, "no_pin", "exec"), {})
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [saved_path])])
    sys.path.insert(0, str(site))
    yield
    sys.path.remove(str(site))
    for n, f in saved.items():
        setattr(torch, n, f)
    torch.Tensor.pin_memory = saved_pin
    if saved_path is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = saved_path


@pytest.fixture(scope="module")
def engine(ckpt, adapters, no_pin):
    paths = [f"{name}={path}" for name, (path, _) in adapters.items()]
    slot = EngineSlot(ckpt, max_total_tokens=8192, chunked_prefill_size=CHUNK, dtype="float32", enable_lora=True,
                      lora_backend="torch_native", lora_paths=paths, max_loras_per_batch=4, max_lora_rank=RANK)
    yield slot.get("lora")
    slot.close()


def run(engine, prompts: list[list[int]], loras: list[str | None], n: int = NEW, start: int | None = None):
    """One generate call (one batch) of greedy requests, each with its own adapter (None: the base model)."""
    kw = {} if start is None else {"logprob_start_len": start}
    return engine.generate(input_ids=prompts, sampling_params=greedy(n), return_logprob=True, lora_path=loras, **kw)


def test_zero_b_adapter_gives_the_base_models_tokens_and_logprobs(engine, ref32):
    prompts = [random_prompt(320, seed=21), random_prompt(9, seed=22)]
    base = run(engine, prompts, [None, None])
    zero = run(engine, prompts, ["zero", "zero"])
    for prompt, b, z in zip(prompts, base, zero):
        check_parity(ref32, prompt, b, NEW, f"base model, {len(prompt)}-token prompt")
        assert z["output_ids"] == b["output_ids"], f"B = 0 adapter changed the greedy tokens ({len(prompt)} tokens)"
        got, want = lps(z["meta_info"]["output_token_logprobs"]), lps(b["meta_info"]["output_token_logprobs"])
        worst = max(abs(x - y) for x, y in zip(got, want))
        assert worst == 0.0, f"B = 0 adapter moved a logprob by {worst:.2e} ({len(prompt)}-token prompt)"


@pytest.mark.parametrize("name", ["all", "vocab"])
def test_adapter_matches_the_merged_reference(engine, adapters, name):
    _, ref = adapters[name]
    prompt = random_prompt(320, seed=23)
    [out] = run(engine, [prompt], [name], start=0)
    check_parity(ref, prompt, out, NEW, f"adapter {name!r} (prompt logprobs included)", chunk=CHUNK)


def test_two_adapters_and_the_base_in_one_batch_each_match_their_reference(engine, ref32, adapters):
    cases = [("all", adapters["all"][1]), ("some", adapters["some"][1]), (None, ref32), ("some", adapters["some"][1])]
    prompts = [random_prompt(n, seed=24 + i) for i, n in enumerate([320, 200, 300, 5])]
    outs = run(engine, prompts, [c[0] for c in cases], n=24)
    for prompt, (name, ref), out in zip(prompts, cases, outs):
        check_parity(ref, prompt, out, 24, f"{name or 'base'} in a mixed batch, {len(prompt)}-token prompt")


def test_adapter_on_a_value_embedding_is_refused_and_the_engine_still_serves(engine, ref32, adapters, tmp_path):
    write_adapter(tmp_path / "ve", ref32, ["value_embeds.1"], RANK, 16.0, seed=9)
    result = engine.load_lora_adapter("ve", str(tmp_path / "ve"))
    assert not result.success and "targets value_embeds.1, which this model cannot adapt" in result.error_message, \
        f"a value-embedding adapter should be refused with our line, got {result}"
    prompt = random_prompt(40, seed=25)
    [out] = run(engine, [prompt], ["some"])
    check_parity(adapters["some"][1], prompt, out, NEW, "an adapter after the refused one")


def test_lora_is_refused_in_the_first_process_where_sglang_cannot_pin_memory(ckpt):
    """Without the no-op pinning, on this CPU machine: one line with the engine's reason, from the model override
    SGLang runs in the first process (the same refusal stopped `sglang.Engine(..., enable_lora=True)` there before
    any scheduler, measured once: rc 1 in 72 s)."""
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("a CUDA driver is present: SGLang pins host memory")
    code = ("import types, cognica_sglang.config_checks\nfrom cognica.hf import register\n"
            "from transformers import AutoConfig\n"
            f"register()\nconfig = AutoConfig.from_pretrained({str(ckpt)!r})\n"
            "args = types.SimpleNamespace(device='cpu', enable_lora=True, lora_paths=None, lora_backend='torch_native',"
            " is_embedding=False, attention_backend='torch_native', prefill_attention_backend=None,"
            " decode_attention_backend=None)\ncognica_sglang.config_checks.check_server_args(args, config)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if "no_pin" not in p)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert r.returncode != 0 and last.startswith("ValueError: cognica: SGLang cannot serve LoRA adapters on this "
                                                 "machine") and "pinning fails here" in last, \
        f"expected the one-line refusal, got rc={r.returncode}: {r.stderr[-1500:]}"


def test_a_triton_lora_backend_on_cpu_is_refused(no_pin):
    from types import SimpleNamespace

    from cognica_sglang.lora import check_lora_server_args

    with pytest.raises(ValueError, match="on CPU pass --lora-backend torch_native"):
        check_lora_server_args(SimpleNamespace(device="cpu", lora_backend="csgmv"))
