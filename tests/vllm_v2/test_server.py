"""One OpenAI-API round trip through `vllm serve` (vLLM 0.34's own command, as on a GPU) on the V2 runner
(.venv/vllm-v2, Triton interpreted; the server inherits the step's environment and loads tests/vllm_v2_shim): a
300-token prompt past the 256-key S window, greedy, with log-probs, equal to the reference (float32)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cognica.model import load_reference
from tests.server_utils import free_port, serve
from tests.utils import assert_fp32_parity, random_prompts

NEW = 8


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "vllm"), "serve", str(tiny_ckpt), "--host", "127.0.0.1", "--port",
           str(port), "--max-model-len", "1024", "--gpu-memory-utilization", "0.3", "--max-num-seqs", "4",
           "--block-size", "32", "--dtype", "float32", "--enforce-eager"]
    log = tmp_path_factory.mktemp("vllm_v2_server") / "server.log"
    with serve(cmd, str(tiny_ckpt), port, log, {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
               startup_s=300, model_dir=tiny_ckpt) as s:
        yield s


def test_completion_with_logprobs_equals_reference(server, tiny_ckpt: Path):
    [prompt] = random_prompts([300], seed=41)
    r = server.complete(prompt=prompt, max_tokens=NEW, temperature=0, logprobs=0, return_tokens_as_token_ids=True,
                        timeout=300)
    assert r.status_code == 200, f"completion failed: {r.status_code} {r.text[:500]}"
    lp = r.json()["choices"][0]["logprobs"]
    tokens = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    ref = load_reference(tiny_ckpt, dtype=torch.float32)
    assert_fp32_parity(ref, prompt, tokens, lp["token_logprobs"], "vllm serve on V2, 300-token prompt", n_new=NEW)
