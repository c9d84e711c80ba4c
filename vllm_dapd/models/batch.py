"""One forward's inputs as one object: what ``DiffusionTransformer.run`` takes (the engine's
``stepper.prepare`` builds it; ``DiffusionTransformer.forward`` builds it from keyword arguments).

Field meanings are the forward contract of ``transformer.py`` (module docstring). Plain data, no
vLLM import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from vllm_dapd.models.attention import PagedAttention

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class AttentionHook:
    """The attention the DAPD/DAWN policies read (``attention.span_attention``): rows [start, end) of
    this forward, for the batch rows ``rows`` (None: all), averaged over ``layers`` (one list for
    every row, or one list per hook row; None: the last layer)."""

    span: tuple[int, int]
    layers: Sequence[int] | Sequence[Sequence[int]] | None = None
    rows: torch.Tensor | None = None  # [B'] long


@dataclass(frozen=True)
class StepBatch:
    """A padded [B, T] batch and everything one forward needs besides the weights."""

    input_ids: torch.Tensor  # [B, T] long
    positions: torch.Tensor | None = None  # [B, T] long RoPE positions (None: derived, see forward)
    key_padding_mask: torch.Tensor | None = None  # [B, P + T] bool, True = real token
    past_key_values: Sequence[KV] | None = None  # cached KV per layer, each [B, Hkv, P, D]
    paged: PagedAttention | None = None  # or: attention over KV pages holding every cached key
    use_cache: bool = False  # also return this forward's own KV per layer
    logits_rows: torch.Tensor | None = None  # [B, R] long: only these input rows get logits
    real_rows: torch.Tensor | None = None  # [N] long: flat rows b * T + t that are not padding
    hook: AttentionHook | None = None
    block_size: int | None = None  # block-causal attention over blocks of this many positions
    inputs_embeds: torch.Tensor | None = None  # [B, T, hidden] instead of the embedding lookup
