"""``PagedKV``: per-request gathers and the batched, padded gather the stepper feeds the model."""

from __future__ import annotations

import torch

from vllm_dapd.engine.core.kv import PagedKV


def test_gather_padded_equals_each_request_gathered_alone():
    kv = PagedKV(num_layers=2, num_blocks=10, block_size=4, num_kv_heads=2, head_dim=3, dtype=torch.float32,
                 device="cpu")
    g = torch.Generator().manual_seed(0)
    tables = [[7, 2, 5], [0, 9], [4]]
    for table in tables:  # fill every page a request owns
        positions = torch.arange(len(table) * 4)
        kv.scatter(table, positions, [(torch.randn(2, len(positions), 3, generator=g),
                                       torch.randn(2, len(positions), 3, generator=g)) for _ in range(2)])
    reads = [torch.tensor([0, 1, 2, 9, 10]), torch.arange(6), torch.tensor([], dtype=torch.long)]
    padded = kv.gather_padded(tables, reads, 6)
    for layer, (k, v) in enumerate(padded):
        assert k.shape == v.shape == (3, 2, 6, 3)
        assert torch.isfinite(k).all() and torch.isfinite(v).all()  # padding keys are masked, never NaN
        for b, (table, pos) in enumerate(zip(tables, reads)):
            if len(pos):
                k1, v1 = kv.gather_at(table, pos)[layer]
                assert torch.equal(k[b, :, : len(pos)], k1) and torch.equal(v[b, :, : len(pos)], v1)
