"""``klass``: KL-Adaptive Stability Sampling (KLASS): commit positions whose prediction is both
confident and stable across forwards.

Source: lizhuo-luo/DAWN ``llada/generate.py`` ``generate_klass`` (its docstring: "reference:
https://github.com/shkim0116/KLASS"; run there as a baseline of the DAWN paper, arXiv 2602.06953),
alg ``klass``, ``unmask_strategy="all"``. One step, per sequence:

1. ``p`` = softmax of the logits at every canvas position; token = argmax, confidence = its
   probability; ``KL(p || p_prev)`` against the previous forward's distribution (``+1e-12`` inside
   both logs, float64, as the reference);
2. *stable*: the last ``kl_history`` KL values (this forward's included) are all
   ``< kl_threshold`` and the step index within the block is ``>= kl_history - 1``;
3. *ready*: masked in the active block, stable and confidence ``> conf_threshold`` (strict);
4. any ready position: commit all of them; none: the most confident masked positions, as many as
   LLaDA's fixed schedule gives this step (``block_size // steps``, one more in the first
   ``block_size % steps`` steps).

Defaults are the reference function's (``conf_threshold=0.6, kl_threshold=0.015,
kl_history_length=2``; DAWN's LLaDA scripts also run 0.7/0.9 and 0.01, its Dream scripts 0.9 and
0.001-0.005). The state across forwards (``p_prev`` and, instead of the reference's window of KL
values, the count of consecutive forwards with KL under the bar: the same test) travels in
``StepResult.memory``: both loops keep it per request, across blocks, as the reference keeps its
buffers. Its cost: one float32 ``[gen_length, V]`` tensor per request (the reference keeps float64).

Where we differ, and why:
* the ``min_commits`` floor (most confident remaining positions) so a block ends within its budget.
  The reference can end a block with masks left (ready steps may commit fewer than the schedule);
  with one step per token (its evaluation setting) every step commits >= 1 and the floor is 1;
* the fallback never picks an unmasked position (the reference's ``topk`` does when the schedule
  asks for more positions than are masked, and overwrites decoded tokens);
* temperature > 0: tokens are Gumbel-max samples and ``p`` is the unscaled softmax (the reference
  takes the softmax of its Gumbel-perturbed scores); equal at temperature 0;
* engine cache modes ``prefix``/``dual`` compute no logits for cached rows, so ``p_prev`` of a
  position is its distribution at the last forward that scored it; mode ``none`` (and the reference
  loop) scores every position every forward, as the reference;
* DAWN's Dream copy (``dream/model/generation_utils.py``, alg ``klass``) falls back to one position
  and uses ``>=``; the LLaDA version is the one reproduced here.
Parity: ``tests/decoding/test_klass.py``, against a transcription of ``generate_klass``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from vllm_dapd.decoding.confidence import probabilities
from vllm_dapd.decoding.independent_set import top_up
from vllm_dapd.decoding.policy import DenoiseState, Policy, StepResult, check_int, check_logits, check_range
from vllm_dapd.decoding.registry import register_policy
from vllm_dapd.decoding.schedule import llada_transfer_count
from vllm_dapd.decoding.select import floor_count, masked_count, propose_tokens, top_k_mask

_EPS = 1e-12  # the reference's epsilon inside the KL's logs


@dataclass(frozen=True)
class KlassParams:
    conf_threshold: float = 0.6  # ready only when confidence > this; in [0, 1]
    kl_threshold: float = 0.015  # stable when KL(p || p_prev) < this for kl_history forwards; >= 0
    kl_history: int = 2  # forwards the KL must stay under the bar (the reference's kl_history_length)

    def __post_init__(self) -> None:
        check_range("conf_threshold", self.conf_threshold, 0.0, 1.0)
        check_range("kl_threshold", self.kl_threshold, 0.0)
        check_int("kl_history", self.kl_history, 1)
        object.__setattr__(self, "conf_threshold", float(self.conf_threshold))
        object.__setattr__(self, "kl_threshold", float(self.kl_threshold))


def kl_divergence(probs: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """[B, L] float64 ``sum p (log(p + eps) - log(p_prev + eps))``, the reference's formula."""
    p, q = probs.double(), prev.double()
    return (p * (torch.log(p + _EPS) - torch.log(q + _EPS))).sum(dim=-1)


def schedule_count(state: DenoiseState) -> torch.Tensor:
    """[B] long: LLaDA's fixed count for this step of the block (stateless estimate without block_size)."""
    if state.block_size is None:
        return llada_transfer_count(masked_count(state), state.step, state.steps)
    size, steps = state.block_size.long(), state.steps.long().clamp_min(1)
    return size // steps + (state.step.long() < size % steps).long()


@register_policy
class KlassPolicy(Policy):
    name = "klass"
    Params = KlassParams

    def step(self, state: DenoiseState, params: Mapping[str, torch.Tensor]) -> StepResult:
        check_logits(state.logits)
        p = {k: v.to(state.tokens.device) for k, v in params.items()}
        tokens = propose_tokens(state)  # [B, L]
        probs = probabilities(state.logits)  # [B, L, V] float32
        conf = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        mem = state.memory
        run = torch.zeros_like(state.tokens)
        kl = torch.full(conf.shape, float("inf"), dtype=torch.float64, device=conf.device)
        if mem is not None:
            present = mem["present"].view(-1, 1)
            kl = torch.where(present, kl_divergence(probs, mem["probs"]), kl)
            run = torch.where(present, mem["stable_run"], run)
        run = torch.where(kl < p["kl_threshold"].double().view(-1, 1), run + 1, torch.zeros_like(run))
        history = p["kl_history"].long().view(-1, 1)
        stable = (run >= history) & (state.step.view(-1, 1) >= history - 1)
        ready = state.masked & stable & (conf > p["conf_threshold"].to(conf.dtype).view(-1, 1))
        fallback = torch.where(ready.any(dim=-1), 0, schedule_count(state))
        chosen = ready | top_k_mask(conf, state.masked, fallback)
        commit = top_up(chosen, conf, state.masked, floor_count(state))
        return StepResult(commit=commit, tokens=tokens, confidence=conf,
                          memory={"probs": probs, "stable_run": run})
