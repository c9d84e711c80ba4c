"""Each baseline policy on small hand-made distributions with expectations worked out by hand."""

from __future__ import annotations

import pytest
import torch

from vllm_dapd.decoding import get_policy, stack_params, uniform_noise
from vllm_dapd.decoding.policy import DenoiseState
from vllm_dapd.decoding.sampling import STREAM_RANDOM_ORDER

EPS = 1e-6
A = [0.6, 0.4 / 3, 0.4 / 3, 0.4 / 3]  # max .6, margin .467, entropy 1.112
B = [0.55, 0.45 - 2 * EPS, EPS, EPS]  # max .55, margin .10, entropy .688
C = [0.5, 0.5 - 2 * EPS, EPS, EPS]  # max .5, margin 0, entropy .693
D = [0.45, 0.55 / 3, 0.55 / 3, 0.55 / 3]  # max .45, margin .267, entropy 1.26


def peaked(p_top: float) -> list[float]:
    rest = (1 - p_top) / 3
    return [p_top, rest, rest, rest]


def state_of(rows, masked=None, step=0, steps=100, temperature=0.0, seed=0) -> DenoiseState:
    """Batch from per-position probability vectors: rows[b][j] = distribution of position j."""
    probs = torch.tensor(rows, dtype=torch.float64)
    Bn, L, _ = probs.shape
    masked = torch.ones(Bn, L, dtype=torch.bool) if masked is None else torch.tensor(masked)
    full = lambda v, dt: torch.full((Bn,), v, dtype=dt)
    return DenoiseState(
        logits=probs.log().float(), tokens=torch.where(masked, 0, 3), masked=masked, decoded=~masked,
        step=full(step, torch.long), steps=full(steps, torch.long), temperature=full(temperature, torch.float32),
        seed=full(seed, torch.long), nfe=full(0, torch.long),
    )


def commit(name, state, **overrides):
    pol = get_policy(name)
    params = [pol.make_params(overrides)] * state.batch_size
    return pol.step(state, stack_params(params))


def committed(res, b=0):
    return res.commit[b].nonzero().flatten().tolist()


# ---- LLaDA low_confidence / random ----

def test_low_confidence_takes_the_llada_count_of_most_probable():
    s = state_of([[peaked(0.9), peaked(0.5), peaked(0.7), peaked(0.6)]], steps=2)
    res = commit("low_confidence", s)
    assert committed(res) == [0, 2]  # ceil(4 / 2) = 2 most probable
    assert res.tokens[0, [0, 2]].tolist() == [0, 0]
    s = state_of([[peaked(0.9), peaked(0.5), peaked(0.7), peaked(0.6)]], masked=[[False, True, True, True]], steps=2)
    assert committed(commit("low_confidence", s)) == [2, 3]  # ceil(3 / 2) = 2, position 0 not masked
    s = state_of([[peaked(0.9)] * 4], step=1, steps=2)
    assert committed(commit("low_confidence", s)) == [0, 1, 2, 3]  # last step: everything


def test_low_confidence_ties_take_the_lowest_position():
    s = state_of([[peaked(0.5)] * 5], steps=3)
    assert committed(commit("low_confidence", s)) == [0, 1]


def test_low_confidence_scores_with_unscaled_probability():
    s = state_of([[A, B]], temperature=2.0, steps=2)
    res = commit("low_confidence", s)
    expected = torch.softmax(s.logits[0], -1).gather(-1, res.tokens[0][:, None])[:, 0]
    assert torch.allclose(res.confidence[0], expected)


def test_random_order_comes_from_the_seeded_noise():
    rows = [[peaked(0.9)] * 6]
    orders = set()
    for seed in range(6):
        s = state_of(rows, steps=3, seed=seed)
        noise = uniform_noise(s.seed, s.nfe, (6,), STREAM_RANDOM_ORDER)[0]
        expected = sorted(noise.topk(2).indices.tolist())
        got = committed(commit("random", s))
        assert got == expected
        orders.add(tuple(got))
    assert len(orders) > 1


# ---- Dream maskgit_plus / margin / entropy ----

@pytest.mark.parametrize("name,rows,first", [
    ("maskgit_plus", [A, B], 0), ("margin", [A, B], 0), ("entropy", [A, B], 1),
    ("maskgit_plus", [C, D], 0), ("margin", [C, D], 1), ("entropy", [C, D], 0),
])
def test_dream_measures_rank_as_dream(name, rows, first):
    s = state_of([rows], steps=2)  # Dream count int(2 * (1 - .5005)) = 0, floored to ceil(2/2) = 1
    assert committed(commit(name, s)) == [first]


def test_dream_confidence_uses_the_tempered_distribution():
    s = state_of([[A, B, C]], temperature=0.5, steps=3)
    res = commit("maskgit_plus", s)
    expected = torch.softmax(s.logits[0] / 0.5, -1).gather(-1, res.tokens[0][:, None])[:, 0]
    assert torch.allclose(res.confidence[0].float(), expected, atol=1e-6)


def test_dream_last_step_commits_all_and_alg_temp_samples_positions():
    s = state_of([[A, B, C, D]], step=3, steps=4)
    assert committed(commit("entropy", s)) == [0, 1, 2, 3]
    s = state_of([[A, B, C, D]], steps=4)
    assert committed(commit("maskgit_plus", s, alg_temp=1e-6)) == [0]  # ~ greedy
    picks = {tuple(committed(commit("maskgit_plus", state_of([[A, B, C, D]], steps=4, seed=k), alg_temp=100.0)))
             for k in range(12)}
    assert len(picks) > 1  # hot alg_temp: positions sampled, seed-dependent


# ---- Fast-dLLM threshold / factor ----

def test_threshold_rule():
    rows = [[peaked(0.95), peaked(0.5), peaked(0.91), peaked(0.3)]]
    assert committed(commit("threshold", state_of(rows), threshold=0.9)) == [0, 2]
    assert committed(commit("threshold", state_of(rows), threshold=0.99)) == [0]  # at least the best one
    assert committed(commit("threshold", state_of(rows), threshold=0.4)) == [0, 1, 2]
    assert committed(commit("threshold", state_of(rows, step=0, steps=1), threshold=0.99)) == [0, 1, 2, 3]
    assert committed(commit("threshold", state_of(rows, step=0, steps=2), threshold=0.99)) == [0, 2]  # floor 2


def test_threshold_dream_quota_caps_the_step():
    rows = [[peaked(0.95), peaked(0.5), peaked(0.91), peaked(0.3)]]

    def dream(threshold, step=0, steps=2, size=4, **kw):
        s = state_of(rows, step=step, steps=steps)
        s.block_size = torch.tensor([size])
        return committed(commit("threshold", s, threshold=threshold, dream_quota=True, **kw))

    assert dream(0.9) == [0, 2]  # quota 4 // 2 = 2, two pass
    assert dream(0.4) == [0, 2]  # three pass, capped at the quota
    assert committed(commit("threshold", state_of(rows), threshold=0.4)) == [0, 1, 2]  # LLaDA's: no cap
    assert dream(0.1, steps=4, size=8, step=1) == [0, 2]  # 8 // 4 x 2 steps - 4 committed = 0: floor 2
    assert dream(0.1, steps=4, size=8, step=1, exact_schedule=True) == [0]  # no floor: the best one
    assert dream(0.1, steps=3, size=4, exact_schedule=True) == [0, 2]  # 4 over 3 steps: 2 1 1 (LLaDA's split)
    assert dream(0.1, steps=4, size=4, exact_schedule=True) == [0]
    assert dream(0.99, exact_schedule=True) == [0]
    assert dream(0.99) == [0, 2]  # ceil(4 / 2)
    assert dream(0.99, step=1, exact_schedule=True) == [0, 1, 2, 3]  # the last step takes all
    with pytest.raises(ValueError, match="block_size"):
        commit("threshold", state_of(rows), dream_quota=True)


def test_threshold_dream_quota_reads_the_tempered_confidence():
    s = state_of([[A, B, C]], temperature=0.5)
    s.block_size = torch.tensor([3])
    res = commit("threshold", s, dream_quota=True)
    expected = torch.softmax(s.logits[0] / 0.5, -1).gather(-1, res.tokens[0][:, None])[:, 0]
    assert torch.allclose(res.confidence[0], expected, atol=1e-6)


def test_threshold_per_row_params():
    rows = [[peaked(0.95), peaked(0.5), peaked(0.91)]] * 2
    pol = get_policy("threshold")
    params = stack_params([pol.make_params({"threshold": 0.9}), pol.make_params({"threshold": 0.45})])
    res = pol.step(state_of(rows), params)
    assert committed(res, 0) == [0, 2] and committed(res, 1) == [0, 1, 2]


@pytest.mark.parametrize("probs,factor,expected", [
    # ranked c = .9 .8 .7 .6; bars 1 - f/(n+1): f=1 -> (any) .667 .75 -> run of 2
    ([0.7, 0.9, 0.6, 0.8], 1.0, [1, 3]),
    # f=2: bars (any) .333 .5 .6 -> .65 passes -> all 4
    ([0.7, 0.9, 0.65, 0.8], 2.0, [0, 1, 2, 3]),
    # f=0: bars 1 -> only the top one
    ([0.7, 0.9, 0.6, 0.8], 0.0, [1]),
])
def test_factor_rule(probs, factor, expected):
    s = state_of([[peaked(p) for p in probs]])
    assert committed(commit("factor", s, factor=factor)) == expected
    assert committed(commit("factor", s, factor=factor, reference_exact=False)) == expected


def test_factor_reference_exact_commits_a_lone_last_failure():
    # ranked .9 .8 .7; bars (any) .667 .75: only the last rank fails. The reference commits all 3.
    s = state_of([[peaked(0.9), peaked(0.8), peaked(0.7)]])
    assert committed(commit("factor", s, factor=1.0)) == [0, 1, 2]
    assert committed(commit("factor", s, factor=1.0, reference_exact=False)) == [0, 1]
    # a failure before the last rank: both modes stop there
    s = state_of([[peaked(0.9), peaked(0.6), peaked(0.5), peaked(0.95)]])
    assert committed(commit("factor", s, factor=1.0)) == [0, 3]


def test_localleap_relaxes_the_bar_next_to_an_anchor():
    # position 1 is an anchor (.95); 3 (.8) is within radius 2 of it, 6 (.8) is not; 4 (.7) is near
    # but under the relaxed bar .75
    rows = [[peaked(0.5), peaked(0.95), peaked(0.5), peaked(0.8), peaked(0.7), peaked(0.5), peaked(0.8)]]
    assert committed(commit("localleap", state_of(rows), radius=2)) == [1, 3]
    assert committed(commit("localleap", state_of(rows), radius=5)) == [1, 3, 6]
    assert committed(commit("localleap", state_of(rows), radius=0)) == [1]
    # no anchor: the plain threshold rule, which still commits the most confident one
    rows = [[peaked(0.8), peaked(0.85), peaked(0.8)]]
    assert committed(commit("localleap", state_of(rows), radius=4)) == [1]


# ---- EB-sampler ----

E1, E2, E3 = peaked(0.97), peaked(0.9), peaked(0.6)  # entropies .1677, .4349, 1.1123 (by hand)


@pytest.mark.parametrize("gamma,expected", [
    (0.0, [1]),  # one position always
    (0.1, [1]),  # {E1, E2}: .1677 + .4349 - .4349 = .168 > .1
    (0.2, [1, 2]),
    (0.6, [1, 2]),  # all three: 1.715 - 1.112 = .603 > .6
    (0.61, [0, 1, 2]),
])
def test_eb_entropy_bound(gamma, expected):
    s = state_of([[E3, E1, E2]])
    assert committed(commit("eb", s, gamma=gamma)) == expected


def test_eb_proxies_change_the_order():
    s = state_of([[A, B]])
    assert committed(commit("eb", s, gamma=0.0, proxy=0)) == [0]  # probability: A (.6)
    assert committed(commit("eb", s, gamma=0.0, proxy=1)) == [1]  # entropy: B (.688 < 1.112)
    assert committed(commit("eb", s, gamma=0.0, proxy=2)) == [0]  # margin: A (.467)


# ---- Params validation ----

@pytest.mark.parametrize("name,field,value", [
    ("threshold", "threshold", -0.1), ("threshold", "dream_quota", 2), ("threshold", "exact_schedule", 0.5), ("threshold", "threshold", 1.5), ("threshold", "threshold", float("nan")),
    ("factor", "factor", -1.0), ("factor", "reference_exact", 2), ("localleap", "relaxed_threshold", 1.2),
    ("localleap", "radius", -1), ("localleap", "radius", 1.5), ("localleap", "threshold", -0.1), ("eb", "gamma", -0.5), ("eb", "proxy", 3), ("eb", "proxy", 1.5),
    ("maskgit_plus", "eps", 0.0), ("margin", "eps", 1.0), ("entropy", "alg_temp", -1.0),
])
def test_bad_params_name_the_field(name, field, value):
    with pytest.raises(ValueError, match=field):
        get_policy(name).make_params({field: value})


def test_int_given_for_a_float_field_still_stacks_as_float():
    pol = get_policy("threshold")
    stacked = stack_params([pol.make_params({"threshold": 1}), pol.make_params({"threshold": 0.5})])
    assert stacked["threshold"].dtype == torch.float32 and stacked["threshold"].tolist() == [1.0, 0.5]


@pytest.mark.parametrize("name", ["maskgit_plus", "margin", "entropy"])
def test_dream_exact_schedule_keeps_dream_counts(name):
    # 6 masks, 3 steps: Dream commits int(6 * (1 - t1/t0)) = int(1.998) = 1; min_commits would say 2
    rows = [[A, B, C, D, A, B]]
    assert len(committed(commit(name, state_of(rows, steps=3)))) == 2
    assert len(committed(commit(name, state_of(rows, steps=3), exact_schedule=True))) == 1
    # steps == masks: Dream's count is 0 at the first step, and exact mode idles like Dream;
    # the default mode never idles
    assert len(committed(commit(name, state_of(rows, steps=6), exact_schedule=True))) == 0
    assert len(committed(commit(name, state_of(rows, steps=6)))) == 1
    # last step: everything, in both modes
    assert len(committed(commit(name, state_of(rows, step=2, steps=3), exact_schedule=True))) == 6


@pytest.mark.parametrize("name", ["maskgit_plus", "margin", "entropy"])
@pytest.mark.parametrize("masks,steps", [(7, 7), (16, 8), (5, 9), (30, 4)])
def test_dream_exact_schedule_finishes_within_budget(name, masks, steps):
    g = torch.Generator().manual_seed(masks * steps)
    s = state_of([[peaked(0.3)] * masks], steps=steps)
    pol = get_policy(name)
    params = stack_params([pol.make_params({"exact_schedule": True})])
    for i in range(steps):
        s.logits = torch.randn(1, masks, 4, generator=g) * 3
        s.step = torch.tensor([i])
        res = pol.step(s, params)
        assert not (res.commit & ~s.masked).any()
        s.masked = s.masked & ~res.commit
    assert not s.masked.any()
