"""Per-sequence decoding cost: NFE and committed tokens of each generated sequence.

The scheduler (``vllm_dapd/engine/scheduler.py``) keeps vLLM's per-sequence acceptance record
(``CompletionOutput.spec_decode_metrics``, one per sampled sequence, so ``n > 1`` gives each output
its own) with one "spec step" per forward: ``num_spec_steps`` = NFE, ``num_accepted_draft_tokens``
= committed tokens (whole blocks, so it can exceed the returned tokens when ``max_tokens`` cuts a
block). ``cost(output)`` reads it for ``vllm.LLM`` users.
"""

from __future__ import annotations

from typing import Any, NamedTuple


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
