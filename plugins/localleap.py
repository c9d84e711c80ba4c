"""``localleap``: LocalLeap, a confidence threshold relaxed next to confident anchors.

Source: lizhuo-luo/DAWN ``llada/generate.py`` ``get_transfer_index_localleap`` (its docstring
credits github shkim0116/KLASS; the same rule is ``get_transfer_index_localleap`` in DAWN's
``dream/model/generation_utils.py``), run there as a baseline of the DAWN paper (arXiv 2602.06953).
One step, per sequence:

1. rank the masked positions of the active block by the probability of the proposed token;
2. *anchors*: masked positions with confidence >= ``threshold``; every position within
   ``radius`` (canvas distance, both sides, the anchor itself included) of an anchor is a
   *neighbour*;
3. commit the most confident position always, and every other masked position whose confidence
   is >= its bar: ``relaxed_threshold`` for a neighbour, ``threshold`` elsewhere (with no anchor,
   the plain ``threshold`` rule of Fast-dLLM).

Defaults are the reference's LLaDA settings (``threshold=0.9, relaxed_threshold=0.75, radius=4``
in DAWN's ``llada/eval_instruct.sh``; its Dream scripts use ``relaxed_threshold=0.8``). Like the
reference, a neighbour's bar is the relaxed one even when that is *higher* than ``threshold``.
Ours on top: the ``min_commits`` floor (most confident remaining positions), so a block ends
within its step budget; the reference loops until the block is done (with a budget of one step
per token the floor is 1 and the two agree). Confidence is the unscaled softmax of LLaDA's code
(float32 here, float64 there); Dream's copy reads it from the tempered distribution (equal at
temperature 0). Parity: ``tests/decoding/test_reference_parity.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from vllm_dapd.decoding.independent_set import top_up
from vllm_dapd.decoding.policy import DenoiseState, Policy, StepResult, check_int, check_logits, check_range
from vllm_dapd.decoding.registry import register_policy
from vllm_dapd.decoding.select import floor_count, propose_tokens, token_confidence, top_k_mask


@dataclass(frozen=True)
class LocalLeapParams:
    threshold: float = 0.9  # anchor bar, and the bar away from anchors; in [0, 1]
    relaxed_threshold: float = 0.75  # bar within ``radius`` of an anchor; in [0, 1]
    radius: int = 4  # neighbourhood half-width in canvas positions; >= 0

    def __post_init__(self) -> None:
        check_range("threshold", self.threshold, 0.0, 1.0)
        check_range("relaxed_threshold", self.relaxed_threshold, 0.0, 1.0)
        check_int("radius", self.radius, 0)
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "relaxed_threshold", float(self.relaxed_threshold))


def near_anchors(anchors: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: positions within ``radius[b]`` of an anchor (a windowed count via cumsum)."""
    length = anchors.shape[-1]
    pos = torch.arange(length, device=anchors.device).unsqueeze(0)  # [1, L]
    r = radius.long().view(-1, 1)
    csum = torch.nn.functional.pad(anchors.long().cumsum(dim=-1), (1, 0))  # [B, L+1]; csum[k] = sum of first k
    hi = (pos + r + 1).clamp(max=length)
    lo = (pos - r).clamp(min=0)
    return (csum.gather(-1, hi) - csum.gather(-1, lo)) > 0


def localleap_chosen(conf: torch.Tensor, masked: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B, L] bool: steps 2-3 of the module docstring (without the floor)."""
    thr = params["threshold"].to(conf.dtype).view(-1, 1)
    relaxed = params["relaxed_threshold"].to(conf.dtype).view(-1, 1)
    anchors = masked & (conf >= thr)
    bar = torch.where(near_anchors(anchors, params["radius"]), relaxed, thr)
    return (masked & (conf >= bar)) | top_k_mask(conf, masked, torch.ones_like(masked[:, 0], dtype=torch.long))


@register_policy
class LocalLeapPolicy(Policy):
    name = "localleap"
    Params = LocalLeapParams
    accepts_row_subset = True

    def step(self, state: DenoiseState, params: Mapping[str, torch.Tensor]) -> StepResult:
        check_logits(state.logits)
        params = {k: v.to(state.tokens.device) for k, v in params.items()}
        tokens = propose_tokens(state)
        conf = token_confidence(state, tokens)  # [B, L]
        chosen = localleap_chosen(conf, state.masked, params)
        commit = top_up(chosen, conf, state.masked, floor_count(state))
        return StepResult(commit=commit, tokens=tokens, confidence=conf)
