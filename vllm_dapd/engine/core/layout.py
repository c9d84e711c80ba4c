"""Where each sequence of one padded batched forward sits (``vllm_dapd/engine/core/stepper.py``).

Three coordinate systems:

- *absolute position*: index into a sequence's prompt + canvas (+ infilling suffix); the prompt is
  ``[0, P)``, canvas position ``c`` is ``P + c``, the suffix follows the canvas. A step feeds the
  model the absolute span ``[a, e)`` (``Feed``); earlier positions (and a ``dual`` suffix) come
  from the KV pages.
- *canvas position*: index into the generation region, ``[0, gen_length)``; what the rows of
  ``DenoiseState`` are.
- *forward row*: row of the padded ``[B, T]`` input. Fed tokens are left-padded so every sequence
  ends at row ``T``: input row ``r`` of sequence ``b`` holds absolute position
  ``a + r - row0[b]``.

A model with ``logits_shift`` 1 (Dream) scores absolute position ``p`` with the row holding
``p - 1``, so canvas position ``c`` is scored by input row ``canvas_row[b] + c``, which holds
absolute position ``P + c - shift``; such rows exist for ``c`` in ``[visible[b], visible_end[b])``.
The model computes logits only for the rows the policies read (``logits_rows``): per sequence an
ascending list of canvas positions (the active block's masked ones, or everything visible), padded
to the longest list by repeating the last position.

``score_from`` (block-causal models): canvas positions before it are fed only to write their final
KV (the block finished last step) and are neither scored nor in the attention span, so a policy sees
the active block alone whether or not the previous block rides along in this forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from .sequence import Sequence as Seq


@dataclass(frozen=True)
class Feed:
    """One sequence's step in absolute positions: what is fed, read from and written to the pages.

    The only place that decides it (cache modes in ``stepper.py``'s docstring). A ``dual`` suffix
    is *cached* when the pages hold the KV of the canvas after the active block (``suffix_block``)."""

    first: int  # fed span [first, end)
    end: int
    total: int  # prompt + canvas + suffix: the keys the sequence attends, [0, total)
    reads: torch.Tensor  # positions whose KV comes from the pages (cached prefix, then a cached suffix)
    writes: torch.Tensor  # fed positions whose KV is stored after the forward (now final, or the suffix)
    protect: torch.Tensor  # fed positions already cached, whose stored KV must survive the forward
    cached_len: int  # leading positions with final KV after this step
    caches_suffix: bool  # ``dual``: this step writes the suffix's KV

    @classmethod
    def of(cls, s: Seq, shift: int, capacity: int) -> Feed:
        """``shift``: the model's logits shift (Dream scores position j with row j - 1, so the row
        before the active block is fed too); ``capacity``: positions the sequence's pages hold."""
        P, (start, stop) = len(s.prompt), s.block_span()
        mode, total = s.settings.cache_mode, s.end
        none = torch.arange(0)
        if getattr(s, "causal", False):  # block-causal: up to the active block's end, never past it
            end, grid = P + stop, s.grid_start()
            if mode == "none":
                return cls(0, end, end, none, none, none, s.cached_len, False)
            first = min(s.cached_len, grid)
            return cls(first, end, end, torch.arange(first), torch.arange(s.cached_len, grid),
                       torch.arange(first, min(s.cached_len, end)), max(s.cached_len, grid), False)
        if mode == "none":
            return cls(0, total, total, none, none, none, s.cached_len, False)
        suffix_cached = mode == "dual" and s.suffix_block == s.block
        first = min(s.cached_len, P + start - shift)
        end = P + stop if suffix_cached else total
        reads = torch.arange(first)
        if suffix_cached:
            reads = torch.cat((reads, torch.arange(end, total)))
        writes = torch.arange(s.cached_len, P + start)  # prompt + committed blocks, now final
        caches_suffix = mode == "dual" and not suffix_cached and capacity >= total and end == total
        if caches_suffix:
            writes = torch.cat((writes, torch.arange(P + stop, total)))
        return cls(first, end, total, reads, writes, torch.arange(first, min(s.cached_len, end)),
                   max(s.cached_len, P + start), caches_suffix)

    def fed(self) -> torch.Tensor:
        return torch.arange(self.first, self.end)

    def stored(self, s: Seq) -> None:
        """Record on ``s`` what the pages hold once ``writes`` are stored."""
        s.cached_len = self.cached_len
        if self.caches_suffix:
            s.suffix_block = s.block


@dataclass(frozen=True)
class BatchLayout:
    """Row arithmetic of one padded forward; each tuple has one entry per sequence."""

    rows: int  # T: input rows of the forward (the longest fed span)
    row0: tuple[int, ...]  # input row of the sequence's first fed token
    canvas_row: tuple[int, ...]  # input row scoring canvas position 0 (may be negative: not fed)
    visible: tuple[int, ...]  # first canvas position scored by this forward
    visible_end: tuple[int, ...]  # end of the scored canvas positions
    span_start: tuple[int, ...]  # first fed canvas position (attention span, unshifted)
    span_end: tuple[int, ...]  # end of the fed canvas positions
    tail: tuple[int, ...]  # fed rows after the canvas (an infilling suffix), the last rows of the forward

    @classmethod
    def of(cls, spans: Sequence[tuple[int, int]], prompt_lengths: Sequence[int], gen_lengths: Sequence[int],
           shift: int, score_from: Sequence[int] | None = None) -> BatchLayout:
        """Layout of sequences fed the absolute ``spans`` [a, e), with their prompt and canvas lengths;
        ``score_from``: per sequence, the first canvas position scored (default: the first fed)."""
        T = max(e - a for a, e in spans)
        row0 = tuple(T - (e - a) for a, e in spans)
        low = tuple(score_from) if score_from is not None else (0,) * len(spans)
        return cls(
            rows=T,
            row0=row0,
            canvas_row=tuple(r + P - a - shift for r, P, (a, _) in zip(row0, prompt_lengths, spans)),
            visible=tuple(max(lo, a + shift - P) for (a, _), P, lo in zip(spans, prompt_lengths, low)),
            visible_end=tuple(min(n, e + shift - P) for (_, e), P, n in zip(spans, prompt_lengths, gen_lengths)),
            span_start=tuple(max(lo, a - P) for (a, _), P, lo in zip(spans, prompt_lengths, low)),
            span_end=tuple(min(n, e - P) for (_, e), P, n in zip(spans, prompt_lengths, gen_lengths)),
            tail=tuple(max(0, e - P - n) for (_, e), P, n in zip(spans, prompt_lengths, gen_lengths)),
        )

    def scored_positions(self, wanted: Sequence[torch.Tensor]) -> torch.Tensor:
        """[B, R] long: sequence b's logits rows score the canvas positions ``wanted[b]`` (ascending,
        visible, at least one) in order, then repeat the last one up to R, the longest list."""
        for b, pos in enumerate(wanted):
            if not len(pos) or int(pos[0]) < self.visible[b] or int(pos[-1]) >= self.visible_end[b]:
                raise ValueError(f"positions {pos.tolist()} of sequence {b} are not within the visible "
                                 f"{(self.visible[b], self.visible_end[b])}")
        width = max(len(pos) for pos in wanted)
        return torch.stack([torch.cat((pos, pos[-1:].expand(width - len(pos)))) for pos in wanted])

    def real_rows(self) -> torch.Tensor:
        """[N] long: flat input rows ``b * T + r`` holding fed tokens (not left padding)."""
        return torch.cat([torch.arange(b * self.rows + r0, (b + 1) * self.rows) for b, r0 in enumerate(self.row0)])

    def input_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, R] input rows scoring the canvas ``positions`` [B, R] (the model's ``logits_rows``)."""
        return positions + torch.tensor(self.canvas_row, dtype=torch.long)[:, None]
