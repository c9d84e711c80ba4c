"""Test helper shared by the stepper and infilling tests (a plain module: ``conftest`` is not importable
by name from every test folder, since tests/distributed and tests/models have their own)."""

from __future__ import annotations

import torch

from vllm_dapd.engine.stepper import denoise_step


def run_stepper(model, seqs, kv=None) -> dict[str, list[int]]:
    """Step ``seqs`` together through ``stepper.denoise_step`` until all finish: each request's tokens."""
    out: dict[str, list[int]] = {s.req_id: [] for s in seqs}
    live = list(seqs)
    while live:
        for s, block in zip(live, denoise_step(model, live, torch.device("cpu"), kv)):
            out[s.req_id] += block
        live = [s for s in live if not s.finished]
    return out
