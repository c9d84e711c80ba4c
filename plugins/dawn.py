"""``dawn``: DAWN, Dependency-Aware Fast Inference for Diffusion LLMs (Luo et al., arXiv 2602.06953).

Read from the authors' code (github lizhuo-luo/DAWN: llada/generate.py ``get_transfer_index_dawn``,
llada/gdllm_utils.py, dream/model/generation_utils.py ``_sample_block`` alg ``dawn``); one step:

1. Graph: attention averaged over heads and the last 4 layers (their hard-coded ids >= 28 of
   LLaDA-8B's 32 and >= 24 of Dream-7B's 28, i.e. ``default_attention_layers = (-4, ..., -1)``);
   key columns that are attention sinks are zeroed, the diagonal ignored; ``i -> j`` (i depends
   on j) where the averaged attention is >= ``tau_edge`` (0.07). Raw scores, not renormalised,
   as in the code (rows are normalised over all keys, prompt included, as there).
2. Confident: every masked position whose proposed token has probability >= ``tau_high`` (0.9).
3. Anchors: decoded positions whose current token the model re-predicts with probability
   >= ``tau_anchor`` (0.9); a masked position with an edge to an anchor is committed when its
   confidence is >= ``tau_induce`` (0.7, LLaDA's default; Dream's code defaults to 0.9).
4. Conflicts: the remaining masked positions with confidence >= ``tau_low`` (0.7) get a greedy
   independent set by confidence in the symmetrised graph, committed too.
5. Nothing chosen: the single most confident masked position.

Where we differ, and why:

* Sinks (``sink_ratio``, the default): DAWN flags key j when its mean incoming attention over all
  queries exceeds an absolute ``tau_sink`` (0.01 in its LLaDA scripts, 0.03 in its Dream ones).
  The mean key gets 1/T (T keys), so below T = 100 every key is a sink and the graph is empty
  (seen running DAWN's gdllm_utils.py on short prompts). We flag keys above ``sink_ratio`` x the
  mean key's incoming attention over the canvas (``graph.attention_sinks``); 10 is DAWN's 0.01 at
  its GSM8K 5-shot length (T ~ 1000).
  Statistics run over canvas positions that are masked in the active block or decoded, since
  ``DenoiseState.attention`` holds canvas rows and columns only. ``tau_sink > 0`` is DAWN's rule
  exactly (``graph.absolute_sinks``): the loops then also compute the prompt's (and a suffix's)
  query rows for ``DenoiseState.key_attention``, in cache mode ``none`` only (other modes never
  compute the cached positions' queries: the request is refused naming ``tau_sink``).
* Anchors come from the canvas only (prompt keys are not in ``DenoiseState.attention``; DAWN also
  lets prompt tokens anchor), and the anchor test uses the probability of the token actually
  committed there (``state.tokens``), where DAWN re-reads the argmax's probability.
* Conflict candidates touch none of the already chosen positions (steps 2-3) in the symmetrised
  graph, the README's "avoid strongly coupled positions". The code's filter keeps only positions
  that attend to a node both confident and induced, likely a slip; ``conflict_with_chosen = False``
  drops the filter instead. The code runs the conflict step only when every row of the batch has a
  candidate and then pads the set with non-candidates (its greedy loop runs K times): per row and
  exact here.
* The step budget: at least ``min_commits`` = ceil(masked / steps_left) per step, topped up with
  the most confident remaining masked positions. It is >= 1 while masks remain, so it is also
  step 5. DAWN runs with a budget of one step per token, so beyond that it rarely binds; rows
  with nothing masked commit nothing (the code forces position 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple

import torch

from vllm_dapd.decoding.confidence import probabilities
from vllm_dapd.decoding.graph import absolute_sinks, attention_sinks, check_attention, dependency_graph, drop_keys
from vllm_dapd.decoding.independent_set import greedy_independent_set, top_up
from vllm_dapd.decoding.policy import DenoiseState, Policy, StepResult, check_logits, check_range
from vllm_dapd.decoding.registry import register_policy
from vllm_dapd.decoding.select import floor_count, propose_tokens, token_confidence
from vllm_dapd.plugins.dapd import coerce_fields


@dataclass(frozen=True)
class DawnParams:
    sink_ratio: float = 10.0  # sink: mean incoming attention > ratio x the mean key's
    tau_sink: float = 0.0  # > 0: DAWN's absolute rule instead (mean over all queries > tau_sink; mode none)
    tau_edge: float = 0.07  # edge i -> j where attention[i, j] >= tau_edge
    tau_high: float = 0.9  # commit outright
    tau_anchor: float = 0.9  # a decoded position anchors when its token's probability >= this
    tau_induce: float = 0.7  # relaxed bar for masked positions linked to an anchor
    tau_low: float = 0.7  # bar for conflict-scheduled candidates
    conflict_with_chosen: bool = True  # candidates must not touch the confident/induced ones

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_range("sink_ratio", self.sink_ratio, 0.0, low_open=True)
        for name in ("tau_sink", "tau_edge", "tau_high", "tau_anchor", "tau_induce", "tau_low"):
            check_range(name, getattr(self, name), 0.0, 1.0)


class DawnSets(NamedTuple):
    """One step's pieces (all [B, L] bool but ``edges``), exposed for tests and traces."""

    edges: torch.Tensor  # [B, L, L] bool; i -> j: i depends on j (sinks removed)
    confident: torch.Tensor  # masked, confidence >= tau_high
    induced: torch.Tensor  # masked, linked to an anchor, confidence >= tau_induce
    scheduled: torch.Tensor  # the conflict-free set among the remaining candidates


def dawn_sets(state: DenoiseState, params: Mapping[str, torch.Tensor], conf: torch.Tensor,
              reread: torch.Tensor, attention: torch.Tensor) -> DawnSets:
    """Steps 1-4 of the module docstring for a batch; ``conf``/``reread``: [B, L] probabilities of
    the proposed tokens and of the tokens on the canvas."""
    p = {k: v.to(conf.device).view(-1, 1) for k, v in params.items()}  # [B, 1] each
    masked = state.masked
    # 1. Sparse directed graph among canvas positions, sinks removed (i -> j: i attends to j).
    valid = masked | state.decoded
    sinks = attention_sinks(attention, valid, p["sink_ratio"].squeeze(1))
    absolute = p["tau_sink"] > 0  # [B, 1]
    if bool(absolute.any()):
        if state.key_attention is None:
            raise ValueError("key_attention: tau_sink > 0 needs DenoiseState.key_attention (every query's "
                             "attention), got None")
        sinks = torch.where(absolute, absolute_sinks(state.key_attention, p["tau_sink"].squeeze(1)), sinks)
    attention = drop_keys(attention, sinks)
    edges = dependency_graph(attention, valid, p["tau_edge"].squeeze(1), symmetric=False)  # [B, L, L]
    # 2-3. Confident positions, and positions induced by confident anchors.
    confident = masked & (conf >= p["tau_high"])
    anchors = state.decoded & (reread >= p["tau_anchor"])
    linked = (edges & anchors.unsqueeze(1)).any(dim=-1)  # [B, L]: has an edge to an anchor
    induced = masked & linked & (conf >= p["tau_induce"])
    chosen = confident | induced
    # 4. Conflict-based scheduling among the rest.
    conflict = edges | edges.transpose(1, 2)
    touches = (conflict & chosen.unsqueeze(1)).any(dim=-1) & p["conflict_with_chosen"].bool()
    candidates = masked & ~chosen & ~touches & (conf >= p["tau_low"])
    scheduled = greedy_independent_set(conflict, conf, candidates)
    return DawnSets(edges, confident, induced, scheduled)


@register_policy
class DawnPolicy(Policy):
    name = "dawn"
    Params = DawnParams
    needs_attention = True
    default_attention_layers = (-4, -3, -2, -1)
    accepts_row_subset = True  # the active block's masked rows ...
    reads_decoded_rows = True  # ... and the decoded ones (anchors)

    def key_attention_setting(self, params: DawnParams) -> str | None:
        return "tau_sink" if params.tau_sink > 0 else None

    def step(self, state: DenoiseState, params: Mapping[str, torch.Tensor]) -> StepResult:
        check_logits(state.logits)
        bsz, length = state.tokens.shape
        tokens = propose_tokens(state)  # [B, L]
        # One softmax serves both reads: the proposal's probability and the committed token's.
        current = torch.where(state.decoded, state.tokens, tokens)  # [B, L]
        probs = probabilities(state.logits)  # [B, rows, V]
        conf = token_confidence(state, tokens, probs)  # [B, L]
        reread = token_confidence(state, current, probs)  # [B, L]: 0 where no row (not an anchor)
        del probs
        masked = state.masked
        if not bool(masked.any()):
            return StepResult(commit=torch.zeros_like(masked), tokens=tokens, confidence=conf)
        attention = check_attention(state.attention, bsz, length)

        sets = dawn_sets(state, params, conf, reread, attention)
        chosen = sets.confident | sets.induced | sets.scheduled
        # 5. The step-budget floor (>= 1 while masks remain) is also DAWN's fallback: an empty
        # choice becomes the single most confident masked position.
        commit = top_up(chosen, conf, masked, floor_count(state))
        return StepResult(commit=commit, tokens=tokens, confidence=conf)  # proposals everywhere
