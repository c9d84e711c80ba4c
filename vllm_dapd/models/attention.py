"""Bidirectional attention, rotary embeddings and the attention hook the DAPD/DAWN policies read.

Every layer runs ``F.scaled_dot_product_attention`` (non-causal; a key padding mask only when a
batch is padded, so the unpadded case keeps the fastest kernel; a [B, T, K] block-causal mask when
the caller asks for block diffusion, ``block_causal_mask``). The hook adds work only to the
layers asked for: it recomputes q.k for the rows of the canvas span, takes each row's log-sum-exp
over *all* keys (prompt and prefix-cache keys included) and exponentiates just the span x span
block, so the probabilities are the ones the layer really used, without building every layer's
attention map. Reference for what the policy wants: DAWN ``llada/model/modeling_llada.py``
``attn_avg`` (softmax over all keys, mean over heads), restricted here to the span.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F


def rope_inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """``1 / theta^(2i/d)`` in fp32, as ``modeling_llada.py`` RotaryEmbedding and HF default RoPE."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, T, D] in fp32 for NeoX-style (rotate-half) RoPE; positions [B, T]."""
    freqs = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fp32: bool) -> torch.Tensor:
    """Rotate x [B, H, T, D].

    ``fp32=True``: LLaDA's ``rope_full_precision`` (rotate in fp32, cast back). ``fp32=False``:
    Dream/HF Llama (cos/sin cast to the activation dtype, rotate in that dtype). Identical in fp32;
    they differ in bf16, so each model keeps its reference's rounding.
    Partial rotary (LLaDA2's ``partial_rotary_factor``): when cos/sin are narrower than D, only the
    first ``cos.shape[-1]`` dims of each head rotate; the rest pass through.
    """
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, sin, fp32), x[..., rot:]), dim=-1)
    if fp32:
        xf = x.float()
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Attention without a causal mask. q [B, H, T, D]; k, v [B, Hkv, K, D]; key_mask [B, K] bool
    (True = real key) or [B, T, K] bool (per query row: the block-causal mask, ``block_causal_mask``).

    Returns [B, H, T, D].
    """
    mask = None if key_mask is None else _mask4(key_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _mask4(key_mask: torch.Tensor) -> torch.Tensor:
    """[B, K] or [B, T, K] bool -> broadcastable over heads (and query rows): [B, 1, 1 | T, K]."""
    return key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]


def block_causal_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, T, K] bool: query at position p sees key at position p' iff ``p' // block_size <= p // block_size``.

    Block diffusion (LLaDA2): causal across blocks of ``block_size`` positions counted from position 0,
    bidirectional inside a block (LLaDA2's ``generate`` builds the same mask from a block-level tril).
    query_pos [B, T], key_pos [B, K] long.
    """
    return (key_pos[:, None, :] // block_size) <= (query_pos[:, :, None] // block_size)


class PagedAttention(Protocol):
    """Attention over KV pages for a packed batch (the engine's kernel path, ``engine/vllm/kernel_kv.py``):
    the model hands each layer's fed rows over, the pages supply every other key."""

    past_len: int  # cached keys per attention-hook row (``past_keys``), the hook's column offset

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, H, D], k/v [N, Hkv, D] (RoPE applied) of the packed rows -> [N, H, D]; stores k/v."""
        ...

    def past_keys(self, layer: int) -> torch.Tensor:
        """[B', Hkv, past_len, D]: the cached keys of the attention-hook rows, padded."""
        ...


def span_attention(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None,
                   span: tuple[int, int], past_len: int) -> torch.Tensor:
    """Softmax attention among the query/key rows [start, end) of this forward, SUMMED over heads.

    q [B, H, T, D] (after RoPE); k [B, Hkv, P + T, D] (prefix keys first, then this forward's keys);
    key_mask [B, P + T] or [B, T, P + T] bool (as ``attend``);
    the span indexes this forward's rows, so its keys sit at columns P + start .. P + end.
    Returns [B, S, S] fp32, the sum over this rank's heads (the caller divides by the total head
    count after summing across tensor-parallel ranks); per head, row i is the probability mass
    query i puts on each span key (a row sums to <= 1).
    Loops over kv-head groups so the transient score block is [B, H/Hkv, S, P + T], not [B, H, ...].
    """
    start, end = span
    n_heads, n_kv = q.shape[1], k.shape[1]
    group = n_heads // n_kv
    scale = 1.0 / math.sqrt(q.shape[-1])
    qs = q[:, :, start:end].float()  # [B, H, S, D]
    total = None
    for g in range(n_kv):
        kg = k[:, g : g + 1].float()  # [B, 1, K, D]
        scores = qs[:, g * group : (g + 1) * group] @ kg.transpose(-1, -2) * scale  # [B, G, S, K]
        if key_mask is not None:  # [B, K], or [B, T, K] (block-causal): the span's query rows
            mask = key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None, start:end]
            scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [B, G, S, 1]
        probs = (scores[..., past_len + start : past_len + end] - lse).exp().sum(1)  # [B, S, S]
        total = probs if total is None else total + probs
    return total
