# SPDX-License-Identifier: Apache-2.0
"""The worker side of `cognica_self` (see `cognica_vllm.self_spec`): a drafter made of the target's own modules and
an autoregressive speculator that drafts through the target's KV cache.

Draft loop (vLLM 0.34's V2 runner calls `propose` after the target's forward and `postprocess_sampled`, so
`last_sampled[req]` is the token the target just sampled, `GPUModelRunner.execute_model`). Request i's target
forward covered positions up to seq_len - 1, of which the last num_rejected were rejected drafts; the target has
already written the KV (and the smear token ids) of every accepted position. So draft step 0 feeds only the sampled
token, at position P = seq_len - num_rejected, and step j the draft of step j - 1 at P + j: k single-token decode
steps, one shape, each replayable from one CUDA graph (`AutoRegressiveSpeculator`'s FULL decode graph; step 0 goes
through its `prefill_cudagraph_manager`, built here for a query of one token). Unlike vLLM's standalone drafter
(`StandaloneARSpeculator`, whose step 0 re-feeds the accepted tokens to its own model), nothing re-feeds accepted
tokens: that would rewrite the target's KV of the stage layers for them.

What the drafter writes, and why the target stays exact: the KV of layers 0..S-1 and the smear buffer's token id
(`cognica_vllm.smear`) at slots P..P+k-1. Those are the target's next query positions (P is the sampled token, then
its drafts), which verification recomputes and rewrites in every layer before anything reads them; a rejected
draft's slot is rewritten by the token that replaces it. The slots are the lookahead slots the scheduler reserves
(`CognicaSelfSpeculatorConfig.num_lookahead_tokens`, `Scheduler.schedule` -> `KVCacheManager.allocate_slots`),
also for requests still in chunked prefill, whose next chunk rewrites them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.config.compilation import CUDAGraphMode
from vllm.forward_context import BatchDescriptor, set_forward_context
from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.worker.gpu.attn_utils import build_slot_mappings_by_layer, init_attn_backend
from vllm.v1.worker.gpu.block_table import BlockTables
from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor
from vllm.v1.worker.gpu.dp_utils import DPSyncState, dispatch_cg_and_sync_dp
from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers
from vllm.v1.worker.gpu.model_states.interface import ModelState
from vllm.v1.worker.gpu.spec_decode.autoregressive.cudagraph_utils import SpeculatorCudaGraphManager
from vllm.v1.worker.gpu.spec_decode.autoregressive.speculator import AutoRegressiveSpeculator
from vllm.v1.worker.utils import AttentionGroup

from cognica import layers
from cognica_vllm.spec_decode import draft_stage


class CognicaStageDrafter(nn.Module):
    """The target's first `poe_draft_stage` stages and its head: every module and parameter is the target's own
    object (registered here a second time, never copied), and its attention layers are the target's, so they read
    and write the target's KV cache. The forward follows `CognicaModel.forward` for a stage prefix (the reference's
    `poe_exit_stage`): smear, layers 0..S-1, the stage exit's tail and norm."""

    def __init__(self, target: nn.Module, stage: int) -> None:
        super().__init__()
        from dataclasses import replace

        model = target.model
        self.config = cfg = replace(model.config, poe_exit_stage=stage, poe_head="final")
        n = cfg.n_active_layers
        assert model.start_layer == 0 and model.end_layer >= n, "the drafter needs the target's first layers here"
        self.layers = nn.ModuleList(model.layers[i] for i in range(n))
        self.wte, self.smear_tokens = model.wte, model.smear_tokens
        self.value_embeds = nn.ModuleDict({k: v for k, v in model.value_embeds.items() if int(k) < n})
        self.kv_slice = model.kv_slice
        for name in ("resid_lambdas", "x0_lambdas", "smear_gate", "smear_lambda", "backout_lambda"):
            setattr(self, name, getattr(model, name))
        self.lm_head, self.logits_processor = target.lm_head, target.logits_processor

    @property
    def attn_layer_names(self) -> set[str]:
        """The target's attention layers this drafter runs, and the one whose metadata the smear op reads."""
        names = {layer.attn.attn.layer_name for layer in self.layers}
        return names | {self.smear_tokens.attn_layer_name}

    def previous_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record the ids at their KV slots and read each token's predecessor (`SmearState.previous`)."""
        return self.smear_tokens.previous(input_ids, positions)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return layers.norm(self.wte(input_ids))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        x = self.embed_input_ids(input_ids)
        prev_ids, has_prev = self.previous_tokens(input_ids, positions)
        x = layers.smear(x, self.embed_input_ids(prev_ids), self.smear_gate, self.smear_lambda, has_prev)
        x0, x_backout = x, None
        for i, layer in enumerate(self.layers):
            x = layers.mix_residual(x, x0, self.resid_lambdas[i], self.x0_lambdas[i])
            ve = self.value_embeds[str(i)](input_ids)[..., self.kv_slice] if str(i) in self.value_embeds else None
            x = layer(positions, x, ve)
            if i == cfg.backout_layer:
                x_backout = x
        last = len(self.layers) - 1
        return layers.readout([layers.exit_tail(x, x_backout, self.backout_lambda, cfg.exit_backout(last))])

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)


class CognicaSelfSpeculator(AutoRegressiveSpeculator):
    """k single-token draft steps through the target's stage layers (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(vllm_config, device)
        self.arange_gpu = torch.arange(self.max_num_reqs + 1, dtype=torch.int32, device=device)

    def load_draft_model(self, target_model: nn.Module, target_attn_layer_names: set[str]) -> nn.Module:
        # no get_model: nothing is built or loaded, so `DraftModelSpeculator.load_model` finds no attention layers
        # beyond the target's (draft_attn_layer_names stays empty: no KV cache of its own)
        return CognicaStageDrafter(target_model, draft_stage(self.vllm_config.model_config.hf_config))

    def init_cudagraph_manager(self, cudagraph_mode: CUDAGraphMode) -> None:
        # step 0 is the same one-token-per-request decode as the later steps (FULL graphs or eager, as
        # `AutoRegressiveSpeculator.init_cudagraph_manager` builds its decode manager); `capture` records it
        self.prefill_cudagraph_manager = SpeculatorCudaGraphManager(
            self.vllm_config, self.device,
            CUDAGraphMode.FULL_DECODE_ONLY if cudagraph_mode.decode_mode() == CUDAGraphMode.FULL
            else CUDAGraphMode.NONE,
            decode_query_lens={1: self.max_num_reqs},
            decode_request_sizes=self.vllm_config.get_draft_decode_cudagraph_request_sizes(),
        )
        super().init_cudagraph_manager(cudagraph_mode)

    def set_attn(self, model_state: ModelState, kv_cache_config: KVCacheConfig, block_tables: BlockTables,
                 target_input_buffers: InputBuffers, target_attn_groups: list[list[AttentionGroup]]) -> None:
        """As `DraftModelSpeculator.set_attn`, with metadata builders for the target's layers the drafter runs
        (per KV-cache group, `init_attn_backend`'s `active_layer_names`) instead of draft layers (there are none)."""
        self.model_state, self.kv_cache_config, self.block_tables = model_state, kv_cache_config, block_tables
        self.attn_groups, self.attn_cg_support, _ = init_attn_backend(
            kv_cache_config, self.attn_vllm_config, self.device, active_layer_names=self.model.attn_layer_names)
        self.target_input_buffers, self.target_attn_groups = target_input_buffers, target_attn_groups
        self._configure_decode_metadata_update()

    @torch.inference_mode()
    def _run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: dict[str, Any] | None,
                   slot_mappings: dict[str, torch.Tensor] | None, num_tokens_across_dp: torch.Tensor | None,
                   cudagraph_runtime_mode: CUDAGraphMode) -> torch.Tensor:
        n = input_ids.shape[0]
        with set_forward_context(attn_metadata, self.vllm_config, num_tokens=n,
                                 cudagraph_runtime_mode=cudagraph_runtime_mode,
                                 num_tokens_across_dp=num_tokens_across_dp, slot_mapping=slot_mappings,
                                 batch_descriptor=BatchDescriptor(num_tokens=n)):
            return self.model(input_ids, positions)

    def _decode(self, num_reqs: int, num_tokens_padded: int, attn_metadata: dict[str, Any] | None,
                slot_mappings: dict[str, torch.Tensor] | None, num_tokens_across_dp: torch.Tensor | None,
                cudagraph_runtime_mode: CUDAGraphMode, num_speculative_steps: int) -> None:
        """Draft `current_draft_step` from the token in `input_buffers`, then advance the buffers one position:
        no host sync, graph-capturable."""
        buf = self.input_buffers
        hidden = self._run_model(buf.input_ids[:num_tokens_padded], buf.positions[:num_tokens_padded], attn_metadata,
                                 slot_mappings, num_tokens_across_dp, cudagraph_runtime_mode)
        drafts = self.sample_draft(hidden[:num_reqs], buf.positions[:num_reqs], self.idx_mapping[:num_reqs],
                                   self.temperature, self.seeds, self.current_draft_step, self.draft_logits)
        self.draft_tokens[:num_reqs].scatter_(1, self.current_draft_step.expand(num_reqs, 1), drafts.unsqueeze(1))
        buf.input_ids[:num_reqs].copy_(drafts.int())
        torch.clamp(buf.positions[:num_reqs] + 1, max=self.max_model_len_gpu - 1, out=buf.positions[:num_reqs])
        torch.clamp(buf.seq_lens[:num_reqs] + 1, max=self.max_model_len_gpu, out=buf.seq_lens[:num_reqs])

    def _prefill(self, num_reqs: int, num_tokens: int, attn_metadata: dict[str, Any] | None,
                 slot_mappings: dict[str, torch.Tensor] | None, num_tokens_across_dp: torch.Tensor | None,
                 cudagraph_runtime_mode: CUDAGraphMode, mm_inputs: Any = None,
                 num_speculative_steps: int | None = None) -> None:
        """Draft step 0: the same single-token decode (the capture passes num_speculative_steps for query length 1,
        `SpeculatorCudaGraphManager.capture`)."""
        self._decode(num_reqs, num_tokens, attn_metadata, slot_mappings, num_tokens_across_dp,
                     cudagraph_runtime_mode, num_speculative_steps or self.num_speculative_steps)

    def _pad_decode_inputs(self, num_reqs: int, batch_desc: BatchExecutionDescriptor) -> None:
        """Rows a graph pads the batch with: no keys, empty queries (their idx_mapping is -1, so no KV slot)."""
        padded = batch_desc.num_reqs or num_reqs
        qsl = self.input_buffers.query_start_loc
        qsl[: num_reqs + 1].copy_(self.arange_gpu[: num_reqs + 1])
        if padded > num_reqs:
            self.input_buffers.seq_lens[num_reqs:padded].zero_()
            qsl[num_reqs + 1: padded + 1].fill_(num_reqs)

    def _prepare_decode_inputs(self, input_batch: InputBatch, num_rejected: torch.Tensor, num_reqs: int,
                               skip_attn: bool, batch_desc: BatchExecutionDescriptor) -> None:
        # step 0's `_decode` already advanced the ids, positions and lengths to step 1's
        self._pad_decode_inputs(num_reqs, batch_desc)

    def _prepare_first_step(self, input_batch: InputBatch, num_rejected: torch.Tensor, last_sampled: torch.Tensor,
                            num_reqs: int) -> None:
        """Step 0 feeds the token the target just sampled at P = seq_len - num_rejected (its KV slot the first the
        target has not written for an accepted token), attending to P + 1 keys."""
        buf = self.input_buffers
        first = (input_batch.seq_lens[:num_reqs] - num_rejected[:num_reqs]).long()
        buf.input_ids[:num_reqs].copy_(last_sampled[input_batch.idx_mapping[:num_reqs], 0].int())  # [max_reqs, 1]
        torch.clamp(first, max=self.max_model_len - 1, out=buf.positions[:num_reqs])
        buf.seq_lens[:num_reqs].copy_(torch.clamp(first + 1, max=self.max_model_len).int())

    def _dispatch(self, manager: SpeculatorCudaGraphManager | None, num_reqs: int,
                  dp_sync_state: DPSyncState | None,
                  is_profile: bool) -> tuple[BatchExecutionDescriptor, torch.Tensor | None]:
        """A uniform one-token batch's graph (or eager), agreed across data-parallel ranks as
        `AutoRegressiveSpeculator._run_multi_step_decode` agrees its decode steps."""
        sync, num_batch_tokens = None, num_reqs
        if dp_sync_state is not None:
            num_reqs = min(num_reqs, dp_sync_state.num_reqs)
            sync, num_batch_tokens = self._build_uniform_batch_dp_sync(dp_sync_state, num_reqs)
        desc, sync = dispatch_cg_and_sync_dp(manager, num_reqs, num_batch_tokens, uniform_token_count=1,
                                             dp_size=self.dp_size, dp_rank=self.dp_rank, need_eager=is_profile,
                                             dp_sync_state=sync, parallel_config=self.vllm_config.parallel_config)
        return desc, None if sync is None else sync.num_tokens_across_dp

    @torch.inference_mode()
    def propose(self, input_batch: InputBatch, attn_metadata: dict[str, Any], slot_mappings: dict[str, torch.Tensor],
                last_hidden_states: torch.Tensor, aux_hidden_states: list[torch.Tensor] | None,
                num_sampled: torch.Tensor, num_rejected: torch.Tensor, last_sampled: torch.Tensor,
                next_prefill_tokens: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                dp_sync_state: DPSyncState | None = None, dummy_run: bool = False,
                skip_attn_for_dummy_run: bool = False, mm_inputs: Any = None, is_profile: bool = False,
                num_speculative_tokens: int | None = None) -> torch.Tensor:
        """`BaseSpeculator.propose`: the target's own metadata and hidden states are not used (the drafter builds
        single-token metadata over the same block tables)."""
        num_reqs = input_batch.num_reqs
        k = self.num_speculative_steps if num_speculative_tokens is None else num_speculative_tokens
        self._copy_request_inputs(num_reqs, input_batch.idx_mapping, temperature, seeds, dummy_run=dummy_run)
        self.current_draft_step.zero_()
        if k == 0:
            self.draft_tokens[:num_reqs].fill_(-1)
            return self.draft_tokens[:num_reqs]
        skip_attn = dummy_run and skip_attn_for_dummy_run
        # the draft metadata's key-count bound: step j attends to at most seq_len + 1 + j keys
        bound = input_batch.seq_lens_cpu_upper_bound[:num_reqs] + 1

        self._prepare_first_step(input_batch, num_rejected, last_sampled, num_reqs)
        desc, num_tokens_across_dp = self._dispatch(self.prefill_cudagraph_manager, num_reqs, dp_sync_state,
                                                    is_profile)
        self._pad_decode_inputs(num_reqs, desc)
        step_md, step_slots = None, None
        if not skip_attn:
            buf = self.input_buffers
            padded = desc.num_reqs or num_reqs
            slots = self.block_tables.compute_slot_mappings(self.idx_mapping[:padded],
                                                            buf.query_start_loc[: padded + 1],
                                                            buf.positions[: desc.num_tokens], desc.num_tokens)
            step_slots = build_slot_mappings_by_layer(slots, self.kv_cache_config)
            step_md = self._build_uniform_attn_metadata(desc, num_reqs, 1, bound, step=0)
        if desc.cg_mode == CUDAGraphMode.FULL:
            assert self.prefill_cudagraph_manager is not None
            self.prefill_cudagraph_manager.run_fullgraph(desc)
        else:
            self._prefill(num_reqs, desc.num_tokens, step_md, step_slots, num_tokens_across_dp, desc.cg_mode,
                          num_speculative_steps=k)
        if k == 1:
            return self.draft_tokens[:num_reqs, :1]
        self._run_multi_step_decode(input_batch, num_rejected, num_reqs, skip_attn, dp_sync_state, bound,
                                    is_profile, k)
        return self.draft_tokens[:num_reqs]
