# SPDX-License-Identifier: Apache-2.0
"""The `SpeculatorConfig` of `cognica_self` (vLLM >= 0.34; see `cognica_vllm.self_spec`)."""

from __future__ import annotations

from typing import Any

from vllm.v1.worker.gpu.spec_decode.speculator_config import SpeculatorConfig

from cognica_vllm.self_spec import METHOD


class CognicaSelfSpeculatorConfig(SpeculatorConfig):
    """No draft checkpoint: `SpeculatorConfig.configure` makes the target's config the draft config."""

    base_method = None
    speculator_class = "cognica_vllm.self_spec_speculator.CognicaSelfSpeculator"

    @property
    def num_lookahead_tokens(self) -> int:
        # draft j of a request is written at its KV slot seq_len - num_rejected + j (j < k), verification's slots
        # end at seq_len - 1, so k slots past the scheduled tokens (`VllmConfig.num_lookahead_tokens`)
        return self.num_speculative_tokens

    def hash_factors(self) -> list[Any]:
        return [METHOD]
