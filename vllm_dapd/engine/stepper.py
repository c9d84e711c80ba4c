"""One denoising step for a batch of sequences (cache modes ``none``, ``prefix``, ``dual``).

The runner calls ``denoise_step`` once per engine step with every sequence the scheduler scheduled.
Sequences are left-padded into one batch (``key_padding_mask`` keeps padding out of attention and
RoPE positions; the projections and MLP skip it, ``real_rows``), the model runs once, computing
logits only for the rows the policies read (the active block's still-masked positions, plus the
decoded ones for DAWN's anchors, or the whole visible canvas for a policy that reads every position,
e.g. KLASS), and the sequences sharing a policy
get one ``DenoiseState`` and one batched call deciding what to commit. Reference loop:
``vllm_dapd/decoding/generate.py`` (itself ML-GSAI/LLaDA ``generate.py``): the whole canvas is the
state, only the active block is committable.

Cache modes:
- ``none``: input = prompt + whole canvas (+ suffix), no KV read or written. Exact.
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

Setting ``cache_refresh`` (modes ``prefix``/``dual``) picks when cached KV is computed:
- ``final`` (default, above): each position's KV is computed once, when its token is final.
- ``block``: Fast-dLLM's exact semantics (``generate_with_prefix_cache`` /
  ``generate_with_dual_cache`` in https://github.com/NVlabs/Fast-dLLM llada/generate.py): at each
  block start the request's cache is dropped (``cached_len = 0``, ``suffix_block = -1``), so the
  block's first step feeds prompt + whole canvas and writes the KV of everything before the block
  (``dual``: and after it); the block's other steps read it. Costs one full forward per block.
  Dream scores position j with row j - 1 here as everywhere, so those steps also feed the token
  before the block (Fast-dLLM's Dream code scores the block's first position with its own row).

Block-causal models (LLaDA2, ``Sequence.causal``; blocks counted from position 0, the first one
holding the prompt's tail): a position never sees a later block, so the KV of the prompt's whole
blocks and of every finished block is exact, not an approximation. Each step feeds from the first
position without final KV (mode ``none``: from 0) to the end of the *active block*, never past it:
usually the active block alone over the cached prefix; at a block's first step also the block
finished last step (its final KV is written then), and at a request's first step the prompt. The
model then gets ``block_size`` (its block-causal mask) whenever the fed span crosses a block
boundary. Policies are scored on the active block only (``BatchLayout.score_from``), their
attention span is the active block's canvas positions, and ``DenoiseState.block_size`` is the whole
block (its prompt positions count as committed). Reference: ``decoding/block_diffusion.py``.

Fed tokens are left-padded so every canvas ends at the last row: one attention span (the longest
fed canvas) serves every sequence whose policy reads attention (DAPD, DAWN), each keeping the
corner of its own size, and each averages its own layers. So every step is one forward for all
scheduled sequences, whatever their policies, canvas lengths and cache modes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable

import torch

from vllm_dapd.decoding.generate import model_depth
from vllm_dapd.decoding.policy import DenoiseState, stack_params
from vllm_dapd.decoding.registry import get_policy

from .kv import PagedKV
from .layout import BatchLayout
from .scoring import record_commits
from .sequence import Sequence

logger = logging.getLogger("vllm.dapd.trace")  # under "vllm": vLLM's handlers and level apply


def _suffix_cached(s: Sequence) -> bool:
    """Cache mode ``dual``: the KV of the canvas after the active block is in the pages."""
    return s.settings.cache_mode == "dual" and s.suffix_block == s.block


def _fed_span(s: Sequence, shift: int) -> tuple[int, int]:
    """[first, end) absolute positions this step feeds to the model."""
    P, (start, end) = len(s.prompt), s.block_span()
    if s.causal:  # never past the active block: no later position is attended
        return (0 if s.settings.cache_mode == "none" else min(s.cached_len, s.grid_start())), P + end
    if s.settings.cache_mode == "none":
        return 0, s.end
    # Dream scores position j with row j - 1: the row before the active block must be fed too.
    first = min(s.cached_len, P + start - shift)
    return first, (P + end if _suffix_cached(s) else s.end)


def _past_positions(s: Sequence, span: tuple[int, int]) -> torch.Tensor:
    """Absolute positions read from the pages: the cached prefix, plus (dual) the cached suffix."""
    prefix = torch.arange(span[0])
    if _suffix_cached(s):
        return torch.cat((prefix, torch.arange(span[1], s.end)))
    return prefix


class _Forward:
    """One padded batched forward; maps canvas positions to logits rows."""

    def __init__(self, model: Callable[..., Any], seqs: list[Sequence], device: torch.device,
                 kv: PagedKV | None):
        shift = model.logits_shift
        self.seqs = seqs
        self.spans = [_fed_span(s, shift) for s in seqs]
        self.start = [a for a, _ in self.spans]
        for s, (a, e) in zip(seqs, self.spans):
            s.fed_rows = e - a
        full = [torch.cat((torch.tensor(s.prompt, dtype=torch.long), s.canvas,
                           torch.tensor(s.suffix, dtype=torch.long))) for s in seqs]
        fed = [f[a:e] for f, (a, e) in zip(full, self.spans)]
        reads = [_past_positions(s, span) for s, span in zip(seqs, self.spans)]
        self.layout = layout = BatchLayout.of(self.spans, [len(s.prompt) for s in seqs],
                                              [s.gen_length for s in seqs], shift,
                                              [s.block_span()[0] if s.causal else 0 for s in seqs])
        # Block-causal: the mask is needed when a fed span crosses a block boundary (one model: one size).
        block_size = None
        if any(s.causal and a < s.grid_start() for s, (a, _) in zip(seqs, self.spans)):
            block_size = seqs[0].block_length
        B, T, P = len(seqs), layout.rows, max(len(r) for r in reads)
        ids = torch.full((B, T), seqs[0].mask_id, dtype=torch.long)
        positions = torch.zeros((B, T), dtype=torch.long)
        keep = torch.zeros((B, P + T), dtype=torch.bool)
        # Fed tokens are left-padded, so every canvas ends at row T (one attention span for all).
        self.row0 = layout.row0  # row of each sequence's first fed token
        for b, f in enumerate(fed):
            ids[b, self.row0[b]:] = f
            positions[b, self.row0[b]:] = torch.arange(self.start[b], self.start[b] + len(f))
            keep[b, : len(reads[b])] = True
            keep[b, P + self.row0[b]:] = True
        padded = any(self.row0) or any(len(r) < P for r in reads)  # some key of ``keep`` is False
        if P and kv is None:
            raise RuntimeError("cache modes 'prefix'/'dual' need the runner's paged KV")
        # The kernel path (engine/kernel_kv.py) attends the pages in place. A request's first step
        # has pages for its prompt only but reads nothing cached: it attends its own rows there. A
        # sequence lacking pages that reads cached KV (not expected from vLLM) sends the whole step
        # down the portable path.
        self.kernel = kv is not None and kv.kernel and block_size is None and all(
            len(s.block_ids) * kv.block_size >= s.end or not len(r)
            for s, r in zip(seqs, reads))
        past = None
        if P and not self.kernel:
            past = kv.gather_padded([s.block_ids for s in seqs], reads, P)
        # Logits only for the rows the policies read (``_wanted``). Logits row i of sequence b scores
        # canvas position self.scored[b, i] (vllm_dapd/engine/layout.py).
        policies = [get_policy(s.settings.policy) for s in seqs]
        self.wanted = [_wanted(s, policies[b], layout.visible[b], layout.visible_end[b]) for b, s in enumerate(seqs)]
        self.scored = layout.scored_positions(self.wanted)  # [B, R] canvas positions
        self.visible, self.visible_end = layout.visible, layout.visible_end
        # The attention hook, for the sequences whose policy reads attention (DAPD, DAWN): every fed
        # canvas ends at row T, so one span (the longest fed canvas) covers them all and each
        # sequence keeps the bottom-right corner of its size (``state``).
        self.span_start, self.span_end, self.tail = layout.span_start, layout.span_end, layout.tail
        self.attention_row: dict[int, int] = {}  # sequence -> row of the hook's output
        span = rows = layers = None
        readers = [b for b, p in enumerate(policies) if p.needs_attention]
        if readers:
            self.attention_row = {b: r for r, b in enumerate(readers)}
            # A suffix's rows follow its canvas: the span reaches over them (``state`` cuts them off).
            self.span_size = max(layout.span_end[b] - layout.span_start[b] + layout.tail[b] for b in readers)
            span = (T - self.span_size, T)
            depth = model_depth(model)
            layers = [policies[b].attention_layers(seqs[b].params, depth) for b in readers]
            if len(readers) < B:
                rows = torch.tensor(readers, dtype=torch.long, device=device)
        paged = None
        if self.kernel:
            paged = kv.step([s.block_ids for s in seqs], [torch.arange(a, e) for a, e in self.spans],
                            [e if s.causal else s.end for s, (_, e) in zip(seqs, self.spans)],
                            [torch.arange(a, min(s.cached_len, e)) for s, (a, e) in zip(seqs, self.spans)],
                            readers, [reads[b] for b in readers], P)
        out = model(ids.to(device), attention_span=span, attention_layers=layers, attention_rows=rows,
                    positions=positions.to(device), key_padding_mask=keep.to(device) if padded else None,
                    past_key_values=past, use_cache=any(s.settings.cache_mode != "none" for s in seqs),
                    logits_rows=layout.input_rows(self.scored).to(device), paged=paged,
                    real_rows=layout.real_rows().to(device) if any(layout.row0) or self.kernel else None,
                    **({} if block_size is None else {"block_size": block_size}))
        self.logits, self.attention, self.presents = out.logits, out.attention, out.past_key_values

    def state(self, idx: list[int]) -> DenoiseState:
        """The reference loop's view of sequences ``idx`` (one policy): tokens/masked/decoded [B, L];
        logits [B, L, V], or [B, W, V] with ``rows`` for a policy that accepts a row subset."""
        seqs = [self.seqs[b] for b in idx]
        B, L = len(seqs), max(s.gen_length for s in seqs)
        device = self.logits.device
        attention = None
        if idx[0] in self.attention_row:  # the policy of these sequences reads attention
            hook_rows = [self.attention_row[b] for b in idx]
            if self.span_size == L and all((self.span_start[b], self.span_end[b]) == (0, L) for b in idx) \
                    and not any(self.tail[b] for b in idx) \
                    and hook_rows == list(range(hook_rows[0], hook_rows[0] + B)):
                attention = self.attention[hook_rows[0]: hook_rows[0] + B]  # whole canvases: a view
            else:
                attention = torch.zeros((B, L, L), dtype=self.attention.dtype, device=device)
                for row, b in enumerate(idx):
                    a0, e0 = self.span_start[b], self.span_end[b]
                    c0 = self.span_size - self.tail[b] - (e0 - a0)  # the canvas's rows in the span
                    c1 = c0 + e0 - a0
                    attention[row, a0:e0, a0:e0] = self.attention[self.attention_row[b], c0:c1, c0:c1]
        pos = torch.arange(L)
        span = torch.tensor([s.block_span() for s in seqs], dtype=torch.long)  # [B, 2]
        lengths = torch.tensor([s.gen_length for s in seqs], dtype=torch.long)
        tokens = torch.nn.utils.rnn.pad_sequence([s.canvas for s in seqs], batch_first=True,
                                                 padding_value=seqs[0].mask_id)
        valid = pos < lengths[:, None]
        active = (pos >= span[:, :1]) & (pos < span[:, 1:])
        is_mask = tokens == seqs[0].mask_id
        # Per-sequence numbers, one host-to-device copy: step, steps, seed, nfe, block size.
        numbers = torch.tensor([[s.step, s.settings.steps_per_block, s.seed, s.nfe,
                                 s.block_length if s.causal else e - a]
                                for s, (a, e) in zip(seqs, span.tolist())], dtype=torch.long)
        step, steps, seed, nfe, block_size = numbers.T.contiguous().to(device)
        subset = get_policy(seqs[0].settings.policy).accepts_row_subset
        width = max(len(self.wanted[b]) for b in idx)
        return DenoiseState(
            logits=self._logits(idx, L, width, subset),
            rows=self.scored[idx, :width].to(device) if subset else None,
            tokens=tokens.to(device),
            masked=(is_mask & active).to(device),
            decoded=(valid & ~is_mask).to(device),
            step=step,
            steps=steps,
            temperature=torch.tensor([s.temperature for s in seqs], dtype=torch.float32, device=device),
            seed=seed,
            nfe=nfe,
            attention=attention,
            block_size=block_size,
            canvas_length=lengths.to(device),
            memory=_stack_memory(seqs, L, device),
        )

    def _rows(self, idx: list[int], width: int) -> torch.Tensor:
        """[len(idx), width, V]: the first ``width`` logits rows of sequences ``idx`` (a view when
        ``idx`` is one contiguous run of the batch, else one gather)."""
        rows = self.logits.narrow(1, 0, width)
        if idx == list(range(idx[0], idx[0] + len(idx))):
            return rows[idx[0]: idx[0] + len(idx)]
        return rows.index_select(0, torch.tensor(idx, device=rows.device))

    def _logits(self, idx: list[int], L: int, width: int, subset: bool) -> torch.Tensor:
        """The policy's logits: its own rows (``subset``: [B, width, V], with ``DenoiseState.rows``),
        else [B, L, V] with row j scoring canvas position j, zeros where this forward has no row
        (cached positions, padding of a shorter canvas); a view of the forward's logits when every
        sequence's rows are exactly its whole canvas of length L (mode ``none``, one length)."""
        if subset or all(len(self.wanted[b]) == L and self.visible[b] == 0 for b in idx):
            return self._rows(idx, width)
        logits = self.logits.new_empty((len(idx), L, self.logits.shape[-1]))
        for row, b in enumerate(idx):  # each row written once: copied where scored, zeros elsewhere
            lo, hi = self.visible[b], self.visible_end[b]
            logits[row, :lo] = 0
            logits[row, lo:hi] = self.logits[b, : hi - lo]
            logits[row, hi:] = 0
        return logits

    def store_kv(self, kv: PagedKV | None) -> None:
        """Write fed KV that later steps read: final prefix positions (``prefix``, ``dual``) and, at a
        ``dual`` block start, the canvas after the active block (if its pages are allocated yet)."""
        for b, s in enumerate(self.seqs):
            if s.settings.cache_mode == "none":
                continue
            P, (start, end) = len(s.prompt), s.block_span()
            first, stop = self.spans[b]
            final = s.grid_start() if s.causal else P + start  # prompt (whole blocks) + committed blocks
            writes = [torch.arange(s.cached_len, final)]
            suffix = s.settings.cache_mode == "dual" and not _suffix_cached(s)
            total = s.end
            if suffix and len(s.block_ids) * kv.block_size >= total and stop == total:
                writes.append(torch.arange(P + end, total))
            else:
                suffix = False
            positions = torch.cat(writes)
            if positions.numel() and not self.kernel:  # the kernel path wrote every fed row already
                rows = positions - first + self.row0[b]  # rows of this forward
                kv.scatter(s.block_ids, positions, [(k[b, :, rows], v[b, :, rows]) for k, v in self.presents])
            s.cached_len = max(s.cached_len, final)
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


def _wanted(s: Sequence, policy: Any, lo: int, hi: int) -> torch.Tensor:
    """Canvas positions whose logits the policy reads, ascending, within the scored ``[lo, hi)``: the
    active block's masked ones (``accepts_row_subset``), plus the decoded ones (``reads_decoded_rows``),
    else all of them."""
    if not policy.accepts_row_subset:
        return torch.arange(lo, hi)
    rows = _committable(s)
    if policy.reads_decoded_rows:
        decoded = torch.nonzero(s.canvas[lo:hi] != s.mask_id).flatten() + lo
        rows = torch.unique(torch.cat((rows, decoded)))  # sorted
    return rows


def _committable(s: Sequence) -> torch.Tensor:
    """Canvas positions of the active block still masked (the only ones a policy may commit)."""
    start, end = s.block_span()
    masked = torch.nonzero(s.canvas[start:end] == s.mask_id).flatten() + start
    return masked if len(masked) else torch.tensor([start])


def _apply(seqs: list[Sequence], state: DenoiseState, rows: list[torch.Tensor | None]) -> None:
    """Run the policy; commit its tokens to each canvas. ``rows[b]``: the canvas positions the
    sequence's logits rows score, on the host (None: row j scores position j)."""
    policy = get_policy(seqs[0].settings.policy)
    result = policy.step(state, stack_params([s.params for s in seqs], state.logits.device))
    # One device-to-host copy per step: the committed token where committed, -1 elsewhere.
    picked = torch.where(result.commit & state.masked, result.tokens, -1).cpu()
    if result.memory is not None:
        for b, s in enumerate(seqs):  # own copies: a request must not pin the whole batch's tensor
            s.memory = {k: v[b, : s.gen_length].clone() for k, v in result.memory.items()}
    for b, s in enumerate(seqs):
        tokens = picked[b, : s.gen_length]
        chosen = tokens >= 0
        s.canvas[chosen] = tokens[chosen]
        if s.num_logprobs is not None:
            record_commits(s, state.logits[b], chosen, tokens, rows[b])
        if s.settings.trace or s.stream_canvas:  # unmasked positions only: committing the mask id leaves one masked
            positions = torch.nonzero(chosen & (s.canvas != s.mask_id)).flatten().tolist()
            s.trace.append((s.nfe, positions))
            if s.settings.trace:
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

    One forward for all sequences, whatever their policies, canvas lengths and cache modes; then one
    batched policy call per policy.
    """
    if not seqs:
        return []
    for s in seqs:
        if s.step == 0 and s.settings.cache_refresh == "block":
            s.cached_len, s.suffix_block = 0, -1  # Fast-dLLM: recompute the cache at the block start
    fwd = _Forward(model, seqs, device, kv)
    by_policy: dict[str, list[int]] = defaultdict(list)
    for b, s in enumerate(seqs):
        by_policy[s.settings.policy].append(b)
    for idx in by_policy.values():
        state = fwd.state(idx)
        _apply([seqs[b] for b in idx], state, [fwd.wanted[b] if state.rows is not None else None for b in idx])
    fwd.store_kv(kv)
    return [_advance(s) for s in seqs]
