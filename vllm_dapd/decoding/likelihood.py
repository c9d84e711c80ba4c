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
bounds. Cost: ``samples`` rows of length N per scored position, less the repeats: ``score_items``
forwards each distinct mask once (``DistinctRows``), about half of them on a 25-token sequence.

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
from typing import Any, Callable, Iterator, NamedTuple, Sequence

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
    chunk_tokens: int = 2048

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


def split_masks_many(v: torch.Tensor, u: torch.Tensor, starts: Sequence[int] | torch.Tensor,
                     settings: ScoreSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """``split_masks`` for every start of ``starts`` [S] in one batched op: masks [S * K, N] (split s
    has rows ``s * K .. s * K + K - 1``) and weights [S * K]. LLaDA's ``l`` smallest priorities of
    ``[c, N)`` are found in one sort of ``u``: walking each sample's positions by priority, position
    j is masked for split c when j >= c and fewer than ``l`` positions >= c came before it."""
    K, N = u.shape
    starts = torch.as_tensor(starts, dtype=torch.long).reshape(-1)
    S = starts.shape[0]
    tail = torch.arange(N)[None, :] >= starts[:, None]  # [S, N]
    L = (N - starts)[:, None]  # [S, 1]
    if settings.estimator == "llada":
        count = torch.minimum(torch.floor(v[None, :] * L).long() + 1, L)  # [S, K], l ~ U{1..L}
        order = u.argsort(dim=1)  # [K, N]: positions by priority
        in_tail = tail[:, order]  # [S, K, N], by priority
        first = in_tail & (in_tail.cumsum(-1, dtype=torch.int32) <= count[..., None])
        mask = torch.zeros((S, K, N), dtype=torch.bool).scatter_(2, order.expand(S, K, N), first)
        weight = count.double().reciprocal() * L  # as split_masks' L / count (Tensor.__rtruediv__)
    else:
        p = (1.0 - settings.eps) * v + settings.eps
        mask = tail[:, None, :] & (u < p[:, None])[None]
        weight = (1.0 / p).expand(S, K)
    return mask.reshape(S * K, N), weight.reshape(S * K)


@dataclass(frozen=True)
class DistinctRows:
    """One sequence's forward rows, each mask once: ``masks`` [U, N] bool (distinct, none empty) and
    ``of`` [R] long, the distinct row of each of the R masks asked for (-1 where a mask is empty: it
    scores nothing, its sum is 0). Masks repeat a lot under common random numbers: every sample of
    the last split masks the last position alone, a sample's mask is the same for neighbouring
    splits whenever the split position is not in it and the masked count does not change, and the
    left-to-right row of position i is the all-masked sample of split i."""

    masks: torch.Tensor
    of: torch.Tensor

    @classmethod
    def of_masks(cls, masks: torch.Tensor) -> "DistinctRows":
        if not masks.shape[0]:
            return cls(masks, torch.zeros(0, dtype=torch.long))
        uniq, inverse = torch.unique(masks, dim=0, return_inverse=True)
        keep = uniq.any(dim=1)
        index = torch.where(keep, keep.long().cumsum(0) - 1, -1)
        return cls(uniq[keep], index[inverse])


@dataclass(frozen=True)
class ScoreItem:
    """What to score of one sequence ``tokens`` [N]: the ELBO estimate of ``tokens[c:]`` given
    ``tokens[:c]`` for each c of ``starts`` (draws seeded by ``seed``), and the left-to-right rows
    (``left_to_right_top_many``) of positions ``top_first .. N - 1`` (None: none)."""

    tokens: torch.Tensor
    starts: Sequence[int] | torch.Tensor = ()
    seed: int = 0
    top_first: int | None = None


class ItemScores(NamedTuple):
    estimates: torch.Tensor  # [len(starts)] float64
    top: dict[str, torch.Tensor] | None  # ``left_to_right_top_many``'s fields; None without top_first


def _chunks(model: Callable[..., Any], ids: torch.Tensor, lens: torch.Tensor, order: torch.Tensor,
            chunk_tokens: int, device: Any) -> Iterator[tuple[int, int, int, torch.Tensor | None]]:
    """Forwards over the rows of ``ids`` [G, Nmax] taken in ``order`` (longest first), each of at
    most ``chunk_tokens`` tokens (or one row): yields (first slot, rows C, length T, logits [C, T, V]
    float32, None where the model returns none: tensor-parallel rank > 0). Rows shorter than the
    chunk's first are padded with the mask id and kept out of attention by a key padding mask."""
    sorted_lens = lens[order].tolist()
    a, G = 0, len(sorted_lens)
    while a < G:
        T = sorted_lens[a]
        C = max(1, min(G - a, chunk_tokens // T))
        rows = order[a:a + C]
        kwargs = {}
        if sorted_lens[a + C - 1] < T:
            kwargs["key_padding_mask"] = (torch.arange(T)[None, :] < lens[rows][:, None]).to(device)
        with torch.inference_mode():
            logits = model(ids[rows, :T].to(device), **kwargs).logits
        yield a, C, T, None if logits is None else logits.float()
        a += C


def score_items(model: Callable[..., Any], items: list[ScoreItem], settings: ScoreSettings, k: int = 1,
                device: Any = None) -> list[ItemScores]:
    """ELBO estimates and left-to-right rows of many sequences in shared forwards. Every distinct
    row of every item (``DistinctRows``: the ELBO samples of all its splits and its left-to-right
    rows together) runs once; rows go longest first into forwards of at most
    ``settings.chunk_tokens`` tokens. A row's log-probabilities are taken only at its masked
    positions (target logit minus the log-sum-exp there); the left-to-right rows also give their
    position's top ``k``."""
    mask_id = int(model.mask_token_id)
    shift = int(getattr(model, "logits_shift", 0))
    K = settings.samples
    plans, weights, splits, queries = [], [], [], []
    for it in items:
        N = it.tokens.shape[0]
        starts = torch.as_tensor(it.starts, dtype=torch.long).reshape(-1)
        masks = [torch.zeros((0, N), dtype=torch.bool)]
        w = torch.zeros(0, dtype=torch.float64)
        if starts.numel():
            _check_split(model, it.tokens, int(starts.min()))
            _check_split(model, it.tokens, int(starts.max()))
            v, u = draws(K, N, it.seed)
            m, w = split_masks_many(v, u, starts, settings)
            masks.append(m)
        pos = torch.zeros(0, dtype=torch.long)
        if it.top_first is not None:
            _check_split(model, it.tokens, it.top_first)
            pos = torch.arange(it.top_first, N)
            masks.append(torch.arange(N)[None, :] >= pos[:, None])
        plans.append(DistinctRows.of_masks(torch.cat(masks)))
        weights.append(w)
        splits.append(w.shape[0])
        queries.append(pos)
    if not items:
        return []
    sizes = torch.tensor([p.masks.shape[0] for p in plans])
    offsets = (sizes.cumsum(0) - sizes).tolist()
    lens = torch.tensor([it.tokens.shape[0] for it in items]).repeat_interleave(sizes)
    G, width = int(sizes.sum()), max(it.tokens.shape[0] for it in items)
    ids = torch.full((G, width), mask_id, dtype=torch.long)
    targets = torch.zeros((G, width), dtype=torch.long)
    masked = torch.zeros((G, width), dtype=torch.bool)
    q_row, q_tok = [], []
    for it, p, o, n, pos in zip(items, plans, offsets, splits, queries):
        U, N = p.masks.shape
        ids[o:o + U, :N] = torch.where(p.masks, mask_id, it.tokens)
        targets[o:o + U, :N] = it.tokens
        masked[o:o + U, :N] = p.masks
        q_row.append(p.of[n:] + o)
        q_tok.append(it.tokens[pos])
    order = torch.sort(lens, descending=True, stable=True).indices  # forward slot -> row
    slot = torch.empty(G, dtype=torch.long)
    slot[order] = torch.arange(G)
    q_slot, q_pos, q_tok = slot[torch.cat(q_row)], torch.cat(queries), torch.cat(q_tok)
    Q = q_slot.shape[0]
    row_sum = torch.zeros(G, dtype=torch.float64)
    tok, rank = torch.full((Q,), float("nan")), torch.zeros(Q, dtype=torch.long)
    top_ids, top = torch.zeros((Q, k), dtype=torch.long), torch.full((Q, k), float("nan"))
    for a, C, T, logits in _chunks(model, ids, lens, order, settings.chunk_tokens, device):
        if logits is None:
            continue
        rows = order[a:a + C]
        m = masked[rows, shift:T]  # row j of the logits scores token j + shift
        at = logits[:, : T - shift][m.to(logits.device)]  # [M, V]: masked positions only
        x = targets[rows, shift:T][m].to(logits.device)
        lp = (at.gather(-1, x[:, None])[:, 0] - at.logsumexp(dim=-1)).double().cpu()
        dense = torch.zeros(m.shape, dtype=torch.float64)
        dense[m] = lp
        row_sum[rows] = dense.sum(dim=1)
        qs = torch.nonzero((q_slot >= a) & (q_slot < a + C)).flatten()
        if qs.numel():
            dist = torch.log_softmax(logits[(q_slot[qs] - a).to(logits.device), (q_pos[qs] - shift).to(logits.device)],
                                     dim=-1)
            t = dist.gather(-1, q_tok[qs, None].to(dist.device))[:, 0]
            values, best = dist.topk(min(k, dist.shape[-1]), dim=-1)
            tok[qs], rank[qs] = t.cpu(), ((dist > t[:, None]).sum(-1) + 1).cpu()
            top_ids[qs, : best.shape[1]], top[qs, : best.shape[1]] = best.cpu(), values.cpu()
    out, q = [], 0
    for it, p, o, n, w, pos in zip(items, plans, offsets, splits, weights, queries):
        of = p.of[:n]
        sums = torch.where(of >= 0, row_sum[(of + o).clamp(min=0)], 0.0)
        estimates = (sums * w).view(-1, K).mean(dim=1)
        fields = None
        if it.top_first is not None:
            r = slice(q, q + pos.shape[0])
            fields = {"token": tok[r], "rank": rank[r], "top_ids": top_ids[r], "top": top[r]}
        q += pos.shape[0]
        out.append(ItemScores(estimates, fields))
    return out


def elbo(model: Callable[..., Any], tokens: torch.Tensor, start: int, settings: ScoreSettings,
         seed: int, device: Any = None) -> float:
    """Estimate of log p(tokens[start:] | tokens[:start]) (a lower bound in expectation)."""
    return float(elbo_many(model, [(tokens, start, seed)], settings, device)[0])


def elbo_many(model: Callable[..., Any], items: list[tuple[torch.Tensor, int, int]], settings: ScoreSettings,
              device: Any = None) -> torch.Tensor:
    """``elbo`` for many (tokens, start, seed) at once (rows of all items share forwards): [n]."""
    est = score_items(model, [ScoreItem(t, [c], seed) for t, c, seed in items], settings, device=device)
    return torch.cat([e.estimates for e in est]) if est else torch.zeros(0, dtype=torch.float64)


def suffix_contributions_many(model: Callable[..., Any], items: list[tuple[torch.Tensor, int, int]],
                              settings: ScoreSettings, device: Any = None) -> list[torch.Tensor]:
    """Per item (tokens [N], first, seed): [N] float64, ``ELBO(i) - ELBO(i + 1)`` for i >= first and
    NaN before, so that every suffix sum from c >= first is the estimate ``elbo(tokens, c)``."""
    for tokens, first, _ in items:  # score_items checks only the splits it scores: none when first >= N
        _check_split(model, tokens, first)
    est = score_items(model, [ScoreItem(t, torch.arange(first, t.shape[0]), seed) for t, first, seed in items],
                      settings, device=device)
    return [contributions(e.estimates, t.shape[0], first) for (t, first, _), e in zip(items, est)]


def contributions(estimates: torch.Tensor, n: int, first: int) -> torch.Tensor:
    """[n] float64 from the estimates of splits ``first .. n - 1``: ``ELBO(i) - ELBO(i + 1)``
    (``ELBO(n) = 0``) from ``first`` on, NaN before."""
    c = torch.full((n,), float("nan"), dtype=torch.float64)
    c[first:] = estimates - torch.cat((estimates[1:], estimates.new_zeros(1)))
    return c


def suffix_contributions(model: Callable[..., Any], tokens: torch.Tensor, settings: ScoreSettings,
                         seed: int, first: int = 1, device: Any = None) -> torch.Tensor:
    return suffix_contributions_many(model, [(tokens, first, seed)], settings, device)[0]


def left_to_right_top_many(model: Callable[..., Any], items: list[tuple[torch.Tensor, int]], k: int,
                           chunk_tokens: int = 2048, device: Any = None) -> list[dict[str, torch.Tensor]]:
    """Per item (tokens [N], first), for each position i >= first with ``tokens[:i]`` visible and
    ``tokens[i:]`` masked: ``token`` [R] log p(x_i), ``rank`` [R] (1 = argmax), ``top_ids`` / ``top``
    [R, k] (the k most likely tokens and their log-probs); R = N - first."""
    est = score_items(model, [ScoreItem(t, (), 0, first) for t, first in items],
                      ScoreSettings(chunk_tokens=chunk_tokens), k, device)
    return [e.top for e in est]


def left_to_right_top(model: Callable[..., Any], tokens: torch.Tensor, k: int, first: int = 1,
                      chunk_tokens: int = 2048, device: Any = None) -> dict[str, torch.Tensor]:
    return left_to_right_top_many(model, [(tokens, first)], k, chunk_tokens, device)[0]


def _check_split(model: Callable[..., Any], tokens: torch.Tensor, start: int) -> None:
    shift = int(getattr(model, "logits_shift", 0))
    if tokens.dim() != 1:
        raise ValueError(f"tokens: expected a 1-D sequence, got shape {tuple(tokens.shape)}")
    if not max(1, shift) <= start < tokens.shape[0]:
        raise ValueError(f"start: must be in [{max(1, shift)}, {tokens.shape[0]}), got {start}")
