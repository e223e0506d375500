"""LoRA on SGLang against the reference with merged weights (run in .venv/sglang).

Adapters are written in the PEFT file format on nanochat's module paths, as tests/test_vllm_lora.py writes them
(`base_model.model.transformer.h.{i}.attn.c_q.lora_A.weight`, `lora_embedding_A` / `_B` for `transformer.wte`); the
oracle is the fp32 reference whose weights are W + (alpha / r) * B @ A. One float32 engine with the torch_native
LoRA backend, chunked prefill in 64-token steps; 320-token prompts cross the 256-key S windows, and every layer
with a value embedding and the smear run under the adapters.

SGLang 0.5.23's LoRA layers pin host memory, which raises on a machine without a CUDA driver (the plugin refuses
LoRA there: `cognica_sglang.lora.check_lora_server_args`). So that this CPU machine can test the plugin's names and
the LoRA math, the engine runs with `pin_memory` a no-op (`NO_PIN`, also in the scheduler process through a
sitecustomize on PYTHONPATH); pinning only places host memory, it changes no value.

    SGLANG_USE_CPU_ENGINE=1 PYTHONPATH=tests/sgl_stub .venv/sglang/bin/python -m pytest tests/test_sglang_lora.py
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.sglang

import sglang  # noqa: E402, F401  (a missing engine is a failure, not a skip)

from cognica.factory import make_checkpoint  # noqa: E402
from cognica.model import CognicaGPT, load_reference  # noqa: E402
from tests.sglang_utils import EngineSlot, check_parity, greedy, lps, random_prompt  # noqa: E402

CHUNK = 64
NEW = 16
RANK = 8
PROJECTIONS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
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


def write_adapter(out: Path, ref: CognicaGPT, targets: list[str], r: int, alpha: float, seed: int,
                  zero_b: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT LoRA adapter on the reference's modules `targets` (as tests/test_vllm_lora.write_adapter)."""
    g = torch.Generator().manual_seed(seed)
    tensors, pairs = {}, {}
    for path in targets:
        module = ref.get_submodule(path)
        if isinstance(module, torch.nn.Embedding):
            n_in, n_out = module.num_embeddings, module.embedding_dim
            suffixes = ("lora_embedding_A", "lora_embedding_B")
        else:
            n_in, n_out, suffixes = module.in_features, module.out_features, ("lora_A.weight", "lora_B.weight")
        a = (torch.rand(r, n_in, generator=g) * 2 - 1) / n_in**0.5
        b = torch.zeros(n_out, r) if zero_b else (torch.rand(n_out, r, generator=g) * 2 - 1) * 0.3
        pairs[path] = (a, b)
        tensors[f"base_model.model.{path}.{suffixes[0]}"] = a.contiguous()
        tensors[f"base_model.model.{path}.{suffixes[1]}"] = b.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "base_model_name_or_path": None,
              "target_modules": sorted({p.rsplit(".", 1)[-1] for p in targets})}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return pairs


@torch.no_grad()
def merged(ref: CognicaGPT, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, alpha: float) -> CognicaGPT:
    """The reference with each adapted weight replaced by PEFT's merge, W + (alpha / r) * B @ A."""
    out = copy.deepcopy(ref)
    for path, (a, b) in pairs.items():
        module = out.get_submodule(path)
        delta = (alpha / r) * (b @ a)
        module.weight += delta.T if isinstance(module, torch.nn.Embedding) else delta
    return out


def all_projections(n_layer: int) -> list[str]:
    return [f"transformer.h.{i}.{p}" for i in range(n_layer) for p in PROJECTIONS]


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
    root = tmp_path_factory.mktemp("adapters")
    n = ref32.config.n_layer
    specs = {
        "zero": (all_projections(n), RANK, 16.0, True),
        "all": (all_projections(n), RANK, 16.0, False),
        "some": ([f"transformer.h.{i}.{p}" for i in (0, 3) for p in ("attn.c_q", "attn.c_v", "mlp.c_fc")]
                 + ["transformer.h.1.attn.c_k", "transformer.h.2.attn.c_proj", "transformer.h.1.mlp.c_proj"],
                 4, 12.0, False),
        "vocab": (["transformer.wte", "lm_head"], RANK, 8.0, False),
    }
    out = {}
    for i, (name, (targets, r, alpha, zero_b)) in enumerate(specs.items(), start=1):
        pairs = write_adapter(root / name, ref32, targets, r, alpha, seed=i, zero_b=zero_b)
        out[name] = (str(root / name), merged(ref32, pairs, r, alpha))
    return out


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
    code = ("import types, cognica_sglang\nfrom cognica.hf import register\nfrom transformers import AutoConfig\n"
            f"register()\nconfig = AutoConfig.from_pretrained({str(ckpt)!r})\n"
            "args = types.SimpleNamespace(device='cpu', enable_lora=True, lora_paths=None, lora_backend='torch_native',"
            " is_embedding=False)\ncognica_sglang._check_stage_options(args, config)\n")
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
