"""Paged KV storage for cache mode ``prefix``: the pages vLLM's scheduler allocates, the tensors we own.

vLLM's KV cache manager hands each request block ids (``NewRequestData.block_ids``,
``CachedRequestData.new_block_ids``); our models attend with SDPA over ``past_key_values``
(``vllm_dapd/models/transformer.py``), not through vLLM ``Attention`` layers, so the runner keeps
one tensor per layer and moves KV between pages and the model itself:

- ``gather(block_ids, n)`` / ``gather_at(block_ids, positions)``: KV of a request's first ``n``
  (or the given) positions as per-layer ``(k, v)``, each [Hkv, n, D] (keys already rotated, as the
  model returns them, so keys of any positions can be concatenated in any order);
- ``gather_padded(tables, positions, width)``: the same for a batch in one gather per layer, right
  padded to ``width`` keys (the padding holds finite KV of some page: mask it out);
- ``scatter(block_ids, positions, kv)``: write this forward's KV of the given absolute positions.

Portable (plain indexing, same on CPU and CUDA). A fused path would call the platform's paged
attention kernel instead of gathering (see docs/ENGINE_DESIGN.md section 4).
"""

from __future__ import annotations

import torch

KV = tuple[torch.Tensor, torch.Tensor]


class PagedKV:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.block_size = block_size
        # [2, num_blocks * block_size, Hkv, D] per layer: slot = block_id * block_size + offset.
        # Zeros, not empty: padding keys of ``gather_padded`` read some slot, and a masked key's
        # value still enters SDPA's product (0 x NaN would be NaN).
        self.layers = [torch.zeros((2, num_blocks * block_size, num_kv_heads, head_dim), dtype=dtype, device=device)
                       for _ in range(num_layers)]

    def slots(self, block_ids: list[int], positions: torch.Tensor) -> torch.Tensor:
        """Slot of each absolute position of a request whose pages are ``block_ids``."""
        table = torch.tensor(block_ids, dtype=torch.long, device=positions.device)
        if positions.numel() and int(positions.max()) >= len(block_ids) * self.block_size:
            raise IndexError(f"position {int(positions.max())} beyond the {len(block_ids)} pages allocated")
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def gather(self, block_ids: list[int], n: int) -> list[KV]:
        return self.gather_at(block_ids, torch.arange(n, device=self.layers[0].device))

    def gather_at(self, block_ids: list[int], positions: torch.Tensor) -> list[KV]:
        """Per layer (k, v), each [Hkv, len(positions), D], of the given absolute positions."""
        idx = self.slots(block_ids, positions.to(self.layers[0].device))
        out = []
        for layer in self.layers:
            kv = layer.index_select(1, idx)  # [2, n, Hkv, D]
            out.append((kv[0].transpose(0, 1), kv[1].transpose(0, 1)))  # [Hkv, n, D]
        return out

    def gather_padded(self, tables: list[list[int]], positions: list[torch.Tensor], width: int) -> list[KV]:
        """Per layer (k, v), each [B, Hkv, width, D] (a view of one gather): sequence b's KV at
        ``positions[b]`` (pages ``tables[b]``) in its first ``len(positions[b])`` keys, then
        padding (slot 0's KV)."""
        device = self.layers[0].device
        idx = torch.zeros((len(tables), width), dtype=torch.long, device=device)
        for b, (table, pos) in enumerate(zip(tables, positions)):
            if len(pos):
                idx[b, : len(pos)] = self.slots(table, pos.to(device))
        out = []
        for layer in self.layers:
            kv = layer.index_select(1, idx.flatten()).view(2, len(tables), width, *layer.shape[2:])
            kv = kv.transpose(2, 3)  # [2, B, Hkv, width, D]
            out.append((kv[0], kv[1]))
        return out

    def scatter(self, block_ids: list[int], positions: torch.Tensor, kv: list[KV]) -> None:
        """``kv`` per layer: (k, v) each [Hkv, len(positions), D]."""
        if not positions.numel():
            return
        idx = self.slots(block_ids, positions.to(self.layers[0].device))
        for layer, (k, v) in zip(self.layers, kv):
            layer[0].index_copy_(0, idx, k.transpose(0, 1).to(layer.dtype))
            layer[1].index_copy_(0, idx, v.transpose(0, 1).to(layer.dtype))
