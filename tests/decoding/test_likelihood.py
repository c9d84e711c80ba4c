"""Monte Carlo ELBO scorer against brute force on a tiny model with a tiny vocabulary.

Brute force enumerates every masked set of the continuation (the estimator's expectation, exactly)
and every unmasking order (the model's exact likelihood under its random-order sampler).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vllm_dapd.decoding.likelihood import (DistinctRows, ScoreItem, ScoreSettings, draws, elbo, left_to_right_top,
                                           score_items, split_masks, split_masks_many, suffix_contributions)


def logp_given(model, tokens: torch.Tensor, masked: set[int]) -> torch.Tensor:
    """[N] log p(x_j | tokens with ``masked`` replaced by the mask id), one forward."""
    row = tokens.clone()
    row[list(masked)] = model.mask_token_id
    lp = torch.log_softmax(model(row[None]).logits[0].double(), dim=-1)
    s = model.logits_shift
    out = torch.full((len(tokens),), float("nan"), dtype=torch.float64)
    out[s:] = lp[: len(tokens) - s].gather(-1, tokens[s:, None])[:, 0]
    return out


def weight(k: int, L: int, estimator: str, eps: float) -> float:
    """P(masked set = S) * weight, for |S| = k: LLaDA's l ~ U{1..L} with L / l; Dream's i.i.d. masks
    with p uniform on [eps, 1] and 1 / p (integrated exactly by expanding (1 - p)^(L - k))."""
    if estimator == "llada":
        return (1 / L) / math.comb(L, k) * (L / k)
    total = sum(math.comb(L - k, j) * (-1) ** j * (1 - eps ** (k + j)) / (k + j) for j in range(L - k + 1))
    return total / (1 - eps)


def exact_expectation(model, tokens, start, estimator="llada", eps=0.0) -> float:
    positions = range(start, len(tokens))
    L = len(positions)
    total = 0.0
    for k in range(1, L + 1):
        for S in itertools.combinations(positions, k):
            total += weight(k, L, estimator, eps) * float(logp_given(model, tokens, set(S))[list(S)].sum())
    return total


def exact_loglik(model, tokens, start) -> tuple[float, float]:
    """(log p, mean over orders of log p_order): the random-order one-token-per-step sampler's exact
    log-likelihood of tokens[start:] given tokens[:start], and its expected log (the ELBO)."""
    positions = list(range(start, len(tokens)))
    probs, logs = [], []
    for order in itertools.permutations(positions):
        masked, lp = set(positions), 0.0
        for j in order:
            lp += float(logp_given(model, tokens, masked)[j])
            masked.discard(j)
        probs.append(math.exp(lp))
        logs.append(lp)
    return math.log(sum(probs) / len(probs)), sum(logs) / len(logs)


def seq(V: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(1, V, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shift", [0, 1])
def test_elbo_is_a_bound_and_the_any_order_mean(helpers, shift):
    model = helpers.FakeLM(V=6, seed=3, logits_shift=shift)
    for seed in range(3):
        tokens, start = seq(6, 6, seed), 3
        ll, order_mean = exact_loglik(model, tokens, start)
        bound = exact_expectation(model, tokens, start)
        assert bound == pytest.approx(order_mean, abs=1e-9)  # LLaDA's weights = mean over orders
        assert bound <= ll + 1e-12
        assert bound < ll - 1e-6  # strict here: the conditionals of a random model disagree


def test_exact_likelihood_is_a_distribution(helpers):
    """The brute-force likelihood the bound is checked against sums to 1 over all continuations."""
    V = 5
    model = helpers.FakeLM(V=V, seed=1)
    context = seq(V, 3, 0)
    total = 0.0
    for cont in itertools.product(range(1, V), repeat=2):  # the mask id (0) has probability ~0
        tokens = torch.cat((context, torch.tensor(cont)))
        total += math.exp(exact_loglik(model, tokens, 3)[0])
    assert total == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("estimator,shift", [("llada", 0), ("dream", 1), ("llada", 1)])
def test_estimator_mean_equals_exact_expectation(helpers, estimator, shift):
    model = helpers.FakeLM(V=6, seed=5, logits_shift=shift)
    tokens, start = seq(6, 7, 11), 3
    settings = ScoreSettings(samples=512, estimator=estimator, eps=1e-3, chunk_tokens=1 << 16)
    runs = torch.tensor([elbo(model, tokens, start, settings, seed) for seed in range(12)])
    exact = exact_expectation(model, tokens, start, estimator, eps=1e-3)
    err = runs.std().item() / math.sqrt(len(runs))
    assert abs(runs.mean().item() - exact) < 5 * err + 1e-9, (runs.mean().item(), exact, err)
    # and the test can tell: a wrong weighting (no L / l) is far outside the tolerance
    assert abs(exact_expectation(model, tokens, start, estimator, eps=1e-3) * 0.8 - runs.mean().item()) > 5 * err


def test_variance_shrinks_with_samples(helpers):
    model = helpers.FakeLM(V=6, seed=2)
    tokens = seq(6, 8, 4)

    def var(samples: int) -> float:
        s = ScoreSettings(samples=samples, chunk_tokens=1 << 16)
        return torch.tensor([elbo(model, tokens, 2, s, seed) for seed in range(40)]).var().item()

    v2, v8, v32 = var(2), var(8), var(32)
    assert v8 < v2 / 2 and v32 < v8 / 2, (v2, v8, v32)


@pytest.mark.parametrize("estimator,shift", [("llada", 0), ("dream", 1)])
def test_suffix_sums_are_the_elbo_of_every_split(helpers, estimator, shift):
    model = helpers.FakeLM(V=12, seed=7, logits_shift=shift)
    tokens = seq(12, 9, 3)
    settings = ScoreSettings(samples=16, estimator=estimator)
    contrib = suffix_contributions(model, tokens, settings, seed=99, first=1)
    assert torch.isnan(contrib[:1]).all()
    for c in range(1, len(tokens)):
        assert float(contrib[c:].sum()) == pytest.approx(elbo(model, tokens, c, settings, seed=99), abs=1e-9)
    # same seed, same numbers; another seed, other numbers
    assert torch.equal(contrib[1:], suffix_contributions(model, tokens, settings, seed=99)[1:])
    assert not torch.allclose(contrib[1:], suffix_contributions(model, tokens, settings, seed=7)[1:])


@pytest.mark.parametrize("shift", [0, 1])
def test_left_to_right_greedy_flags(helpers, shift):
    """Greedy at every position of x[c:] <=> one-token-per-step left-to-right greedy decoding of
    len(x) - c tokens after x[:c] reproduces x[c:] (decoded here by a literal loop)."""
    V, N, c = 10, 8, 3
    model = helpers.FakeLM(V=V, seed=4, logits_shift=shift)
    x = torch.cat((seq(V, c, 1), torch.zeros(N - c, dtype=torch.long)))
    for i in range(c, N):  # literal greedy loop, leftmost masked position first
        lp = logp_given(model, torch.where(torch.arange(N) < i, x, 0), set())
        row = torch.log_softmax(model(torch.where(torch.arange(N) < i, x, 0)[None]).logits[0], -1)[i - shift]
        x[i] = int(row.argmax())
        assert not torch.isnan(lp[i])
    top = left_to_right_top(model, x, k=2, first=c)
    assert (top["rank"] == 1).all() and torch.equal(top["top_ids"][:, 0], x[c:])
    assert torch.allclose(top["token"], top["top"][:, 0])
    y = x.clone()
    y[N - 2] = int(top["top_ids"][N - 2 - c, 1])  # the runner-up at one position
    flags = left_to_right_top(model, y, k=1, first=c)["rank"] == 1
    assert not flags[N - 2 - c] and flags[: N - 2 - c].all()


@pytest.mark.parametrize("estimator", ["llada", "dream"])
def test_batched_split_masks_equal_one_split_at_a_time(estimator):
    settings = ScoreSettings(samples=16, estimator=estimator, eps=0.05)
    for n, seed in ((2, 0), (9, 1), (30, 2)):
        v, u = draws(16, n, seed)
        starts = torch.tensor([n - 1, 1, n // 2, 1])  # any order, repeats allowed
        masks, weights = split_masks_many(v, u, starts, settings)
        one = [split_masks(v, u, int(c), settings) for c in starts]
        assert torch.equal(masks, torch.cat([m for m, _ in one]))
        assert torch.equal(weights, torch.cat([w for _, w in one]))


def test_distinct_rows_keep_each_mask_once():
    masks = torch.tensor([[0, 1, 1], [0, 0, 1], [0, 1, 1], [0, 0, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    rows = DistinctRows.of_masks(masks)
    assert rows.masks.shape == (3, 3) and rows.masks.any(dim=1).all()
    assert len({tuple(m.tolist()) for m in rows.masks}) == 3
    assert rows.of[3] == -1  # the empty mask scores nothing
    keep = rows.of >= 0
    assert torch.equal(rows.masks[rows.of[keep]], masks[keep])
    assert DistinctRows.of_masks(torch.zeros((0, 4), dtype=torch.bool)).of.shape == (0,)


@pytest.mark.parametrize("estimator,shift", [("llada", 0), ("dream", 1)])
def test_each_distinct_row_is_forwarded_once(helpers, estimator, shift):
    """All splits' samples and the left-to-right rows of two sequences: every distinct mask is one
    forward row (repeats are many: all samples of the last split mask the same position), and the
    estimates equal those of each split scored alone."""
    model = helpers.FakeLM(V=12, seed=2, logits_shift=shift)
    settings = ScoreSettings(samples=8, estimator=estimator)
    seqs = [seq(12, 9, 1), seq(12, 9, 2)]  # one length: FakeLM takes no padding mask
    items = [ScoreItem(t, torch.arange(1, len(t)), 30 + i, 1) for i, t in enumerate(seqs)]
    model.calls.clear()
    out = score_items(model, items, settings, k=2)
    forwarded = sum(ids.shape[0] for ids, _, _ in model.calls)
    distinct = 0
    for t, item in zip(seqs, items):
        v, u = draws(8, len(t), item.seed)
        masks = {tuple(m.tolist()) for c in range(1, len(t)) for m in split_masks(v, u, c, settings)[0] if m.any()}
        distinct += len(masks | {tuple(j >= i for j in range(len(t))) for i in range(1, len(t))})
    assert forwarded == distinct < sum(8 * (len(t) - 1) + len(t) - 1 for t in seqs)
    for t, item, got in zip(seqs, items, out):
        alone = torch.tensor([elbo(model, t, c, settings, item.seed) for c in range(1, len(t))], dtype=torch.float64)
        torch.testing.assert_close(got.estimates, alone, atol=1e-9, rtol=0)
        top = left_to_right_top(model, t, k=2, first=1)
        assert all(torch.equal(got.top[key], top[key]) for key in ("rank", "top_ids"))


@pytest.mark.parametrize("kwargs,field", [({"samples": 0}, "samples"), ({"estimator": "x"}, "estimator"),
                                          ({"eps": 1.0}, "eps"), ({"chunk_tokens": -1}, "chunk_tokens")])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        ScoreSettings(**kwargs)


def test_split_out_of_range_is_an_error(helpers):
    model = helpers.FakeLM(V=6, logits_shift=1)
    with pytest.raises(ValueError, match="^start:"):
        elbo(model, seq(6, 5, 0), 0, ScoreSettings(), 0)
    with pytest.raises(ValueError, match="^start:"):
        elbo(model, seq(6, 5, 0), 5, ScoreSettings(), 0)
