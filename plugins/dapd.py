"""``dapd``: Dependency-Aware Parallel Decoding (Kim, Jeon, Jeon, No; arXiv 2603.12996, ICML 2026).

The method, from the paper's abstract and introduction (the only parts of it, and of the authors'
repository quasar529/DAPD, reachable when this was written): self-attention among the still-masked
positions induces a conditional dependency graph over them (an MRF); an edge marks a strong
interaction, a non-edge weak dependence; a step unmasks an *independent set* of that graph, so no
two strongly coupled positions are committed together.

Everything below the abstract is our choice, each one a parameter so a correction is one visible
change (the tests pin the defaults):

* Layers/heads: the last layer, heads averaged (``default_attention_layers = (-1,)``): one map is
  the cheapest the model hook can return; DAWN's last-4 average is one server option away.
* Scores (``renormalize``): each masked row's attention restricted to the masked keys of the active
  block and rescaled to sum to 1, i.e. the share of its "attention to unknowns" that goes to each
  unknown. The raw row is shared with the prompt and decoded context, so its scale drifts with
  prompt length and progress; the share does not. Masks of later blocks are not nodes, so the
  graph lives inside the block (one-block mode: the whole answer). The diagonal stays in the
  denominator (a row attending mostly to itself is weakly coupled). The price: a row that barely
  looks at masks at all has its few weak links inflated to large shares; ``renormalize = False``
  thresholds the raw scores instead (then use an absolute ``edge_threshold``).
* Symmetrisation: an MRF edge is undirected; ``max(s, s^T)`` by default (coupled if either side
  attends strongly, the cautious reading, like DAWN's ``edge | edge^T``), ``(s + s^T) / 2`` with
  ``symmetric_mean``.
* Edge threshold (``relative_threshold``, ``edge_threshold``): edge where the score is at least
  ``edge_threshold`` times the uniform share 1/M (M = masked positions of the row): "more coupled
  than average". A relative cut keeps the graph's density comparable from a fully masked 256-token
  canvas (1/M = 0.004) to its last few masks; an absolute cut on the share is one flag away.
  Uncalibrated against the paper: sweep it with the benchmark.
* Order: the greedy independent set visits masked positions by descending probability of the
  proposed token (ties: lowest position), the usual confidence of LLaDA/Fast-dLLM; the most
  confident position is therefore always committed.
* Cap (``max_per_step``, 0 = none): only the cap's most confident members of the set.
* Direct vs Staged: the authors' README (as quoted in PAPERS.md) reports Staged spending more
  steps than Direct at equal accuracy (GSM8K 1-block: 48.9 vs 34.0 NFE). We read Staged as a
  confidence gate on the set: only members with confidence >= ``stage_threshold`` are committed
  (the floor below keeps the most confident one when none passes). A guess consistent with that
  one number, nothing more.
* Step budget: at least ``min_commits`` = ceil(masked / steps_left) per step so a block ends within
  its budget; when the (capped, gated) set is smaller, it is topped up with the most confident
  remaining masked positions, which may be coupled to the set. That is the only way a DAPD commit
  is not independent, and only when the budget forces it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping

import torch

from vllm_dapd.decoding.confidence import token_probability
from vllm_dapd.decoding.graph import check_attention, dependency_graph, pair_mask, renormalize_over, symmetrize
from vllm_dapd.decoding.independent_set import greedy_independent_set, top_up
from vllm_dapd.decoding.policy import DenoiseState, Policy, StepResult, check_int, check_logits, check_range
from vllm_dapd.decoding.registry import register_policy
from vllm_dapd.decoding.select import floor_count, propose_tokens


def coerce_fields(params: object) -> None:
    """Validate field types of a frozen Params: floats become float (so stack_params makes float
    tensors even from ``2``), bools must be bools (or 0/1). Errors name the field."""
    for f in fields(params):
        value = getattr(params, f.name)
        if f.type in (bool, "bool"):
            if value not in (True, False) or isinstance(value, float):
                raise ValueError(f"{f.name}: must be true or false, got {value!r}")
            object.__setattr__(params, f.name, bool(value))
        elif f.type in (float, "float"):
            check_range(f.name, value)
            object.__setattr__(params, f.name, float(value))


ORDER_CONFIDENCE, ORDER_DEGREE = 0, 1


@dataclass(frozen=True)
class DapdParams:
    edge_threshold: float = 0.25  # edge where score >= this (x 1/M when relative_threshold)
    relative_threshold: bool = True  # threshold in units of the uniform share 1/M
    renormalize: bool = True  # scores = share of the row's attention to masked keys
    symmetric_mean: bool = True  # (s + s^T)/2 (the paper) instead of max(s, s^T)
    max_per_step: int = 0  # cap on the set (0 = none); the min_commits floor still applies
    staged: bool = False  # DAPD-Staged: gate the set by stage_threshold
    stage_threshold: float = 0.9
    order: int = ORDER_DEGREE  # greedy visit order: 0 confidence, 1 degree x confidence (paper)
    tail_ratio: float = 0.5  # below this masked fraction: no graph, commit confidence > tail_threshold
    tail_threshold: float = 0.9
    safe_confidence: float = 0.9  # masked positions this sure are committed outside the graph (1.0: off)
    attention_window: int = 4  # average the attention of this many layers ...
    attention_skip: int = 0  # ... ending this many layers before the last (0: up to the last layer)

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_range("edge_threshold", self.edge_threshold, 0.0)
        check_int("max_per_step", self.max_per_step, 0)
        check_range("stage_threshold", self.stage_threshold, 0.0, 1.0)
        check_int("order", self.order, 0)
        if self.order > ORDER_DEGREE:
            raise ValueError(f"order: must be 0 (confidence) or 1 (degree x confidence), got {self.order}")
        check_range("tail_ratio", self.tail_ratio, 0.0, 1.0)
        check_range("tail_threshold", self.tail_threshold, 0.0, 1.0)
        check_range("safe_confidence", self.safe_confidence, 0.0, 1.0)
        check_int("attention_window", self.attention_window, 1)
        check_int("attention_skip", self.attention_skip, 0)


def dapd_scores(attention: torch.Tensor, masked: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B, L, L] float: symmetric edge scores s_ij among ``masked`` positions (zero elsewhere and
    on the diagonal)."""
    renorm = params["renormalize"].bool().view(-1, 1, 1)
    scores = torch.where(renorm, renormalize_over(attention, masked), attention)
    scores = symmetrize(scores, params["symmetric_mean"].bool())
    return scores * pair_mask(masked).to(scores.dtype)


def dapd_graph(attention: torch.Tensor, masked: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B, L, L] bool: DAPD's undirected dependency graph among ``masked`` [B, L] positions."""
    scores = dapd_scores(attention, masked, params)
    m = masked.sum(dim=-1).clamp_min(1).to(scores.dtype)  # [B]
    tau = params["edge_threshold"].to(scores.dtype)
    cut = torch.where(params["relative_threshold"].bool(), tau / m, tau)
    return dependency_graph(scores, masked, cut, symmetric=False)  # scores are symmetric already


def dapd_priority(scores: torch.Tensor, conf: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """[B, L]: the greedy visit key, confidence or the paper's degree x confidence (Welsh-Powell,
    proxy degree d_i = sum_j s_ij over the masked positions), per row by ``order`` [B]."""
    degree = scores.sum(dim=-1)  # [B, L]; scores are zero off the masked pairs
    return torch.where(order.view(-1, 1) == ORDER_DEGREE, degree * conf, conf)


def in_tail(masked: torch.Tensor, decoded: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """[B] bool: the fraction of the canvas still masked, masked / (masked + decoded), is below
    ``ratio`` [B] (one block over the answer: the paper's mask ratio)."""
    total = (masked | decoded).sum(dim=-1).clamp_min(1).to(torch.float32)
    return masked.sum(dim=-1).to(torch.float32) / total < ratio.to(torch.float32)


@register_policy
class DapdPolicy(Policy):
    name = "dapd"
    Params = DapdParams
    needs_attention = True
    default_attention_layers = (-1,)

    def attention_layers(self, params: DapdParams) -> tuple[int, ...]:
        """Layers -(window + skip) .. -(skip + 1), counted from the last; those past the model's
        depth are dropped by the model hook."""
        return tuple(range(-(params.attention_window + params.attention_skip), -params.attention_skip))

    def step(self, state: DenoiseState, params: Mapping[str, torch.Tensor]) -> StepResult:
        check_logits(state.logits)
        bsz, length = state.tokens.shape
        params = {k: v.to(state.tokens.device) for k, v in params.items()}
        tokens = propose_tokens(state)  # [B, L]
        conf = token_probability(state.logits, tokens)  # [B, L]
        masked = state.masked
        if not bool(masked.any()):
            nothing = torch.zeros_like(masked)
            return StepResult(commit=nothing, tokens=tokens, confidence=conf)
        attention = check_attention(state.attention, bsz, length)

        scores = dapd_scores(attention, masked, params)
        m = masked.sum(dim=-1).clamp_min(1).to(scores.dtype)  # [B]
        tau = params["edge_threshold"].to(scores.dtype)
        cut = torch.where(params["relative_threshold"].bool(), tau / m, tau)
        # A (near-)deterministic marginal is consistent with any joint: such positions commit
        # outright and are no graph nodes (the paper's appendix: probability 1 is always safe).
        safe = masked & (conf >= params["safe_confidence"].view(-1, 1)) & (params["safe_confidence"] < 1).view(-1, 1)
        nodes = masked & ~safe
        adjacency = dependency_graph(scores, nodes, cut, symmetric=False)
        cap = params["max_per_step"].long()
        cap = torch.where(cap > 0, cap, torch.full_like(cap, length))
        priority = dapd_priority(scores, conf, params["order"])
        chosen = greedy_independent_set(adjacency, priority, nodes, cap) | safe
        if bool(params["staged"].any()):
            gated = chosen & (conf >= params["stage_threshold"].view(-1, 1))
            chosen = torch.where(params["staged"].bool().view(-1, 1), gated, chosen)
        # Tail (the paper's late switch): past the ratio, every position above tail_threshold.
        tail = in_tail(masked, state.decoded, params["tail_ratio"]).view(-1, 1)
        chosen = torch.where(tail, masked & (conf > params["tail_threshold"].view(-1, 1)), chosen)
        commit = top_up(chosen, conf, masked, floor_count(state))  # floor >= 1: the top one survives
        return StepResult(commit=commit, tokens=tokens, confidence=conf)  # proposals everywhere
