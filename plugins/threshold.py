"""``threshold``: Fast-dLLM's confidence-threshold parallel decoding (LLaDA rule, and Dream's capped rule).

Source: NVlabs/Fast-dLLM ``llada/generate.py`` ``get_transfer_index`` with ``threshold`` set
(paper: "Fast-dLLM", Wu et al. 2025, parallel decoding section). Every masked position of the
active block whose proposed token has probability ``>= threshold`` is committed, and always at
least the single most confident one. On top of the reference we apply the ``min_commits`` floor, so
a block also finishes within its step budget (the reference loops until the block is done; with
``steps >= block_length`` the floor is 1 and the two agree).

``dream_quota=True``: Fast-dLLM's Dream rule (``dream/model/generation_utils.py`` ``_sample``, alg
``confidence_threshold``). Each step has a quota, ``block_size // steps`` plus what the previous
step's quota left uncommitted, and commits the most confident position plus those of the
quota's top-ranked positions that pass the threshold: at most the quota, however many pass.
Stateless form: quota = what an even split of the block over its steps would have committed by
the end of this step, minus what is already committed (``block_size - masked``), using
``DenoiseState.block_size``. The reference asserts ``block_size % steps == 0``; we split any
remainder as LLaDA's schedule does (one extra to each of the first steps), identical when it
divides. Confidence is then read from the tempered distribution, as Dream's ``sample_tokens``
does (equal at temperature 0; Dream's top_p/top_k are not applied). The floor never breaks the
cap: it is at most the quota while the block started fully masked (both loops start it so).

``exact_schedule=True``: no ``min_commits`` floor before the budget's last step (the references
have none), for step-for-step parity. The last step commits every remaining mask, where the
references would keep stepping (Fast-dLLM's Dream loop adds steps, ``steps += 1``; its LLaDA loop
runs until the block is done), so a block still ends within its budget. Together with
``dream_quota`` this reproduces the Dream reference step for step while it stays in budget
(``tests/decoding/test_reference_parity.py``).

``overrun=True``: the references' loops exactly, past the budget too. No floor at any step, and the
budget's last step applies the same rule (the most confident position plus those that pass)
instead of committing the rest: the block keeps stepping until it has no mask
(``Policy.step_limit``), as Fast-dLLM's Dream loop does by ``steps += 1`` (its quota is then every
remaining mask, so the cap no longer binds) and its LLaDA loop by ``while True``. A step commits
at least one position while masks remain, so a block takes at most ``max(steps, block size)``
forwards (the limit binds only if the model proposes the mask id itself). Token and forward parity
with the Dream loop: ``tests/fastdllm_dream_reference.py`` and the tests that use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from vllm_dapd.decoding.confidence import token_probability
from vllm_dapd.decoding.policy import DenoiseState, Policy, StepResult, check_logits, check_range
from vllm_dapd.decoding.registry import register_policy
from vllm_dapd.decoding.select import commit_top, floor_count, masked_count, propose_tokens, token_confidence
from vllm_dapd.plugins.dapd import coerce_fields


@dataclass(frozen=True)
class ThresholdParams:
    threshold: float = 0.9  # commit every masked position with probability >= threshold; in [0, 1]
    dream_quota: bool = False  # Dream's rule: at most the step's quota (needs DenoiseState.block_size)
    exact_schedule: bool = False  # no min_commits floor before the last step (reference parity)
    overrun: bool = False  # no floor, no forced last step: the block steps on until done (reference loops)

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_range("threshold", self.threshold, 0.0, 1.0)


def dream_quota(state: DenoiseState) -> torch.Tensor:
    """[B] long: this step's quota of Fast-dLLM's Dream threshold rule (see the module docstring)."""
    if state.block_size is None:
        raise ValueError("block_size: dream_quota needs DenoiseState.block_size (the active block's size)")
    size = state.block_size.long().to(state.step.device)
    steps = state.steps.long().clamp_min(1)
    done = (state.step.long() + 1).clamp(max=steps)  # steps finished after this one
    target = done * (size // steps) + torch.minimum(done, size % steps)  # LLaDA's even split, cumulative
    return target - (size - masked_count(state))


@register_policy
class ThresholdPolicy(Policy):
    name = "threshold"
    Params = ThresholdParams
    accepts_row_subset = True

    def step_limit(self, params: ThresholdParams, steps: int, block_size: int) -> int:
        return max(steps, block_size) if params.overrun else steps

    def step(self, state: DenoiseState, params: Mapping[str, torch.Tensor]) -> StepResult:
        check_logits(state.logits)
        tokens = propose_tokens(state)
        score = token_confidence(state, tokens)  # [B, L]
        quota_rows = params["dream_quota"].to(score.device).bool()
        if bool(quota_rows.any()):  # Dream reads confidence off the tempered distribution
            t = state.temperature.float()
            tempered = state.logits.float() / torch.where(t > 0, t, torch.ones_like(t)).view(-1, 1, 1)
            score = torch.where(quota_rows.view(-1, 1),
                                state.on_canvas(token_probability(tempered, state.at_rows(tokens))), score)
        above = state.masked & (score >= params["threshold"].to(score).unsqueeze(1))
        count = above.sum(dim=-1)
        if bool(quota_rows.any()):
            count = torch.where(quota_rows, torch.minimum(count, dream_quota(state)), count)
        exact = params["exact_schedule"].to(score.device).bool()
        overrun = params["overrun"].to(score.device).bool()
        last = state.step >= state.steps - 1
        floor = torch.where(overrun | exact & ~last, torch.ones_like(count), floor_count(state))
        return commit_top(state, tokens, score, count, torch.minimum(floor, masked_count(state)))
