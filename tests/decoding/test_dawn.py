"""DAWN: hand-worked steps pin each rule; properties check the policy contract."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_dapd.decoding import DenoiseState, get_policy, stack_params
from vllm_dapd.decoding.select import propose_tokens
from vllm_dapd.decoding.confidence import token_probability
from vllm_dapd.decoding.independent_set import is_independent
from vllm_dapd.plugins.dawn import DawnParams, dawn_sets

POLICY = get_policy("dawn")
V = 5
MASK = 4


def logits_for(probs: list[list[float]]) -> torch.Tensor:
    """[B, L, V]: token 0 gets probability p at each position, the rest share 1 - p."""
    rows = [[[math.log(p)] + [math.log((1 - p) / (V - 1))] * (V - 1) for p in row] for row in probs]
    return torch.tensor(rows)


def state(probs, masked, attention, decoded=None, steps=100, anchor_token=0) -> DenoiseState:
    masked = torch.tensor(masked)
    decoded = ~masked if decoded is None else torch.tensor(decoded)
    b = masked.shape[0]
    return DenoiseState(
        logits=logits_for(probs), tokens=torch.where(masked, MASK, anchor_token), masked=masked, decoded=decoded,
        step=torch.zeros(b, dtype=torch.long), steps=torch.full((b,), steps), temperature=torch.zeros(b),
        seed=torch.arange(b), attention=torch.tensor(attention, dtype=torch.float32),
    )


def commit(st_: DenoiseState, **overrides) -> list[list[int]]:
    params = stack_params([POLICY.make_params(overrides)] * st_.batch_size)
    return POLICY.step(st_, params).commit.int().tolist()


def sets_of(st_: DenoiseState, **overrides):
    """The rule-by-rule sets of one step (proposals at temperature 0 are the argmax)."""
    conf = token_probability(st_.logits, st_.logits.argmax(-1))
    reread = token_probability(st_.logits, torch.where(st_.decoded, st_.tokens, st_.logits.argmax(-1)))
    return dawn_sets(st_, stack_params([DawnParams(**overrides)] * st_.batch_size), conf, reread, st_.attention)


# Position 0 decoded (its token 0 re-predicted at 0.95: an anchor); 1, 2, 3 masked.
# Attention (canvas part): 1 -> 0 (0.3), 3 -> 2 (0.2); everything else 0.02.
#   conf: 1: 0.75 (induced by the anchor), 2: 0.95 (confident), 3: 0.72 (a candidate coupled to 2).
ATT = [[[0.5, 0.02, 0.02, 0.02], [0.3, 0.02, 0.02, 0.02], [0.02, 0.02, 0.02, 0.02], [0.02, 0.02, 0.2, 0.02]]]
MASKED = [[False, True, True, True]]
PROBS = [[0.95, 0.75, 0.95, 0.72]]


def test_confident_induced_and_conflict_rules():
    # 2 confident, 1 induced; 3 touches 2 (chosen) and so waits.
    assert commit(state(PROBS, MASKED, ATT)) == [[0, 1, 1, 0]]
    # Without the touch filter 3 is a conflict candidate with no candidate neighbour: it goes too.
    assert commit(state(PROBS, MASKED, ATT), conflict_with_chosen=False) == [[0, 1, 1, 1]]


def test_anchor_needs_a_confident_reprediction():
    # The model now gives the anchor's token only 0.5: no anchor, so 1 (0.75) is a plain candidate.
    st_ = state([[0.5, 0.75, 0.95, 0.72]], MASKED, ATT)
    sets = sets_of(st_)
    assert sets.induced.int().tolist() == [[0, 0, 0, 0]]
    assert sets.confident.int().tolist() == [[0, 0, 1, 0]]
    assert sets.scheduled.int().tolist() == [[0, 1, 0, 0]]  # 1 touches nothing chosen
    assert commit(st_) == [[0, 1, 1, 0]]
    # Bar for induced positions: 0.75 < tau_induce 0.8, and 0.75 < tau_low 0.8: 1 waits.
    assert commit(state(PROBS, MASKED, ATT), tau_induce=0.8, tau_low=0.8) == [[0, 0, 1, 0]]


def test_anchor_reads_the_committed_token():
    # The model prefers token 0 at position 0 (0.95) but the canvas holds token 1 there
    # (probability 0.0125): not an anchor, although DAWN's argmax reading would call it one.
    st_ = state(PROBS, MASKED, ATT, anchor_token=1)
    assert not sets_of(st_).induced.any()
    assert sets_of(state(PROBS, MASKED, ATT)).induced.int().tolist() == [[0, 1, 0, 0]]


def test_conflict_set_is_greedy_independent():
    # Nothing decoded, nothing >= 0.9; candidates 0..3 (>= 0.7) on the path 0-1-2-3 (edges 0.1).
    att = [[[0.0, 0.1, 0.0, 0.0], [0.0, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0]]]
    all4 = [[True] * 4]
    assert commit(state([[0.8, 0.85, 0.75, 0.7]], all4, att)) == [[0, 1, 0, 1]]  # 1, then 3
    assert commit(state([[0.8, 0.75, 0.75, 0.85]], all4, att)) == [[1, 0, 0, 1]]  # 3, then 0
    # Below tau_low everywhere: the fallback commits the single most confident.
    assert commit(state([[0.3, 0.5, 0.6, 0.4]], all4, att)) == [[0, 0, 1, 0]]
    # Edge threshold above every score: no conflicts, all four candidates go.
    assert commit(state([[0.8, 0.85, 0.75, 0.7]], all4, att), tau_edge=0.2) == [[1, 1, 1, 1]]


def test_sink_keys_carry_no_edges():
    # 12 positions; position 0 decoded and every row gives it 0.6, the others 0.01 each: mean key
    # (0.6 + 11 * 0.01) / 12 = 0.059, key 0 is 10x that (0.6 > 0.59): a sink at ratio 10.
    n = 12
    att = [[[0.6] + [0.01] * (n - 1) for _ in range(n)]]
    masked = [[False] + [True] * (n - 1)]
    probs = [[0.95] + [0.75] * (n - 1)]
    st_ = state(probs, masked, att)
    # Sink removed: nobody is linked to the anchor; no edges at all (0.01 < 0.07); all 11 candidates go.
    assert commit(st_) == [[0] + [1] * (n - 1)]
    # Ratio 20 keeps key 0: all 11 masks are induced by the anchor (0.6 >= 0.07) and go too ...
    assert commit(st_, sink_ratio=20.0) == [[0] + [1] * (n - 1)]
    sets = sets_of(st_, sink_ratio=20.0)
    assert sets.induced.int().tolist() == [[0] + [1] * (n - 1)]  # ... but as induced, not scheduled
    assert not sets.scheduled.any()
    sets = sets_of(st_)  # ratio 10: key 0 is gone, so nothing is induced; all 11 are scheduled
    assert not sets.edges.any() and not sets.induced.any()
    assert sets.scheduled.int().tolist() == [[0] + [1] * (n - 1)]


def test_short_sequence_graph_is_not_emptied():
    # DAWN's absolute tau_sink 0.01 would flag all of these keys (each gets 0.2 > 0.01) and drop
    # the 0 <-> 1 coupling; relative to the mean key none is a sink, so 0 and 1 stay coupled.
    att = [[[0.2, 0.2, 0.2], [0.2, 0.2, 0.2], [0.2, 0.2, 0.2]]]
    assert commit(state([[0.8, 0.75, 0.72]], [[True] * 3], att)) == [[1, 0, 0]]


def test_floor_tops_up_and_edge_cases():
    att = [[[0.0, 0.1, 0.0, 0.0], [0.0, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0]]]
    assert commit(state([[0.3, 0.5, 0.6, 0.4]], [[True] * 4], att, steps=2)) == [[0, 1, 1, 0]]
    assert commit(state([[0.7]], [[True]], [[[0.3]]])) == [[1]]  # canvas of one
    done = state([[0.7, 0.7]], [[False, False]], [[[0.0, 0.0], [0.0, 0.0]]])
    done.attention = None
    assert commit(done) == [[0, 0]]
    ties = state([[0.8, 0.8]], [[True, True]], [[[0.0, 0.5], [0.5, 0.0]]])
    assert commit(ties) == [[1, 0]]
    bad = state([[0.8, 0.8]], [[True, True]], [[[0.0, 0.5], [0.5, 0.0]]])
    bad.logits[0, 0, 1] = float("-inf")
    with pytest.raises(ValueError, match="logits"):
        commit(bad)
    bad.attention = None
    bad.logits[0, 0, 1] = 0.0
    with pytest.raises(ValueError, match="attention"):
        commit(bad)


def test_params_validation():
    assert POLICY.needs_attention and POLICY.default_attention_layers == (-4, -3, -2, -1)
    p = DawnParams()
    defaults = (p.tau_edge, p.tau_high, p.tau_anchor, p.tau_induce, p.tau_low, p.sink_ratio)
    assert defaults == (0.07, 0.9, 0.9, 0.7, 0.7, 10.0)
    for bad in ({"tau_edge": 1.5}, {"tau_low": -0.1}, {"sink_ratio": 0.0}, {"sink_ratio": float("inf")},
                {"conflict_with_chosen": 2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            POLICY.make_params(bad)


# ---- properties ----

params_st = st.builds(
    DawnParams, sink_ratio=st.sampled_from([1.5, 3.0, 10.0]), tau_edge=st.sampled_from([0.02, 0.07, 0.2]),
    tau_high=st.sampled_from([0.6, 0.9]), tau_anchor=st.sampled_from([0.5, 0.9]),
    tau_induce=st.sampled_from([0.3, 0.7]), tau_low=st.sampled_from([0.2, 0.7]), conflict_with_chosen=st.booleans(),
)


@st.composite
def batches(draw):
    b, n = draw(st.integers(1, 4)), draw(st.integers(1, 9))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = torch.randn(b, n, 7, generator=g) * draw(st.sampled_from([0.5, 4.0]))
    masked = torch.rand(b, n, generator=g) < draw(st.sampled_from([0.3, 0.8, 1.0]))
    decoded = ~masked & (torch.rand(b, n, generator=g) < 0.8)  # the rest: later blocks / padding
    att = torch.softmax(torch.randn(b, n, n + draw(st.integers(0, 5)), generator=g) * 2, dim=-1)[..., :n]
    steps = torch.randint(1, 6, (b,), generator=g)
    s = DenoiseState(logits=logits, tokens=torch.where(masked, 6, torch.randint(0, 6, (b, n), generator=g)),
                     masked=masked, decoded=decoded, step=(torch.rand(b, generator=g) * steps).long(), steps=steps,
                     temperature=torch.tensor([draw(st.sampled_from([0.0, 0.8])) for _ in range(b)]),
                     seed=torch.randint(0, 1000, (b,), generator=g), attention=att.contiguous())
    return s, [draw(params_st) for _ in range(b)]


def row(s: DenoiseState, b: int) -> DenoiseState:
    k = slice(b, b + 1)
    return DenoiseState(logits=s.logits[k], tokens=s.tokens[k], masked=s.masked[k], decoded=s.decoded[k],
                        step=s.step[k], steps=s.steps[k], temperature=s.temperature[k], seed=s.seed[k],
                        attention=s.attention[k])


@settings(max_examples=60, deadline=None)
@given(batches())
def test_contract(batch):
    s, plist = batch
    params = stack_params(plist)
    out = POLICY.step(s, params)
    masked_n = s.masked.sum(-1)
    floor = -(-masked_n // (s.steps - s.step).clamp_min(1))
    assert not (out.commit & ~s.masked).any()
    assert (out.commit.sum(-1) >= floor).all() and (out.commit.sum(-1)[masked_n > 0] >= 1).all()
    assert (out.commit.sum(-1)[masked_n == 0] == 0).all()
    assert torch.equal(out.tokens, propose_tokens(s))  # proposals at every position
    for b, p in enumerate(plist):
        alone = POLICY.step(row(s, b), stack_params([p]))
        assert torch.equal(alone.commit[0], out.commit[b]) and torch.equal(alone.tokens[0], out.tokens[b])
    if not s.masked.any():
        return
    conf = out.confidence
    reread = token_probability(s.logits, torch.where(s.decoded, s.tokens, s.logits.argmax(-1)).clamp(max=6))
    sets = dawn_sets(s, params, conf, reread, s.attention)
    conflict = sets.edges | sets.edges.transpose(1, 2)
    assert bool(is_independent(conflict, sets.scheduled).all())  # the conflict set is independent
    chosen = sets.confident | sets.induced | sets.scheduled
    assert not (chosen & ~out.commit).any()  # every rule's pick is committed
    for b, p in enumerate(plist):
        m = s.masked[b]
        assert torch.equal(sets.confident[b], m & (conf[b] >= p.tau_high))
        assert not (sets.scheduled[b] & (conf[b] < p.tau_low)).any()
        assert not (sets.induced[b] & (conf[b] < p.tau_induce)).any()
        if p.conflict_with_chosen:  # scheduled positions touch no confident/induced one
            touch = conflict[b] & (sets.confident[b] | sets.induced[b]).unsqueeze(0)
            assert not (touch.any(-1) & sets.scheduled[b]).any()


# ---- DAWN's absolute sink rule (tau_sink), against its code ----

def ref_detect_attn_sinks_(attn_scores, threshold=0.05):
    """lizhuo-luo/DAWN ``llada/gdllm_utils.py`` ``detect_attn_sinks_``."""
    B, S, _ = attn_scores.shape
    barA = attn_scores.mean(dim=1)  # column mean over every query
    return barA > threshold


def ref_dawn_edges(avg_attn_scores, tau_sink, tau_edge):
    """The graph part of DAWN's ``llada/generate.py`` ``get_transfer_index_dawn`` on the whole
    sequence's attention [B, S, S] (sink columns zeroed, diagonal zeroed, ``>= tau_edge``; ``[b, i, j]``:
    i attends to j, before the code's transpose)."""
    sink_mask = ref_detect_attn_sinks_(avg_attn_scores, threshold=tau_sink)
    key_sink_mask = sink_mask.unsqueeze(1)
    avg_attn_scores = avg_attn_scores.masked_fill(key_sink_mask, 0.0)
    avg_attn_scores.diagonal(dim1=1, dim2=2).zero_()
    return avg_attn_scores >= tau_edge


@pytest.mark.parametrize("seed", range(20))
def test_tau_sink_graph_equals_dawn(seed):
    """With ``tau_sink``, sinks and edges among canvas positions are DAWN's, computed on the whole
    sequence's attention (prompt queries included) from its column means (``key_attention``)."""
    g = torch.Generator().manual_seed(seed)
    b, P, n = 2, int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(2, 10, (1,), generator=g))
    S = P + n
    full = torch.softmax(torch.randn(b, S, S, generator=g) * 2.5, dim=-1)  # rows over all keys
    tau_sink = float(torch.empty(1).uniform_(0.5 / S, 2.0 / S, generator=g))  # some keys sinks, not all
    masked = torch.rand(b, n, generator=g) < 0.6
    st_ = state([[0.8] * n] * b, masked.tolist(), full[:, P:, P:].tolist())
    st_.key_attention = full.mean(dim=1)[:, P:]
    ours = sets_of(st_, tau_sink=tau_sink).edges
    want = ref_dawn_edges(full.clone(), tau_sink, 0.07)[:, P:, P:]
    assert torch.equal(ours, want & ~torch.eye(n, dtype=torch.bool))  # every canvas position is a node here


def test_tau_sink_cases_differ_from_the_relative_rule():
    """Non-vacuous: in those cases the absolute rule drops other keys than ``sink_ratio`` does, and
    keys attended mostly by the prompt's queries count (the canvas rows alone give other sinks)."""
    differ = prompt_counts = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        b, P, n = 2, int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(2, 10, (1,), generator=g))
        S = P + n
        full = torch.softmax(torch.randn(b, S, S, generator=g) * 2.5, dim=-1)
        tau_sink = float(torch.empty(1).uniform_(0.5 / S, 2.0 / S, generator=g))
        want = ref_dawn_edges(full.clone(), tau_sink, 0.07)[:, P:, P:]
        st_ = state([[0.8] * n] * b, [[True] * n] * b, full[:, P:, P:].tolist())
        differ += int(not torch.equal(sets_of(st_).edges, want & ~torch.eye(n, dtype=torch.bool)))
        canvas_only = full[:, P:, P:].mean(dim=1) > tau_sink
        prompt_counts += int(not torch.equal(canvas_only, full.mean(dim=1)[:, P:] > tau_sink))
    assert differ >= 5 and prompt_counts >= 5, (differ, prompt_counts)


def test_tau_sink_needs_key_attention_and_is_validated():
    st_ = state(PROBS, MASKED, ATT)
    with pytest.raises(ValueError, match="^key_attention"):
        commit(st_, tau_sink=0.01)
    st_.key_attention = torch.tensor([[0.3, 0.001, 0.001, 0.001]])  # key 0 (the anchor) a sink at 0.01
    assert sets_of(st_, tau_sink=0.01).induced.int().tolist() == [[0, 0, 0, 0]]
    assert sets_of(st_, tau_sink=0.5).induced.int().tolist() == [[0, 1, 0, 0]]
    assert POLICY.key_attention_setting(DawnParams(tau_sink=0.03)) == "tau_sink"
    assert POLICY.key_attention_setting(DawnParams()) is None
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="^tau_sink"):
            POLICY.make_params({"tau_sink": bad})
