"""Likelihood of a continuation under a masked diffusion LM: Monte Carlo ELBO and a greedy check.

A masked diffusion LM has no left-to-right token probabilities; what it has is a bound. For a
sequence ``x`` whose first ``c`` tokens are given (the context) and whose ``L = N - c`` last tokens
are scored (the continuation), LLaDA (Nie et al. 2025, Eq. 6 and Appendix B.5; ML-GSAI/LLaDA
``get_log_likelihood.py``) estimates

    ELBO(c) = E_{l ~ U{1..L}} E_{S subset of [c, N), |S| = l} [ (L / l) sum_{j in S} log p(x_j | x with S masked) ]

which is <= log p(x[c:] | x[:c]) for the model's own random-order sampler (the expectation equals
the mean over orders of the any-order autoregressive log-likelihood; Jensen gives the bound).
Dream (DreamLM/Dream ``eval/eval.py``, ``_eval_target_nll_mc``) masks each continuation token
independently with probability ``p = (1 - eps) t + eps``, ``t ~ U(0, 1)``, weight ``1 / p``; with
``eps = 0`` its expectation is the same ELBO (both weight a masked set of size k by
(k-1)! (L-k)! / L!). Dream's logits are shifted (row j scores token j + 1): ``model.logits_shift``.

Randomness: every sample k draws one uniform ``v_k``, stratified over the samples as both
references do (``v_k = (v_0 + k / K) mod 1``, each marginally uniform), and one priority ``u_kj`` per
position. For a split ``c``: LLaDA masks the ``l = floor(v L) + 1`` positions of ``[c, N)`` with the
smallest priorities; Dream masks those with ``u < p(v)``. The draws depend on (seed, K, N) only, so
every split of one sequence uses the same ones (common random numbers), which is what makes
``suffix_contributions`` consistent with ``elbo``.

``suffix_contributions`` gives one number per position ``i``: ``ELBO(i) - ELBO(i + 1)`` (estimates,
``ELBO(N) = 0``). The sum over any suffix ``[c, N)`` telescopes to the estimate ``ELBO(c)``, i.e. the
ELBO of that suffix given everything before it, whatever ``c`` is. That is what a client holding
only the whole text and its own split point (lm-evaluation-harness' ``ctxlen``) needs. Single
values are differences of two estimates (noisy, may be positive); only suffix sums are log-likelihood
bounds. Cost: ``samples`` rows of length N per scored position.

Greedy (``left_to_right_top``): position i is *greedy* when the model's argmax at i, with
``x[:i]`` visible and ``x[i:]`` masked, is ``x_i``. The continuation ``x[c:]`` is greedy for every
position of it exactly when left-to-right decoding with one token per step (LLaDA's semi-
autoregressive loop with block length 1, greedy) reproduces it, so the flag is consistent with any
split too. (LLaDA's ``eval_llada.py`` checks greedy with its low-confidence order instead, which
depends on the split; Dream's eval leaves it unimplemented; Dream's ``ar_ftb`` log-likelihood is
this same left-to-right masking.) Pure tensor code, no vLLM import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

ESTIMATORS = ("llada", "dream")


@dataclass(frozen=True)
class ScoreSettings:
    """How to estimate: Monte Carlo samples per split, estimator, Dream's ``eps``, rows per forward."""

    samples: int = 32
    estimator: str = "llada"
    eps: float = 1e-3
    max_rows: int = 256

    def __post_init__(self) -> None:
        for name in ("samples", "max_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator: must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if not isinstance(self.eps, (int, float)) or not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps: must be in [0, 1), got {self.eps!r}")


def draws(samples: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(v [K] stratified uniforms, u [K, N] priorities), a function of (seed, K, N) only."""
    g = torch.Generator().manual_seed(int(seed))
    v0 = torch.rand((), generator=g, dtype=torch.float64)
    v = (v0 + torch.arange(samples, dtype=torch.float64) / samples) % 1.0
    u = torch.rand((samples, length), generator=g, dtype=torch.float64)
    return v, u


def split_masks(v: torch.Tensor, u: torch.Tensor, start: int, settings: ScoreSettings
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks [K, N] (only positions >= start) and weights [K] of the samples for split ``start``."""
    K, N = u.shape
    L = N - start
    mask = torch.zeros((K, N), dtype=torch.bool)
    tail = u[:, start:]
    if settings.estimator == "llada":
        count = torch.clamp(torch.floor(v * L).long() + 1, 1, L)  # l ~ U{1..L}
        rank = tail.argsort(dim=1).argsort(dim=1)
        mask[:, start:] = rank < count[:, None]
        weight = L / count.double()
    else:
        p = (1.0 - settings.eps) * v + settings.eps
        mask[:, start:] = tail < p[:, None]
        weight = 1.0 / p
    return mask, weight


def _token_logprobs(model: Callable[..., Any], rows: torch.Tensor, targets: torch.Tensor,
                    max_rows: int, device: Any = None) -> torch.Tensor:
    """log p(targets[r, j] | rows[r]) for every row and position j >= shift ([R, N] float64; NaN
    where no row scores the position: j < shift)."""
    shift = int(getattr(model, "logits_shift", 0))
    R, N = rows.shape
    out = torch.full((R, N), float("nan"), dtype=torch.float64)
    for a in range(0, R, max_rows):
        ids = rows[a:a + max_rows]
        logits = model(ids.to(device) if device is not None else ids).logits.float()
        lp = torch.log_softmax(logits[:, : N - shift], dim=-1)
        tgt = targets[a:a + max_rows, shift:].to(lp.device)
        out[a:a + max_rows, shift:] = lp.gather(-1, tgt[..., None])[..., 0].double().cpu()
    return out


def _split_estimates(model: Callable[..., Any], tokens: torch.Tensor, starts: list[int],
                     settings: ScoreSettings, seed: int, device: Any = None) -> torch.Tensor:
    """ELBO estimates [len(starts)] of ``tokens[c:]`` given ``tokens[:c]`` for each c, one batch."""
    mask_id = int(model.mask_token_id)
    N = tokens.shape[0]
    v, u = draws(settings.samples, N, seed)
    masks, weights = zip(*(split_masks(v, u, c, settings) for c in starts))
    mask = torch.cat(masks)  # [S * K, N]
    rows = torch.where(mask, torch.full_like(mask, mask_id, dtype=torch.long), tokens.expand(mask.shape))
    lp = _token_logprobs(model, rows, tokens.expand(mask.shape), settings.max_rows, device)
    per_sample = torch.where(mask, lp, torch.zeros_like(lp)).sum(dim=1) * torch.cat(weights)
    return per_sample.view(len(starts), settings.samples).mean(dim=1)


def elbo(model: Callable[..., Any], tokens: torch.Tensor, start: int, settings: ScoreSettings,
         seed: int, device: Any = None) -> float:
    """Estimate of log p(tokens[start:] | tokens[:start]) (a lower bound in expectation)."""
    _check_split(model, tokens, start)
    return float(_split_estimates(model, tokens, [start], settings, seed, device)[0])


def suffix_contributions(model: Callable[..., Any], tokens: torch.Tensor, settings: ScoreSettings,
                         seed: int, first: int = 1, device: Any = None) -> torch.Tensor:
    """[N] float64: ``ELBO(i) - ELBO(i + 1)`` for i >= first, NaN before; suffix sums = ``elbo``."""
    N = tokens.shape[0]
    _check_split(model, tokens, first)
    est = _split_estimates(model, tokens, list(range(first, N)), settings, seed, device)
    out = torch.full((N,), float("nan"), dtype=torch.float64)
    out[first:] = est - torch.cat((est[1:], est.new_zeros(1)))
    return out


def left_to_right_top(model: Callable[..., Any], tokens: torch.Tensor, k: int, first: int = 1,
                      max_rows: int = 256, device: Any = None) -> dict[str, torch.Tensor]:
    """For each position i >= first, with ``tokens[:i]`` visible and ``tokens[i:]`` masked:
    ``token`` [R] log p(x_i), ``rank`` [R] (1 = argmax), ``top_ids``/``top`` [R, k]. R = N - first."""
    shift = int(getattr(model, "logits_shift", 0))
    _check_split(model, tokens, first)
    N = tokens.shape[0]
    pos = torch.arange(first, N)
    rows = tokens.expand(len(pos), N).clone()
    rows[torch.arange(N)[None, :] >= pos[:, None]] = int(model.mask_token_id)
    token, rank, top_ids, top = [], [], [], []
    for a in range(0, len(pos), max_rows):
        ids = rows[a:a + max_rows]
        logits = model(ids.to(device) if device is not None else ids).logits.float()
        p = pos[a:a + max_rows]
        lp = torch.log_softmax(logits[torch.arange(len(p)), (p - shift).to(logits.device)], dim=-1)
        x = tokens[p].to(lp.device)
        t = lp.gather(-1, x[:, None])[:, 0]
        token.append(t.cpu())
        rank.append(((lp > t[:, None]).sum(-1) + 1).cpu())
        values, ids_k = lp.topk(min(k, lp.shape[-1]), dim=-1) if k > 0 else (lp[:, :0], x[:, None][:, :0])
        top.append(values.cpu())
        top_ids.append(ids_k.cpu())
    return {"token": torch.cat(token), "rank": torch.cat(rank), "top_ids": torch.cat(top_ids),
            "top": torch.cat(top)}


def _check_split(model: Callable[..., Any], tokens: torch.Tensor, start: int) -> None:
    shift = int(getattr(model, "logits_shift", 0))
    if tokens.dim() != 1:
        raise ValueError(f"tokens: expected a 1-D sequence, got shape {tuple(tokens.shape)}")
    if not max(1, shift) <= start < tokens.shape[0]:
        raise ValueError(f"start: must be in [{max(1, shift)}, {tokens.shape[0]}), got {start}")

