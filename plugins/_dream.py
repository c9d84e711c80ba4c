"""Shared step of Dream's three confidence algorithms (Dream ``generation_utils.py`` ``_sample``).

Not a policy itself (no registration); ``maskgit_plus``, ``margin`` and ``entropy`` differ only in
the confidence measure. Per step, as in Dream:

1. logits are divided by the temperature (when > 0); the token is a sample of that distribution
   (our Gumbel-max, the same law as Dream's ``Categorical``), argmax at temperature 0;
2. the confidence is measured on the tempered distribution;
3. the count is Dream's linear schedule ``int(masked * (1 - t[i+1]/t[i]))`` (all at the last
   step), floored by ``min_commits`` like every policy. That floor is ``ceil(masked / steps_left)``
   while Dream's count is the float32 ``int()`` just below it, so by default the Dream policies
   commit a little earlier than Dream. ``exact_schedule=True`` keeps Dream's counts unfloored, for
   token parity with ``diffusion_generate``: the one mode that may commit nothing at a step (Dream's
   count is 0 at the first step when ``steps == length``), as Dream does. The block still ends
   within its budget because Dream's last step commits everything;
4. positions are the top-``count`` by confidence, or, with ``alg_temp > 0``, a sample without
   replacement from ``softmax(confidence / alg_temp)`` over masked positions, drawn as
   Gumbel-top-k (same law as Dream's ``torch.multinomial`` without replacement).

Differences on purpose: Dream counts masks over the whole canvas and averages them over the batch;
we count each sequence's masks in its active block (batch-independent; equal with one block and
batch 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from vllm_dapd.decoding.policy import DenoiseState, StepResult, check_logits, check_range
from vllm_dapd.decoding.sampling import STREAM_ALG_TEMP, gumbel_noise
from vllm_dapd.decoding.schedule import dream_transfer_count
from vllm_dapd.decoding import select
from vllm_dapd.decoding.select import commit_top, masked_count, noise_counter, propose_tokens


@dataclass(frozen=True)
class DreamParams:
    eps: float = 1e-3  # end of Dream's linspace(1, eps) timesteps; in (0, 1)
    alg_temp: float = 0.0  # 0: top-k by confidence; > 0: sample positions from softmax(conf / alg_temp)
    exact_schedule: bool = False  # True: Dream's own counts, unfloored (parity mode; may idle a step)

    def __post_init__(self) -> None:
        check_range("eps", self.eps, 0.0, 1.0, low_open=True, high_open=True)
        check_range("alg_temp", self.alg_temp, 0.0)
        object.__setattr__(self, "eps", float(self.eps))
        object.__setattr__(self, "alg_temp", float(self.alg_temp))
        if not isinstance(self.exact_schedule, bool):
            raise ValueError(f"exact_schedule: must be true or false, got {self.exact_schedule!r}")


def dream_step(
    state: DenoiseState,
    params: Mapping[str, torch.Tensor],
    measure: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],  # (tempered logits, tokens) -> [B, L]
) -> StepResult:
    check_logits(state.logits)
    tokens = propose_tokens(state)  # [B, L]
    t = state.temperature.float()
    scale = torch.where(t > 0, t, torch.ones_like(t)).view(-1, 1, 1)
    score = state.on_canvas(measure(state.logits.float() / scale, state.at_rows(tokens))).to(torch.float64)  # [B, L]
    count = dream_transfer_count(masked_count(state), state.step, state.steps, params["eps"])
    alg_temp = params["alg_temp"].to(torch.float64)
    ranked = score
    if bool((alg_temp > 0).any()):
        g = gumbel_noise(state.seed, noise_counter(state), (score.shape[1],), STREAM_ALG_TEMP)
        hot = (alg_temp > 0).unsqueeze(1)
        ranked = torch.where(hot, score / torch.where(hot, alg_temp.unsqueeze(1), 1.0) + g, score)
    floor = None
    exact = params["exact_schedule"]
    if bool(exact.any()):
        floor = torch.where(exact, 0, select.floor_count(state))
    result = commit_top(state, tokens, ranked, count, floor)
    result.confidence = score
    return result
