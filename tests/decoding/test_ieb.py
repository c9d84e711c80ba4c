"""``ieb``: hand-made permutation and sort-control steps, a reduction to ``dapd``, and hypothesis
properties of one step (independence, same-token conflicts, the entropy budget, the floor)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vllm_dapd.decoding import DenoiseState, get_policy, min_commits, stack_params
from vllm_dapd.decoding.confidence import entropy, token_probability
from vllm_dapd.decoding.independent_set import is_independent
from vllm_dapd.plugins.dapd import dapd_graph

POLICY = get_policy("ieb")
V = 6


def logits_for(rows: list[list[tuple[int, float]]]) -> torch.Tensor:
    """[B, L, V]: position j puts probability p on token t (the rest share 1 - p)."""
    out = []
    for row in rows:
        out.append([[math.log(p) if v == t else math.log((1 - p) / (V - 1)) for v in range(V)] for t, p in row])
    return torch.tensor(out)


def state_of(rows, attention=None, steps=100, masked=None) -> DenoiseState:
    logits = logits_for(rows)
    B, L, _ = logits.shape
    masked = torch.ones(B, L, dtype=torch.bool) if masked is None else torch.tensor(masked)
    if attention is None:  # each position attends to itself: no DAPD edges
        attention = torch.eye(L).expand(B, L, L).clone() * 0.9 + 0.1 / L
    full = lambda v: torch.full((B,), v, dtype=torch.long)  # noqa: E731
    return DenoiseState(logits=logits, tokens=torch.where(masked, 0, 1), masked=masked, decoded=~masked,
                        step=full(0), steps=full(steps), temperature=torch.zeros(B), seed=full(0), nfe=full(0),
                        attention=torch.as_tensor(attention, dtype=torch.float32))


def committed(name, st_, **overrides) -> list[int]:
    pol = get_policy(name)
    res = pol.step(st_, stack_params([pol.make_params(overrides)] * st_.batch_size))
    return res.commit[0].nonzero().flatten().tolist()


def test_permutation_with_uniform_marginals_commits_one_per_item():
    # Positions 0-2 each propose item 3 at .34 (a permutation's uniform marginal, argmax tie broken
    # the same way); position 3 proposes item 4 at .34. No attention edges at all.
    rows = [[(3, 0.34), (3, 0.34), (3, 0.34), (4, 0.34)]]
    assert committed("ieb", state_of(rows), gamma=100.0) == [0, 3]  # one copy of each item
    # dapd's graph alone: item 3 three times; its conflict_bar is ieb's rule
    assert committed("dapd", state_of(rows), variant="tuned", conflict_bar=0.0) == [0, 1, 2, 3]
    assert committed("dapd", state_of(rows), variant="tuned", conflict_bar=0.9) == [0, 3]


def test_sort_control_keeps_confident_repeats_together():
    rows = [[(2, 0.99), (2, 0.98), (5, 0.97), (5, 0.99)]]  # "2 2 5 5", confident
    assert committed("ieb", state_of(rows)) == [0, 1, 2, 3]
    assert committed("ieb", state_of(rows), conflict_bar=0.985) == [0, 3]  # now 1 and 2 are unsure


def test_entropy_budget_stops_the_set():
    rows = [[(1, 0.99), (2, 0.6), (3, 0.6), (4, 0.6)]]  # distinct tokens, no edges
    ent = entropy(logits_for(rows))[0].tolist()
    assert committed("ieb", state_of(rows), gamma=100.0) == [0, 1, 2, 3]
    # budget: sum - max over the prefix; {0, 1}: ent[0] <= gamma; {0, 1, 2}: ent[0] + ent[1] > gamma
    g = ent[0] + 0.5 * ent[1]
    assert committed("ieb", state_of(rows), gamma=g) == [0, 1]
    assert committed("ieb", state_of(rows), gamma=0.0) == [0]
    assert committed("ieb", state_of(rows, steps=2), gamma=0.0) == [0, 1]  # the floor, ceil(4 / 2)


def test_graph_edges_still_separate():
    rows = [[(1, 0.9), (2, 0.8), (3, 0.7)]]
    att = torch.tensor([[[0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]]])  # 0 <-> 1 strongly
    assert committed("ieb", state_of(rows, attention=att), gamma=100.0) == [0, 2]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), L=st.integers(1, 14), edge=st.floats(0.5, 3.0))
def test_without_conflicts_or_budget_it_is_dapd(helpers, seed, L, edge):
    st_ = helpers.make_state(2, L, 5, seed=seed, masked_frac=0.8, steps=3, attention=True)
    dapd = get_policy("dapd")
    want = dapd.step(st_, stack_params([dapd.make_params({"variant": "tuned", "edge_threshold": edge, "symmetric_mean": False, "order": 0,
                                                       "tail_ratio": 0.0, "safe_confidence": 1.0,
                                                       "conflict_bar": 0.0})] * 2)).commit
    got = POLICY.step(st_, stack_params([POLICY.make_params(
        {"edge_threshold": edge, "conflict_bar": 0.0, "gamma": 1e9})] * 2)).commit
    assert torch.equal(got, want)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), L=st.integers(1, 16), V_=st.integers(2, 5),
       frac=st.floats(0.1, 1.0), bar=st.floats(0.0, 1.0), gamma=st.floats(0.0, 3.0), edge=st.floats(0.5, 4.0),
       scale=st.floats(0.5, 6.0))
@example(seed=1, B=1, L=12, V_=2, frac=1.0, bar=0.0, gamma=0.0, edge=1.0, scale=5.0)  # an H of 3e-8 nats
def test_step_properties(helpers, seed, B, L, V_, frac, bar, gamma, edge, scale):
    """With the floor at 1 (large budget): only masked positions, the top one always, no two linked
    in DAPD's graph, no repeated token where either copy is unsure, sum H - max H <= gamma."""
    st_ = helpers.make_state(B, L, V_, seed=seed, masked_frac=frac, steps=10_000, attention=True,
                             logit_scale=scale)
    p = POLICY.make_params({"conflict_bar": bar, "gamma": gamma, "edge_threshold": edge})
    stacked = stack_params([p] * B)
    res = POLICY.step(st_, stacked)
    c, masked = res.commit, st_.masked
    assert not (c & ~masked).any()
    n = masked.sum(-1)
    assert (c.sum(-1) >= min_commits(n, st_.step, st_.steps)).all()
    conf = token_probability(st_.logits, res.tokens)
    top = torch.where(masked, conf, -1.0).argmax(-1)
    has = n > 0
    assert c[has, top[has]].all(), "the most confident masked position is always committed"
    assert is_independent(dapd_graph(st_.attention, masked, stacked), c).all()
    same = res.tokens.unsqueeze(2) == res.tokens.unsqueeze(1)
    unsure = conf < bar
    eye = torch.eye(L, dtype=torch.bool)
    bad = same & (unsure.unsqueeze(2) | unsure.unsqueeze(1)) & c.unsqueeze(2) & c.unsqueeze(1) & ~eye
    assert not bad.any(), "two committed positions share a token while one is unsure"
    h = torch.where(c, entropy(st_.logits).double(), 0.0)
    # The policy's H comes from one softmax (confidence.softmax_entropy): within 5e-5 nats + 5e-4 relative.
    assert ((h.sum(-1) - h.max(-1).values) <= gamma + 5e-5 + 5e-4 * h.sum(-1)).all()


@pytest.mark.parametrize("field,value", [("gamma", -1.0), ("conflict_bar", 1.5), ("edge_threshold", -0.1),
                                         ("renormalize", 2)])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        POLICY.make_params({field: value})


class PermutationLM:
    """An exact oracle for "answer: a permutation of items 1..n" (mask id 0): each masked position's
    distribution is uniform over the items not yet on the canvas, tilted by a fixed per-(position,
    item) preference so positions disagree a little; attention goes to self only, so the graph
    cannot see that the positions compete for the same items."""

    mask_token_id, logits_shift = 0, 0

    def __init__(self, n: int, seed: int, tilt: float = 0.3):
        self.n = n
        self.pref = torch.randn(n, n + 1, generator=torch.Generator().manual_seed(seed)) * tilt

    def __call__(self, x, attention_span=None, attention_layers=None):
        from vllm_dapd.decoding.model_api import DiffusionOutput
        B, T = x.shape
        canvas = x[:, T - self.n:]
        used = torch.zeros(B, self.n + 1, dtype=torch.bool).scatter_(1, canvas, True)
        used[:, 0] = True  # the mask is never an answer
        logits = torch.full((B, T, self.n + 1), -1e4)
        logits[:, T - self.n:] = torch.where(used.unsqueeze(1), -1e4, self.pref.unsqueeze(0))
        att = None
        if attention_span is not None:
            s, e = attention_span
            att = torch.eye(e - s).expand(B, e - s, e - s).clone() * 0.9
        return DiffusionOutput(logits=logits, attention=att)


def test_permutation_oracle_ieb_never_repeats_an_item():
    """On the exact oracle ``ieb`` always decodes a permutation, in fewer forwards than one item per
    step; ``dapd`` with the same graph (and no same-token rule) repeats items."""
    from vllm_dapd.decoding import denoise
    n, ok = 6, {"ieb": 0, "dapd": 0}
    nfe = []
    for seed in range(20):
        lm = PermutationLM(n, seed)
        prompt = torch.tensor([[1, 2]])
        for name in ok:
            res = denoise(lm, prompt, gen_length=n, block_length=n, steps=n, policy=name,
                          params={"gamma": 100.0} if name == "ieb" else {"variant": "tuned", "conflict_bar": 0.0})
            ok[name] += int(sorted(res.tokens[0].tolist()) == list(range(1, n + 1)))
            if name == "ieb":
                nfe.append(int(res.nfe[0]))
    assert ok["ieb"] == 20
    assert ok["dapd"] < 20
    assert sum(nfe) / len(nfe) < n
