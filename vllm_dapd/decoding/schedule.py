"""How many masked positions a step commits: LLaDA's even split, Dream's linear schedule, and the floor.

All functions are batched over ``[B]`` (each sequence may have its own mask count and budget).

* LLaDA (ML-GSAI/LLaDA ``generate.py`` ``get_num_transfer_tokens``): a block's ``M`` masks are
  split evenly over its ``S`` steps, the remainder ``M % S`` going one each to the first steps.
  Stateless form: committing ``ceil(masked_left / steps_left)`` at every step reproduces that table
  exactly (``llada_transfer_count``), so a policy needs no per-request schedule state.
* Dream (``generation_utils.py`` ``_sample``, algs ``maskgit_plus``/``topk_margin``/``entropy``):
  ``timesteps = linspace(1, eps, steps + 1)`` in float32; step ``i`` commits
  ``int(masked * (1 - t[i+1] / t[i]))`` and the last step commits every remaining mask. Kept in
  float32 on purpose: with ``steps == masks`` it commits 0 at the first step and 2 at the last
  (measured against Dream's generation_utils.py on CPU).
* ``min_commits``: the floor ``ceil(masked / max(steps - step, 1))`` that every policy respects, so
  every unfinished sequence progresses and a block always finishes within its step budget.
"""

from __future__ import annotations

import torch


def llada_transfer_counts(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps] long: LLaDA's per-step commit counts for blocks with ``masked_count`` [B] masks."""
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    m = masked_count.long().unsqueeze(1)  # [B, 1]
    i = torch.arange(steps, device=m.device).unsqueeze(0)  # [1, S]
    return m // steps + (i < m % steps).long()


def llada_transfer_count(masked_count: torch.Tensor, step: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[B] long: this step's LLaDA count, stateless: ``ceil(masked / (steps - step))``.

    Over a whole block (committing exactly this many each step) it equals the row of
    ``llada_transfer_counts`` at index ``step``. Past the budget (``step >= steps``) it asks for all.
    """
    left = (steps.long() - step.long()).clamp_min(1)
    m = masked_count.long().clamp_min(0)
    return (m + left - 1) // left


def min_commits(masked_count: torch.Tensor, step: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[B] long: the fewest positions a policy must commit now so the block ends within ``steps``.

    ``ceil(masked / max(steps - step, 1))``; 0 when nothing is masked, >= 1 otherwise.
    """
    return llada_transfer_count(masked_count, step, steps)


def dream_timesteps(steps: int, eps: float = 1e-3) -> torch.Tensor:
    """[steps + 1] float32 ``linspace(1, eps)``, exactly Dream's (float32 rounding included)."""
    return torch.linspace(1, eps, steps + 1, dtype=torch.float32)


def dream_transfer_count(
    masked_count: torch.Tensor,  # [B] masks left (Dream: the whole canvas; here: the active block)
    step: torch.Tensor,  # [B] steps already taken
    steps: torch.Tensor,  # [B] step budget
    eps: torch.Tensor | float = 1e-3,  # [B] or scalar
) -> torch.Tensor:
    """[B] long: Dream's count ``int(masked * (1 - t[i+1] / t[i]))``, all remaining at the last step.

    The float32 timesteps come from ``torch.linspace`` itself (one call per distinct (steps, eps)
    pair in the batch, usually one) because its rounding is what Dream's schedule is.
    Steps past the budget count as the last step.
    """
    device = masked_count.device
    masked = masked_count.long()
    step = step.long()
    steps = steps.long().clamp_min(1)
    eps_t = torch.as_tensor(eps, dtype=torch.float32, device=device).expand(masked.shape)
    ratio = torch.ones(masked.shape, dtype=torch.float32, device=device)  # s / t per row
    i = step.clamp(max=steps - 1)
    pairs = torch.stack([steps.to(torch.float64), eps_t.to(torch.float64)], dim=1)
    for s_val, e_val in torch.unique(pairs, dim=0).tolist():  # distinct budgets, not sequences
        rows = (steps == int(s_val)) & (eps_t.to(torch.float64) == e_val)
        ts = torch.linspace(1, e_val, int(s_val) + 1, dtype=torch.float32, device=device)
        ratio = torch.where(rows, ts[(i + 1).clamp(max=int(s_val))] / ts[i.clamp(max=int(s_val) - 1)], ratio)
    count = (masked.to(torch.float32) * (1 - ratio)).floor().long()
    return torch.where(step >= steps - 1, masked, count).clamp_min(0)
