"""``low_confidence``: LLaDA's default remasking (ML-GSAI/LLaDA ``generate.py``, ``remasking='low_confidence'``).

Each step proposes a token per masked position (Gumbel-max at the request's temperature, argmax at
0), scores it by its softmax probability under the *unscaled* logits, and commits the most
confident ``ceil(masked_left / steps_left)`` positions of the active block: LLaDA's
``get_num_transfer_tokens`` table in stateless form (``schedule.llada_transfer_count``).
With temperature 0 this is token-for-token the reference ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from vllm_dapd.decoding.policy import DenoiseState, Policy, StepResult, check_logits
from vllm_dapd.decoding.registry import register_policy
from vllm_dapd.decoding.select import commit_top, propose_tokens, token_confidence


@dataclass(frozen=True)
class LowConfidenceParams:
    """No knobs: the count comes from the step budget, the order from the probability."""


@register_policy
class LowConfidencePolicy(Policy):
    name = "low_confidence"
    Params = LowConfidenceParams
    accepts_row_subset = True

    def step(self, state: DenoiseState, params: Mapping[str, torch.Tensor]) -> StepResult:
        check_logits(state.logits)
        tokens = propose_tokens(state)  # [B, L]
        score = token_confidence(state, tokens)  # [B, L]
        return commit_top(state, tokens, score, torch.zeros_like(state.step))
