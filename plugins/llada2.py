"""``llada2``: LLaDA2's own decoding rule (inclusionAI LLaDA2.0 ``generate``; SGLang ships it as its
dLLM "LowConfidence" algorithm with threshold 0.95 and block 32).

A block of ``B`` positions gets a schedule of ``B // steps`` tokens per step, the remainder one more
in the first steps (``block_diffusion.transfer_schedule``). At step ``i`` every masked position of
the active block proposes a token (argmax at temperature 0) scored by its softmax probability; the
positions scoring strictly above ``threshold`` are all committed when there are at least
``k_i`` of them, else the ``k_i`` most confident ones: i.e. the best ``max(#above, k_i)``.

``B`` is ``DenoiseState.block_size``, the whole block: in a block-causal model's first block the
prompt's tail counts as already committed, as in the reference, whose schedule is the full block's
whatever the prompt covers (a state without ``block_size`` uses its masked count). The
``min_commits`` floor of every policy never binds on top: committing at least ``k_i`` keeps a block
on schedule, so ``k_i`` (the largest count left) covers what remains per step left.
Reference loop: ``vllm_dapd/decoding/block_diffusion.py`` (token for token against the reference
remote code, ``tests/models/test_llada2.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from vllm_dapd.decoding.policy import DenoiseState, Policy, StepResult, check_logits, check_range
from vllm_dapd.decoding.registry import register_policy
from vllm_dapd.decoding.select import commit_top, masked_count, propose_tokens, token_confidence
from vllm_dapd.plugins.dapd import coerce_fields


@dataclass(frozen=True)
class Llada2Params:
    threshold: float = 0.95  # commit every masked position with probability > threshold; in [0, 1]

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_range("threshold", self.threshold, 0.0, 1.0)


def scheduled_count(state: DenoiseState) -> torch.Tensor:
    """[B] long: the block's even split over its steps at this step, remainder first."""
    size = state.block_size.long().to(state.step.device) if state.block_size is not None else masked_count(state)
    steps = state.steps.long().clamp_min(1)
    return size // steps + (state.step.long() < size % steps).long()


@register_policy
class Llada2Policy(Policy):
    name = "llada2"
    Params = Llada2Params
    accepts_row_subset = True

    def step(self, state: DenoiseState, params: Mapping[str, torch.Tensor]) -> StepResult:
        check_logits(state.logits)
        tokens = propose_tokens(state)
        score = token_confidence(state, tokens)  # [B, L]
        above = (state.masked & (score > params["threshold"].to(score).unsqueeze(1))).sum(dim=-1)
        return commit_top(state, tokens, score, torch.maximum(above, scheduled_count(state)))
