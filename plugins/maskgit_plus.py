"""``maskgit_plus``: Dream's probability-ranked unmasking (Dream ``generation_utils.py``, alg ``maskgit_plus``).

Confidence = probability of the proposed token under the tempered distribution (the max
probability at temperature 0). Schedule, ``eps`` and ``alg_temp``: see ``_dream.py``.
"""

from __future__ import annotations

from typing import Mapping

import torch

from vllm_dapd.decoding.confidence import token_probability
from vllm_dapd.decoding.policy import DenoiseState, Policy, StepResult
from vllm_dapd.decoding.registry import register_policy

from ._dream import DreamParams, dream_step


@register_policy
class MaskGitPlusPolicy(Policy):
    name = "maskgit_plus"
    Params = DreamParams
    accepts_row_subset = True

    def step(self, state: DenoiseState, params: Mapping[str, torch.Tensor]) -> StepResult:
        return dream_step(state, params, token_probability)
