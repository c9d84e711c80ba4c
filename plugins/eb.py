"""``eb``: the Entropy-Bounded sampler (EB-Sampler).

Source: Ben-Hamu, Gat, Severo, Nolte, Karrer, "Accelerated Sampling from Masked Diffusion Models
via Entropy Bounded Unmasking" (arXiv 2505.24857, 2025), the EB-Sampler algorithm: sort the masked
positions by an error proxy (most certain first), then unmask the largest prefix ``S`` with

    sum_{i in S} H(p_i) - max_{i in S} H(p_i) <= gamma

(``H`` = entropy of the position's predicted distribution, in nats). The left side bounds the
mutual information the factorised (independent) sample ignores, so ``gamma`` is an error budget:
0 decodes one position per step, larger values decode more in parallel. The prefix always has at
least one position; ``min_commits`` floors it so the block ends within its budget.

Choices (stated because the paper leaves them to the sampler it wraps):
* ``proxy``: 0 = probability of the proposed token (LLaDA's confidence, the paper's default
  "confidence" proxy), 1 = entropy (lowest first), 2 = top-1 minus top-2 margin.
* ``gamma`` default 0.01: a low-error point of the paper's gamma sweeps (which span about 1e-3 to
  1); tune per task.
* Entropy and probability use the unscaled logits (as LLaDA's ``low_confidence``), tokens are
  sampled at the request's temperature. Both come from one softmax (``softmax_entropy``); H then
  differs from the log-softmax form by fp32 rounding only (within 5e-5 nats + 5e-4 relative).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from vllm_dapd.decoding.confidence import probability_margin, softmax_entropy
from vllm_dapd.decoding.policy import DenoiseState, Policy, StepResult, check_int, check_logits, check_range
from vllm_dapd.decoding.registry import register_policy
from vllm_dapd.decoding.select import commit_top, propose_tokens, rank_order, token_confidence

PROXY_CONFIDENCE, PROXY_ENTROPY, PROXY_MARGIN = 0, 1, 2


@dataclass(frozen=True)
class EBParams:
    gamma: float = 0.01  # entropy budget per step (nats); >= 0
    proxy: int = PROXY_CONFIDENCE  # ranking: 0 probability, 1 entropy, 2 margin

    def __post_init__(self) -> None:
        check_range("gamma", self.gamma, 0.0)
        check_int("proxy", self.proxy, 0)
        if self.proxy > PROXY_MARGIN:
            raise ValueError(f"proxy: must be 0 (confidence), 1 (entropy) or 2 (margin), got {self.proxy}")
        object.__setattr__(self, "gamma", float(self.gamma))


def entropy_bounded_count(
    ent: torch.Tensor, order: torch.Tensor, masked: torch.Tensor, gamma: torch.Tensor  # [B,L], [B,L], [B,L], [B]
) -> torch.Tensor:
    """[B] long: longest prefix of ``order`` whose entropy sum minus its max stays <= gamma."""
    h = ent.to(torch.float64).gather(-1, order)  # [B, L] in proxy order
    valid = masked.gather(-1, order)  # eligible positions come first in ``order``
    h = torch.where(valid, h, torch.zeros_like(h))
    excess = h.cumsum(dim=-1) - h.cummax(dim=-1).values
    ok = (excess <= gamma.to(torch.float64).unsqueeze(1)) & valid
    return ok.long().cumprod(dim=-1).sum(dim=-1)


@register_policy
class EBPolicy(Policy):
    name = "eb"
    Params = EBParams
    accepts_row_subset = True

    def step(self, state: DenoiseState, params: Mapping[str, torch.Tensor]) -> StepResult:
        check_logits(state.logits)
        tokens = propose_tokens(state)
        probs, ent = softmax_entropy(state.logits)  # one softmax for the entropy and every proxy
        ent = state.on_canvas(ent)  # [B, L]
        proxy = params["proxy"].unsqueeze(1)  # [B, 1]
        score = torch.where(proxy == PROXY_ENTROPY, -ent, token_confidence(state, tokens, probs))
        if bool((proxy == PROXY_MARGIN).any()):  # a vocabulary pass: only when some row asks for it
            score = torch.where(proxy == PROXY_MARGIN, state.on_canvas(probability_margin(probs)), score)
        order = rank_order(score, state.masked)
        count = entropy_bounded_count(ent, order, state.masked, params["gamma"])
        return commit_top(state, tokens, score, count)
