"""The batched greedy independent set equals the plain sequential greedy, row by row."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_dapd.decoding.independent_set import greedy_independent_set, is_independent


def sequential_greedy(adj: list[list[bool]], prio: list[float], cand: list[bool], cap: int | None) -> list[bool]:
    """The reference: visit candidates by (-priority, index); take unless a neighbour was taken."""
    n = len(prio)
    taken = [False] * n
    dropped = [False] * n
    count = 0
    for i in sorted(range(n), key=lambda k: (-prio[k], k)):
        if not cand[i] or dropped[i]:
            continue
        if cap is not None and count >= cap:
            break
        taken[i] = True
        count += 1
        for j in range(n):
            if j != i and (adj[i][j] or adj[j][i]):
                dropped[j] = True
    return taken


def run(adj, prio, cand=None, cap=None):
    adj_t = torch.tensor(adj, dtype=torch.bool)
    prio_t = torch.tensor(prio, dtype=torch.float32)
    cand_t = torch.ones_like(prio_t, dtype=torch.bool) if cand is None else torch.tensor(cand)
    return greedy_independent_set(adj_t, prio_t, cand_t, cap).tolist()


def path(n: int) -> list[list[bool]]:
    return [[abs(i - j) == 1 for j in range(n)] for i in range(n)]


# ---- worked by hand ----

def test_path_in_rank_order_takes_every_other_node():
    # 0-1-2-3, priorities falling along the path: take 0, drop 1, take 2, drop 3.
    assert run([path(4)], [[0.9, 0.8, 0.7, 0.6]]) == [[True, False, True, False]]


def test_path_with_middle_best():
    # 0-1-2-3-4 with node 2 best: take 2 (drops 1, 3), then 0 and 4 are free.
    assert run([path(5)], [[0.1, 0.5, 0.9, 0.5, 0.2]]) == [[True, False, True, False, True]]


def test_star_centre_first_or_last():
    star = [[(i == 0) != (j == 0) for j in range(4)] for i in range(4)]
    assert run([star], [[0.9, 0.5, 0.4, 0.3]]) == [[True, False, False, False]]
    assert run([star], [[0.1, 0.5, 0.4, 0.3]]) == [[False, True, True, True]]


def test_ties_go_to_the_lowest_index():
    assert run([path(2)], [[0.5, 0.5]]) == [[True, False]]
    assert run([path(3)], [[0.5, 0.5, 0.5]]) == [[True, False, True]]


def test_directed_edge_is_read_both_ways():
    adj = [[False, False], [True, False]]  # only 1 -> 0
    assert run([adj], [[0.2, 0.9]]) == [[False, True]]


def test_non_candidates_are_not_taken_and_do_not_block():
    # 0-1-2: node 1 is best but not a candidate, so 0 and 2 are both free.
    assert run([path(3)], [[0.2, 0.9, 0.1]], [[True, False, True]]) == [[True, False, True]]


def test_cap_keeps_the_best_ranked_members():
    # No edges, cap 2: the two most confident; cap 0: nothing.
    empty = [[False] * 4 for _ in range(4)]
    assert run([empty], [[0.1, 0.7, 0.3, 0.9]], cap=2) == [[False, True, False, True]]
    assert run([empty], [[0.1, 0.7, 0.3, 0.9]], cap=0) == [[False] * 4]


def test_per_row_caps_and_empty_rows():
    empty = [[False] * 3 for _ in range(3)]
    out = run([empty, empty, empty], [[0.1, 0.2, 0.3]] * 3,
              [[True] * 3, [False] * 3, [True] * 3], cap=torch.tensor([1, 2, 3]))
    assert out == [[False, False, True], [False] * 3, [True] * 3]


def test_canvas_of_one():
    assert run([[[True]]], [[0.3]]) == [[True]]  # a self loop is ignored


def test_infinite_priorities_are_ordered():
    assert run([path(3)], [[-math.inf, math.inf, -math.inf]]) == [[False, True, False]]


def test_bad_inputs_raise():
    adj = torch.zeros(1, 3, 3, dtype=torch.bool)
    cand = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="priority"):
        greedy_independent_set(adj, torch.tensor([[0.1, float("nan"), 0.2]]), cand)
    with pytest.raises(ValueError, match="max_size"):
        greedy_independent_set(adj, torch.zeros(1, 3), cand, torch.tensor([-1]))
    with pytest.raises(ValueError, match="adjacency"):
        greedy_independent_set(torch.zeros(1, 3, 2, dtype=torch.bool), torch.zeros(1, 3), cand)
    with pytest.raises(ValueError, match="priority"):
        greedy_independent_set(adj, torch.zeros(1, 2), cand)


# ---- equal to the sequential reference ----

@st.composite
def problems(draw):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, 10))
    density = draw(st.sampled_from([0.0, 0.2, 0.5, 0.9]))
    adj = [[[draw(st.floats(0, 1)) < density for _ in range(n)] for _ in range(n)] for _ in range(b)]
    values = st.sampled_from([0.0, 0.1, 0.5, 0.5, 0.9, 1.0, -math.inf])  # repeats make ties
    prio = [[draw(values) for _ in range(n)] for _ in range(b)]
    cand = [[draw(st.booleans()) or draw(st.booleans()) for _ in range(n)] for _ in range(b)]
    caps = draw(st.one_of(st.none(), st.lists(st.integers(0, n + 1), min_size=b, max_size=b)))
    return adj, prio, cand, caps


@settings(max_examples=150, deadline=None)
@given(problems())
def test_equals_sequential_greedy(problem):
    adj, prio, cand, caps = problem
    got = run(adj, prio, cand, None if caps is None else torch.tensor(caps))
    for b in range(len(adj)):
        want = sequential_greedy(adj[b], prio[b], cand[b], None if caps is None else caps[b])
        assert got[b] == want
    chosen = torch.tensor(got)
    assert bool(is_independent(torch.tensor(adj), chosen).all())
    assert not (chosen & ~torch.tensor(cand)).any()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_larger_random_graphs(seed):
    g = torch.Generator().manual_seed(seed)
    adj = torch.rand(2, 40, 40, generator=g) < 0.1
    prio = torch.rand(2, 40, generator=g)
    cand = torch.rand(2, 40, generator=g) < 0.8
    got = greedy_independent_set(adj, prio, cand, torch.tensor([5, 40]))
    for b in range(2):
        want = sequential_greedy(adj[b].tolist(), prio[b].tolist(), cand[b].tolist(), [5, 40][b])
        assert got[b].tolist() == want


def test_directed_reads_each_candidates_own_row():
    """``directed=True``: a candidate joins unless adjacency[candidate, taken] for a better-ranked
    taken node (DAPD's authors), checked against that sequential loop on random digraphs."""
    gen = torch.Generator().manual_seed(0)
    differs = 0
    for _ in range(200):
        L = int(torch.randint(2, 10, (1,), generator=gen))
        adj = torch.rand(1, L, L, generator=gen) < 0.3
        prio = torch.rand(1, L, generator=gen)
        cand = torch.rand(1, L, generator=gen) < 0.8
        want, taken = [False] * L, []
        for i in sorted(range(L), key=lambda i: (-float(prio[0, i]), i)):
            if cand[0, i] and not any(adj[0, i, j] for j in taken if j != i):
                taken.append(i)
                want[i] = True
        got = greedy_independent_set(adj, prio, cand, directed=True)
        assert got[0].tolist() == want
        differs += got[0].tolist() != greedy_independent_set(adj, prio, cand)[0].tolist()
    assert differs > 10  # the undirected set is another one
