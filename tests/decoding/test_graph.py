"""Dependency graphs from attention: small matrices worked out by hand, plus properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_dapd.decoding.graph import (
    attention_sinks,
    check_attention,
    dependency_graph,
    drop_keys,
    renormalize_over,
    symmetrize,
)

T, F = True, False
ATT = torch.tensor([[[0.5, 0.2, 0.05],
                     [0.1, 0.6, 0.3],
                     [0.0, 0.08, 0.9]]])


def test_directed_edges_at_threshold():
    # i -> j where att[i, j] >= 0.1 off the diagonal: 0->1 (0.2), 1->0 (0.1, equal counts), 1->2 (0.3).
    adj = dependency_graph(ATT, torch.ones(1, 3, dtype=torch.bool), torch.tensor([0.1]), symmetric=False)
    assert adj.tolist() == [[[F, T, F], [T, F, T], [F, F, F]]]


def test_symmetric_edges_link_both_ways():
    adj = dependency_graph(ATT, torch.ones(1, 3, dtype=torch.bool), torch.tensor([0.1]))
    assert adj.tolist() == [[[F, T, F], [T, F, T], [F, T, F]]]


def test_only_among_nodes_and_per_row_threshold():
    att = ATT.expand(2, 3, 3)
    nodes = torch.tensor([[T, F, T], [T, T, T]])
    adj = dependency_graph(att, nodes, torch.tensor([0.01, 0.25]))
    # row 0: node 1 gone; 0<->2 via att[0, 2] = 0.05 >= 0.01. row 1: only 1->2 (0.3) survives 0.25.
    assert adj.tolist() == [[[F, F, T], [F, F, F], [T, F, F]],
                            [[F, F, F], [F, F, T], [F, T, F]]]


def test_renormalize_over_keys():
    att = torch.tensor([[[0.2, 0.3, 0.1], [0.0, 0.0, 0.5], [0.1, 0.1, 0.1]]])
    out = renormalize_over(att, torch.tensor([[T, T, F]]))
    expected = torch.tensor([[[0.4, 0.6, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.0]]])
    assert torch.allclose(out, expected)


def test_symmetrize_max_or_mean():
    s = torch.tensor([[[0.0, 0.4], [0.1, 0.0]]]).expand(2, 2, 2)
    out = symmetrize(s, torch.tensor([False, True]))
    assert torch.allclose(out[0], torch.tensor([[0.0, 0.4], [0.4, 0.0]]))
    assert torch.allclose(out[1], torch.tensor([[0.0, 0.25], [0.25, 0.0]]))


def test_sinks_relative_to_the_mean_key():
    # Every row puts 0.6 on key 0 and 0.1 on keys 1..3: mean incoming [0.6, 0.1, 0.1, 0.1],
    # mean key 0.225. ratio 2 -> cut 0.45: key 0 is a sink. ratio 4 -> cut 0.9: none.
    att = torch.tensor([[0.6, 0.1, 0.1, 0.1]]).expand(4, 4).unsqueeze(0)
    valid = torch.ones(1, 4, dtype=torch.bool)
    assert attention_sinks(att, valid, torch.tensor([2.0])).tolist() == [[T, F, F, F]]
    assert attention_sinks(att, valid, torch.tensor([4.0])).tolist() == [[F, F, F, F]]
    # Position 3 invalid (padding): reference over keys 0..2 = 0.8 / 3; it is never flagged.
    valid = torch.tensor([[T, T, T, F]])
    assert attention_sinks(att, valid, torch.tensor([2.0])).tolist() == [[T, F, F, F]]


def test_sinks_ignore_invalid_positions():
    # Key 3 (padding / a later block) soaks up 0.6 but is not part of the canvas statistics.
    att = torch.tensor([[0.1, 0.1, 0.1, 0.6]]).expand(4, 4).unsqueeze(0)
    valid = torch.tensor([[T, T, T, F]])
    assert attention_sinks(att, valid, torch.tensor([2.0])).tolist() == [[F, F, F, F]]


def test_short_sequence_is_not_all_sinks():
    # Uniform attention over T = 20 keys (10 of them canvas): each key gets 0.05 > DAWN's 0.01,
    # which flags everything; relative to the mean key nothing is abnormal.
    att = torch.full((1, 10, 10), 0.05)
    assert not attention_sinks(att, torch.ones(1, 10, dtype=torch.bool), torch.tensor([1.5])).any()


def test_drop_keys_zeroes_columns():
    out = drop_keys(ATT, torch.tensor([[F, T, F]]))
    assert out[0, :, 1].eq(0).all() and out[0, :, 0].equal(ATT[0, :, 0])


def test_check_attention():
    with pytest.raises(ValueError, match="attention"):
        check_attention(None, 1, 3)
    with pytest.raises(ValueError, match="attention"):
        check_attention(torch.zeros(1, 3, 2), 1, 3)
    with pytest.raises(ValueError, match="attention"):
        check_attention(torch.full((1, 2, 2), float("nan")), 1, 2)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 9), st.floats(0.0, 0.5))
def test_graph_properties(seed, n, tau):
    g = torch.Generator().manual_seed(seed)
    att = torch.softmax(torch.randn(3, n, n, generator=g) * 2, dim=-1)
    nodes = torch.rand(3, n, generator=g) < 0.7
    adj = dependency_graph(att, nodes, torch.full((3,), tau))
    assert adj.equal(adj.transpose(1, 2))
    assert not adj.diagonal(dim1=1, dim2=2).any()
    assert not (adj.any(-1) & ~nodes).any()
    # Each row equals its own single-row graph (no cross-talk in the batch).
    for b in range(3):
        assert adj[b].equal(dependency_graph(att[b:b + 1], nodes[b:b + 1], torch.tensor([tau]))[0])


def test_same_token_links_need_one_unsure_end_and_two_nodes():
    from vllm_dapd.decoding.graph import same_token_links

    tokens = torch.tensor([[3, 3, 3, 5]])
    conf = torch.tensor([[0.95, 0.99, 0.5, 0.2]])
    nodes = torch.tensor([[True, True, True, True]])
    links = same_token_links(tokens, conf, nodes, torch.tensor([0.9]))
    # 0-1: both sure (a legitimate repeat); 0-2, 1-2: 2 is unsure; 3 proposes another token
    assert links[0].int().tolist() == [[0, 0, 1, 0], [0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert not same_token_links(tokens, conf, nodes, torch.tensor([0.0])).any()  # bar 0: off
    off = torch.tensor([[True, True, False, True]])
    assert not same_token_links(tokens, conf, off, torch.tensor([0.9])).any()  # 2 is not a node
