"""``random``: LLaDA's random remasking (ML-GSAI/LLaDA ``generate.py``, ``remasking='random'``).

Same count as ``low_confidence`` (``ceil(masked_left / steps_left)``), but the positions are ranked
by uniform noise instead of confidence. The noise is ``sampling.uniform_noise`` keyed by the
request's seed and forward count (its own stream), so the order is reproducible and independent
of the batch, unlike the reference's ``torch.rand``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from vllm_dapd.decoding.policy import DenoiseState, Policy, StepResult, check_logits
from vllm_dapd.decoding.registry import register_policy
from vllm_dapd.decoding.sampling import STREAM_RANDOM_ORDER, uniform_noise
from vllm_dapd.decoding.select import commit_top, noise_counter, propose_tokens


@dataclass(frozen=True)
class RandomParams:
    """No knobs: the count comes from the step budget, the order from the seed."""


@register_policy
class RandomPolicy(Policy):
    name = "random"
    Params = RandomParams
    accepts_row_subset = True

    def step(self, state: DenoiseState, params: Mapping[str, torch.Tensor]) -> StepResult:
        check_logits(state.logits)
        tokens = propose_tokens(state)
        L = state.tokens.shape[1]
        score = uniform_noise(state.seed, noise_counter(state), (L,), STREAM_RANDOM_ORDER)  # [B, L]
        return commit_top(state, tokens, score, torch.zeros_like(state.step))
