"""SGLang's CUDA-side mechanisms, reproduced on this CPU (run in .venv/sglang): the hybrid SWA KV pool (SGLang's own
`SWAKVPool`, whose constructor needs no GPU), prefill CUDA-graph scopes and a context longer than the training
context. On CPU the plugin turns the SWA pool off (tests/sglang/test_parity.py), so the engine tests never build it.

    SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$(.venv/sglang/bin/cognica sglang-cpu-path)" \
        .venv/sglang/bin/python -m pytest tests/sglang/test_cuda_paths.py
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool  # noqa: E402
from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context  # noqa: E402

from cognica_sglang.attention import _slot_rows, use_triton_attention  # noqa: E402
from cognica_sglang.smear import SlotTokens  # noqa: E402

FULL, SWA = 64, 48  # SSSL: the SWA sub-pool is smaller than the full pool (SGLang sizes it ~0.8x here)
SLIDING_LAYERS, FULL_LAYERS = [0, 1, 2], [3]


@pytest.fixture
def hybrid_pool():
    """SGLang's hybrid pool for an SSSL model, as its pool configurator builds it (page size 1), and the
    full -> SWA slot mapping its allocator registers; published the way the model runner publishes its pools."""
    pool = SWAKVPool(size=FULL, size_swa=SWA, page_size=1, dtype=torch.float32, head_num=2, head_dim=8,
                     swa_attention_layer_ids=SLIDING_LAYERS, full_attention_layer_ids=FULL_LAYERS, device="cpu",
                     enable_memory_saver=False)
    mapping = torch.full((FULL + 2,), -1, dtype=torch.int64)  # full slot -> SWA slot, -1 sentinel last
    mapping[1:SWA + 1] = torch.arange(1, SWA + 1)
    pool.register_mapping(mapping)
    req_to_token = ReqToTokenPool(size=4, max_context_len=128, device="cpu", enable_memory_saver=False)
    backend = SimpleNamespace(token_to_kv_pool=pool, req_to_token_pool=req_to_token)
    with forward_context(ForwardContext(attn_backend=backend)):
        yield pool, req_to_token


def decode_batch(req_pool_indices: list[int], out_cache_loc: list[int]) -> SimpleNamespace:
    """The ForwardBatch fields the smear and the attention glue read, for a DECODE step."""
    return SimpleNamespace(forward_mode=ForwardMode.DECODE, req_pool_indices=torch.tensor(req_pool_indices),
                           out_cache_loc=torch.tensor(out_cache_loc), out_cache_loc_virtual=None,
                           extend_seq_lens=None)


def test_smear_buffer_covers_every_full_pool_slot(hybrid_pool):
    """`out_cache_loc` holds full-pool slots: once the radix cache fills, the highest one comes up. The smear
    buffer must be sized from the full pool, not from layer 0's buffer (a sliding layer: the SWA sub-pool)."""
    pool, req_to_token = hybrid_pool
    highest = pool.full_kv_pool.get_key_buffer(0).shape[0] - 1
    assert highest > pool.swa_kv_pool.get_key_buffer(0).shape[0], "the pools must differ in size for this test"
    req_to_token.req_to_token[1, :2] = torch.tensor([highest - 1, highest], dtype=torch.int32)
    tokens = SlotTokens()
    tokens.previous(torch.tensor([17]), torch.tensor([0]), decode_batch([1], [highest - 1]))
    prev, has_prev = tokens.previous(torch.tensor([23]), torch.tensor([1]), decode_batch([1], [highest]))
    assert prev.tolist() == [17] and has_prev.flatten().tolist() == [True], "lost the token at the top full slot"
    assert tokens.ids[highest].item() == 23, "the token at the highest full-pool slot was not recorded"


def test_a_full_pool_layer_with_a_window_is_not_translated_to_swa_slots(hybrid_pool):
    """Past the training context an L layer gets a window (`window_left` in cognica_sglang/model.py) but the pool
    keeps it in the full sub-pool (its layer mapping comes from the config's layer pattern): its slots must stay
    full-pool slots. Sliding layers are translated."""
    pool, req_to_token = hybrid_pool
    req_to_token.req_to_token[0, :3] = torch.tensor([50, 51, 52], dtype=torch.int32)  # beyond the SWA pool
    batch = decode_batch([0], [52])
    l_layer = SimpleNamespace(layer_id=FULL_LAYERS[0], sliding_window_size=1023)
    rows, indices = _slot_rows(l_layer, batch)
    assert rows[indices[0], :3].tolist() == [50, 51, 52], "an L layer's full-pool slots were translated to SWA slots"
    s_layer = SimpleNamespace(layer_id=SLIDING_LAYERS[0], sliding_window_size=255)
    rows, indices = _slot_rows(s_layer, batch)
    assert rows[indices[0], :3].tolist() == pool.translate_loc_from_full_to_swa(torch.tensor([50, 51, 52])).tolist()


def test_triton_extend_path_never_runs_inside_a_prefill_cuda_graph(monkeypatch):
    """SGLang enables prefill CUDA graphs for a model with a `layers` attribute; inside one (breakable or full) the
    layer must take RadixAttention, whose `_eager_attention` is the graph break, not the Triton extend path."""
    from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph.context import (
        enable_breakable_cuda_graph,
    )
    from sglang.srt.model_executor.runner_utils.prefill_graph import prefill_graph_scope

    monkeypatch.setenv("COGNICA_KERNELS", "triton")
    extend = SimpleNamespace(forward_mode=ForwardMode.EXTEND)
    assert use_triton_attention(True, extend), "an eager CUDA extend batch takes the Triton kernel"
    for full_graph in (False, True):
        with prefill_graph_scope(full_graph=full_graph):
            assert not use_triton_attention(True, extend), f"Triton extend inside a prefill graph (full={full_graph})"
    with enable_breakable_cuda_graph():
        assert not use_triton_attention(True, extend), "Triton extend inside a breakable CUDA graph"


def test_context_longer_than_training_is_refused(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch):
    """With SGLang's own check lifted (SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1, `ModelConfig._derive_context_length`
    in sglang/srt/configs/model_config.py), a context above the tiny checkpoint's 1024-token training context passes
    SGLang's config and is refused by the model."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.server_args import ServerArgs

    import cognica_sglang.model as model

    monkeypatch.setenv("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "1")
    config = ModelConfig(str(tiny_ckpt), context_length=2048)
    assert config.context_len == 2048, "SGLang's own check did not let the longer context through"
    args = ServerArgs(model_path=str(tiny_ckpt), context_length=2048, device="cpu")
    monkeypatch.setattr(model, "get_server_args", lambda: args)  # what the scheduler process publishes
    with pytest.raises(ValueError, match="--context-length 2048 is longer than the 1024-token context"):
        model.CognicaPoEForCausalLM(config.hf_config)


def test_quantized_kv_cache_falls_back_to_radix_attention_without_writing(monkeypatch: pytest.MonkeyPatch):
    """`--kv-cache-dtype fp8` on CUDA with our extend kernel chosen: the pool holds fp8 K/V, which the kernel does
    not read. The layer must fall back to RadixAttention (None here) before storing anything (RadixAttention
    stores this step's K/V itself), for the extend and the CPU decode path alike."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from cognica_sglang.attention import cpu_decode_attention, triton_extend_attention

    monkeypatch.setenv("COGNICA_KERNELS", "triton")
    pool = MHATokenToKVPool(size=32, page_size=1, dtype=torch.float8_e4m3fn, head_num=2, head_dim=8, layer_num=1,
                            device="cpu", enable_memory_saver=False)
    writes = []
    monkeypatch.setattr(pool, "set_kv_buffer", lambda *args, **kwargs: writes.append(args))
    req_to_token = ReqToTokenPool(size=2, max_context_len=64, device="cpu", enable_memory_saver=False)
    backend = SimpleNamespace(token_to_kv_pool=pool, req_to_token_pool=req_to_token)
    attn = SimpleNamespace(layer_id=0, head_dim=8, tp_q_head_num=2, tp_k_head_num=2, tp_v_head_num=2,
                           sliding_window_size=-1, scaling=8**-0.5, k_scale=None)
    q, k, v = (torch.randn(3, 16, dtype=torch.bfloat16) for _ in range(3))
    batch = SimpleNamespace(forward_mode=ForwardMode.EXTEND, req_pool_indices=torch.tensor([0]),
                            out_cache_loc=torch.tensor([1, 2, 3]), seq_lens=torch.tensor([3]),
                            extend_seq_lens=torch.tensor([3]), extend_seq_lens_cpu=[3])
    assert pool.get_key_buffer(0).dtype != torch.bfloat16, "the pool must store K/V in another dtype for this test"
    with forward_context(ForwardContext(attn_backend=backend)):
        assert triton_extend_attention(q, k, v, attn, batch) is None, "fp8 KV: the extend kernel must not run"
        assert cpu_decode_attention(q[:1], k[:1], v[:1], attn, batch) is None, "fp8 KV: the decode path must not run"
    assert writes == [], "K/V were stored before falling back: RadixAttention would store them a second time"


def test_prefill_cuda_graphs_are_not_captured_for_this_model():
    """SGLang captures prefill CUDA graphs (breakable ones by default on CUDA) only for a model whose `.model` chain
    reaches a `layers` attribute (`_resolve_transformer_layer_model`); CognicaModel names its layer list
    `eager_prefill_layers`, so SGLang finds none and prefill runs eagerly (README limitations)."""
    import ast
    import inspect

    from sglang.srt.model_executor.runner.prefill_cuda_graph_runner import _resolve_transformer_layer_model

    import cognica_sglang.model as model

    tree = ast.parse(inspect.getsource(model.CognicaModel))
    attrs = {t.attr for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
             if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    assert "eager_prefill_layers" in attrs and "layers" not in attrs, sorted(attrs)
    inner = torch.nn.Module()
    inner.eager_prefill_layers = torch.nn.ModuleList()
    outer = torch.nn.Module()
    outer.model = inner  # CognicaPoEForCausalLM.model
    with pytest.raises(RuntimeError, match="without layers"):
        _resolve_transformer_layer_model(outer)
    inner.layers = inner.eager_prefill_layers  # what naming it `layers` would do
    assert _resolve_transformer_layer_model(outer) is inner
