"""Canvas streaming: one streamed chunk per forward, listing what that forward committed.

A request with ``stream: true`` and ``vllm_xargs={"stream_canvas": 1}`` gets, for every forward of
each of its sequences, one chunk whose choice carries
``dapd.canvas = {"forward": k, "committed": [[position, token_id, text], ...]}`` (forward 1..NFE,
positions from the answer start over whole blocks, so they may pass ``max_tokens``; ``text`` is the
token alone, decoded with its special tokens). ``delta.content`` / ``text`` keep vLLM's meaning:
append-only text of the answer's committed prefix (``sequence.Sequence.release_end``), stop strings
and EOS applied. Replaying every chunk's
``committed`` gives the final canvas; its first ``len(answer tokens)`` positions are the answer.

How a forward reaches the client (the normal path is untouched: all of this runs only for such
requests):

- runner (``engine/vllm/runner.py``): the stepper records the committed positions of these sequences as
  for ``trace``; the runner adds their tokens and sends ``DiffusionRunnerOutput.dapd_canvas
  = {req_id: [(forward, positions, tokens)]}``.
- scheduler (``engine/vllm/scheduler.py``): vLLM's scheduler emits an ``EngineCoreOutput`` only when a
  request gets tokens (a finished block). ``attach`` puts the forward's commits on the request's
  output of the step and, for a forward that handed out no tokens, appends an output without tokens.
  The commits ride ``EngineCoreOutput.new_sampling_mask`` (``rows``: one row per forward), vLLM's
  per-output list of integer rows: the output processor hands it to the ``CompletionOutput`` of
  that choice as ``sampling_mask`` (streamed requests: each output gets the rows since the last
  one, and ``RequestOutput.add`` concatenates them when it merges outputs a slow client has not
  read, also across the ``n`` choices, each keeping its own). Our runner never fills it otherwise,
  and the completion and chat servers never send it.
- API server (``engine/vllm/cost.py``'s stream wrapper): ``CanvasStream`` takes the commits off each
  output. An item with no tokens is not shown to vLLM's generator (it would drop it or send an
  empty chunk): the wrapper sends the canvas chunk itself, in order with vLLM's chunks (both go
  through one queue). An item with tokens goes to vLLM's generator and its chunk for that choice
  gets the ``dapd.canvas`` field. So each forward is one chunk, never more.

Known limit: when a stop string ends the answer at the first token a step hands out, vLLM trims that
forward's rows with the tokens and its chunk is not sent (the answer and the other chunks are right).

``stream_canvas`` without ``stream`` (and with ``vllm.LLM``, which returns final outputs only) is
an HTTP 400 naming the key (``check``, run at admission, ``validation.admit``, when the plan asks
for it).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Callable

from ..core.settings import STREAM_CANVAS as KEY  # the vllm_xargs key
from ..core.settings import check_flag


def requested(extra_args: Any) -> bool:
    """Whether ``extra_args`` asks for canvas streaming; a non-boolean value is a ValueError naming the key."""
    return check_flag(KEY, (extra_args or {}).get(KEY, False))


def requested_xargs(xargs: Any) -> bool:
    """``requested`` for an admitted request's ``vllm_xargs`` (already validated; never raises)."""
    try:
        return requested(xargs)
    except ValueError:
        return False


def check(sampling_params: Any) -> None:
    """Admission check of a request whose plan asks for canvas streaming: it must be streamed (delta)."""
    from vllm.sampling_params import RequestOutputKind

    if getattr(sampling_params, "output_kind", None) != RequestOutputKind.DELTA:
        raise ValueError(f"{KEY}: needs a streamed request (\"stream\": true); one chunk is sent per forward")


# ---------------------------------------------------------------------------- engine core side


def rows(entries: list[tuple[int, list[int], list[int]]], min_rows: int = 0) -> Any:
    """Runner entries ``(forward, positions, tokens)`` -> the carrier: one row ``[forward, position,
    token, position, token, ...]`` per forward, padded with empty rows to ``min_rows`` (the output's
    token count: vLLM trims the carrier with the tokens when a stop string cuts them, row by row)."""
    import numpy as np
    from vllm.v1.outputs import SamplingMaskLists

    flat = [[f, *(v for pair in zip(positions, tokens) for v in pair)] for f, positions, tokens in entries]
    flat += [[]] * max(0, min_rows - len(flat))
    offsets = np.cumsum([0, *(len(row) for row in flat)])
    return SamplingMaskLists(np.asarray([v for row in flat for v in row], dtype=np.int64), offsets)


def attach(outputs: dict[int, Any], canvas: dict[str, list], requests: dict[str, Any],
           new_output: Callable[[Any, Any], Any]) -> None:
    """Put each request's commits of this step on its ``EngineCoreOutput`` of the step;
    ``new_output(request, carrier)`` makes one without tokens for a request that got none (none
    once it is gone: aborted)."""
    by_id = {out.request_id: out for batch in outputs.values() for out in batch.outputs if out.request_id in canvas}
    for req_id, entries in canvas.items():
        out = by_id.get(req_id)
        if out is not None:
            out.new_sampling_mask = rows(entries, len(out.new_token_ids))
            continue
        request = requests.get(req_id)
        if request is None or request.is_finished():
            continue
        from vllm.v1.engine import EngineCoreOutputs

        batch = outputs.get(request.client_index)
        if batch is None:
            batch = outputs[request.client_index] = EngineCoreOutputs()
        batch.outputs.append(new_output(request, rows(entries)))


# ---------------------------------------------------------------------------- API server side


def take(output: Any) -> list[tuple[int, list[list[int]]]]:
    """The commits riding one ``CompletionOutput`` (removed from it): ``[(forward, [[position, token],
    ...]), ...]`` in forward order (several when vLLM merged outputs a slow client had not read yet)."""
    mask = getattr(output, "sampling_mask", None)
    if mask is None:
        return []
    output.sampling_mask = None
    return [(row[0], [row[i:i + 2] for i in range(1, len(row), 2)]) for row in mask.token_ids if row]


class CanvasStream:
    """Merges canvas chunks into one streaming response (see the module docstring).

    ``chat``: chat chunk shape (``delta``) instead of completion (``text``); ``choice_index(item,
    output)``: a choice's index; ``tokenizer``: decodes each committed token alone (None: empty
    texts); ``request_id``, ``model_name``: the ``id`` and ``model`` of the chunks it makes."""

    def __init__(self, chat: bool, choice_index: Callable[[Any, Any], int], tokenizer: Any,
                 request_id: str, model_name: str) -> None:
        self.chat, self.choice_index, self.tokenizer = chat, choice_index, tokenizer
        self.request_id, self.model_name, self.created = request_id, model_name, int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending: dict[int, list[dict]] = {}  # choice index -> canvas values for vLLM's next chunk
        self.texts: dict[int, str] = {}
        self.chunks = 0  # canvas chunks sent (own or stamped)

    def text(self, token: int) -> str:
        text = self.texts.get(token)
        if text is None:
            text = "" if self.tokenizer is None else self.tokenizer.decode([token], skip_special_tokens=False)
            self.texts[token] = text
        return text

    def value(self, forward: int, committed: list[list[int]]) -> dict[str, Any]:
        return {"forward": forward, "committed": [[p, t, self.text(t)] for p, t in committed]}

    def own_chunk(self, index: int, value: dict[str, Any]) -> str:
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": None, "dapd": {"canvas": value}}
        if self.chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        chunk = {"id": self.request_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model_name, "choices": [choice]}
        self.chunks += 1
        return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"

    def stamp(self, chunk: dict[str, Any]) -> bool:
        """Add the pending canvas to vLLM's chunk (one value per choice per chunk); True if changed. A
        chat role chunk (sent before the first item's text) gets none: the forward goes on its text."""
        stamped = False
        for choice in chunk.get("choices") or ():
            if "role" in (choice.get("delta") or {}):
                continue
            values = self.pending.get(choice.get("index"))
            if values:
                choice.setdefault("dapd", {})["canvas"] = values.pop(0)
                self.chunks += 1
                stamped = True
        return stamped

    async def results(self, items: AsyncIterator[Any], note: Callable[[Any], None]) -> AsyncIterator[Any]:
        """vLLM's ``result_generator`` as vLLM's stream generator should see it. An item whose outputs
        carry commits but no tokens is kept from it (its chunks go straight to the queue), except the
        very first item (chat sends its role chunks on it). Otherwise each output's last forward
        goes on vLLM's chunk for that choice, earlier ones (merged outputs) in own chunks before it."""
        seen_any = False
        async for item in items:
            res = item[1] if isinstance(item, tuple) else item
            note(item)
            commits = [(self.choice_index(item, output), take(output), output) for output in res.outputs]
            if not any(values for _, values, _ in commits):
                seen_any = True
                yield item
                continue
            bare = all(not output.token_ids and output.finish_reason is None for output in res.outputs)
            if bare and seen_any:
                for index, values, _ in commits:
                    for f, committed in values:
                        self.queue.put_nowait(self.own_chunk(index, self.value(f, committed)))
                continue
            after: list[tuple[int, dict]] = []  # own chunks to send after vLLM's for this item
            for index, values, _ in commits:
                values = [self.value(f, committed) for f, committed in values]
                if bare:  # the first item: vLLM sends no chunk for it (chat: its role chunks)
                    after += [(index, value) for value in values]
                    continue
                for value in values[:-1]:
                    self.queue.put_nowait(self.own_chunk(index, value))
                self.pending[index] = values[-1:]
            seen_any = True
            yield item  # vLLM's chunks for it are in the queue when this resumes
            for index, _, _ in commits:
                after += [(index, value) for value in self.pending.pop(index, [])]  # not taken by vLLM's
            for index, value in after:
                self.queue.put_nowait(self.own_chunk(index, value))

    async def merged(self, lines: AsyncIterator[str], stamp_line: Callable[[str], str]) -> AsyncIterator[str]:
        """vLLM's lines (stamped) and the canvas chunks, in the order they were made."""
        done = object()

        async def pump() -> None:
            try:
                async for line in lines:
                    if self.pending and line.startswith("data: {"):
                        chunk = json.loads(line[len("data: "):])
                        if self.stamp(chunk):
                            line = f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
                    self.queue.put_nowait(stamp_line(line))
            except BaseException as e:  # noqa: BLE001  (handed to the consumer below)
                self.queue.put_nowait(e)
                return
            self.queue.put_nowait(done)

        task = asyncio.ensure_future(pump())
        try:
            while True:
                line = await self.queue.get()
                if line is done:
                    break
                if isinstance(line, BaseException):
                    raise line
                yield line
        finally:
            if not task.done():
                task.cancel()  # client gone: cancels vLLM's generator, which aborts the request
