"""Invariants every registered policy must keep (built-in and later ones such as dapd/dawn).

Per step: only masked positions are committed; every unfinished sequence commits at least
``min_commits`` (>= 1), finished ones nothing; repeated steps finish a block within its budget; a
batch gives each row what it would get alone, with per-row params and temperatures mixed;
NaN/inf logits are refused; ties are broken deterministically.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_dapd.decoding import available_policies, get_policy, min_commits, stack_params

POLICIES = available_policies()
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_step(policy, state, params_list):
    return policy.step(state, stack_params(params_list))


def shapes():
    return st.tuples(st.integers(1, 4), st.integers(1, 12), st.integers(2, 20), st.integers(0, 10_000))


@pytest.mark.parametrize("name", POLICIES)
@SETTINGS
@given(shape=shapes(), frac=st.floats(0.0, 1.0), step=st.integers(0, 5), steps=st.integers(1, 6),
       temp=st.sampled_from([0.0, 0.7, 1.0]))
def test_commits_only_masked_and_at_least_the_floor(helpers, name, shape, frac, step, steps, temp):
    B, L, V, seed = shape
    policy = get_policy(name)
    state = helpers.make_state(B, L, V, seed=seed, masked_frac=frac, step=step, steps=steps,
                               temperature=temp, attention=policy.needs_attention)
    rnd = random.Random(seed)
    res = run_step(policy, state, [helpers.varied_params(policy, rnd) for _ in range(B)])
    assert res.commit.dtype == torch.bool and res.commit.shape == (B, L)
    assert res.tokens.shape == (B, L) and res.tokens.dtype == torch.long
    assert not (res.commit & ~state.masked).any(), "committed a position that is not masked"
    n = state.masked.sum(-1)
    got = res.commit.sum(-1)
    floor = min_commits(n, state.step, state.steps)
    assert (got >= floor).all()
    assert (got[n > 0] >= 1).all()
    assert (got[n == 0] == 0).all()
    committed = res.tokens[res.commit]
    assert ((committed >= 0) & (committed < V)).all()


@pytest.mark.parametrize("name", POLICIES)
@SETTINGS
@given(shape=shapes(), steps=st.integers(1, 6), frac=st.floats(0.3, 1.0))
def test_block_finishes_within_budget(helpers, name, shape, steps, frac):
    B, L, V, seed = shape
    policy = get_policy(name)
    rnd = random.Random(seed)
    params = stack_params([helpers.varied_params(policy, rnd) for _ in range(B)])
    state = helpers.make_state(B, L, V, seed=seed, masked_frac=frac, steps=steps, attention=policy.needs_attention)
    for i in range(steps):
        fresh = helpers.make_state(B, L, V, seed=seed * 31 + i + 1, attention=policy.needs_attention)
        state.logits, state.attention = fresh.logits, fresh.attention  # a new "forward" every step
        state.step = torch.full((B,), i, dtype=torch.long)
        state.nfe = state.step.clone()
        res = policy.step(state, params)
        state.tokens = torch.where(res.commit, res.tokens, state.tokens)
        state.decoded = state.decoded | res.commit
        state.masked = state.masked & ~res.commit
    assert not state.masked.any(), f"{name} left masks after {steps} steps"


@pytest.mark.parametrize("name", POLICIES)
@SETTINGS
@given(shape=shapes(), frac=st.floats(0.0, 1.0), steps=st.integers(1, 6))
def test_batch_equals_each_row_alone(helpers, name, shape, frac, steps):
    B, L, V, seed = shape
    policy = get_policy(name)
    rnd = random.Random(seed)
    temps = [rnd.choice([0.0, 0.5, 1.0]) for _ in range(B)]
    steps_rows = [rnd.randint(1, steps) for _ in range(B)]
    state = helpers.make_state(B, L, V, seed=seed, masked_frac=frac, steps=steps_rows, temperature=temps,
                               attention=policy.needs_attention)
    plist = [helpers.varied_params(policy, rnd) for _ in range(B)]
    res = run_step(policy, state, plist)
    for b in range(B):
        alone = run_step(policy, helpers.select_rows(state, [b]), [plist[b]])
        assert torch.equal(alone.commit[0], res.commit[b]), f"row {b}"
        c = alone.commit[0]
        assert torch.equal(alone.tokens[0][c], res.tokens[b][c]), f"row {b} tokens"


@pytest.mark.parametrize("name", POLICIES)
def test_same_inputs_same_output(helpers, name):
    policy = get_policy(name)
    state = helpers.make_state(3, 10, 12, seed=5, temperature=[0.0, 1.0, 0.8], attention=policy.needs_attention)
    p = [policy.make_params()] * 3
    a, b = run_step(policy, state, p), run_step(policy, state, p)
    assert torch.equal(a.commit, b.commit) and torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("B,L", [(1, 1), (1, 7), (3, 1)])
def test_tiny_shapes(helpers, name, B, L):
    policy = get_policy(name)
    state = helpers.make_state(B, L, 5, seed=1, masked_frac=1.0, attention=policy.needs_attention)
    res = run_step(policy, state, [policy.make_params()] * B)
    assert (res.commit.sum(-1) >= 1).all()
    assert not (res.commit & ~state.masked).any()


@pytest.mark.parametrize("name", POLICIES)
def test_nothing_masked_commits_nothing(helpers, name):
    policy = get_policy(name)
    state = helpers.make_state(2, 6, 8, seed=2, masked_frac=0.0, attention=policy.needs_attention)
    assert not state.masked.any()
    res = run_step(policy, state, [policy.make_params()] * 2)
    assert not res.commit.any()


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_refused(helpers, name, bad):
    policy = get_policy(name)
    state = helpers.make_state(2, 6, 8, seed=3, attention=policy.needs_attention)
    state.logits[1, 2, 3] = bad
    with pytest.raises(ValueError, match="logits"):
        run_step(policy, state, [policy.make_params()] * 2)


@pytest.mark.parametrize("name", POLICIES)
def test_ties_are_deterministic(helpers, name):
    """All-equal logits (every position and token tie): same output every call, and the output of a
    row does not depend on the batch."""
    policy = get_policy(name)
    state = helpers.make_state(2, 8, 6, seed=4, masked_frac=1.0, steps=3, attention=policy.needs_attention)
    state.logits = torch.zeros_like(state.logits)
    if state.attention is not None:
        state.attention = torch.full_like(state.attention, 1.0 / 16)
    p = [policy.make_params()] * 2
    a, b = run_step(policy, state, p), run_step(policy, state, p)
    assert torch.equal(a.commit, b.commit) and torch.equal(a.tokens, b.tokens)
    committed = a.tokens[a.commit]
    if name != "random":
        assert (committed == 0).all(), "tied tokens: the lowest vocab id wins at temperature 0"


SUBSET_POLICIES = [n for n in POLICIES if get_policy(n).accepts_row_subset]


def test_row_subset_is_declared_by_the_builtin_block_local_policies():
    assert {"dapd", "low_confidence", "threshold", "eb", "random", "dawn"} <= set(SUBSET_POLICIES)
    assert "klass" not in SUBSET_POLICIES  # its history reads every position's logits
    assert [n for n in SUBSET_POLICIES if get_policy(n).reads_decoded_rows] == ["dawn"]  # anchors


@pytest.mark.parametrize("name", SUBSET_POLICIES)
@SETTINGS
@given(shape=shapes(), frac=st.floats(0.0, 1.0), step=st.integers(0, 3), steps=st.integers(1, 6),
       temp=st.sampled_from([0.0, 0.8]), data=st.data())
def test_active_block_rows_decide_as_the_whole_canvas(helpers, name, shape, frac, step, steps, temp, data):
    """Given only the logits rows of its active block, or of its masked positions alone
    (``DenoiseState.rows``, padded by repeating a row, as the engine does), plus those of the decoded
    positions for a policy that reads them, a policy commits the same positions with the same tokens."""
    B, L, V, seed = shape
    lo = data.draw(st.integers(0, L - 1))
    hi = data.draw(st.integers(lo + 1, L))
    policy = get_policy(name)
    full = helpers.make_state(B, L, V, seed=seed, masked_frac=frac, step=step, steps=steps, temperature=temp,
                              attention=policy.needs_attention, block=(lo, hi))
    pad = data.draw(st.integers(0, 3))
    if data.draw(st.booleans()):  # the whole block
        rows = torch.cat((torch.arange(lo, hi), torch.full((pad,), hi - 1))).expand(B, -1)
    else:  # each row's masked positions only (the engine's choice), padded with the last one
        per_row = [torch.nonzero(m).flatten() for m in full.masked]
        per_row = [p if len(p) else torch.tensor([lo]) for p in per_row]
        width = max(len(p) for p in per_row) + pad
        rows = torch.stack([torch.cat((p, p[-1:].expand(width - len(p)))) for p in per_row])
    if policy.reads_decoded_rows:  # the engine adds every decoded position's row (DAWN's anchors)
        per_row = [torch.unique(torch.cat((r, torch.nonzero(d).flatten()))) for r, d in zip(rows, full.decoded)]
        width = max(len(p) for p in per_row)
        rows = torch.stack([torch.cat((p, p[-1:].expand(width - len(p)))) for p in per_row])
    subset = dataclasses.replace(full, logits=full.logits.gather(1, rows[..., None].expand(-1, -1, V)), rows=rows)
    params = [helpers.varied_params(policy, random.Random(seed)) for _ in range(B)]
    want, got = run_step(policy, full, params), run_step(policy, subset, params)
    assert torch.equal(got.commit, want.commit)
    assert torch.equal(got.tokens[got.commit], want.tokens[want.commit])


def test_check_logits_is_exact_with_its_one_reduction_fast_path():
    from vllm_dapd.decoding.policy import check_logits

    check_logits(torch.full((2, 3, 4), 3e38))  # finite, though their sum overflows: accepted
    check_logits(torch.randn(2, 3, 4, dtype=torch.bfloat16))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(2, 3, 4)
        x[1, 2, 3] = bad
        with pytest.raises(ValueError, match="logits"):
            check_logits(x)
    x = torch.zeros(2, 3, 4)
    x[0, 0, 0], x[1, 1, 1] = float("inf"), -float("inf")
    with pytest.raises(ValueError, match="logits"):
        check_logits(x)
