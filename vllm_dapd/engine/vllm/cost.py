"""Per-choice decoding cost: NFE and committed tokens of each generated sequence, for clients.

The scheduler (``vllm_dapd/engine/vllm/scheduler.py``) keeps vLLM's per-sequence acceptance record
(``CompletionOutput.spec_decode_metrics``, one per sampled sequence, so ``n > 1`` gives each output
its own) with one "spec step" per forward: ``num_spec_steps`` = NFE, ``num_accepted_draft_tokens``
= committed tokens (whole blocks, so it can exceed the returned tokens when ``max_tokens`` cuts a
block). ``cost(output)`` reads it for ``vllm.LLM`` users.

Trace (requests with ``vllm_xargs={"trace": 1}``): which canvas positions each forward committed.
The runner reports them per step, the scheduler sends them with the sequence's final output in
``CompletionOutput.routed_experts`` (see ``vllm_dapd/engine/vllm/scheduler.py``: the one per-sequence
array vLLM carries from the engine to the API server), encoded by ``encode_trace`` as rows
``(forward, position)`` (position -1: that forward committed nothing). ``trace(output)`` decodes
it to ``[[forward, [positions...]], ...]``, forward = 1..NFE, positions relative to the answer
start (canvas = whole blocks, so positions may pass ``max_tokens``).

vLLM's OpenAI server returns that record only as ``metrics.speculative_decoding`` and only for one
prompt with ``n == 1``. ``install_response_cost`` (called from ``hooks.configure_diffusion_engine``,
so only when a diffusion model is served) adds to every choice of a completion or chat completion
response the field ``dapd = {"nfe": int, "committed_tokens": int, "tokens_per_forward": float}``
(plus ``"trace"``, as ``trace(output)``, for requests with ``trace=1``);
when streaming, on the chunk that carries the choice's ``finish_reason``. vLLM's response models
allow extra fields (``OpenAIBaseModel``: ``extra="allow"``), so an attribute set on a choice is
serialized with it. The hooks wrap the serving methods that see the final ``RequestOutput``\\ s:

- completion, non-streaming: ``request_output_to_completion_response`` numbers choices in the
  order of ``final_res_batch`` then ``outputs`` (``index=len(choices)``), so choice k is the k-th
  output in that order;
- chat, non-streaming: ``chat_completion_full_generator`` consumes ``result_generator``; its last
  ``RequestOutput`` holds all ``n`` outputs and choice ``index`` = ``output.index``;
- streaming (both): the ``result_generator`` is wrapped to note each finished output's cost under
  its choice index (completion: ``prompt_idx * n + output.index``; chat: ``output.index``), and the
  next chunk carrying that index with a ``finish_reason`` gets the field. Only chunks that follow
  a finished output are parsed. Requests with ``stream_canvas=1`` also get one chunk per forward
  (``engine/vllm/canvas.py``: ``CanvasStream``); the cost then joins that chunk's ``dapd.canvas``.
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any, AsyncIterator, NamedTuple

import numpy as np

from . import canvas

FIELD = "dapd"


class Cost(NamedTuple):
    """Decoding cost of one generated sequence."""

    nfe: int  # forward evaluations of the model for this sequence
    committed_tokens: int  # tokens unmasked and committed (whole blocks; >= tokens returned)
    tokens_per_forward: float  # committed_tokens / nfe (0.0 if nfe == 0)

    def as_dict(self) -> dict[str, Any]:
        return self._asdict()


def cost(output: Any) -> Cost | None:
    """The cost of one ``vllm.CompletionOutput`` (``request_output.outputs[i]``), or None when it has
    no per-sequence record (not served by vllm-dapd, or not finished)."""
    metrics = getattr(output, "spec_decode_metrics", None)
    if metrics is None:
        return None
    record = metrics.to_dict()
    nfe, committed = int(record["num_spec_steps"]), int(record["num_accepted_draft_tokens"])
    return Cost(nfe, committed, committed / nfe if nfe else 0.0)


def encode_trace(entries: list[tuple[int, list[int]]]) -> np.ndarray:
    """``[(forward, positions), ...]`` -> int32 rows ``(forward, position)``; ``(forward, -1)`` for a
    forward that committed nothing, so every forward is kept."""
    rows = [(f, p) for f, positions in entries for p in (positions or [-1])]
    return np.asarray(rows, dtype=np.int32).reshape(-1, 2)


def score_entries(scores: list[float]) -> list[tuple[int, list[int]]]:
    """Choice estimates as trace entries ``(-2 - i, [float32 bits of score i])`` (a forward is >= 1,
    so the two never mix in ``encode_trace``'s rows; ``scores`` reads them back)."""
    bits = np.asarray(scores, dtype=np.float32).view(np.int32).tolist()
    return [(-2 - i, [b]) for i, b in enumerate(bits)]


def scores(output: Any) -> list[float] | None:
    """The ELBO estimate of each choice, in the request's order, for one ``vllm.CompletionOutput``
    of a request with choices (``structured_outputs`` choice / ``score_choices``); None otherwise."""
    rows = getattr(output, "routed_experts", None)
    if rows is None:
        return None
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != 2 or not (rows[:, 0] <= -2).any():
        return None
    picked = rows[rows[:, 0] <= -2]
    picked = picked[np.argsort(-picked[:, 0])]  # -2, -3, ...: choice order
    return [float(v) for v in picked[:, 1].astype(np.int32).view(np.float32)]


def trace(output: Any) -> list[list[Any]] | None:
    """Which canvas positions each forward committed, for one ``vllm.CompletionOutput`` of a request
    with ``trace=1``: ``[[forward, [positions...]], ...]`` in forward order (1..NFE; positions
    relative to the answer start). None without a trace."""
    rows = getattr(output, "routed_experts", None)
    if rows is None:
        return None
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != 2:
        return None
    by_forward: dict[int, list[int]] = {}
    for f, p in rows.tolist():
        if f < 0:  # a choice's score (``score_entries``)
            continue
        by_forward.setdefault(f, [])
        if p >= 0:
            by_forward[f].append(p)
    return [[f, by_forward[f]] for f in sorted(by_forward)] if by_forward else None


def _field(output: Any) -> dict[str, Any] | None:
    c = cost(output)
    if c is None:
        return None
    value = c.as_dict()
    t = trace(output)
    if t is not None:
        value["trace"] = t
    s = scores(output)
    if s is not None:
        value["scores"] = s
    return value


def _attach(choice: Any, output: Any) -> None:
    value = _field(output)
    if value is not None:
        setattr(choice, FIELD, value)
        if ("trace" in value or "scores" in value) and getattr(choice, "routed_experts", None) is not None:
            choice.routed_experts = None  # chat would also send the encoded trace (base64 numpy)


def _with_completion_cost(method):
    @functools.wraps(method)
    def request_output_to_completion_response(self, final_res_batch, *args, **kwargs):
        response = method(self, final_res_batch, *args, **kwargs)
        outputs = [output for res in final_res_batch for output in res.outputs]
        for choice, output in zip(response.choices, outputs):
            _attach(choice, output)
        return response

    return request_output_to_completion_response


def _with_chat_cost(method):
    @functools.wraps(method)
    async def chat_completion_full_generator(self, request, result_generator, *args, **kwargs):
        last = []

        async def remember_last():
            async for res in result_generator:
                last[:] = [res]
                yield res

        response = await method(self, request, remember_last(), *args, **kwargs)
        if last and hasattr(response, "choices"):
            by_index = {output.index: output for output in last[0].outputs}
            for choice in response.choices:
                if choice.index in by_index:
                    _attach(choice, by_index[choice.index])
        return response

    return chat_completion_full_generator


def _stamp_chunk(line: str, pending: dict[int, dict]) -> str:
    """Add the pending cost to the choices of one SSE ``data:`` line that carry a finish_reason."""
    if not line.startswith("data: {"):
        return line
    chunk = json.loads(line[len("data: "):])
    stamped = False
    for choice in chunk.get("choices") or ():
        if choice.get("finish_reason") is not None and choice.get("index") in pending:
            choice[FIELD] = {**(choice.get(FIELD) or {}), **pending.pop(choice["index"])}  # keeps a canvas
            stamped = True
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n" if stamped else line


def _with_stream_cost(method, choice_index, chat: bool):
    """Wrap a streaming generator method taking ``request`` and ``result_generator``;
    ``choice_index(request, item, output)`` gives a finished output's choice index. Requests with
    ``stream_canvas`` also get one chunk per forward (``engine/vllm/canvas.py``)."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    async def stream_generator(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        request, results = bound.arguments["request"], bound.arguments["result_generator"]
        pending: dict[int, dict] = {}

        def note(item: Any) -> None:
            res = item[1] if isinstance(item, tuple) else item
            for output in res.outputs:
                value = _field(output) if output.finish_reason is not None else None
                if value is not None:
                    pending[choice_index(request, item, output)] = value

        def stamp(line: str) -> str:
            return _stamp_chunk(line, pending) if pending else line

        if canvas.requested_xargs(getattr(request, "vllm_xargs", None)):
            stream = canvas.CanvasStream(chat, lambda item, output: choice_index(request, item, output),
                                         bound.arguments.get("tokenizer"), bound.arguments.get("request_id", ""),
                                         bound.arguments.get("model_name", ""))
            bound.arguments["result_generator"] = stream.results(results, note)
            async for line in stream.merged(method(*bound.args, **bound.kwargs), stamp):
                yield line
            return

        async def note_finished() -> AsyncIterator[Any]:
            async for item in results:
                note(item)
                yield item

        bound.arguments["result_generator"] = note_finished()
        async for line in method(*bound.args, **bound.kwargs):
            yield stamp(line)

    return stream_generator


def _completion_index(request: Any, item: tuple[int, Any], output: Any) -> int:
    return item[0] * (request.n or 1) + output.index


def _chat_index(request: Any, item: Any, output: Any) -> int:
    return output.index


def install_response_cost() -> None:
    """Wrap vLLM's OpenAI serving methods so every choice carries ``dapd`` (idempotent)."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    if getattr(OpenAIServingCompletion, "_dapd_cost_installed", False):
        return
    OpenAIServingCompletion.request_output_to_completion_response = _with_completion_cost(
        OpenAIServingCompletion.request_output_to_completion_response)
    OpenAIServingCompletion.completion_stream_generator = _with_stream_cost(
        OpenAIServingCompletion.completion_stream_generator, _completion_index, chat=False)
    OpenAIServingChat.chat_completion_full_generator = _with_chat_cost(
        OpenAIServingChat.chat_completion_full_generator)
    OpenAIServingChat.chat_completion_stream_generator = _with_stream_cost(
        OpenAIServingChat.chat_completion_stream_generator, _chat_index, chat=True)
    OpenAIServingCompletion._dapd_cost_installed = True
