"""``BatchLayout``: the row arithmetic of one padded forward (``vllm_dapd/engine/core/layout.py``)."""

from __future__ import annotations

import itertools

import pytest
import torch

from vllm_dapd.engine.core.layout import BatchLayout, Feed


def test_mode_none_llada_whole_canvases_left_padded():
    # Prompts 5 and 3, canvas 8: fed spans are the whole sequence [0, P + 8).
    lay = BatchLayout.of([(0, 13), (0, 11)], [5, 3], [8, 8], shift=0)
    assert lay.rows == 13 and lay.row0 == (0, 2)
    assert lay.visible == (0, 0) and lay.visible_end == (8, 8)
    assert lay.canvas_row == (5, 5)  # both canvases end at the last row
    assert (lay.span_start, lay.span_end) == ((0, 0), (8, 8))


def test_prefix_dream_skips_cached_rows():
    # Prompt 4, canvas 8, blocks of 4 at the second block: positions < 7 are cached, Dream feeds
    # from the row before the block (absolute 7 = P + 4 - 1) to the end.
    lay = BatchLayout.of([(7, 12)], [4], [8], shift=1)
    assert lay.rows == 5 and lay.row0 == (0,)
    assert lay.visible == (4,) and lay.visible_end == (8,)
    assert lay.canvas_row == (-4,)  # canvas position 4 (the block) is scored by input row 0
    assert (lay.span_start, lay.span_end) == ((3,), (8,))


@pytest.mark.parametrize("shift", [0, 1])
def test_every_scored_canvas_position_maps_to_the_row_that_scores_it(shift):
    """Against the padded batch written out: each sequence's fed absolute positions, left-padded to
    the longest; canvas position ``c`` is scored by the row holding ``P + c - shift`` when that row
    is fed. The visible range, the fed canvas range and ``canvas_row`` must name exactly those rows,
    and ``input_rows`` of the scored positions agrees."""
    cases = []
    for P, n in ((3, 8), (6, 12), (4, 4)):
        for a in range(0, P + n):
            for e in (P + n, min(P + n, a + 4)):
                if a < e and min(n, e + shift - P) > max(0, a + shift - P):
                    cases.append(((a, e), P, n))
    groups = list(itertools.islice(itertools.combinations(cases, 3), 0, None, 97))
    assert len(groups) > 100
    for group in groups:
        spans, prompts, gens = zip(*group)
        lay = BatchLayout.of(spans, prompts, gens, shift)
        T = max(e - a for a, e in spans)
        assert lay.rows == T
        for b, ((a, e), P, n) in enumerate(group):
            held = [None] * (T - (e - a)) + list(range(a, e))  # absolute position in each input row
            assert lay.row0[b] == held.count(None)
            scored = [c for c in range(n) if P + c - shift in held]
            assert scored == list(range(lay.visible[b], lay.visible_end[b]))
            fed = [p - P for p in held if p is not None and p >= P]  # none: Dream scores c = 0 from the prompt
            assert lay.span_end[b] - lay.span_start[b] == len(fed) and fed[:1] in ([], [lay.span_start[b]])
            for c in scored:
                assert held[lay.canvas_row[b] + c] == P + c - shift
        positions = lay.scored_positions([torch.arange(v, e) for v, e in zip(lay.visible, lay.visible_end)])
        rows = lay.input_rows(positions)
        assert ((rows >= torch.tensor(lay.row0)[:, None]) & (rows < lay.rows)).all()


def test_scored_positions_pad_a_shorter_list_with_its_last_position():
    lay = BatchLayout.of([(0, 13), (0, 11)], [5, 3], [8, 8], shift=0)
    positions = lay.scored_positions([torch.tensor([4, 6, 7]), torch.tensor([0])])
    assert positions.tolist() == [[4, 6, 7], [0, 0, 0]]
    assert lay.input_rows(positions).tolist() == [[9, 11, 12], [5, 5, 5]]
    assert lay.real_rows().tolist() == list(range(13)) + list(range(13 + 2, 26))  # row0 = (0, 2)
    with pytest.raises(ValueError, match="not within the visible"):
        BatchLayout.of([(7, 12)], [4], [8], shift=1).scored_positions([torch.arange(0, 4)])  # cached, not fed


# ---------------------------------------------------------------- Feed: fed, read and written positions

def seq(mode, prompt=4, gen=8, block=4, cached_len=0, active=0, suffix_block=-1, suffix=0):
    from vllm_dapd.engine.core.sequence import Sequence
    from vllm_dapd.engine.core.settings import DecodeSettings

    s = Sequence("r", list(range(prompt)), gen, DecodeSettings(block_length=block, cache_mode=mode), None, 99, 0.0, 0,
                 suffix=[7] * suffix)
    s.cached_len, s.block, s.suffix_block = cached_len, active, suffix_block
    return s


def test_feed_mode_none_feeds_everything_and_touches_no_page():
    f = Feed.of(seq("none", suffix=2), shift=0, capacity=100)
    assert (f.first, f.end, f.total) == (0, 14, 14)
    assert not len(f.reads) and not len(f.writes) and not len(f.protect) and not f.caches_suffix


@pytest.mark.parametrize("shift", [0, 1])
def test_feed_prefix_first_step_caches_the_prompt(shift):
    f = Feed.of(seq("prefix"), shift, capacity=12)
    assert (f.first, f.end) == (0, 12) and not len(f.reads)
    assert f.writes.tolist() == [0, 1, 2, 3] and f.cached_len == 4 and not len(f.protect)


def test_feed_prefix_next_block_dream_feeds_the_row_before_it_and_keeps_its_cached_kv():
    # Prompt 4, blocks of 4, the second block active, final KV for [0, 8): Dream feeds position 7.
    f = Feed.of(seq("prefix", cached_len=8, active=1), shift=1, capacity=12)
    assert (f.first, f.end) == (7, 12) and f.reads.tolist() == list(range(7))
    assert not len(f.writes) and f.protect.tolist() == [7] and f.cached_len == 8
    g = Feed.of(seq("prefix", cached_len=4, active=1), shift=0, capacity=12)  # block 0 just committed
    assert (g.first, g.end) == (4, 12) and g.writes.tolist() == [4, 5, 6, 7] and g.cached_len == 8


def test_feed_dual_caches_the_suffix_once_its_pages_exist_then_reads_it():
    start = seq("dual", cached_len=4, active=1, suffix=2)  # prompt 4, canvas 8, suffix 2: total 14
    f = Feed.of(start, shift=0, capacity=16)
    assert (f.first, f.end) == (4, 14) and f.caches_suffix
    assert f.writes.tolist() == [4, 5, 6, 7, 12, 13]  # committed block 0, then the canvas after block 1
    assert not Feed.of(start, shift=0, capacity=8).caches_suffix  # pages not allocated yet: next step
    cached = Feed.of(seq("dual", cached_len=8, active=1, suffix_block=1, suffix=2), shift=0, capacity=16)
    assert (cached.first, cached.end) == (8, 12) and not cached.caches_suffix and not len(cached.writes)
    assert cached.reads.tolist() == list(range(8)) + [12, 13]  # prefix, then the cached suffix
