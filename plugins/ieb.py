"""``ieb``: independent set under an entropy budget, with same-token conflicts (this project's policy).

Not a published method and not DAPD: ours, built where the peers fail. On answers whose positions
are coupled through *which item goes where* (a permutation, a Latin-square row) two masked positions
often have the same marginal, so both propose the same token; attention need not link them, and
``dapd``/``threshold``/``eb`` then commit a repeated item. One step:

1. Graph: DAPD's attention dependency graph among the masked positions of the active block
   (``plugins/dapd.py`` ``dapd_graph``, same parameters and defaults: edge where the
   renormalised, max-symmetrised share is >= ``edge_threshold`` x 1/M).
2. Same-token conflicts: two masked positions proposing the same token are linked too when either
   is uncertain (confidence, the proposed token's probability, < ``conflict_bar``). Two confident
   copies (a sorted list's repeated digit) stay unlinked, so legitimate repeats still go together;
   ``conflict_bar = 0`` turns the rule off.
3. Independent set: the greedy one in confidence order over that graph
   (``independent_set.greedy_independent_set``), so no two committed positions are linked.
4. Entropy budget: only the longest confidence-ordered prefix of the set with
   ``sum H - max H <= gamma`` (EB-Sampler's bound, Ben-Hamu et al. 2025, ``plugins/eb.py``; H = entropy
   of the position's distribution in nats, from the confidence's softmax: ``softmax_entropy``,
   within 5e-5 nats + 5e-4 relative), so a step never commits many uncertain positions even
   when they are mutually unlinked. The most confident position always passes.
5. Floor: at least ``min_commits`` = ceil(masked / steps_left), topped up with the most confident
   remaining masked positions (which may break 2-4; only when the budget forces it, as in ``dapd``).

Defaults: the graph's are DAPD's (``dapd`` documents them); ``conflict_bar = 0.9`` is Fast-dLLM's
threshold, "confident" in the sense the baselines use; ``gamma = 1.0`` nats is EB's cheapest
lossless point on the demo model's tasks (README results) and, with the graph doing most of the
separating, a guard against committing several near-uniform positions at once. Tune both with the
benchmarks. Measured on the demo model (200 test items per task, reference loop; it has no
permutation task, so this checks only that nothing is lost): defaults 100% on every task at 5.37
forwards per 10-token answer (one per step: 10; ``dapd`` defaults: 100% at 5.10); at
``edge_threshold=2`` 100% at 3.49. On an exact permutation oracle (6 items, uniform conditionals
tilted per position, attention to self only: ``tests/decoding/test_ieb.py`` ``PermutationLM``,
100 seeds) ``ieb`` decodes a permutation every time, at 5.48 forwards with ``gamma=1`` and 2.46
with no budget (``dapd``: 0/100 at 1 forward; ``eb`` gamma 1: 52/100 at 5.0; ``threshold``,
``dawn``, ``localleap``, ``klass``: 100/100 at 6): the budget is the conservative part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from vllm_dapd.decoding.confidence import softmax_entropy
from vllm_dapd.decoding.graph import check_attention, same_token_links
from vllm_dapd.decoding.independent_set import greedy_independent_set, top_up
from vllm_dapd.decoding.policy import DenoiseState, Policy, StepResult, check_logits, check_range
from vllm_dapd.decoding.registry import register_policy
from vllm_dapd.decoding.select import floor_count, propose_tokens, rank_order, ranks, token_confidence
from vllm_dapd.plugins.dapd import coerce_fields, dapd_graph
from vllm_dapd.plugins.eb import entropy_bounded_count


@dataclass(frozen=True)
class IebParams:
    edge_threshold: float = 1.0  # DAPD graph: edge where score >= this (x 1/M when relative_threshold)
    relative_threshold: bool = True
    renormalize: bool = True
    symmetric_mean: bool = False
    conflict_bar: float = 0.9  # same token links two positions when either is below this; in [0, 1]
    gamma: float = 1.0  # entropy budget per step (nats): sum H - max H of the set; >= 0

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_range("edge_threshold", self.edge_threshold, 0.0)
        check_range("conflict_bar", self.conflict_bar, 0.0, 1.0)
        check_range("gamma", self.gamma, 0.0)


def conflict_graph(adjacency: torch.Tensor, tokens: torch.Tensor, conf: torch.Tensor, masked: torch.Tensor,
                   bar: torch.Tensor) -> torch.Tensor:
    """[B, L, L] bool: ``adjacency`` plus same-token pairs of ``masked`` positions where either
    confidence is below ``bar`` [B] (step 2)."""
    return adjacency | same_token_links(tokens, conf, masked, bar)


def budget_prefix(chosen: torch.Tensor, conf: torch.Tensor, ent: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the longest confidence-ordered prefix of ``chosen`` with sum H - max H <= gamma."""
    order = rank_order(conf, chosen)
    count = entropy_bounded_count(ent, order, chosen, gamma)
    return chosen & (ranks(order) < count.unsqueeze(1))


@register_policy
class IebPolicy(Policy):
    name = "ieb"
    Params = IebParams
    accepts_row_subset = True
    needs_attention = True
    default_attention_layers = (-1,)

    def step(self, state: DenoiseState, params: Mapping[str, torch.Tensor]) -> StepResult:
        check_logits(state.logits)
        bsz, length = state.tokens.shape
        params = {k: v.to(state.tokens.device) for k, v in params.items()}
        tokens = propose_tokens(state)  # [B, L]
        probs, ent = softmax_entropy(state.logits)  # one softmax for the confidence and the entropy
        conf = token_confidence(state, tokens, probs)  # [B, L], as dapd ranks
        masked = state.masked
        if not bool(masked.any()):
            return StepResult(commit=torch.zeros_like(masked), tokens=tokens, confidence=conf)
        attention = check_attention(state.attention, bsz, length)
        graph = conflict_graph(dapd_graph(attention, masked, params), tokens, conf, masked, params["conflict_bar"])
        chosen = greedy_independent_set(graph, conf, masked)  # holds the most confident position
        chosen = budget_prefix(chosen, conf, state.on_canvas(ent), params["gamma"])
        commit = top_up(chosen, conf, masked, floor_count(state))
        return StepResult(commit=commit, tokens=tokens, confidence=conf)
