"""What a step hands out (``Sequence.release_end``, ``committed_run``; ``stepper.denoise_step``'s return):
finished blocks, and before its block ends the committed prefix of the active block, short of the first
stop token and of position ``early_limit``. Streamed text advances by it (``tests/engine/test_canvas.py``
checks that through the server); here the arithmetic and the stepper, no engine."""

from __future__ import annotations

import pytest
import torch

from vllm_dapd.engine.core import offline
from vllm_dapd.engine.core.offline import Request
from vllm_dapd.engine.core.sequence import Sequence, committed_run
from vllm_dapd.engine.core.settings import DecodeSettings
from vllm_dapd.engine.core.stepper import denoise_step
from vllm_dapd.models.tiny import make_tiny_llada
from vllm_dapd.models.loading import load_model

M = 99  # mask id


def t(*values):
    return torch.tensor(values, dtype=torch.long)


NO_STOPS = torch.zeros(0, dtype=torch.long)


@pytest.mark.parametrize("canvas, first, stop, stops, end", [
    ((1, 2, M, 4), 0, 4, (), 2),  # the run ends at the first mask
    ((1, 2, 3, 4), 0, 4, (), 4),  # all committed: up to stop
    ((1, 2, 3, 4), 0, 3, (), 3),  # never past stop
    ((M, 2, 3, 4), 0, 4, (), 0),  # nothing when first is masked
    ((1, 2, M, 4, 5, M), 3, 6, (), 5),  # from first on
    ((1, 7, 3, 4), 0, 4, (7,), 1),  # short of a stop token
    ((1, 2, 3, 7), 0, 4, (8, 7), 3),
    ((1, 2, 3), 2, 2, (), 2),  # empty window
])
def test_committed_run(canvas, first, stop, stops, end):
    assert committed_run(t(*canvas), first, stop, M, t(*stops) if stops else NO_STOPS) == end


def seq(canvas, block_length, *, block=0, emitted=0, early_limit=100, stops=()):
    s = Sequence("r", [1, 2], len(canvas), DecodeSettings(block_length=block_length), None, M, 0.0, 0,
                 early_limit=early_limit, stops=t(*stops) if stops else NO_STOPS)
    s.canvas, s.block, s.emitted = t(*canvas), block, emitted
    return s


def test_release_end_finished_blocks_then_the_active_prefix():
    # block 0 = [0, 4) finished (its masks too: a step limit spent on the mask id), block 1 active
    assert seq((1, M, 3, 4, 5, 6, M, 8), 4, block=1).release_end() == 6
    assert seq((1, M, 3, 4, M, 6, 7, 8), 4, block=1).release_end() == 4  # active block starts masked
    assert seq((1, 2, M, 4), 4, early_limit=0).release_end() == 0  # default: whole blocks only
    assert seq((1, 2, 3, 4, 5, 6, M, 8), 4, block=1, early_limit=0).release_end() == 4
    assert seq((1, 2, 3, 4, 5, 6), 4, block=2).release_end() == 6  # finished: everything, short last block


def test_release_end_holds_back_stops_and_the_length_cap_until_the_block_ends():
    assert seq((1, 2, 7, 4, M, 6), 6, stops=(7,)).release_end() == 2  # the stop token and what follows wait
    assert seq((1, 2, 7, 4, 5, 6), 6, block=1, stops=(7,)).release_end() == 6  # ... until the block ends
    assert seq((1, 2, 3, 4, M, 6), 6, early_limit=2).release_end() == 2  # max_tokens 3: the 3rd token waits
    assert seq((1, 2, 3, 4, 5, 6), 6, block=1, early_limit=2).release_end() == 6


def test_release_end_never_goes_back():
    s = seq((1, 2, 3, M, 5, 6, 7, 8), 8, emitted=3)
    assert s.release_end() == 3
    s.emitted = 2  # the run is searched from what is out, not from the block start
    s.canvas[0] = M
    assert s.release_end() == 3


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    return load_model(make_tiny_llada(str(tmp_path_factory.mktemp("release") / "llada")))


def stepped(model, early_limit, stops=()):
    """One block of 12 (low_confidence, one token per forward) stepped by hand: what each step released."""
    s = offline.sequences(model, [Request([5, 6, 7], {"block_length": 12, "steps": 12}, max_tokens=12)],
                          kv=None)[0][0]
    s.early_limit, s.stops = early_limit, t(*stops) if stops else NO_STOPS
    out = []
    while not s.finished:
        out.append(denoise_step(model, [s], torch.device("cpu"))[0])
    return out, s


def test_stepper_releases_the_prefix_as_it_is_committed(llada):
    whole, s = stepped(llada, 0)
    answer = whole[-1]
    assert [len(r) for r in whole] == [0] * 11 + [12]  # block at a time
    early, s2 = stepped(llada, 11)
    assert sum(early, []) == answer and s2.nfe == s.nfe == 12  # same tokens, same forwards
    before_end = sum(early[:-1], [])
    assert sum(1 for r in early if r) > 2 and len(before_end) > 4  # several releases before the block ends
    assert all(before_end[i] == answer[i] for i in range(len(before_end)))  # a prefix, in order
    capped, _ = stepped(llada, 4)  # max_tokens 5: the 5th token waits for the block's end
    assert len(sum(capped[:-1], [])) == 4 and sum(capped, []) == answer
    # A stop token held back: nothing from its first position on leaves before the block ends.
    stop = before_end[-1]
    held, _ = stepped(llada, 11, stops=(stop,))
    assert len(sum(held[:-1], [])) == answer.index(stop) and sum(held, []) == answer
