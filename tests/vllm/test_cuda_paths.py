"""vLLM's CUDA-only mechanisms, reproduced on this CPU (run in .venv/vllm): graph splitting, CUDA-graph batch padding,
stable op outputs, kernel block sizes, the Triton launch variant at warm-up vs capture, an fp8 KV cache and a context
longer than the training context.

No GPU runs vLLM here, so each test drives the engine's own rule (its partition functions, its padding copied from
the engine source with the line cited, its dtype mapping) through our ops.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx
from vllm.compilation.backends import split_graph
from vllm.config import CompilationConfig, CompilationMode
from vllm.forward_context import ForwardContext, override_forward_context

from cognica_kernels.attention import kernel_variant
from cognica_vllm import attention, smear
from cognica_vllm.forward_context import split_graph_at

STATE, FULL_LAYER = "model.smear", "model.layers.3.attn.attn"
NUM_KV_HEADS, HEAD_SIZE = 2, 8


def cuda_compilation_config() -> CompilationConfig:
    """The compilation config a CUDA build starts from: VLLM_COMPILE with vLLM's default splitting ops
    (`CompilationConfig.set_splitting_ops_for_v1` in vllm/config/compilation.py)."""
    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE)
    cc.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter")
    assert "vllm::unified_attention_with_output" in cc.splitting_ops
    return cc


def test_smear_and_attention_ops_split_the_compiled_graph():
    """Both ops are split points under vLLM's own rule (`split_graph`/`should_split`), so piecewise CUDA graphs run
    them eagerly with each step's metadata instead of replaying what the capture run recorded."""
    config = SimpleNamespace(compilation_config=cuda_compilation_config())
    split_graph_at(config, smear.OP_NAME)  # what SmearState and CognicaAttention register
    split_graph_at(config, attention.OP_NAME)

    def body(input_ids, positions, q, k, v):
        prev = smear.smear_prev_ids(input_ids, positions, STATE)
        h = q * (prev >= 0).unsqueeze(-1).to(q.dtype) + 1
        out = attention.cognica_paged_attention(h, k, v, FULL_LAYER, 511, 2048)
        return out * 2

    n = 5
    gm = make_fx(body, tracing_mode="fake")(torch.zeros(n, dtype=torch.long), torch.arange(n), torch.randn(n, 16),
                                            torch.randn(n, 16), torch.randn(n, 16))
    _, items = split_graph(gm, config.compilation_config.splitting_ops)
    split_targets = {str(node.target) for item in items if item.is_splitting_graph for node in item.graph.graph.nodes
                     if node.op == "call_function"}
    for op in ("vllm.cognica_smear_prev_ids.default", "vllm.cognica_paged_attention.default"):
        assert op in split_targets, f"{op} is captured inside a piecewise graph: splitting ops matched {split_targets}"
    assert sum(not item.is_splitting_graph for item in items) == 3, "expected 3 piecewise graphs around the 2 ops"


class FullLayer(nn.Module):
    """The attributes the ops read from vLLM's `Attention` layer in `no_compile_layers`."""

    def __init__(self, kv_cache: torch.Tensor):
        super().__init__()
        self.kv_cache, self.num_kv_heads, self.head_size = [kv_cache], NUM_KV_HEADS, HEAD_SIZE


def smear_context(num_blocks: int, kernel_block_size: int, meta, slot_mapping: torch.Tensor) -> tuple:
    """A forward context as vLLM's model runner builds it, around a full-attention layer whose bound cache has the
    CPU/FLASH_ATTN layout [num_blocks, num_kv_heads, block_size, 2 * head_size]."""
    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE)
    cc.splitting_ops = []
    state = smear.SmearState(SimpleNamespace(compilation_config=cc), FULL_LAYER, STATE)
    kv = torch.zeros(num_blocks, NUM_KV_HEADS, kernel_block_size, 2 * HEAD_SIZE)
    ctx = ForwardContext(no_compile_layers={STATE: state, FULL_LAYER: FullLayer(kv)},
                         attn_metadata={FULL_LAYER: meta}, slot_mapping={FULL_LAYER: slot_mapping})
    return ctx, state


def run_smear(ctx: ForwardContext, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    with override_forward_context(ctx):
        return smear.smear_prev_ids(input_ids, positions, STATE)


def padded_decode_metadata(real_positions: list[int], block_table_rows: list[list[int]], block_size: int,
                           num_reqs_padded: int, runner: str):
    """Decode metadata as vLLM pads it for a FULL CUDA graph of `num_reqs_padded` one-token requests."""
    num_reqs = len(real_positions)
    cu = list(range(1, num_reqs + 1))
    if runner == "v1":
        # GPUModelRunner._prepare_inputs (v1/worker/gpu_model_runner.py): query_start_loc.np[num_reqs + 1:].fill(...)
        qsl = [0] + cu + [cu[-1]] * (num_reqs_padded - num_reqs)
    else:
        # GPUModelRunner.prepare_inputs (v1/worker/gpu/model_runner.py): query_start_loc_np[num_reqs + 1:] = num_tokens
        qsl = [0] + cu + [num_reqs] * (num_reqs_padded - num_reqs)
    # padded block-table rows hold NULL_BLOCK_ID (0) (GPUModelRunner._build_attention_metadata); the gpu/ runner's
    # BlockTables.get_dummy_block_tables zeroes them
    width = max(len(r) for r in block_table_rows)
    rows = [r + [0] * (width - len(r)) for r in block_table_rows] + [[0] * width] * (num_reqs_padded - num_reqs)
    slots = [rows[i][p // block_size] * block_size + p % block_size for i, p in enumerate(real_positions)]
    # GPUModelRunner._get_slot_mappings / gpu/block_table.py PAD_SLOT_ID: padded tokens have slot -1
    slot_mapping = torch.tensor(slots + [-1] * (num_reqs_padded - num_reqs))
    meta = SimpleNamespace(query_start_loc=torch.tensor(qsl, dtype=torch.int32),
                           block_table=torch.tensor(rows, dtype=torch.int32),
                           num_actual_tokens=num_reqs_padded,  # _build_attention_metadata: num_tokens_padded
                           slot_mapping=slot_mapping, max_query_len=1)
    return meta, slot_mapping


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_smear_ignores_padded_requests_of_a_full_cuda_graph(runner: str):
    """3 real decode requests padded to a 4-request graph: the padded request's index would be one past the block
    table; the op must read and write nothing for it and return -1 there."""
    bs = 16
    positions = [5, 40, 17]
    rows = [[3], [4, 7, 9], [1, 2]]
    meta, slot_mapping = padded_decode_metadata(positions, rows, bs, num_reqs_padded=4, runner=runner)
    ctx, state = smear_context(num_blocks=12, kernel_block_size=bs, meta=meta, slot_mapping=slot_mapping)
    # an earlier step filled the slots of the previous positions
    state.buffer(12 * bs, torch.device("cpu"))
    prev_slots = [rows[i][(p - 1) // bs] * bs + (p - 1) % bs for i, p in enumerate(positions)]
    state.slot_ids[torch.tensor(prev_slots)] = torch.tensor([101, 102, 103], dtype=torch.int32)
    before = state.slot_ids.clone()
    input_ids = torch.tensor([11, 12, 13, 77])
    stale_position = 999  # the padded row of the persistent positions buffer keeps an old value
    prev = run_smear(ctx, input_ids, torch.tensor(positions + [stale_position]))
    assert prev.tolist() == [101, 102, 103, -1], f"smear ids under {runner} padding: {prev.tolist()}"
    changed = (state.slot_ids[:-1] != before[:-1]).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(slot_mapping[:3].tolist()), f"padding wrote slots {changed}"


def test_smear_op_writes_into_the_callers_output():
    """Piecewise replays use the input addresses captured (`CUDAGraphWrapper.__call__`, no copy): the op
    must return nothing and mutate an output allocated by the caller, like `unified_attention_with_output`."""
    schema = torch.ops.vllm.cognica_smear_prev_ids.default._schema
    assert not schema.returns, f"the op returns a fresh tensor: {schema}"
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["out"], f"the op does not write a caller-owned output: {schema}"
    meta, slot_mapping = padded_decode_metadata([1], [[2]], 16, num_reqs_padded=1, runner="v1")
    ctx, state = smear_context(num_blocks=4, kernel_block_size=16, meta=meta, slot_mapping=slot_mapping)
    state.buffer(4 * 16, torch.device("cpu"))[2 * 16] = 55
    out = torch.full((1,), -7)
    with override_forward_context(ctx):
        torch.ops.vllm.cognica_smear_prev_ids(torch.tensor([9]), torch.tensor([1]), out, STATE)
    assert out.tolist() == [55], "the op did not fill the caller's buffer"


def test_smear_takes_the_block_size_from_the_cache_tensor():
    """vLLM may split a manager block into kernel blocks (`GPUModelRunner.initialize_kv_cache`): block tables count
    kernel blocks of the cache's own size, not `cache_config.block_size`."""
    kernel_bs = 16
    positions = [20]  # kernel block 1 of the sequence
    rows = [[5, 6]]
    meta, slot_mapping = padded_decode_metadata(positions, rows, kernel_bs, num_reqs_padded=1, runner="v1")
    ctx, state = smear_context(num_blocks=8, kernel_block_size=kernel_bs, meta=meta, slot_mapping=slot_mapping)
    state.cache_config = SimpleNamespace(block_size=32)  # what the manager uses
    state.buffer(8 * kernel_bs, torch.device("cpu"))[6 * kernel_bs + 3] = 42  # position 19
    prev = run_smear(ctx, torch.tensor([1]), torch.tensor(positions))
    assert prev.tolist() == [42], f"read the wrong slot for position 19: {prev.tolist()}"


@pytest.mark.parametrize("window_left", [511, None])
def test_triton_launch_variant_is_the_same_at_warm_up_and_capture(window_left):
    """vLLM warms a decode graph up with max_seq_len = the dummy query length (`GPUModelRunner._dummy_run`) and
    captures it with max_seq_len = max_model_len (`GPUModelRunner._build_attention_metadata`): the kernel variant
    (split count)
    must not differ, or it first compiles inside stream capture."""
    max_model_len, heads, kv_heads = 2048, 16, 16  # the published model's heads
    for batch in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):  # vLLM's capture sizes
        warm_up = SimpleNamespace(max_query_len=1, max_seq_len=1)
        capture = SimpleNamespace(max_query_len=1, max_seq_len=max_model_len)
        variants = [kernel_variant(batch, heads, kv_heads, window_left=window_left,
                                   **attention.kernel_lengths(meta, max_model_len))
                    for meta in (warm_up, capture)]
        assert variants[0] == variants[1], f"batch {batch}: warm-up compiles {variants[0]}, capture {variants[1]}"


def test_fp8_kv_cache_falls_back_to_the_engines_attention(caplog, monkeypatch: pytest.MonkeyPatch):
    """`--kv-cache-dtype fp8` stores the cache as float8 (vLLM's own mapping); the Triton kernel reads it as q's
    dtype, so the layer must take vLLM's attention, and say so, instead of asserting at the first forward, also
    where COGNICA_KERNELS opts in to the Triton kernel."""
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    monkeypatch.setenv("COGNICA_KERNELS", "attention=triton")
    model = SimpleNamespace(dtype=torch.bfloat16)
    fp8 = kv_cache_dtype_str_to_dtype("fp8", model)
    assert attention.use_cognica_attention("FLASH_ATTN", True, kv_cache_dtype_str_to_dtype("auto", model),
                                           torch.bfloat16), "an unquantized cache keeps the Triton path"
    monkeypatch.setattr(logging.getLogger("vllm"), "propagate", True)  # vLLM's logger keeps records to itself
    with caplog.at_level(logging.INFO, logger="vllm"):
        assert not attention.use_cognica_attention("FLASH_ATTN", True, fp8, torch.bfloat16), f"{fp8} cache"
    assert any("KV cache is stored as" in r.getMessage() for r in caplog.records), "no log line for the fallback"


def test_context_longer_than_training_is_refused(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch):
    """With vLLM's own check lifted (VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, `_get_and_verify_max_len` in
    vllm/config/model.py), max_model_len above the 1024-token training context of the tiny checkpoint passes vLLM's
    config and is refused by the model."""
    from vllm.config import ModelConfig, VllmConfig

    import cognica_vllm
    from cognica_vllm.model import CognicaPoEForCausalLM

    cognica_vllm.register()
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    config = VllmConfig(model_config=ModelConfig(model=str(tiny_ckpt), max_model_len=2048, skip_tokenizer_init=True))
    assert config.model_config.max_model_len == 2048, "vLLM's own check did not let the longer context through"
    with pytest.raises(ValueError, match="--max-model-len 2048 is longer than the 1024-token context"):
        CognicaPoEForCausalLM(vllm_config=config)
