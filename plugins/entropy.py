"""``entropy``: Dream's entropy-ranked unmasking (Dream ``generation_utils.py``, alg ``entropy``).

Confidence = negative entropy ``sum p log(p + 1e-10)`` of the tempered distribution: the most
peaked distributions commit first. Schedule, ``eps`` and ``alg_temp``: see ``_dream.py``.
"""

from __future__ import annotations

from typing import Mapping

import torch

from vllm_dapd.decoding.confidence import negative_entropy
from vllm_dapd.decoding.policy import DenoiseState, Policy, StepResult
from vllm_dapd.decoding.registry import register_policy

from ._dream import DreamParams, dream_step


@register_policy
class EntropyPolicy(Policy):
    name = "entropy"
    Params = DreamParams
    accepts_row_subset = True

    def step(self, state: DenoiseState, params: Mapping[str, torch.Tensor]) -> StepResult:
        return dream_step(state, params, lambda logits, tokens: negative_entropy(logits))
