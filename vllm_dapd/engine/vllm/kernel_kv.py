"""KV pages attended in place by vLLM's CPU paged-attention kernel (``--attention-backend CPU_ATTN``,
the default on CPU when the kernel takes the model's head size; ``TORCH_SDPA`` asks for the portable path).

The portable path (``kv.PagedKV``) gathers every request's cached prefix into a padded dense tensor
per layer and runs PyTorch SDPA over it. This path keeps the pages in the layout of vLLM's CPU
attention backend (``vllm/v1/attention/backends/cpu_attn.py``): one ``[blocks, Hkv, block_size,
2 * D]`` tensor per layer, keys in the first half of each (block, head) row and values in the
second, each in the order ``cpu_attn_reshape_and_cache`` writes them (on x86 without AMX, keys are
stored transposed per page, [D, block_size]). Each layer of a step then:

1. writes the fed rows' keys/values at their slots (``cpu_attn_reshape_and_cache``);
2. runs ``cpu_attention_with_kv_cache`` with ``causal=False`` over the packed queries (the real rows
   of every sequence, one after the other, ``query_start_loc``) and each sequence's block table,
   keys ``[0, prompt + canvas)``: its cached prefix (and dual suffix) plus what step 1 wrote;
3. puts back the pages of fed positions that were already cached (Dream feeds the row before the
   active block, whose final KV must survive), so the pages hold exactly what the portable path
   writes, and later steps read the same KV on either path.

So nothing is gathered and no padded batch is attended. The kernel's KV split is off, so each query
row reduces over its keys in one order whatever else is in the batch: a request's attention does not
depend on its batch (bitwise, tested), unlike the padded portable path. The kernel returns no
log-sum-exp, so the attention hook (DAPD/DAWN policies) still gathers its rows' cached keys, in the
layers it reads.

The kernel needs every position of a sequence to have a page. At a request's first step vLLM has
allocated only its prompt's, but that step reads nothing cached: it stores what has a page and
attends its own fed rows with SDPA (one call per such sequence, no padding). A sequence that reads
cached KV without all its pages (not expected from vLLM's scheduler) sends the whole step down the
portable path over these pages (``read``/``write`` below).

``read`` does not depend on the kernel's internal order: ``_probe`` writes the row index and the
dimension index through the kernel's own writer once and records where each element lands.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..core.kv import KV, PagedKV, PortableStep
from ..core.layout import Feed

ATTENTION_BACKEND = "CPU_ATTN"  # vLLM's name for it (AttentionBackendEnum)
logger = logging.getLogger("vllm.dapd.attention")  # under "vllm": vLLM's handlers and level apply


PORTABLE_BACKEND = "TORCH_SDPA"  # the name that asks for the portable path (gather + PyTorch SDPA)


def choose_attention(vllm_config: Any) -> bool:
    """Resolve ``--attention-backend`` for a diffusion model once, at config time, and write the
    choice back into ``vllm_config.attention_config.backend`` (what the runner reads, ``uses_kernel``).

    Unset: the kernel path where it runs (CPU platform, a head size the kernel takes), else the
    portable path. ``CPU_ATTN``: the kernel path, or a ValueError saying why not. ``TORCH_SDPA``: the
    portable path. Any other backend: a ValueError naming the flag. Returns whether it is the kernel."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    backend = vllm_config.attention_config.backend
    name = None if backend is None else backend.name
    if name not in (None, ATTENTION_BACKEND, PORTABLE_BACKEND):
        raise ValueError(f"--attention-backend {name}: diffusion models (vllm-dapd) take {ATTENTION_BACKEND} "
                         f"(vLLM's CPU paged kernel) or {PORTABLE_BACKEND} (gather + PyTorch SDPA, any device); "
                         "unset picks the kernel where it runs")
    why_not = None if current_platform.is_cpu() else "vLLM's CPU attention kernel needs the CPU platform"
    why_not = why_not or unsupported(vllm_config.model_config.get_head_size(), vllm_config.cache_config.block_size)
    if name == ATTENTION_BACKEND and why_not:
        raise ValueError(f"--attention-backend {ATTENTION_BACKEND}: {why_not}")
    if name is None:
        name = PORTABLE_BACKEND if why_not else ATTENTION_BACKEND
        vllm_config.attention_config.backend = AttentionBackendEnum[name]
        logger.info("vllm-dapd: attention on the %s path (--attention-backend %s)%s",
                    "kernel" if name == ATTENTION_BACKEND else "portable", name, f": {why_not}" if why_not else "")
    return name == ATTENTION_BACKEND


def uses_kernel(vllm_config: Any) -> bool:
    """Whether the runner keeps its pages for the kernel (after ``choose_attention``)."""
    backend = vllm_config.attention_config.backend
    return backend is not None and backend.name == ATTENTION_BACKEND


def unsupported(head_dim: int, block_size: int | None) -> str | None:
    """Why vLLM's CPU kernel cannot take this shape (None: it can). An unset block size is the CPU
    platform's default (128)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    heads = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in heads:
        return f"head size {head_dim} is not supported by vLLM's CPU attention kernel (supported: {heads})"
    if block_size is not None and block_size % 16:
        return f"block size {block_size} must be a multiple of 16"
    return None


def isa_for(dtype: torch.dtype, block_size: int, head_dim: int) -> str:
    """The kernel variant vLLM's CPU backend picks for this shape (vec, vec16, amx, neon, ...)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_dim, "auto")


def check_supported(head_dim: int, block_size: int) -> None:
    """Raise a ValueError naming what vLLM's CPU kernel does not take."""
    why_not = unsupported(head_dim, block_size)
    if why_not:
        raise ValueError(f"--attention-backend {ATTENTION_BACKEND}: {why_not}; use {PORTABLE_BACKEND}")


class KernelKV(PagedKV):
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        from vllm import _custom_ops

        check_supported(head_dim, block_size)
        self.ops = _custom_ops
        self.block_size, self.num_blocks, self.num_kv_heads, self.head_dim = block_size, num_blocks, num_kv_heads, head_dim
        self.isa = isa_for(dtype, block_size, head_dim)
        # Zeros, as in PagedKV: padding keys of a gather read some slot.
        self.layers = [torch.zeros((num_blocks, num_kv_heads, block_size, 2 * head_dim), dtype=dtype, device=device)
                       for _ in range(num_layers)]
        self.key_at, self.value_at = self._probe(dtype, device)
        self._heads = torch.arange(num_kv_heads, device=device)

    def caches(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's (key_cache, value_cache) views of layer ``layer``, as vLLM's backend makes them."""
        cache = self.layers[layer]
        nb, hkv, bs, _ = cache.shape
        k, v = cache.view(nb, hkv, 2 * bs, self.head_dim).chunk(2, dim=2)
        return k, v

    def _probe(self, dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the kernel's writer puts row t, dimension d of a page: ([bs, D], [bs, D]) offsets into
        a (block, head)'s ``2 * bs * D`` elements, keys then values. Raises if it is not a permutation
        of one head's elements (a quantised or head-interleaved layout, which ``read`` cannot invert)."""
        bs, hkv, D = self.block_size, self.num_kv_heads, self.head_dim
        page = torch.zeros((1, hkv, bs, 2 * D), dtype=dtype, device=device)
        kc, vc = page.view(1, hkv, 2 * bs, D).chunk(2, dim=2)
        slots = torch.arange(bs, device=device)
        rows = torch.arange(bs, device=device)[:, None, None].expand(bs, hkv, D)
        dims = torch.arange(D, device=device)[None, None, :].expand(bs, hkv, D)
        codes = {"row_lo": rows % 128, "row_hi": rows // 128, "dim_lo": dims % 128, "dim_hi": dims // 128,
                 "head": torch.arange(hkv, device=device)[None, :, None].expand(bs, hkv, D)}
        seen = {}
        for name, code in codes.items():  # integers below 129 (+ 1; 0 = not written): exact in bf16
            page.zero_()
            value = (code + 1).to(dtype).contiguous()
            self.ops.cpu_attn_reshape_and_cache(value, value, kc, vc, slots, self.isa)
            seen[name] = page.view(hkv, 2 * bs * D).long() - 1
        if not bool((seen["head"] == torch.arange(hkv, device=device)[:, None]).all()):
            raise RuntimeError(f"vLLM's CPU KV layout ({self.isa}) is not head-major; vllm-dapd cannot read it")
        row = (seen["row_hi"] * 128 + seen["row_lo"])[0]  # [2 * bs * D]: the row stored at each element
        dim = (seen["dim_hi"] * 128 + seen["dim_lo"])[0]
        out = []
        for half in (slice(0, bs * D), slice(bs * D, 2 * bs * D)):
            where = torch.full((bs, D), -1, dtype=torch.long, device=device)
            where[row[half], dim[half]] = torch.arange(half.start, half.stop, device=device)
            if bool((where < 0).any()):  # bs * D writes filled all bs * D cells: a permutation
                raise RuntimeError(f"vLLM's CPU KV layout ({self.isa}) is not a permutation of a page; "
                                   "vllm-dapd cannot read it")
            out.append(where)
        return out[0], out[1]

    def read(self, layer: int, slots: torch.Tensor) -> KV:
        flat = self.layers[layer].view(self.layers[layer].shape[0], self.num_kv_heads, -1)
        block, offset = slots // self.block_size, slots % self.block_size
        heads = self._heads[None, :, None]
        k = flat[block[:, None, None], heads, self.key_at[offset][:, None, :]]  # [n, Hkv, D]
        v = flat[block[:, None, None], heads, self.value_at[offset][:, None, :]]
        return k, v

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kc, vc = self.caches(layer)
        dtype = self.layers[layer].dtype
        self.ops.cpu_attn_reshape_and_cache(k.to(dtype).contiguous(), v.to(dtype).contiguous(), kc, vc,
                                            slots, self.isa)

    def begin(self, tables: list[list[int]], feeds: list[Feed], row0: tuple[int, ...], hook_rows: list[int],
              width: int) -> KernelStep | PortableStep:
        """The kernel path, unless a sequence reads cached KV without pages for all its positions (not
        expected from vLLM): then the whole step takes the portable path over these pages."""
        if not all(len(t) * self.block_size >= f.total or not len(f.reads) for t, f in zip(tables, feeds)):
            return super().begin(tables, feeds, row0, hook_rows, width)
        return self.step(tables, [f.fed() for f in feeds], [f.total for f in feeds], [f.protect for f in feeds],
                         hook_rows, [feeds[b].reads for b in hook_rows], width)

    def step(self, tables: list[list[int]], fed: list[torch.Tensor], seq_lens: list[int],
             protect: list[torch.Tensor], hook_rows: list[int], hook_reads: list[torch.Tensor],
             past_len: int) -> KernelStep:
        """The attention of one forward over these pages (see ``KernelStep``): sequence b feeds the
        absolute positions ``fed[b]`` (its packed query rows, in order) and attends keys
        ``[0, seq_lens[b])``; ``protect[b]``: fed positions whose cached KV must survive the step;
        ``hook_rows``: the sequences the attention hook reads, ``hook_reads``: the cached positions
        each of them reads (padded to ``past_len`` keys). A sequence whose pages do not cover
        ``seq_lens[b]`` yet (its first step) must read nothing cached: it attends its own fed rows."""
        device = self.device
        paged = [len(t) * self.block_size >= n for t, n in zip(tables, seq_lens)]
        ends = torch.tensor([len(f) for f in fed]).cumsum(0).tolist()
        spans = [(e - len(f), e) for e, f in zip(ends, fed)]  # packed rows of each sequence
        rows, slots, own = [], [], []
        for (a, b), f, t, n, ok in zip(spans, fed, tables, seq_lens, paged):
            has = torch.ones(len(f), dtype=torch.bool)
            if not ok:  # its first step: store what has a page (the prompt), attend its own rows
                if len(f) != n:
                    raise ValueError(f"a sequence without all its pages must feed all its {n} positions, "
                                     f"not {len(f)}")
                has = f < len(t) * self.block_size
                own.append((a, b))
            rows.append(torch.arange(a, b)[has])
            slots.append(self.slots(t, f[has].to(device)))
        rows = torch.cat(rows)
        tables_k = [t for t, ok in zip(tables, paged) if ok]
        kept = [self.slots(t, p.to(device)) for t, p in zip(tables, protect) if len(p)]
        kernel = None
        if tables_k:
            lengths = torch.tensor([len(f) for f, ok in zip(fed, paged) if ok], dtype=torch.int32)
            width = max(len(t) for t in tables_k)
            kernel = KernelBatch(
                rows=None if not own else torch.cat([torch.arange(a, b) for (a, b), ok in zip(spans, paged) if ok]
                                                    ).to(device),
                query_start_loc=torch.cat((torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int())).to(device),
                seq_lens=torch.tensor([n for n, ok in zip(seq_lens, paged) if ok], dtype=torch.int32, device=device),
                block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables_k], dtype=torch.int32,
                                         device=device))
        return KernelStep(
            kv=self, kernel=kernel, own=own, rows=None if len(rows) == ends[-1] else rows.to(device),
            slots=torch.cat(slots),
            protect=torch.cat(kept) if kept else None,
            hook=self.padded_slots([tables[b] for b in hook_rows], hook_reads, past_len) if hook_rows else None,
            past_len=past_len)


@dataclass(frozen=True)
class KernelBatch:
    """The sequences the kernel attends: their packed query rows (``rows``; None: all rows, in
    order), one ``query_start_loc`` entry per sequence, keys ``[0, seq_lens)`` of its block table."""

    rows: torch.Tensor | None
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor


class KernelStep:
    """One forward's attention over ``KernelKV`` pages: what the model calls per layer
    (``models.attention.PagedAttention``). Every fed row's KV goes to the pages as the model runs,
    so ``store`` has nothing left to do."""

    past_key_values = None
    use_cache = False

    def __init__(self, kv: KernelKV, kernel: KernelBatch | None, own: list[tuple[int, int]],
                 rows: torch.Tensor | None, slots: torch.Tensor, protect: torch.Tensor | None,
                 hook: torch.Tensor | None, past_len: int):
        self.kv, self.kernel, self.own = kv, kernel, own
        self.rows, self.slots, self.protect, self.hook = rows, slots, protect, hook
        self.past_len = past_len
        self._metadata: torch.Tensor | None = None  # the kernel's work split, the same for every layer

    @property
    def paged(self) -> KernelStep:
        return self

    def store(self, presents: list[KV] | None) -> None:
        pass

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, H, D], k/v [N, Hkv, D] of the packed fed rows (RoPE applied) -> [N, H, D]."""
        kv = self.kv
        saved = None if self.protect is None else kv.read(layer, self.protect)
        if self.rows is None:
            kv.write(layer, self.slots, k, v)
        else:
            kv.write(layer, self.slots, k.index_select(0, self.rows), v.index_select(0, self.rows))
        batch = self.kernel
        if batch is not None and batch.rows is None:  # every sequence on the kernel
            out = self._kernel(layer, q, batch).to(q.dtype)
        else:
            out = torch.empty_like(q)
            if batch is not None:
                out.index_copy_(0, batch.rows, self._kernel(layer, q.index_select(0, batch.rows), batch).to(q.dtype))
        for a, b in self.own:  # a first step: its own rows are all its keys (no padding, no pages)
            out[a:b] = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                enable_gqa=q.shape[1] != k.shape[1])[0].transpose(0, 1)
        if saved is not None:
            kv.write(layer, self.protect, *saved)
        return out

    def _kernel(self, layer: int, q: torch.Tensor, batch: KernelBatch) -> torch.Tensor:
        kv, ops = self.kv, self.kv.ops
        kc, vc = kv.caches(layer)
        q = q.to(kc.dtype).contiguous()
        if self._metadata is None:
            # No KV split: each query row then reduces over its keys in one fixed order, whatever
            # else is in the batch (a request's tokens do not depend on its batch).
            self._metadata = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=len(batch.seq_lens), num_heads=q.shape[1], num_kv_heads=kv.num_kv_heads,
                head_dim=kv.head_dim, seq_lens=batch.seq_lens, dtype=kc.dtype,
                query_start_loc=batch.query_start_loc, causal=False, sliding_window_size=-1, isa=kv.isa,
                enable_kv_split=False)
        out = torch.empty_like(q)
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=kc, value_cache=vc, output=out, query_start_loc=batch.query_start_loc,
            seq_lens=batch.seq_lens, scale=kv.head_dim ** -0.5, causal=False, alibi_slopes=None, sliding_window=-1,
            block_table=batch.block_table, softcap=0.0, scheduler_metadata=self._metadata, s_aux=None)
        return out

    def past_keys(self, layer: int) -> torch.Tensor:
        """[B', Hkv, past_len, D]: the cached keys each attention-hook row reads (padded)."""
        if self.hook is None:
            raise RuntimeError("past_keys: this step has no attention-hook rows")
        k, _ = self.kv.read_padded(layer, self.hook)
        return k
