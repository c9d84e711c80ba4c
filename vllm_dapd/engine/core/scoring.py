"""``logprobs`` / ``prompt_logprobs`` for diffusion requests, in vLLM's runner-output shapes.

**Prompt logprobs** (what ``/v1/completions`` with ``echo: true, logprobs: k`` returns for the
prompt, and what lm-evaluation-harness' ``local-completions`` sums over the continuation for its
log-likelihood requests) are *not* autoregressive log-probabilities. Position i (i >= 1; vLLM
reports none for position 0) carries ``ELBO(i) - ELBO(i + 1)``, where ``ELBO(c)`` is the Monte Carlo
ELBO estimate of ``prompt[c:]`` given ``prompt[:c]`` (``vllm_dapd.decoding.likelihood``; all
estimates of one request share their random draws, seeded by the request's ``seed``). So the sum
over ``prompt[c:]``, for any c, is the ELBO estimate of that suffix given the text before it: the
client's split point (lm-eval's ``ctxlen``) need not be known to the server. With ``score_window
W`` (to bound the cost: ``score_samples`` forwards per scored position) only the last W positions
carry ELBO terms; earlier ones carry the left-to-right term ``log p(x_i | x[:i], x[i:] masked)``
(Dream's ``ar_ftb`` scoring), so a suffix starting before the window sums to a left-to-right chain
up to the window plus the window's ELBO.

The top-k entries of each position are the k most likely tokens of the left-to-right forward for
that position (``x[:i]`` visible, ``x[i:]`` masked), their values shifted so that each is the
scored token's value plus ``log p(a) - log p(x_i)`` in that forward; the rank is ``x_i``'s rank
there. Hence a position's value equals the maximum of its top-k values exactly when ``x_i`` is the
left-to-right greedy choice, and lm-eval's ``is_greedy`` means "one-token-per-step left-to-right
greedy decoding of the continuation reproduces it".

**Sample logprobs** (``logprobs: k`` on generated tokens): the log-softmax of the raw logits at
the position in the forward that committed the token (before temperature, like vLLM's default
``raw_logprobs``), with that forward's top-k. Positions never committed (a step budget spent on a
model proposing the mask id) report -9999 (vLLM's floor for -inf). ``-1`` ("the whole
vocabulary") is refused at admission for both.

Request options (``vllm_xargs``, or server defaults in ``--additional-config '{"dapd": {...}}'``;
``settings.ScoreOptions``, resolved with the rest of the request's plan, ``settings.plan``):
``score_samples`` (Monte Carlo samples per split, default 32, at most ``SAMPLES_LIMIT`` = 1024),
``score_estimator`` (``llada`` | ``dream``; default: ``dream`` for Dream models, ``llada``
otherwise), ``score_window`` (default ``DEFAULT_WINDOW`` = 32: a continuation of up to 32 tokens still
sums to its ELBO, and a 1,000-token few-shot prompt costs 32, not 1,000, positions' samples; 0 = every
prompt position), ``score_start`` (0 = unset):
the prompt position where the
continuation starts, when the client knows it (lm-eval's ``ctxlen``). Then one ELBO is estimated,
of ``prompt[c:]`` given ``prompt[:c]`` (``score_samples`` rows instead of ``score_samples`` per
position), spread evenly over positions ``c..N-1`` so that their sum is that estimate (single
values are then the per-token average, not per-position terms); positions before ``c`` carry the
left-to-right terms, as before a window.

**Choices** (``score_choices``: a list of token-id lists; what OpenAI ``structured_outputs:
{"choice": [...]}`` becomes, ``engine/vllm/requests.py``): the request answers with the choice of highest
ELBO given the prompt (``choice_scores``: ``score_samples`` samples each, all choices scored with the
request's seed, i.e. the same stratified mask ratios, in shared forwards), followed by the model's
EOS so that generation stops there; the estimates of every choice go back as ``dapd.scores``
(``engine/vllm/cost.py``). At most ``MAX_CHOICES`` choices.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from vllm_dapd.decoding.likelihood import ScoreItem, ScoreSettings, contributions, elbo_many, score_items

from .sequence import Sequence
from .settings import DEFAULT_WINDOW, MAX_CHOICES, SAMPLES_LIMIT, ScoreOptions  # noqa: F401  (re-exported)

_MISSING = -9999.0  # vLLM's floor for logprobs in responses; NaN would not serialise to JSON


class PromptLogprobs(NamedTuple):
    """One request's prompt logprobs (the fields of vLLM's ``LogprobsTensors``, which the runner makes
    of them): row r is about prompt token r + 1; column 0 the token itself, then the top ones."""

    logprob_token_ids: torch.Tensor  # [n - 1, k + 1]
    logprobs: torch.Tensor  # [n - 1, k + 1]
    selected_token_ranks: torch.Tensor  # [n - 1]


class SampleLogprobs(NamedTuple):
    """Every returned token's logprobs (the fields of vLLM's ``LogprobsLists``)."""

    logprob_token_ids: np.ndarray  # [tokens, width]
    logprobs: np.ndarray
    sampled_token_ranks: np.ndarray
    cu_num_generated_tokens: list[int]


def prompt_logprobs(model: Any, seqs: list[Sequence], device: Any) -> dict[str, PromptLogprobs]:
    """The prompt logprobs of ``seqs`` (see the module docstring); all their rows share forwards."""
    shift = int(model.logits_shift)
    todo = [s for s in seqs if len(s.prompt) >= 2]
    out = {s.req_id: PromptLogprobs(torch.empty((0, s.num_prompt_logprobs + 1), dtype=torch.long),
                                    torch.empty((0, s.num_prompt_logprobs + 1)), torch.empty(0, dtype=torch.long))
           for s in seqs if len(s.prompt) < 2}
    if not todo:
        return out
    by_settings: dict[ScoreSettings, list[Sequence]] = {}
    for s in todo:
        by_settings.setdefault(s.score.settings(shift), []).append(s)
    tokens = {s.req_id: torch.tensor(s.prompt, dtype=torch.long) for s in todo}
    first = {s.req_id: max(1, shift, len(s.prompt) - s.score.window if s.score.window else 1) for s in todo}
    k = max(s.num_prompt_logprobs for s in todo)
    start = max(1, shift)
    contrib: dict[str, torch.Tensor] = {}
    tops: dict[str, dict[str, torch.Tensor]] = {}
    for settings, group in by_settings.items():
        # One set of forwards per settings: the ELBO rows and the left-to-right rows together.
        known = {s.req_id for s in group if start <= s.score.start < len(s.prompt)}
        for s in group:
            if s.req_id in known:  # score_start: one ELBO of the continuation, spread evenly over it
                first[s.req_id] = s.score.start
        items = [ScoreItem(tokens[s.req_id], [first[s.req_id]] if s.req_id in known
                           else torch.arange(first[s.req_id], len(s.prompt)), s.seed, start) for s in group]
        for s, scores in zip(group, score_items(model, items, settings, k, device)):
            n, c = len(s.prompt), first[s.req_id]
            tops[s.req_id] = scores.top
            if s.req_id in known:
                contrib[s.req_id] = torch.full((n,), float("nan"), dtype=torch.float64)
                contrib[s.req_id][c:] = float(scores.estimates[0]) / (n - c)
            else:
                contrib[s.req_id] = contributions(scores.estimates, n, c)
    for s in todo:
        top, n = tops[s.req_id], len(s.prompt)
        x = tokens[s.req_id]
        value = torch.full((n,), float("nan"), dtype=torch.float64)
        value[start:] = top["token"].double()  # left-to-right terms (before the window)
        c = contrib.get(s.req_id)
        if c is not None:
            f = first[s.req_id]
            value[f:] = c[f:]
        width = s.num_prompt_logprobs
        ids = torch.zeros((n, width + 1), dtype=torch.long)
        vals = torch.full((n, width + 1), float("nan"), dtype=torch.float32)
        ranks = torch.zeros(n, dtype=torch.long)
        ids[:, 0], vals[:, 0] = x, value.float()
        ids[start:, 1:] = top["top_ids"][:, :width]
        vals[start:, 1:] = (value[start:, None] + (top["top"][:, :width] - top["token"][:, None]).double()).float()
        ranks[start:] = top["rank"]
        # vLLM's prompt logprobs: row r is about prompt token r + 1 (none for token 0).
        out[s.req_id] = PromptLogprobs(ids[1:], vals[1:], ranks[1:])
    return out


def record_commits(s: Sequence, logits: torch.Tensor, chosen: torch.Tensor, tokens: torch.Tensor,
                   rows: torch.Tensor | None = None) -> None:
    """Sample logprobs of the tokens committed now: ``logits`` [R, V] (this forward's rows: row i
    scores canvas position ``rows[i]``, ascending, or ``i`` when ``rows`` is None), ``chosen`` [L]
    bool, ``tokens`` [L]."""
    pos = torch.nonzero(chosen).flatten()
    if s.num_logprobs is None or not pos.numel():
        return
    index = pos if rows is None else torch.searchsorted(rows, pos)
    lp = torch.log_softmax(logits[index.to(logits.device)].float(), dim=-1).cpu()
    x = tokens[pos]
    t = lp.gather(-1, x[:, None])[:, 0]
    rank = (lp > t[:, None]).sum(-1) + 1
    values, ids = lp.topk(min(s.num_logprobs, lp.shape[-1]), dim=-1)
    for i, p in enumerate(pos.tolist()):
        s.token_logprobs[p] = (torch.cat((x[i:i + 1], ids[i])), torch.cat((t[i:i + 1], values[i])), int(rank[i]))


def sample_logprobs(seqs: dict[str, Sequence], req_ids: list[str],
                    returned: list[list[int]]) -> SampleLogprobs | None:
    """Logprobs of every returned token (rows of requests without ``logprobs`` are zeros), or None
    when no request asked."""
    wanted = [seqs[r] for r in req_ids if r in seqs and seqs[r].num_logprobs is not None]
    if not wanted:
        return None
    width = 1 + max(max(len(v[0]) for v in s.token_logprobs.values()) if s.token_logprobs else 1 for s in wanted)
    total = sum(len(t) for t in returned)
    ids = np.zeros((total, width), dtype=np.int64)
    vals = np.full((total, width), _MISSING, dtype=np.float32)
    ranks = np.zeros(total, dtype=np.int64)
    cu, row = [], 0
    for r, toks in zip(req_ids, returned):
        cu.append(row)
        s = seqs.get(r)
        if s is not None and s.num_logprobs is not None and toks:
            start = s.emitted - len(toks)  # the canvas positions released this step
            for j in range(len(toks)):
                rec = s.token_logprobs.pop(start + j, None)
                ids[row + j, 0] = toks[j]
                if rec is not None:
                    n = len(rec[0])
                    ids[row + j, :n], vals[row + j, :n], ranks[row + j] = rec[0].numpy(), rec[1].numpy(), rec[2]
        row += len(toks)
    cu.append(row)
    return SampleLogprobs(ids, vals, ranks, cu)


def choice_scores(model: Any, seqs: list[Sequence], device: Any) -> dict[str, list[float]]:
    """Per sequence with ``score.choices``: the ELBO estimate of each choice given its prompt
    (``likelihood.elbo_many``: one item per choice, seeded by the request's seed, so every choice
    has the same stratified mask ratios; all rows of all sequences share forwards)."""
    shift = int(model.logits_shift)
    out: dict[str, list[float]] = {}
    by_settings: dict[ScoreSettings, list[Sequence]] = {}
    for s in seqs:
        by_settings.setdefault(s.score.settings(shift), []).append(s)
    for settings, group in by_settings.items():
        items = [(torch.tensor(s.prompt + list(c), dtype=torch.long), len(s.prompt), s.seed)
                 for s in group for c in s.score.choices]
        values = elbo_many(model, items, settings, device).tolist()
        for s in group:
            out[s.req_id], values = values[: len(s.score.choices)], values[len(s.score.choices):]
    return out
