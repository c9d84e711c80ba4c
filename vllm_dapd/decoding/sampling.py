"""Batch-independent randomness for the denoising loop: Gumbel-max token sampling and uniform noise.

Why a hash instead of ``torch.rand``: a global generator hands out numbers in call order, so a
sequence's noise would depend on which other sequences share its batch and in which row it sits.
Here every random number is a pure function of ``(stream, seed, counter, index...)`` computed with
integer tensor ops (a murmur3-style finaliser on 32-bit words), so

* a row's result is the same alone or in any batch (the engine's batching never changes outputs);
* the same seed reproduces the same output, on CPU and CUDA alike.

All 32-bit words live in int64 tensors. The mixer (a multiply-xorshift finaliser in the style of
murmur3's fmix32) uses two *31-bit* odd multipliers (a pair from C. Wellons' hash-prospector), so a
product of a 32-bit word and a multiplier stays below 2**63: int64 never overflows (signed overflow
is not something to rely on), and each multiply is one tensor op.

Sampling semantics follow ML-GSAI/LLaDA ``generate.py`` ``add_gumbel_noise``: the token is
``argmax(exp(logits) / (-log u) ** T)`` in float64. We evaluate the same argmax in log space,
``argmax(logits - T * log(-log u))``, which is equal (log is monotone) but cannot overflow
``exp``. At ``T == 0`` the token is the plain ``argmax`` of the logits (no noise is drawn).

Ties: ``torch.argmax`` returns the first maximal index, so among equal scores the lowest vocab id
wins, deterministically.
"""

from __future__ import annotations

from typing import Sequence

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # added before mixing an index so that index 0 does not map to hash 0
_C1 = 0x21F0AAAD  # odd, < 2**31: x * _C1 < 2**63 for any 32-bit x
_C2 = 0x735A2D97

# Independent noise streams (a salt mixed into every hash) so two uses never share numbers.
STREAM_GUMBEL = 1
STREAM_RANDOM_ORDER = 2
STREAM_ALG_TEMP = 3


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` and ``0 < c < 2**31``: the product fits int64."""
    assert 0 < c < 2**31
    return (x * c) & _M32


def _fmix(h: torch.Tensor) -> torch.Tensor:
    """Multiply-xorshift finaliser: a bijection on 32-bit words with good avalanche."""
    h = h ^ (h >> 16)
    h = _mul32(h, _C1)
    h = h ^ (h >> 15)
    h = _mul32(h, _C2)
    return h ^ (h >> 15)


def _key(x: torch.Tensor) -> torch.Tensor:
    return _fmix((x + _GOLDEN) & _M32)  # x < 2**32 + golden: no overflow either


def _combine(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Fold 32-bit word(s) ``x`` into running hash ``h`` (broadcasting)."""
    return _fmix(h ^ _key(x))


def _row_hash(seed: torch.Tensor, counter: torch.Tensor, stream: int) -> torch.Tensor:
    """[B] hash of (stream, seed, counter); both int64, any sign (split into two 32-bit words)."""
    seed = seed.long()
    counter = counter.long()
    h = _key(torch.full_like(seed, stream & _M32))
    for word in (seed & _M32, (seed >> 32) & _M32, counter & _M32, (counter >> 32) & _M32):
        h = _combine(h, word)
    return h


def hash_words(seed: torch.Tensor, counter: torch.Tensor, shape: Sequence[int], stream: int = 0) -> torch.Tensor:
    """[B, *shape] int64 in [0, 2**32): hash of (stream, seed[b], counter[b], index...).

    Each trailing dimension is folded in turn (index along dim 0, then dim 1, ...), so the cost is
    one finaliser per element of the largest dimension and the value at an index does not depend
    on the sizes of ``shape`` (a row's noise at canvas position j is the same for any canvas length).
    """
    h = _row_hash(seed, counter, stream)  # [B]
    for size in shape:
        idx = torch.arange(size, device=h.device, dtype=torch.long)
        h = _combine(h.unsqueeze(-1), idx)  # [..., size]
    return h


def uniform_noise(seed: torch.Tensor, counter: torch.Tensor, shape: Sequence[int], stream: int = 0) -> torch.Tensor:
    """[B, *shape] float64 uniform in the open interval (0, 1), a pure function of its arguments.

    ``seed``/``counter``: [B] int64 (per-sequence seed and e.g. its forward count). Policies that
    need random numbers (``random`` order, Dream's ``alg_temp``) use their own ``stream``.
    """
    return _to_unit(hash_words(seed, counter, shape, stream))


def _to_unit(h: torch.Tensor) -> torch.Tensor:
    """32-bit words -> float64 in (0, 1): the centre of each of the 2**32 equal cells."""
    return (h.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)


def gumbel_noise(
    seed: torch.Tensor, counter: torch.Tensor, shape: Sequence[int], stream: int = STREAM_GUMBEL
) -> torch.Tensor:
    """[B, *shape] float64 standard Gumbel noise ``-log(-log u)``."""
    return -torch.log(-torch.log(uniform_noise(seed, counter, shape, stream)))


def sample_tokens(
    logits: torch.Tensor,  # [B, L, V]
    temperature: torch.Tensor,  # [B] float; 0 = greedy
    seed: torch.Tensor,  # [B] long
    counter: torch.Tensor,  # [B] long; e.g. forwards already spent (changes the noise every step)
    chunk_elements: int = 1 << 22,
    positions: torch.Tensor | None = None,  # [B, L] long: canvas position of each row (default arange(L))
) -> torch.Tensor:
    """[B, L] long: Gumbel-max sample of ``softmax(logits / T)`` per position, argmax where T == 0.

    Rows with ``T == 0`` never draw noise; rows with ``T > 0`` get noise from their own
    ``(seed, counter)`` only, so batch composition never changes a row's tokens. The noise equals
    ``gumbel_noise(seed, counter, (L, V))`` (with ``positions``: its rows at those positions, so a
    row's token does not depend on which other rows are scored); it is made in slices of positions of about
    ``chunk_elements`` numbers so a 126k-word vocabulary does not need ``[B, L, V]`` int64 temporaries.
    """
    tokens = logits.argmax(dim=-1)  # [B, L]; lowest id wins ties
    hot = temperature > 0
    if not bool(hot.any()):
        return tokens
    rows = hot.nonzero().squeeze(1)
    b, L, V = rows.numel(), logits.shape[1], logits.shape[2]
    where = torch.arange(L, device=logits.device) if positions is None else positions.index_select(0, rows)
    h_pos = _combine(_row_hash(seed.index_select(0, rows), counter.index_select(0, rows), STREAM_GUMBEL).unsqueeze(1),
                     where)  # [b, L]
    vocab_key = _key(torch.arange(V, device=logits.device))  # [V]
    t = temperature.index_select(0, rows).to(torch.float64).view(-1, 1, 1)
    step = max(1, chunk_elements // max(b * V, 1))
    picked = torch.empty(b, L, dtype=torch.long, device=logits.device)
    hot_logits = logits if b == logits.shape[0] else logits.index_select(0, rows)
    for start in range(0, L, step):  # slices of positions bound memory; not a per-token loop
        end = min(start + step, L)
        h = _fmix(h_pos[:, start:end, None] ^ vocab_key)  # [b, c, V]
        g = -torch.log(-torch.log(_to_unit(h)))
        sub = hot_logits[:, start:end].to(torch.float64)
        picked[:, start:end] = (sub + t * g).argmax(dim=-1)
    tokens[rows] = picked
    return tokens
