"""``margin``: Dream's top-k margin unmasking (Dream ``generation_utils.py``, alg ``topk_margin``).

Confidence = top-1 minus top-2 probability of the tempered distribution: a position whose two best
candidates are close waits. Schedule, ``eps`` and ``alg_temp``: see ``_dream.py``.
"""

from __future__ import annotations

from typing import Mapping

import torch

from vllm_dapd.decoding.confidence import top2_margin
from vllm_dapd.decoding.policy import DenoiseState, Policy, StepResult
from vllm_dapd.decoding.registry import register_policy

from ._dream import DreamParams, dream_step


@register_policy
class MarginPolicy(Policy):
    name = "margin"
    Params = DreamParams
    accepts_row_subset = True

    def step(self, state: DenoiseState, params: Mapping[str, torch.Tensor]) -> StepResult:
        return dream_step(state, params, lambda logits, tokens: top2_margin(logits))
