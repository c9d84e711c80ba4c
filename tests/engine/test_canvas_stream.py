"""Canvas streaming without a server: the carrier rows and ``CanvasStream``'s merging of canvas chunks
with vLLM's own (merged outputs of a slow client, ``n`` choices, the first item, a client that leaves).

``fake_vllm`` stands for vLLM's completion stream generator: one chunk per output that has text or a
finish reason, none for an empty output before the choice's first text (as vLLM skips those)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import numpy as np
import pytest

from vllm_dapd.engine.vllm import canvas


def mask(rows):
    from vllm.outputs import SamplingMask

    return SamplingMask([list(r) for r in rows])


def output(index, tokens=(), text="", finish=None, forwards=()):
    """A CompletionOutput-like object carrying ``forwards``: [(forward, [(position, token), ...])]."""
    rows = [[f, *(v for pair in committed for v in pair)] for f, committed in forwards]
    return SimpleNamespace(index=index, token_ids=list(tokens), text=text, finish_reason=finish,
                           sampling_mask=mask(rows) if rows else None)


def item(*outputs):
    return (0, SimpleNamespace(outputs=list(outputs)))


async def fake_vllm(results, log):
    sent = set()
    async for _, res in results:
        for out in res.outputs:
            if not out.text and not out.token_ids and out.index not in sent:
                continue
            sent.add(out.index)
            log.append(("vllm", out.index))
            chunk = {"choices": [{"index": out.index, "text": out.text, "finish_reason": out.finish_reason}]}
            yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


def run(items):
    """The lines the wrapped stream sends for these items, parsed (without [DONE])."""

    async def source():
        for it in items:
            yield it
            await asyncio.sleep(0)

    async def main():
        stream = canvas.CanvasStream(False, lambda it, out: out.index, None, "cmpl-1", "m")
        log = []
        lines = [line async for line in stream.merged(fake_vllm(stream.results(source(), lambda it: None), log),
                                                      lambda line: line)]
        assert lines[-1] == "data: [DONE]\n\n"
        return [json.loads(line[len("data: "):]) for line in lines[:-1]], stream

    return asyncio.run(main())


def forwards_of(chunks, index=0):
    return [c["choices"][0]["dapd"]["canvas"]["forward"] for c in chunks
            if c["choices"][0]["index"] == index and "dapd" in c["choices"][0]]


def test_rows_round_trip_and_survive_a_stop_string_trim():
    from vllm.outputs import SamplingMask

    carrier = canvas.rows([(7, [4, 1], [40, 10])], min_rows=3)  # a forward that returned 3 tokens
    assert carrier.to_nested_list() == [[7, 4, 40, 1, 10], [], []]
    for kept in (1, 2, 3):  # vLLM trims the carrier with the tokens when a stop string cuts the block
        out = SimpleNamespace(sampling_mask=SamplingMask(carrier.slice_request(0, kept).to_nested_list()))
        assert canvas.take(out) == [(7, [[4, 40], [1, 10]])] and out.sampling_mask is None
    empty = canvas.rows([(2, [], [])])  # a forward that committed nothing still has its row
    assert empty.to_nested_list() == [[2]] and np.asarray(empty.offsets).tolist() == [0, 1]


def test_each_forward_one_chunk_in_order_with_text_on_vllms_chunk():
    chunks, stream = run([
        item(output(0, forwards=[(1, [(2, 12)])])),  # the first item: shown to vLLM, which sends nothing
        item(output(0, forwards=[(2, [(0, 10)])])),
        item(output(0, tokens=[10, 11, 12], text="a b c", finish="length", forwards=[(3, [(1, 11)])])),
    ])
    assert forwards_of(chunks) == [1, 2, 3] and stream.chunks == 3 and len(chunks) == 3
    assert [c["choices"][0]["text"] for c in chunks] == ["", "", "a b c"]  # the text rides forward 3's chunk
    assert chunks[0]["choices"][0]["dapd"]["canvas"] == {"forward": 1, "committed": [[2, 12, ""]]}


def test_chat_role_chunk_gets_no_forward_its_text_chunk_does():
    """The first forward already hands out text (a committed prefix): vLLM's chat generator sends the
    role chunk, then the text; the forward rides the text's chunk, not the role chunk."""

    async def fake_chat(results, log):
        first = True
        async for _, res in results:
            for out in res.outputs:
                if first:
                    yield f"data: {json.dumps({'choices': [{'index': out.index, 'delta': {'role': 'assistant', 'content': ''}}]})}\n\n"
                if out.text or out.finish_reason:
                    chunk = {"choices": [{"index": out.index, "delta": {"content": out.text},
                                          "finish_reason": out.finish_reason}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
            first = False
        yield "data: [DONE]\n\n"

    async def main(items):
        async def source():
            for it in items:
                yield it
                await asyncio.sleep(0)

        stream = canvas.CanvasStream(True, lambda it, out: out.index, None, "chat-1", "m")
        lines = [line async for line in stream.merged(fake_chat(stream.results(source(), lambda it: None), []),
                                                      lambda line: line)]
        return [json.loads(line[len("data: "):]) for line in lines[:-1]]

    chunks = asyncio.run(main([item(output(0, tokens=[10], text="a", forwards=[(1, [(0, 10)])])),
                               item(output(0, tokens=[11], text=" b", finish="stop", forwards=[(2, [(1, 11)])]))]))
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": ""}, {"content": "a"},
                                                         {"content": " b"}]
    assert "dapd" not in chunks[0]["choices"][0] and forwards_of(chunks) == [1, 2]
    assert chunks[1]["choices"][0]["dapd"]["canvas"]["forward"] == 1


def test_merged_outputs_keep_every_forward_and_the_text_comes_last():
    """A slow client: vLLM merged forwards 1-3 into one output with the block's text."""
    chunks, _ = run([item(output(0, tokens=[5, 6], text="x y", finish="length",
                                 forwards=[(1, [(0, 5)]), (2, []), (3, [(1, 6)])]))])
    assert forwards_of(chunks) == [1, 2, 3]
    assert [c["choices"][0]["text"] for c in chunks] == ["", "", "x y"]


def test_n_choices_each_their_own_forwards():
    chunks, _ = run([
        item(output(0, forwards=[(1, [(0, 1)])])),
        item(output(1, forwards=[(1, [(1, 2)])])),
        item(output(0, forwards=[(2, [(1, 3)])]), output(1, forwards=[(2, [(0, 4)])])),  # merged: both choices
        item(output(1, tokens=[4, 2], text="q r", finish="length", forwards=[(3, [])])),
        item(output(0, tokens=[1, 3], text="s t", finish="length", forwards=[(3, [])])),
    ])
    assert forwards_of(chunks, 0) == [1, 2, 3] and forwards_of(chunks, 1) == [1, 2, 3]


def test_a_client_that_leaves_cancels_vllms_generator():
    cancelled = []

    async def endless():
        for f in range(1, 10**6):
            yield item(output(0, forwards=[(f, [])]))
            await asyncio.sleep(0)

    async def vllm_side(results):
        try:
            async for _ in results:
                pass
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main():
        stream = canvas.CanvasStream(False, lambda it, out: out.index, None, "cmpl-1", "m")
        lines = stream.merged(vllm_side(stream.results(endless(), lambda it: None)), lambda line: line)
        got = [await lines.__anext__() for _ in range(3)]
        await lines.aclose()  # what the server does when the client disconnects
        await asyncio.sleep(0.01)
        return got

    got = asyncio.run(main())
    assert len(got) == 3 and cancelled == [True]


@pytest.mark.parametrize("value, ok", [(1, True), (True, True), (0, False), (False, False), (None, None),
                                       (2, None), ("1", None), (1.0, None)])
def test_requested_accepts_booleans_only(value, ok):
    if ok is None and value is not None:
        with pytest.raises(ValueError, match="^stream_canvas: "):
            canvas.requested({"stream_canvas": value})
    else:
        assert canvas.requested({} if value is None else {"stream_canvas": value}) is bool(ok)
