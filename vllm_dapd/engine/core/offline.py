"""The served denoising step run offline: requests in, tokens out, no vLLM (plain data and torch).

``run(model, requests)`` resolves each request with ``settings.plan`` (the function the server's
scheduler calls: same settings keys, same canvas size), gives it pages in one ``PagedKV`` (or the
pages passed in, e.g. ``kernel_kv.KernelKV``) and loops ``stepper.denoise_step`` over all of them
together, one padded forward per step, until every request has finished its canvas. It is what
the vLLM runner does each engine step, minus vLLM's scheduling (admission, preemption, chunked
prefill); a block-causal model (``model.attention_structure``, LLaDA2) is planned on its own block
grid with cache mode ``prefix`` by default, as the server does: tests and benchmarks use it to compare the served step with the reference loop
(``vllm_dapd/decoding/generate.py``) without starting an engine.

Pages are handed out interleaved (request i of n gets pages i, i + n, i + 2n, ...), so each
request's KV is scattered through the pool as under vLLM's allocator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .kv import PagedKV
from .sequence import Sequence
from .settings import DecodeSettings, Defaults, plan
from .stepper import denoise_step

PAGE = 4  # positions per page of the pool ``run`` makes (small: a request spans several)


@dataclass(frozen=True)
class Request:
    """One request: token ids and the per-request settings a client sends (``vllm_xargs``)."""

    prompt: list[int]
    settings: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"policy": "dapd", "steps": 4}
    max_tokens: int | None = None  # None: the room left (``max_model_len`` - prompt - suffix)
    temperature: float = 0.0
    seed: int = 0
    suffix: list[int] = field(default_factory=list)  # infilling: fixed tokens after the canvas


@dataclass
class Result:
    tokens: list[int]  # the canvas, in order (blocks as they finished)
    nfe: int  # forwards this request took part in
    sequence: Sequence  # its final state (trace, logprobs, canvas)


def sequences(model: Any, requests: list[Request], *, server: DecodeSettings | None = None,
              kv: PagedKV | str | None = "paged", max_model_len: int = 1 << 20) -> tuple[list[Sequence], PagedKV | None]:
    """Each request's ``Sequence`` (planned as the server plans it) with its pages, and the pages:
    ``kv="paged"`` makes a pool that fits them all, a ``PagedKV`` is used as given, None: no pages
    (cache mode ``none`` only)."""
    structure = getattr(model, "attention_structure", None)
    causal = structure.block_size if structure is not None and structure.kind == "block_causal" else None
    if server is None:  # as the server's defaults: a block-causal model's block size, its exact KV reuse
        server = DecodeSettings(block_length=causal, cache_mode="prefix") if causal else DecodeSettings()
    defaults = Defaults(server)
    seqs = []
    for i, r in enumerate(requests):
        room = max_model_len - len(r.prompt) - len(r.suffix)
        p = plan(defaults, r.settings, r.max_tokens, room, causal, len(r.prompt))
        seqs.append(Sequence(f"r{i}", list(r.prompt), p.gen_length, p.settings, p.params, int(model.mask_token_id),
                             float(r.temperature), int(r.seed), suffix=list(r.suffix), causal=causal is not None))
    if kv is None:
        return seqs, None
    n = len(seqs)
    if kv == "paged":
        spec = model.spec
        kv = PagedKV(spec.n_layers, n * max(-(-s.end // PAGE) for s in seqs), PAGE, spec.n_kv_heads, spec.head_dim,
                     torch.float32, "cpu")
    need = max(-(-s.end // kv.block_size) for s in seqs)
    if n * need > kv.num_blocks:
        raise ValueError(f"kv: {n} requests of up to {need} pages need {n * need}, the pool has {kv.num_blocks}")
    for i, s in enumerate(seqs):
        s.block_ids = [i + n * j for j in range(-(-s.end // kv.block_size))]
    return seqs, kv


def finish(model: Any, seqs: list[Sequence], kv: PagedKV | None = None,
           device: torch.device | str = "cpu") -> list[list[int]]:
    """Step ``seqs`` together until all are finished; each one's tokens (from where it stood)."""
    out: list[list[int]] = [[] for _ in seqs]
    live = list(range(len(seqs)))
    while live:
        for i, block in zip(live, denoise_step(model, [seqs[i] for i in live], torch.device(device), kv)):
            out[i] += block
        live = [i for i in live if not seqs[i].finished]
    return out


def run(model: Any, requests: list[Request], *, server: DecodeSettings | None = None,
        kv: PagedKV | str | None = "paged", device: torch.device | str = "cpu",
        max_model_len: int = 1 << 20) -> list[Result]:
    """Every request to completion, all in one batch per step; results in request order."""
    seqs, kv = sequences(model, requests, server=server, kv=kv, max_model_len=max_model_len)
    return [Result(tokens, s.nfe, s) for tokens, s in zip(finish(model, seqs, kv, device), seqs)]
