"""One denoising step for a batch of sequences (cache modes ``none``, ``prefix``, ``dual``).

The runner calls ``denoise_step`` once per engine step with every sequence the scheduler scheduled.
Sequences are right-padded into one batch (``key_padding_mask`` keeps padding out of attention and
RoPE positions), the model runs once per group, each sequence's canvas rows are gathered into a
``DenoiseState`` and the policy of each group of sequences sharing a policy decides, in one batched
call, what to commit. Reference loop: ``vllm_dapd/decoding/generate.py`` (itself ML-GSAI/LLaDA
``generate.py``): the whole canvas is the state, only the active block is committable.

Cache modes:
- ``none``: input = prompt + whole canvas, no KV read or written. Exact.
- ``prefix`` (Fast-dLLM prefix cache, incremental): input = everything from the first position
  without final KV (prompt at the first step, then the block committed last step) to the end of
  the canvas; earlier positions come from the request's pages as ``past_key_values``. After the
  forward, the KV of the fed *final* positions (prompt, committed blocks) is written to the pages,
  so each position's KV is computed once, when its token is final. Canvas positions before the
  forward's first row (committed, cached) get no logits: they are never committable.
- ``dual`` (Fast-dLLM dual cache): a block's first step is a ``prefix`` step that also caches the
  KV of the canvas after the block; its other steps feed only the block (Dream: plus the token
  before it) over cached prefix + suffix keys. Keys carry RoPE already, so the suffix can sit in
  ``past_key_values`` next to the prefix; the fed tokens get explicit positions. If the suffix's
  pages are not allocated yet (a request's very first step), the next step caches it instead.

Fed tokens are left-padded so every canvas ends at the last row: the model hook takes one
attention span for the whole batch, so attention-reading policies (DAPD, DAWN) share one forward
among all sequences whose visible canvas has the same length (in mode ``none``: the same
``gen_length``); the rest share another.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable

import torch

from vllm_dapd.decoding.policy import DenoiseState, stack_params
from vllm_dapd.decoding.registry import get_policy

from .kv import PagedKV
from .scoring import record_commits
from .sequence import Sequence

logger = logging.getLogger("vllm.dapd.trace")  # under "vllm": vLLM's handlers and level apply


def _suffix_cached(s: Sequence) -> bool:
    """Cache mode ``dual``: the KV of the canvas after the active block is in the pages."""
    return s.settings.cache_mode == "dual" and s.suffix_block == s.block


def _fed_span(s: Sequence, shift: int) -> tuple[int, int]:
    """[first, end) absolute positions this step feeds to the model."""
    P, (start, end) = len(s.prompt), s.block_span()
    if s.settings.cache_mode == "none":
        return 0, P + s.gen_length
    # Dream scores position j with row j - 1: the row before the active block must be fed too.
    first = min(s.cached_len, P + start - shift)
    return first, (P + end if _suffix_cached(s) else P + s.gen_length)


def _past_positions(s: Sequence, span: tuple[int, int]) -> torch.Tensor:
    """Absolute positions read from the pages: the cached prefix, plus (dual) the cached suffix."""
    prefix = torch.arange(span[0])
    if _suffix_cached(s):
        return torch.cat((prefix, torch.arange(span[1], len(s.prompt) + s.gen_length)))
    return prefix


class _Forward:
    """One padded batched forward; maps canvas positions to logits rows."""

    def __init__(self, model: Callable[..., Any], seqs: list[Sequence], device: torch.device,
                 kv: PagedKV | None, attention_layers: Any = None):
        shift = model.logits_shift
        self.seqs = seqs
        self.spans = [_fed_span(s, shift) for s in seqs]
        self.start = [a for a, _ in self.spans]
        full = [torch.cat((torch.tensor(s.prompt, dtype=torch.long), s.canvas)) for s in seqs]
        fed = [f[a:e] for f, (a, e) in zip(full, self.spans)]
        reads = [_past_positions(s, span) for s, span in zip(seqs, self.spans)]
        B, T, P = len(seqs), max(len(f) for f in fed), max(len(r) for r in reads)
        ids = torch.full((B, T), seqs[0].mask_id, dtype=torch.long)
        positions = torch.zeros((B, T), dtype=torch.long)
        keep = torch.zeros((B, P + T), dtype=torch.bool)
        # Fed tokens are left-padded, so every canvas ends at row T: sequences whose visible canvas
        # has the same length share one attention span (one forward for a whole DAPD group).
        self.row0 = [T - len(f) for f in fed]  # row of each sequence's first fed token
        for b, f in enumerate(fed):
            ids[b, self.row0[b]:] = f
            positions[b, self.row0[b]:] = torch.arange(self.start[b], self.start[b] + len(f))
            keep[b, : len(reads[b])] = True
            keep[b, P + self.row0[b]:] = True
        past = None
        if P:
            if kv is None:
                raise RuntimeError("cache modes 'prefix'/'dual' need the runner's paged KV")
            past = self._padded_past([kv.gather_at(s.block_ids, r) if len(r) else None
                                      for s, r in zip(seqs, reads)], P)
        # Canvas position c of sequence b is scored by row row0 + prompt + c - start - shift of
        # this forward; rows exist for c in [visible, visible_end).
        self.visible = [max(0, a + shift - len(s.prompt)) for s, (a, _) in zip(seqs, self.spans)]
        self.visible_end = [min(s.gen_length, e + shift - len(s.prompt)) for s, (_, e) in zip(seqs, self.spans)]
        canvas0 = [r + len(s.prompt) - a - shift for r, s, a in zip(self.row0, seqs, self.start)]
        first = min(c0 + v for c0, v in zip(canvas0, self.visible))
        self.offsets = [c0 - first for c0 in canvas0]
        span = None
        if attention_layers is not None:  # the group shares the length of its visible canvas
            self.span_start = [max(0, a - len(s.prompt)) for s, (a, _) in zip(seqs, self.spans)]
            self.span_end = [e - len(s.prompt) for s, (_, e) in zip(seqs, self.spans)]
            size = self.span_end[0] - self.span_start[0]
            span = (T - size, T)
        out = model(ids.to(device), attention_span=span, attention_layers=attention_layers,
                    positions=positions.to(device), key_padding_mask=None if bool(keep.all()) else keep.to(device),
                    past_key_values=past, use_cache=any(s.settings.cache_mode != "none" for s in seqs),
                    logits_start=first)
        self.logits, self.attention, self.presents = out.logits, out.attention, out.past_key_values

    @staticmethod
    def _padded_past(per_seq: list[Any], P: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Right-pad each sequence's gathered prefix to P keys: per layer ([B, Hkv, P, D], same)."""
        ref = next(p for p in per_seq if p is not None)
        layers = []
        for i, (k0, _) in enumerate(ref):
            k = k0.new_zeros((len(per_seq), k0.shape[0], P, k0.shape[2]))
            v = torch.zeros_like(k)
            for b, p in enumerate(per_seq):
                if p is not None:
                    n = p[i][0].shape[1]
                    k[b, :, :n], v[b, :, :n] = p[i]
            layers.append((k, v))
        return layers

    def state(self, idx: list[int]) -> DenoiseState:
        """The reference loop's view of sequences ``idx``: logits [B, L, V]; tokens/masked/decoded [B, L]."""
        seqs = [self.seqs[b] for b in idx]
        B, L = len(seqs), max(s.gen_length for s in seqs)
        device = self.logits.device
        logits = torch.zeros((B, L, self.logits.shape[-1]), dtype=self.logits.dtype, device=device)
        tokens = torch.full((B, L), seqs[0].mask_id, dtype=torch.long)
        valid = torch.zeros((B, L), dtype=torch.bool)
        active = torch.zeros((B, L), dtype=torch.bool)
        attention = None
        if self.attention is not None:
            attention = torch.zeros((B, L, L), dtype=self.attention.dtype, device=device)
        for row, (b, s) in enumerate(zip(idx, seqs)):
            v, ve, n, off = self.visible[b], self.visible_end[b], s.gen_length, self.offsets[b]
            logits[row, v:ve] = self.logits[b, off + v: off + ve]
            tokens[row, :n] = s.canvas
            valid[row, :n] = True
            active[row, slice(*s.block_span())] = True
            if attention is not None:
                a0, e0 = self.span_start[b], self.span_end[b]
                attention[row, a0:e0, a0:e0] = self.attention[b]
        is_mask = tokens == seqs[0].mask_id
        return DenoiseState(
            logits=logits,
            tokens=tokens.to(device),
            masked=(is_mask & active).to(device),
            decoded=(valid & ~is_mask).to(device),
            step=torch.tensor([s.step for s in seqs], dtype=torch.long, device=device),
            steps=torch.tensor([s.settings.steps_per_block for s in seqs], dtype=torch.long, device=device),
            temperature=torch.tensor([s.temperature for s in seqs], dtype=torch.float32, device=device),
            seed=torch.tensor([s.seed for s in seqs], dtype=torch.long, device=device),
            nfe=torch.tensor([s.nfe for s in seqs], dtype=torch.long, device=device),
            attention=attention,
            block_size=torch.tensor([e - a for a, e in (s.block_span() for s in seqs)], dtype=torch.long, device=device),
            memory=_stack_memory(seqs, L, device),
        )

    def store_kv(self, kv: PagedKV | None) -> None:
        """Write fed KV that later steps read: final prefix positions (``prefix``, ``dual``) and, at a
        ``dual`` block start, the canvas after the active block (if its pages are allocated yet)."""
        for b, s in enumerate(self.seqs):
            if s.settings.cache_mode == "none":
                continue
            P, (start, end) = len(s.prompt), s.block_span()
            first, stop = self.spans[b]
            writes = [torch.arange(s.cached_len, P + start)]  # prompt + committed blocks
            suffix = s.settings.cache_mode == "dual" and not _suffix_cached(s)
            total = P + s.gen_length
            if suffix and len(s.block_ids) * kv.block_size >= total and stop == total:
                writes.append(torch.arange(P + end, total))
            else:
                suffix = False
            positions = torch.cat(writes)
            if positions.numel():
                rows = positions - first + self.row0[b]  # rows of this forward
                kv.scatter(s.block_ids, positions, [(k[b, :, rows], v[b, :, rows]) for k, v in self.presents])
            s.cached_len = max(s.cached_len, P + start)
            if suffix:
                s.suffix_block = s.block


def _stack_memory(seqs: list[Sequence], L: int, device: torch.device) -> dict[str, torch.Tensor] | None:
    """DenoiseState.memory for ``seqs``: each one's rows padded to ``L``, zeros where it has none."""
    ref = next((s.memory for s in seqs if s.memory is not None), None)
    if ref is None:
        return None
    out = {}
    for name, v in ref.items():
        t = v.new_zeros((len(seqs), L, *v.shape[1:]))
        for b, s in enumerate(seqs):
            if s.memory is not None:
                t[b, : s.gen_length] = s.memory[name]
        out[name] = t.to(device)
    out["present"] = torch.tensor([s.memory is not None for s in seqs], dtype=torch.bool, device=device)
    return out


def _apply(seqs: list[Sequence], state: DenoiseState) -> None:
    policy = get_policy(seqs[0].settings.policy)
    result = policy.step(state, stack_params([s.params for s in seqs], state.logits.device))
    commit = (result.commit & state.masked).cpu()
    tokens = result.tokens.cpu()
    if result.memory is not None:
        for b, s in enumerate(seqs):  # own copies: a request must not pin the whole batch's tensor
            s.memory = {k: v[b, : s.gen_length].clone() for k, v in result.memory.items()}
    for b, s in enumerate(seqs):
        chosen = commit[b, : s.gen_length]
        s.canvas[chosen] = tokens[b, : s.gen_length][chosen]
        if s.num_logprobs is not None:
            record_commits(s, state.logits[b, : s.gen_length], chosen, tokens[b, : s.gen_length])
        if s.settings.trace:  # unmasked positions only: committing the mask id itself leaves one masked
            positions = torch.nonzero(chosen & (s.canvas != s.mask_id)).flatten().tolist()
            s.trace.append((s.nfe, positions))
            logger.info("dapd trace %s nfe=%d block=%d step=%d committed=%s", s.req_id, s.nfe, s.block,
                        s.step, positions)


def _advance(s: Sequence) -> list[int]:
    """Count the step; return the active block's tokens if it just finished (then move to the next).

    A block finishes when it has no mask left or its step budget is spent, as in the reference
    loop: a model may propose the mask id itself, and committing it leaves the position masked.
    """
    s.step += 1
    s.nfe += 1
    start, end = s.block_span()
    block = s.canvas[start:end]
    if s.step < s.settings.steps_per_block and bool((block == s.mask_id).any()):
        return []
    s.block, s.step = s.block + 1, 0
    return block.tolist()


@torch.inference_mode()
def denoise_step(model: Callable[..., Any], seqs: list[Sequence], device: torch.device,
                 kv: PagedKV | None = None) -> list[list[int]]:
    """One step for every sequence; per sequence, the tokens of the block it finished ([] if none).

    One forward for all sequences whose policy reads no attention; the others are grouped by the
    length of their visible canvas, since the model hook takes one span for the whole batch.
    """
    if not seqs:
        return []
    shift = model.logits_shift
    groups: dict[Any, list[Sequence]] = defaultdict(list)
    for s in seqs:
        policy = get_policy(s.settings.policy)
        key = None
        if policy.needs_attention:
            first, end = _fed_span(s, shift)
            visible = end - len(s.prompt) - max(0, first - len(s.prompt))
            key = (visible, policy.attention_layers(s.params))
        groups[key].append(s)
    for key, group in groups.items():
        fwd = _Forward(model, group, device, kv, attention_layers=key[1] if key is not None else None)
        by_policy: dict[str, list[int]] = defaultdict(list)
        for b, s in enumerate(group):
            by_policy[s.settings.policy].append(b)
        for idx in by_policy.values():
            _apply([group[b] for b in idx], fwd.state(idx))
        fwd.store_kv(kv)
    return [_advance(s) for s in seqs]
