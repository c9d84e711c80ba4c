"""Shared selection pieces of the policies: rank positions by a score, commit the top ``k[b]`` of each row.

Every count-based policy reduces to "score per position + how many to commit"; this file is the one
place that turns that into a commit mask, batched with a different ``k`` per row.

Ties: ranking uses a *stable* descending sort, so among equal scores the lowest canvas position
wins, deterministically (``torch.topk``, used by the references, promises no order among ties).
"""

from __future__ import annotations

import torch

from .confidence import token_probability
from .policy import DenoiseState, StepResult
from .sampling import sample_tokens
from .schedule import min_commits


def rank_order(score: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """[B, L] long: positions sorted best first; eligible ones first, then by score, then by index."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices  # [B, L]
    elig_sorted = eligible.gather(-1, order).to(torch.int8)
    regroup = torch.sort(elig_sorted, dim=-1, descending=True, stable=True).indices
    return order.gather(-1, regroup)


def ranks(order: torch.Tensor) -> torch.Tensor:
    """[B, L] long: rank of each position (0 = best), the inverse permutation of ``order``."""
    r = torch.empty_like(order)
    src = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return r.scatter_(-1, order, src)


def top_k_mask(score: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the ``k[b]`` best-scored ``eligible`` positions of each row (fewer if not enough)."""
    r = ranks(rank_order(score, eligible))
    return (r < k.long().unsqueeze(-1)) & eligible


def noise_counter(state: DenoiseState) -> torch.Tensor:
    """[B] long: the counter keying this step's noise (the request's forward count, else the step)."""
    return state.nfe if state.nfe is not None else state.step


def propose_tokens(state: DenoiseState) -> torch.Tensor:
    """[B, L] long: one token per position, Gumbel-max at each row's temperature (argmax at 0);
    with ``state.rows``, proposals at the scored positions and the canvas token elsewhere."""
    tokens = sample_tokens(state.logits, state.temperature, state.seed, noise_counter(state), positions=state.rows)
    return tokens if state.rows is None else state.tokens.scatter(1, state.rows, tokens)


def token_confidence(state: DenoiseState, tokens: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] softmax probability of ``tokens`` [B, L] at every position a logits row scores
    (0 elsewhere: never a committable position). ``probs``: ``probabilities(state.logits)`` if the
    caller has them already."""
    if probs is None:
        return state.on_canvas(token_probability(state.logits, state.at_rows(tokens)))
    return state.on_canvas(probs.gather(-1, state.at_rows(tokens).unsqueeze(-1)).squeeze(-1))


def masked_count(state: DenoiseState) -> torch.Tensor:
    """[B] long: committable positions per sequence."""
    return state.masked.sum(dim=-1)


def floor_count(state: DenoiseState) -> torch.Tensor:
    """[B] long: ``min_commits`` for this state (>= 1 for every unfinished sequence)."""
    return min_commits(masked_count(state), state.step, state.steps)


def commit_top(
    state: DenoiseState, tokens: torch.Tensor, score: torch.Tensor, count: torch.Tensor,
    floor: torch.Tensor | None = None,
) -> StepResult:
    """Commit the ``max(count, floor)`` best-scored masked positions per row.

    ``floor`` defaults to ``min_commits``; a policy may pass a lower one only where its own count
    already guarantees the block ends within budget (Dream's exact schedule).
    """
    k = torch.maximum(count.long(), floor_count(state) if floor is None else floor.long())
    commit = top_k_mask(score, state.masked, k)
    return StepResult(commit=commit, tokens=tokens, confidence=score)  # proposals everywhere
