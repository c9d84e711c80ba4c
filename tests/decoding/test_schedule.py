"""Step schedules: LLaDA's table and its stateless form, Dream's float32 linspace schedule, the floor."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_dapd.decoding import (
    dream_timesteps,
    dream_transfer_count,
    llada_transfer_count,
    llada_transfer_counts,
    min_commits,
)


def t(*xs):
    return torch.tensor(xs, dtype=torch.long)


def test_llada_table_by_hand():
    # get_num_transfer_tokens: base = M // S everywhere, +1 on the first M % S steps
    assert llada_transfer_counts(t(10, 7, 3, 0), 4).tolist() == [[3, 3, 2, 2], [2, 2, 2, 1], [1, 1, 1, 0], [0, 0, 0, 0]]


@settings(max_examples=40, deadline=None)
@given(m=st.integers(0, 300), s=st.integers(1, 64))
def test_stateless_form_reproduces_the_table(m, s):
    table = llada_transfer_counts(t(m), s)[0].tolist()
    left, got = m, []
    for i in range(s):
        k = int(llada_transfer_count(t(left), t(i), t(s)))
        got.append(k)
        left -= k
    assert got == table and left == 0


def test_min_commits():
    assert min_commits(t(0, 5, 5, 5, 7), t(0, 0, 4, 9, 1), t(4, 4, 4, 4, 3)).tolist() == [0, 2, 5, 5, 4]
    assert (min_commits(t(1, 1), t(0, 0), t(1000, 1)) == 1).all()


def dream_literal(masks, steps, eps=1e-3):
    """Dream ``_sample``'s count, one step at a time (float32 linspace, ``int()`` truncation)."""
    ts = torch.linspace(1, eps, steps + 1)
    left, out = masks, []
    for i in range(steps):
        n = int(torch.tensor(float(left)) * (1 - ts[i + 1] / ts[i])) if i < steps - 1 else left
        out.append(n)
        left -= n
    return out


def run_dream(masks, steps, eps=1e-3):
    left, out = masks, []
    for i in range(steps):
        n = int(dream_transfer_count(t(left), t(i), t(steps), eps))
        out.append(n)
        left -= n
    return out


def test_dream_float32_trap():
    """steps == masks: 0 at the first step, 2 at the last (Dream computes the float32 timesteps
    with torch.linspace: its rounding makes the first count 0 and the last 2)."""
    got = run_dream(16, 16)
    assert got[0] == 0 and got[-1] == 2 and sum(got) == 16 and set(got[1:-1]) == {1}


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 256), s=st.integers(1, 64), eps=st.sampled_from([1e-3, 1e-2, 0.1]))
def test_dream_matches_literal_schedule(m, s, eps):
    assert run_dream(m, s, eps) == dream_literal(m, s, eps)


def test_dream_batched_rows_with_their_own_budgets():
    masks, step, steps = t(16, 30, 9, 0), t(0, 3, 8, 1), t(16, 10, 9, 4)
    eps = torch.tensor([1e-3, 1e-2, 1e-3, 1e-3])
    batch = dream_transfer_count(masks, step, steps, eps)
    for b in range(4):
        alone = dream_transfer_count(masks[b:b + 1], step[b:b + 1], steps[b:b + 1], float(eps[b]))
        assert int(alone) == int(batch[b])
    assert torch.equal(dream_timesteps(7), torch.linspace(1, 1e-3, 8))
