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
from typing import Any, Callable, Iterator

import torch

from .policy import check_int

ESTIMATORS = ("llada", "dream")


@dataclass(frozen=True)
class ScoreSettings:
    """How to estimate: Monte Carlo samples per split, estimator, Dream's ``eps``, and the token
    budget of one forward (rows of all sequences are packed into forwards of at most that many
    tokens, bounding the [rows, T, V] logits)."""

    samples: int = 32
    estimator: str = "llada"
    eps: float = 1e-3
    chunk_tokens: int = 8192

    def __post_init__(self) -> None:
        for name in ("samples", "chunk_tokens"):
            check_int(name, getattr(self, name), 1)
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


def _forward(model: Callable[..., Any], rows: list[torch.Tensor], chunk_tokens: int, device: Any
             ) -> Iterator[tuple[int, torch.Tensor | None]]:
    """Yields (first row index, logits [C, T, V] float32) over chunks of ``rows`` (1-D token
    tensors), right-padded with the mask id; a key padding mask keeps the padding out of attention
    when lengths differ. Logits are None where the model returns none (tensor-parallel rank > 0)."""
    mask_id = int(model.mask_token_id)
    a = 0
    while a < len(rows):
        T = len(rows[a])
        C = 1
        while a + C < len(rows) and (C + 1) * max(T, len(rows[a + C])) <= chunk_tokens:
            T = max(T, len(rows[a + C]))
            C += 1
        lens = torch.tensor([len(r) for r in rows[a:a + C]])
        ids = torch.full((C, T), mask_id, dtype=torch.long)
        for i, r in enumerate(rows[a:a + C]):
            ids[i, : len(r)] = r
        kwargs = {}
        if bool((lens < T).any()):
            kwargs["key_padding_mask"] = (torch.arange(T)[None, :] < lens[:, None]).to(device)
        with torch.inference_mode():
            logits = model(ids.to(device), **kwargs).logits
        yield a, None if logits is None else logits.float()
        a += C


def _split_estimates(model: Callable[..., Any], items: list[tuple[torch.Tensor, list[int], int]],
                     settings: ScoreSettings, device: Any = None) -> list[torch.Tensor]:
    """Per item (tokens [N], starts, seed): ELBO estimates [len(starts)] of ``tokens[c:]`` given
    ``tokens[:c]`` for each start c. All rows of all items share forwards."""
    mask_id = int(model.mask_token_id)
    shift = int(getattr(model, "logits_shift", 0))
    rows, masks, weights = [], [], []
    for tokens, starts, seed in items:
        v, u = draws(settings.samples, tokens.shape[0], seed)
        m, w = zip(*(split_masks(v, u, c, settings) for c in starts)) if starts else ((), ())
        m = torch.cat(m) if m else torch.zeros((0, tokens.shape[0]), dtype=torch.bool)
        masks.append(m)
        weights.append(torch.cat(w) if w else torch.zeros(0, dtype=torch.float64))
        rows.extend(torch.where(m, mask_id, tokens.expand(m.shape)))
    targets = [t for (t, starts, _), m in zip(items, masks) for _ in range(m.shape[0])]
    flat_masks = [r for m in masks for r in m]
    sums = torch.zeros(len(rows), dtype=torch.float64)
    for a, logits in _forward(model, rows, settings.chunk_tokens, device):
        if logits is None:
            continue
        C, T, _ = logits.shape
        tgt = torch.zeros((C, T), dtype=torch.long)
        use = torch.zeros((C, T), dtype=torch.bool)
        for i in range(C):
            n = len(targets[a + i])
            tgt[i, :n], use[i, :n] = targets[a + i], flat_masks[a + i]
        lp = torch.log_softmax(logits[:, : T - shift], dim=-1).gather(-1, tgt[:, shift:, None].to(logits.device))
        sums[a:a + C] = (lp[..., 0].double().cpu() * use[:, shift:]).sum(dim=1)
    sums = list(sums.split([m.shape[0] for m in masks]))
    return [(s * w).view(-1, settings.samples).mean(dim=1) for s, w in zip(sums, weights)]


def elbo(model: Callable[..., Any], tokens: torch.Tensor, start: int, settings: ScoreSettings,
         seed: int, device: Any = None) -> float:
    """Estimate of log p(tokens[start:] | tokens[:start]) (a lower bound in expectation)."""
    _check_split(model, tokens, start)
    return float(_split_estimates(model, [(tokens, [start], seed)], settings, device)[0][0])


def elbo_many(model: Callable[..., Any], items: list[tuple[torch.Tensor, int, int]], settings: ScoreSettings,
              device: Any = None) -> torch.Tensor:
    """``elbo`` for many (tokens, start, seed) at once (rows of all items share forwards): [n]."""
    for tokens, start, _ in items:
        _check_split(model, tokens, start)
    est = _split_estimates(model, [(t, [c], seed) for t, c, seed in items], settings, device)
    return torch.stack([e[0] for e in est]) if est else torch.zeros(0, dtype=torch.float64)


def suffix_contributions_many(model: Callable[..., Any], items: list[tuple[torch.Tensor, int, int]],
                              settings: ScoreSettings, device: Any = None) -> list[torch.Tensor]:
    """Per item (tokens [N], first, seed): [N] float64, ``ELBO(i) - ELBO(i + 1)`` for i >= first and
    NaN before, so that every suffix sum from c >= first is the estimate ``elbo(tokens, c)``."""
    for tokens, first, _ in items:
        _check_split(model, tokens, first)
    est = _split_estimates(model, [(t, list(range(first, t.shape[0])), seed) for t, first, seed in items],
                           settings, device)
    out = []
    for (tokens, first, _), e in zip(items, est):
        c = torch.full((tokens.shape[0],), float("nan"), dtype=torch.float64)
        c[first:] = e - torch.cat((e[1:], e.new_zeros(1)))
        out.append(c)
    return out


def suffix_contributions(model: Callable[..., Any], tokens: torch.Tensor, settings: ScoreSettings,
                         seed: int, first: int = 1, device: Any = None) -> torch.Tensor:
    return suffix_contributions_many(model, [(tokens, first, seed)], settings, device)[0]


def left_to_right_top_many(model: Callable[..., Any], items: list[tuple[torch.Tensor, int]], k: int,
                           chunk_tokens: int = 8192, device: Any = None) -> list[dict[str, torch.Tensor]]:
    """Per item (tokens [N], first), for each position i >= first with ``tokens[:i]`` visible and
    ``tokens[i:]`` masked: ``token`` [R] log p(x_i), ``rank`` [R] (1 = argmax), ``top_ids`` / ``top``
    [R, k] (the k most likely tokens and their log-probs); R = N - first."""
    shift = int(getattr(model, "logits_shift", 0))
    mask_id = int(model.mask_token_id)
    rows, index = [], []
    for j, (tokens, first) in enumerate(items):
        _check_split(model, tokens, first)
        for i in range(first, tokens.shape[0]):
            r = tokens.clone()
            r[i:] = mask_id
            rows.append(r)
            index.append((j, i))
    R = [t.shape[0] - first for t, first in items]
    out = [{"token": torch.full((n,), float("nan")), "rank": torch.zeros(n, dtype=torch.long),
            "top_ids": torch.zeros((n, k), dtype=torch.long), "top": torch.full((n, k), float("nan"))}
           for n in R]
    for a, logits in _forward(model, rows, chunk_tokens, device):
        if logits is None:
            continue
        n = logits.shape[0]
        js, ps = zip(*index[a:a + n])
        pos = torch.tensor(ps)
        lp = torch.log_softmax(logits[torch.arange(n), (pos - shift).to(logits.device)], dim=-1)
        x = torch.stack([items[j][0][p] for j, p in zip(js, ps)]).to(lp.device)
        t = lp.gather(-1, x[:, None])[:, 0]
        rank = (lp > t[:, None]).sum(-1) + 1
        values, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
        for row, (j, p) in enumerate(zip(js, ps)):
            o, r = out[j], p - items[j][1]
            o["token"][r], o["rank"][r] = t[row].cpu(), rank[row].cpu()
            o["top_ids"][r, : ids.shape[1]], o["top"][r, : ids.shape[1]] = ids[row].cpu(), values[row].cpu()
    return out


def left_to_right_top(model: Callable[..., Any], tokens: torch.Tensor, k: int, first: int = 1,
                      chunk_tokens: int = 8192, device: Any = None) -> dict[str, torch.Tensor]:
    return left_to_right_top_many(model, [(tokens, first)], k, chunk_tokens, device)[0]


def _check_split(model: Callable[..., Any], tokens: torch.Tensor, start: int) -> None:
    shift = int(getattr(model, "logits_shift", 0))
    if tokens.dim() != 1:
        raise ValueError(f"tokens: expected a 1-D sequence, got shape {tuple(tokens.shape)}")
    if not max(1, shift) <= start < tokens.shape[0]:
        raise ValueError(f"start: must be in [{max(1, shift)}, {tokens.shape[0]}), got {start}")
