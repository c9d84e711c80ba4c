"""``dapd``: Dependency-Aware Parallel Decoding (Kim, Jeon, Jeon, No; arXiv 2603.12996, ICML 2026).

Self-attention among the still-masked positions induces a dependency graph over them; a step
unmasks a set of positions no two of which are strongly coupled. ``variant`` picks the algorithm:

``staged`` and ``direct``: the authors' ``dapd_staged`` / ``dapd_direct``, read in
their code (quasar529/DAPD, vendored in wyffffff/cora-diff-llada at a08ed01,
``llada/vendor_methods/dapd/generation.py`` and ``core.py``) and checked token for token against
a transcription of it (``tests/dapd_paper_reference.py``). One step, per request:

* Attention: softmax(q k^T / sqrt d) of the post-RoPE q, k over *all* keys (prompt + canvas),
  KV heads repeated for GQA, averaged over every head and over the last
  ``max(1, n - int(n * (1 - layer_ratio)))`` of the model's n layers (0.3: 10 of LLaDA-8B's 32);
  the model hook computes exactly that for the canvas x canvas corner (``DenoiseState.attention``).
* Dependency: ``(A + A^T) / 2``, zero diagonal, zero outside masked x masked of the active block.
  Edges are tested on a copy with each row divided by its max over the masked columns (clamped at
  1e-8); a position's degree is its row sum of the undivided matrix.
* Set: masked positions in descending order of ``degree / (max degree + 1e-8) * confidence /
  (max confidence + 1e-8)``; a position joins when its row-normalised dependency to every
  position already chosen is ``<= tau`` (its own row: the test is one-directional),
  ``tau = tau_min + (tau_max - tau_min) * progress``, ``progress = 1 - masked / canvas`` over the
  whole answer (later blocks' masks count as masked).
* ``direct``: masked positions with confidence ``>= 1.0`` are taken first and the set is grown
  from the rest. ``staged``: once ``progress >= 0.5``, every masked position with confidence
  ``>= 0.9`` is added to the set. Nothing taken: the single most confident masked position.
* No step budget: the authors loop until the block has no mask. Here a block has ``steps``
  forwards at most and every step commits at least ``ceil(masked / steps_left)``; with ``steps
  >= block_length`` (the engine's default ``steps`` is ``block_length``) that floor is at most 1,
  the authors' fallback, so their loop is reproduced exactly. A smaller ``steps`` tops the set
  up with the most confident masked positions.

Where the authors' loop is per batch (tau from the whole batch's masks, one top-1 fallback for
the whole batch, one block exit), ``dapd`` is per request: each request of a batch is decoded as
the authors' loop decodes it alone (their scripts run batch 1). Two more differences, both by
rounding only: the confidence maximum in the visit order is taken over the active block's masked
positions (the authors' is over the whole sequence, prompt included; the engine computes no prompt
logits), a positive per-row constant that does not change the order in exact arithmetic; and the
attention is averaged over heads and layers in one sum rather than per layer. Dream, which the
authors' code does not cover, runs the same rules on its shifted logits.

``tuned`` (the default, with ``conflict_bar`` 0.9): this project's construction from before the
authors' code was reachable (public summaries plus choices on ``benchmarks/dependency.py``'s dev
split; docs/DAPD_GRAPH.md). It reads only the fields below ``layer_ratio``:

* Layers (``attention_window``, ``attention_skip``): the last four layers, heads averaged.
* Scores (``renormalize``): each masked row's attention restricted to the masked keys of the
  active block and rescaled to sum to 1. Masks of later blocks are not nodes.
* Symmetrisation (``symmetric_mean``): ``(s + s^T) / 2``; ``max`` is the option.
* Edge (``relative_threshold``, ``edge_threshold``): ``s >= edge_threshold / M`` (M = masked
  positions), a quarter of the uniform share by default; an absolute cut is one flag away.
* Order (``order``): 1 = degree x confidence, 0 = confidence; a Welsh-Powell greedy maximal
  independent set (undirected edges).
* Tail (``tail_ratio``, ``tail_threshold``): below a masked fraction of 0.5 of the canvas, no
  graph, every position with confidence > 0.9.
* Sure positions (``safe_confidence``): masked positions with confidence >= 0.9 commit outright
  and are not graph nodes; with ``safe_edges`` (off by default) an unsure position linked to one
  of them waits a step (the carry rule, docs/DAPD_GRAPH.md).
* Cap (``max_per_step``, 0 = none); ``staged``/``stage_threshold``: gate the set by confidence
  (an earlier guess at "Staged", not the authors' rule).
* Step budget as above: a set below the floor is topped up with the most confident positions.

``conflict_bar`` (every variant; ours, not the authors'; 0.9 by default with ``tuned``, off by
default with ``staged`` and ``direct``): after the set is built, two
positions of it that propose the same token while either is below this confidence are linked, and
only the more confident of each such group commits (``drop_conflicts``; the same-token links of
``ieb``). Attention does not link a permutation's or a Latin row's cells while they are all
masked, so every variant otherwise commits two of them with the same symbol
(docs/DAPD_GRAPH.md, "Carry chains and exclusive choices").

Which variant is the default and why: README, Policies (measured with ``benchmarks/dependency.py``).
"""


from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping

import torch

from vllm_dapd.decoding.graph import (check_attention, dependency_graph, pair_mask, renormalize_over, same_token_links,
                                     symmetrize)
from vllm_dapd.decoding.independent_set import greedy_independent_set, top_up
from vllm_dapd.decoding.policy import DenoiseState, Policy, StepResult, check_int, check_logits, check_range
from vllm_dapd.decoding.registry import register_policy
from vllm_dapd.decoding.select import floor_count, propose_tokens, token_confidence


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
# ``variant``: the authors' two algorithms (quasar529/DAPD ``dapd_staged`` / ``dapd_direct``) and
# this project's earlier construction, kept as ``tuned``. Requests name them; Params store the index.
VARIANTS = ("staged", "direct", "tuned")
STAGED, DIRECT, TUNED = range(3)
DEFAULT_VARIANT = "tuned"  # chosen on the dependency benchmark (README, Policies)
# ``conflict_bar`` when a request does not set it: on for tuned (with the default, chosen on the
# dependency benchmark's dev split), off for the authors' variants (their algorithms, token for token).
DEFAULT_CONFLICT_BAR = {"staged": 0.0, "direct": 0.0, "tuned": 0.9}
PAPER_FIELDS = {"tau_min", "tau_max", "layer_ratio"}  # what staged/direct read; tuned reads the others
SHARED_FIELDS = {"conflict_bar"}  # read by every variant (our extension; default per variant: DEFAULT_CONFLICT_BAR)


def variant_index(value: object) -> int:
    """``variant`` as given (a name, or its index) -> its index; errors name the field."""
    if isinstance(value, str) and value.strip() in VARIANTS:
        return VARIANTS.index(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(VARIANTS):
        return value
    raise ValueError(f"variant: must be one of {', '.join(VARIANTS)}, got {value!r}")


def paper_layer_count(num_layers: int, layer_ratio: float) -> int:
    """How many last layers the authors average: ``max(1, n - int(n * (1 - layer_ratio)))``
    (0.3: 10 of LLaDA-8B's 32, 2 of a 4-layer model)."""
    return max(1, num_layers - int(num_layers * (1 - float(layer_ratio))))


@dataclass(frozen=True)
class DapdParams:
    # staged | direct (the authors' algorithms, which read only tau_min, tau_max, layer_ratio) or
    # tuned (the fields below); stored as the index into VARIANTS.
    variant: int | str = DEFAULT_VARIANT
    tau_min: float = 0.01  # paper: an edge where the row-normalised dependency exceeds tau, ...
    tau_max: float = 0.15  # ... tau = tau_min + (tau_max - tau_min) * progress (answer decoded)
    layer_ratio: float = 0.3  # paper: average the last max(1, n - int(n * (1 - ratio))) layers
    edge_threshold: float = 0.25  # edge where score >= this (x 1/M when relative_threshold)
    relative_threshold: bool = True  # threshold in units of the uniform share 1/M
    renormalize: bool = True  # scores = share of the row's attention to masked keys
    symmetric_mean: bool = True  # (s + s^T)/2 (the paper) instead of max(s, s^T)
    max_per_step: int = 0  # cap on the set (0 = none); the min_commits floor still applies
    staged: bool = False  # our earlier guess at "Staged" (not the authors' rule): gate the set by stage_threshold
    stage_threshold: float = 0.9
    order: int = ORDER_DEGREE  # greedy visit order: 0 confidence, 1 degree x confidence (paper)
    tail_ratio: float = 0.5  # below this masked fraction: no graph, commit confidence > tail_threshold
    tail_threshold: float = 0.9
    safe_confidence: float = 0.9  # masked positions this sure are committed outside the graph (1.0: off)
    attention_window: int = 4  # average the attention of this many layers ...
    attention_skip: int = 0  # ... ending this many layers before the last (0: up to the last layer)
    # Every variant (our extension, not the authors'; ieb's rule): two positions about to commit the
    # same token are linked when either is below this confidence; only the more confident one
    # commits (exclusive choices: a Latin row's symbols). 0.0: off. None: the variant's default,
    # DEFAULT_CONFLICT_BAR (0.9 for tuned, chosen on the dependency benchmark's dev split; off for
    # staged and direct, which stay the authors' algorithms unless a request sets it).
    conflict_bar: float | None = None
    # tuned (ours): an unsure position linked to a safe one (confidence >= safe_confidence, committed
    # outside the graph this step) waits instead of committing beside it. Off by default.
    safe_edges: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", variant_index(self.variant))
        if self.conflict_bar is None:
            object.__setattr__(self, "conflict_bar", DEFAULT_CONFLICT_BAR[VARIANTS[self.variant]])
        check_range("conflict_bar", self.conflict_bar, 0.0, 1.0)
        object.__setattr__(self, "conflict_bar", float(self.conflict_bar))
        coerce_fields(self)
        check_range("tau_min", self.tau_min, 0.0)
        check_range("tau_max", self.tau_max, 0.0)
        check_range("layer_ratio", self.layer_ratio, 0.0, 1.0, low_open=True)
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
        check_range("conflict_bar", self.conflict_bar, 0.0, 1.0)


def dapd_scores(attention: torch.Tensor, masked: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B, L, L] float: symmetric edge scores s_ij among ``masked`` positions (zero elsewhere and
    on the diagonal)."""
    renorm = params["renormalize"].bool().view(-1, 1, 1)
    scores = torch.where(renorm, renormalize_over(attention, masked), attention)
    scores = symmetrize(scores, params["symmetric_mean"].bool())
    return scores * pair_mask(masked).to(scores.dtype)


def edge_cut(masked: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B] float: the score an edge needs, ``edge_threshold`` (x 1/M with ``relative_threshold``)."""
    m = masked.sum(dim=-1).clamp_min(1).float()
    tau = params["edge_threshold"].float()
    return torch.where(params["relative_threshold"].bool(), tau / m, tau)


def dapd_graph(attention: torch.Tensor, masked: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B, L, L] bool: DAPD's undirected dependency graph among ``masked`` [B, L] positions
    (every masked position a node: no safe set)."""
    scores = dapd_scores(attention, masked, params)
    return dependency_graph(scores, masked, edge_cut(masked, params), symmetric=False)  # symmetric already


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
    accepts_row_subset = True
    needs_attention = True
    default_attention_layers = (-4, -3, -2, -1)  # = attention_layers(DapdParams())

    def make_params(self, overrides: Mapping[str, object] | None = None) -> DapdParams:
        """Validated Params; a setting the request's variant does not read is refused, naming it
        (``edge_threshold`` with ``staged`` would otherwise be silently ignored)."""
        params = super().make_params(overrides)
        given = set(overrides or {}) - {"variant"} - SHARED_FIELDS
        wrong = sorted(given & PAPER_FIELDS if params.variant == TUNED else given - PAPER_FIELDS)
        if wrong:
            reads = "tuned" if params.variant != TUNED else "staged and direct"
            raise ValueError(f"{wrong[0]}: a setting of dapd variant {reads} only; this request's variant is "
                             f"{VARIANTS[params.variant]!r}")
        return params

    def attention_layers(self, params: DapdParams, num_layers: int | None = None) -> tuple[int, ...]:
        """Paper variants: the last ``paper_layer_count(num_layers, layer_ratio)`` layers (all of
        them when the depth is unknown). Tuned: layers -(window + skip) .. -(skip + 1). Layers
        past the model's depth are dropped by the model hook."""
        if params.variant != TUNED:
            count = paper_layer_count(num_layers, params.layer_ratio) if num_layers else 1024  # unknown: all
            return tuple(range(-count, 0))
        return tuple(range(-(params.attention_window + params.attention_skip), -params.attention_skip))

    def step(self, state: DenoiseState, params: Mapping[str, torch.Tensor]) -> StepResult:
        check_logits(state.logits)
        bsz, length = state.tokens.shape
        params = {k: v.to(state.tokens.device) for k, v in params.items()}
        tokens = propose_tokens(state)  # [B, L]
        conf = token_confidence(state, tokens)  # [B, L]
        masked = state.masked
        if not bool(masked.any()):
            nothing = torch.zeros_like(masked)
            return StepResult(commit=nothing, tokens=tokens, confidence=conf)
        attention = check_attention(state.attention, bsz, length)
        paper = params["variant"] != TUNED  # [B]
        if bool(paper.all()):
            commit = paper_set(state, attention, conf, params)
        else:
            commit = tuned_set(state, attention, conf, params)
            if bool(paper.any()):
                commit = torch.where(paper.view(-1, 1), paper_set(state, attention, conf, params), commit)
        below = params["conflict_bar"]
        if bool((below > 0).any()):  # our extension: equal proposals may not commit together
            commit = top_up(drop_conflicts(commit & masked, tokens, conf, below), conf, masked, floor_count(state))
        return StepResult(commit=commit, tokens=tokens, confidence=conf)  # proposals everywhere


def paper_set(state: DenoiseState, attention: torch.Tensor, conf: torch.Tensor,
              params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B, L] bool: one step of the authors' ``dapd_staged`` / ``dapd_direct`` (quasar529/DAPD
    ``generation.py`` ``generate_dapd_with_blocks``, ``core.py``), per request. See the module
    docstring for each rule; ``min_commits`` tops the set up to the step budget's floor, which is
    their top-1 fallback when ``steps >= block_length``."""
    masked = state.masked
    bsz, length = masked.shape
    # Dependency among the active block's masks: (A + A^T) / 2, zero diagonal; edges are tested on
    # a copy normalised by each row's max over the masked columns (clamped at 1e-8).
    pair = masked.unsqueeze(2) & masked.unsqueeze(1)
    eye = torch.eye(length, dtype=torch.bool, device=masked.device)
    raw = ((attention + attention.transpose(1, 2)) / 2).masked_fill(eye, 0.0) * pair.float()
    norm = raw.masked_fill(~pair, float("-inf")).amax(dim=-1, keepdim=True)
    norm = torch.where(norm == float("-inf"), torch.ones_like(norm), norm).clamp_min(1e-8)
    dependency = raw / norm * pair.float()
    degree = raw.sum(dim=-1) * masked.float()
    # tau from the whole answer's progress (later blocks' masks count as remaining), in float64
    # as the reference's Python floats, compared in float32 as its tensor comparison.
    total = (state.canvas_length if state.canvas_length is not None
             else torch.full((bsz,), length, device=masked.device)).to(torch.float64)
    remaining = total - state.decoded.sum(dim=-1).to(torch.float64)
    progress = 1.0 - remaining / total.clamp_min(1)
    tau_min, tau_max = params["tau_min"].double(), params["tau_max"].double()
    tau = (tau_min + (tau_max - tau_min) * progress).float()
    variant = params["variant"].view(-1, 1)
    direct = masked & (conf >= 1.0) & (variant == DIRECT)
    candidates = masked & ~direct
    # Visit order: degree / (max degree + 1e-8) * confidence / (max confidence + 1e-8). The
    # reference takes the confidence max over the whole sequence (prompt included); the engine
    # computes no prompt logits, so here it is over the scored positions: a positive per-row
    # constant either way, which changes the order only through rounding.
    key = (degree / (degree.amax(dim=-1, keepdim=True) + 1e-8)) * (conf / (conf.amax(dim=-1, keepdim=True) + 1e-8))
    key = key * candidates.float()
    blocked = dependency > tau.view(-1, 1, 1)
    chosen = greedy_independent_set(blocked, key, candidates, directed=True) | direct
    # Staged: from half the answer decoded on, every masked position with confidence >= 0.9 joins.
    staged = (variant == STAGED) & (progress >= 0.5).view(-1, 1)
    chosen = chosen | (staged & masked & (conf >= 0.9))
    return top_up(chosen, conf, masked, floor_count(state))


def tuned_set(state: DenoiseState, attention: torch.Tensor, conf: torch.Tensor,
              params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B, L] bool: the ``tuned`` construction (this project's reading before the authors' code)."""
    masked = state.masked
    length = masked.shape[1]
    scores = dapd_scores(attention, masked, params)
    # A (near-)deterministic marginal is consistent with any joint: such positions commit
    # outright and are no graph nodes (the paper's appendix: probability 1 is always safe).
    safe = masked & (conf >= params["safe_confidence"].view(-1, 1)) & (params["safe_confidence"] < 1).view(-1, 1)
    nodes = masked & ~safe
    adjacency = dependency_graph(scores, nodes, edge_cut(masked, params), symmetric=False)
    # safe_edges (the carry rule): a safe position keeps its edges to the unsure ones, which then
    # wait a step (an addition's tens digit waits for the sure units digit it carries from).
    linked_to_safe = (dependency_graph(scores, masked, edge_cut(masked, params), symmetric=False)
                      & safe.unsqueeze(1)).any(dim=-1)
    nodes = nodes & ~(linked_to_safe & params["safe_edges"].bool().view(-1, 1))
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
    return top_up(chosen, conf, masked, floor_count(state))  # floor >= 1: the top one survives


def drop_conflicts(chosen: torch.Tensor, tokens: torch.Tensor, conf: torch.Tensor, below: torch.Tensor
                   ) -> torch.Tensor:
    """[B, L] bool: ``chosen`` [B, L] without the positions that propose the same token as a more
    confident chosen position while either of the two is below ``below`` [B] (0: off).

    Why: attention does not link exclusive choices (a Latin row's cells, a permutation's slots)
    while they are all masked, so DAPD's graph lets two of them commit the same symbol in one step
    (docs/DAPD_GRAPH.md, "Carry chains and exclusive choices"). Equal proposals are an edge of a
    second graph; the greedy independent set on it by confidence keeps the surest of each group.
    Confident repeats (a sorted list's equal digits) stay: both ends at least ``below``.
    """
    return greedy_independent_set(same_token_links(tokens, conf, chosen, below), conf, chosen)
