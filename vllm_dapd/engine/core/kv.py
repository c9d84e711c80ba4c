"""Paged KV storage for cache modes ``prefix``/``dual``: the pages vLLM's scheduler allocates, the tensors we own.

vLLM's KV cache manager hands each request block ids (``NewRequestData.block_ids``,
``CachedRequestData.new_block_ids``); our models do not use vLLM ``Attention`` layers, so the runner
keeps one tensor per layer and moves KV between pages and the model itself:

- ``gather(block_ids, n)`` / ``gather_at(block_ids, positions)``: KV of a request's first ``n``
  (or the given) positions as per-layer ``(k, v)``, each [Hkv, n, D] (keys already rotated, as the
  model returns them, so keys of any positions can be concatenated in any order);
- ``gather_padded(tables, positions, width)``: the same for a batch in one gather per layer, right
  padded to ``width`` keys (the padding holds finite KV of some page: mask it out);
- ``scatter(block_ids, positions, kv)``: write this forward's KV of the given absolute positions;
- ``begin(tables, feeds, row0, hook_rows, width)``: one forward's view of the pages (the stepper's
  only entry): what the model reads (``past_key_values`` or ``paged``) and ``store``, called after
  the forward, which writes what each ``layout.Feed`` names.

``PagedKV`` is the portable layout (plain indexing, same on CPU and CUDA): the stepper gathers the
cached prefix into ``past_key_values`` and PyTorch SDPA attends it. ``engine/vllm/kernel_kv.py`` keeps
the pages in the layout of vLLM's CPU paged-attention kernel instead (same methods, plus the
kernel), selected by ``--attention-backend CPU_ATTN``: it changes ``read``/``write`` and ``begin``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .layout import Feed

KV = tuple[torch.Tensor, torch.Tensor]


class PagedKV:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.block_size, self.num_blocks = block_size, num_blocks
        # [2, num_blocks * block_size, Hkv, D] per layer: slot = block_id * block_size + offset.
        # Zeros, not empty: padding keys of ``gather_padded`` read some slot, and a masked key's
        # value still enters SDPA's product (0 x NaN would be NaN).
        self.layers = [torch.zeros((2, num_blocks * block_size, num_kv_heads, head_dim), dtype=dtype, device=device)
                       for _ in range(num_layers)]

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    # -------------------------------------------------- layout: the only methods a subclass changes

    def read(self, layer: int, slots: torch.Tensor) -> KV:
        """(k, v) of layer ``layer`` at ``slots`` [n], each [n, Hkv, D]."""
        kv = self.layers[layer].index_select(1, slots)
        return kv[0], kv[1]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` [n, Hkv, D] of layer ``layer`` at ``slots`` [n]."""
        cache = self.layers[layer]
        cache[0].index_copy_(0, slots, k.to(cache.dtype))
        cache[1].index_copy_(0, slots, v.to(cache.dtype))

    # -------------------------------------------------- requests

    def slots(self, block_ids: list[int], positions: torch.Tensor) -> torch.Tensor:
        """Slot of each absolute position of a request whose pages are ``block_ids``."""
        table = torch.tensor(block_ids, dtype=torch.long, device=positions.device)
        if positions.numel() and int(positions.max()) >= len(block_ids) * self.block_size:
            raise IndexError(f"position {int(positions.max())} beyond the {len(block_ids)} pages allocated")
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def gather(self, block_ids: list[int], n: int) -> list[KV]:
        return self.gather_at(block_ids, torch.arange(n, device=self.device))

    def gather_at(self, block_ids: list[int], positions: torch.Tensor) -> list[KV]:
        """Per layer (k, v), each [Hkv, len(positions), D], of the given absolute positions."""
        idx = self.slots(block_ids, positions.to(self.device))
        return [tuple(t.transpose(0, 1) for t in self.read(i, idx)) for i in range(len(self.layers))]

    def padded_slots(self, tables: list[list[int]], positions: list[torch.Tensor], width: int) -> torch.Tensor:
        """[B, width] slots: sequence b's ``positions[b]`` (pages ``tables[b]``), then slot 0."""
        idx = torch.zeros((len(tables), width), dtype=torch.long, device=self.device)
        for b, (table, pos) in enumerate(zip(tables, positions)):
            if len(pos):
                idx[b, : len(pos)] = self.slots(table, pos.to(self.device))
        return idx

    def gather_padded(self, tables: list[list[int]], positions: list[torch.Tensor], width: int) -> list[KV]:
        """Per layer (k, v), each [B, Hkv, width, D] (a view of one gather): sequence b's KV at
        ``positions[b]`` (pages ``tables[b]``) in its first ``len(positions[b])`` keys, then
        padding (slot 0's KV)."""
        idx = self.padded_slots(tables, positions, width)
        return [self.read_padded(i, idx) for i in range(len(self.layers))]

    def read_padded(self, layer: int, idx: torch.Tensor) -> KV:
        """(k, v) of layer ``layer`` at the slots ``idx`` [B, W], each [B, Hkv, W, D]."""
        k, v = self.read(layer, idx.flatten())
        return tuple(t.view(*idx.shape, *t.shape[1:]).transpose(1, 2) for t in (k, v))

    def scatter(self, block_ids: list[int], positions: torch.Tensor, kv: list[KV]) -> None:
        """``kv`` per layer: (k, v) each [Hkv, len(positions), D]."""
        if not positions.numel():
            return
        idx = self.slots(block_ids, positions.to(self.device))
        for i, (k, v) in enumerate(kv):
            self.write(i, idx, k.transpose(0, 1), v.transpose(0, 1))

    # -------------------------------------------------- one forward

    def begin(self, tables: list[list[int]], feeds: list[Feed], row0: tuple[int, ...], hook_rows: list[int],
              width: int) -> PortableStep:
        """Sequence b (pages ``tables[b]``, input rows from ``row0[b]``) reads ``feeds[b].reads``,
        gathered into ``past_key_values`` right-padded to ``width`` keys (``hook_rows``: unused here,
        the hook reads ``past_key_values`` too)."""
        past = self.gather_padded(tables, [f.reads for f in feeds], width) if width else None
        return PortableStep(self, tables, feeds, row0, past)


@dataclass
class PortableStep:
    """One forward over ``PagedKV``: the cached KV gathered for SDPA; ``store`` writes back the KV of
    the fed positions each feed names (``Feed.writes``) from the forward's own KV."""

    kv: PagedKV
    tables: list[list[int]]
    feeds: list[Feed]
    row0: tuple[int, ...]
    past_key_values: list[KV] | None
    paged: None = None

    @property
    def use_cache(self) -> bool:
        return any(len(f.writes) for f in self.feeds)

    def store(self, presents: list[KV] | None) -> None:
        for b, (table, f) in enumerate(zip(self.tables, self.feeds)):
            if len(f.writes):
                rows = f.writes - f.first + self.row0[b]  # rows of this forward
                self.kv.scatter(table, f.writes, [(k[b, :, rows], v[b, :, rows]) for k, v in presents])
