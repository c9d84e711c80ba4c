"""Where each sequence of one padded batched forward sits (``vllm_dapd/engine/stepper.py``).

Three coordinate systems:

- *absolute position*: index into a sequence's prompt + canvas; the prompt is ``[0, P)``, canvas
  position ``c`` is ``P + c``. A step feeds the model the absolute span ``[a, e)``
  (``stepper._fed_span``); earlier positions come from the KV pages.
- *canvas position*: index into the generation region, ``[0, gen_length)``; what the rows of
  ``DenoiseState`` are.
- *forward row*: row of the padded ``[B, T]`` input. Fed tokens are left-padded so every sequence
  ends at row ``T``: input row ``r`` of sequence ``b`` holds absolute position
  ``a + r - row0[b]``. The model returns logits only for rows ``>= logits_start``; logits row
  ``i`` is input row ``logits_start + i``.

A model with ``logits_shift`` 1 (Dream) scores absolute position ``p`` with the row holding
``p - 1``, so canvas position ``c`` is scored by logits row ``offsets[b] + c``, which holds absolute
position ``P + c - shift``; such rows exist for ``c`` in ``[visible[b], visible_end[b])``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class BatchLayout:
    """Row arithmetic of one padded forward; each tuple has one entry per sequence."""

    rows: int  # T: input rows of the forward (the longest fed span)
    row0: tuple[int, ...]  # input row of the sequence's first fed token
    logits_start: int  # first input row that gets logits (the lowest row any canvas needs)
    offsets: tuple[int, ...]  # canvas position c is scored by logits row offsets[b] + c
    visible: tuple[int, ...]  # first canvas position scored by this forward
    visible_end: tuple[int, ...]  # end of the scored canvas positions
    span_start: tuple[int, ...]  # first fed canvas position (attention span, unshifted)
    span_end: tuple[int, ...]  # end of the fed canvas positions

    @classmethod
    def of(cls, spans: Sequence[tuple[int, int]], prompt_lengths: Sequence[int], gen_lengths: Sequence[int],
           shift: int) -> BatchLayout:
        """Layout of sequences fed the absolute ``spans`` [a, e), with their prompt and canvas lengths."""
        T = max(e - a for a, e in spans)
        row0 = tuple(T - (e - a) for a, e in spans)
        visible = tuple(max(0, a + shift - P) for (a, _), P in zip(spans, prompt_lengths))
        visible_end = tuple(min(n, e + shift - P) for (_, e), P, n in zip(spans, prompt_lengths, gen_lengths))
        # Input row of canvas position 0's scoring row (may be negative: not fed).
        canvas0 = [r + P - a - shift for r, P, (a, _) in zip(row0, prompt_lengths, spans)]
        first = min(c0 + v for c0, v in zip(canvas0, visible))
        return cls(
            rows=T,
            row0=row0,
            logits_start=first,
            offsets=tuple(c0 - first for c0 in canvas0),
            visible=visible,
            visible_end=visible_end,
            span_start=tuple(max(0, a - P) for (a, _), P in zip(spans, prompt_lengths)),
            span_end=tuple(e - P for (_, e), P in zip(spans, prompt_lengths)),
        )
