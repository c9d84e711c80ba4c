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
  before the block (Fast-dLLM's Dream code scores the block's first position with its own row, a row
  it never reads: that loop commits the position at the block's first forward, unconditionally).

Block-causal models (LLaDA2, ``Sequence.causal``; blocks counted from position 0, the first one
holding the prompt's tail): a position never sees a later block, so the KV of the prompt's whole
blocks and of every finished block is exact, not an approximation. Each step feeds from the first
position without final KV (mode ``none``: from 0) to the end of the *active block*, never past it
(``layout.Feed``): usually the active block alone over the cached prefix; at a block's first step
also the block finished last step (its final KV is written then), and at a request's first step
the prompt. The model then gets ``block_size`` (its block-causal mask) whenever the fed span
crosses a block boundary. Policies are scored on the active block only (``BatchLayout.score_from``),
their attention span is the active block's canvas positions, and ``DenoiseState.block_size`` is
the whole block (its prompt positions count as committed). Reference: ``decoding/block_diffusion.py``.

Fed tokens are left-padded so every canvas ends at the last row: one attention span (the longest
fed canvas) serves every sequence whose policy reads attention (DAPD, DAWN), each keeping the
corner of its own size, and each averages its own layers. So every step is one forward for all
scheduled sequences, whatever their policies, canvas lengths and cache modes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from vllm_dapd.decoding.generate import model_depth
from vllm_dapd.decoding.policy import DenoiseState, stack_params
from vllm_dapd.models.batch import AttentionHook, StepBatch

from .kv import PagedKV
from .layout import BatchLayout, Feed
from .scoring import record_commits
from .sequence import Sequence

logger = logging.getLogger("vllm.dapd.trace")  # under "vllm": vLLM's handlers and level apply


@torch.inference_mode()
def denoise_step(model: Any, seqs: list[Sequence], device: torch.device,
                 kv: PagedKV | None = None) -> list[list[int]]:
    """One step for every sequence; per sequence, the tokens it releases ([] if none): those of the
    blocks it finished and, up to ``early_limit``, the committed prefix of its active block
    (``Sequence.release_end``; with the default ``early_limit`` 0, whole finished blocks only).

    One forward for all sequences, whatever their policies, canvas lengths and cache modes; then one
    batched policy call per policy; then the KV the next steps read goes to the pages.
    """
    if not seqs:
        return []
    for s in seqs:
        if s.step == 0 and s.settings.cache_refresh == "block":
            s.cached_len, s.suffix_block = 0, -1  # Fast-dLLM: recompute the cache at the block start
    step = prepare(model, seqs, device, kv)
    out = model.run(step.batch)
    for idx in step.groups():
        state = denoise_state(step, out, idx)
        _apply([seqs[b] for b in idx], state, [step.wanted[b] if state.rows is not None else None for b in idx])
    if step.pages is not None:
        step.pages.store(out.past_key_values)
    for s, f in zip(seqs, step.feeds):
        f.stored(s)
    for s in seqs:
        _advance(s)
    return [_release(s) for s in seqs]


@dataclass(frozen=True)
class Step:
    """One prepared step: the model's batch and where each sequence sits in it."""

    seqs: list[Sequence]
    feeds: list[Feed]  # per sequence: fed, read and written positions
    layout: BatchLayout
    wanted: list[torch.Tensor]  # per sequence: the canvas positions its logits rows score (ascending)
    scored: torch.Tensor  # [B, R]: ``wanted`` padded (``BatchLayout.scored_positions``)
    hook_rows: dict[int, int]  # sequence -> row of the attention hook's output (policies reading it)
    hook_size: int  # rows of the hook's span: the last ``hook_size`` rows of the forward
    batch: StepBatch
    pages: Any  # this forward's view of the KV pages (``PagedKV.begin``), None without pages

    def groups(self) -> list[list[int]]:
        """The sequences sharing a policy (one batched policy call each), in batch order."""
        groups: dict[str, list[int]] = {}
        for b, s in enumerate(self.seqs):
            groups.setdefault(s.settings.policy, []).append(b)
        return list(groups.values())


def prepare(model: Any, seqs: list[Sequence], device: torch.device, kv: PagedKV | None) -> Step:
    """The padded batch of one step. Fed tokens are left-padded, so every canvas ends at row T: one
    attention-hook span (the longest fed canvas, plus a suffix's rows) serves every sequence whose
    policy reads attention, each keeping the bottom-right corner of its own size."""
    shift = model.logits_shift
    feeds = [Feed.of(s, shift, 0 if kv is None else len(s.block_ids) * kv.block_size) for s in seqs]
    layout = BatchLayout.of([(f.first, f.end) for f in feeds], [len(s.prompt) for s in seqs],
                            [s.gen_length for s in seqs], shift, [s.block_span()[0] if s.causal else 0 for s in seqs])
    for s, f in zip(seqs, feeds):
        s.fed_rows = f.end - f.first
    # Block-causal: the mask is needed when a fed span crosses a block boundary (one model: one size);
    # the kernel takes no mask, so such a step runs the portable path over the same pages.
    block_size = seqs[0].block_length if any(s.causal and f.first < s.grid_start() for s, f in zip(seqs, feeds)) \
        else None
    B, T, P = len(seqs), layout.rows, max(len(f.reads) for f in feeds)
    if kv is None and (P or any(len(f.writes) for f in feeds)):
        raise RuntimeError("cache modes 'prefix'/'dual' need the runner's paged KV")
    ids = torch.full((B, T), seqs[0].mask_id, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    keep = torch.zeros((B, P + T), dtype=torch.bool)  # keys: cached (right-padded to P), then fed rows
    for b, (s, f) in enumerate(zip(seqs, feeds)):
        r0 = layout.row0[b]
        ids[b, r0:] = s.tokens()[f.first: f.end]
        positions[b, r0:] = f.fed()
        keep[b, : len(f.reads)] = True
        keep[b, P + r0:] = True
    padded = any(layout.row0) or any(len(f.reads) < P for f in feeds)  # some key of ``keep`` is False
    wanted = [_wanted(s, layout.visible[b], layout.visible_end[b]) for b, s in enumerate(seqs)]
    scored = layout.scored_positions(wanted)
    readers = [b for b, s in enumerate(seqs) if s.policy.needs_attention]
    hook, size = None, 0
    if readers:  # a suffix's rows follow its canvas: the span reaches over them (``_attention`` cuts them);
        # DAWN's tau_sink (``key_attention``, cache mode none): over every fed row, the prompt's too
        size = max(T - layout.row0[b] if _keyed(seqs[b])
                   else layout.span_end[b] - layout.span_start[b] + layout.tail[b] for b in readers)
        depth = model_depth(model)
        hook = AttentionHook((T - size, T), [seqs[b].policy.attention_layers(seqs[b].params, depth) for b in readers],
                             torch.tensor(readers, dtype=torch.long, device=device) if len(readers) < B else None)
    begin = None if kv is None else PagedKV.begin.__get__(kv) if block_size else kv.begin
    pages = None if kv is None else begin([s.block_ids for s in seqs], feeds, layout.row0, readers, P)
    paged = None if pages is None else pages.paged
    batch = StepBatch(
        ids.to(device), positions.to(device), keep.to(device) if padded else None,
        past_key_values=None if pages is None else pages.past_key_values, paged=paged,
        use_cache=pages is not None and pages.use_cache, logits_rows=layout.input_rows(scored).to(device),
        real_rows=layout.real_rows().to(device) if any(layout.row0) or paged is not None else None, hook=hook,
        block_size=block_size)
    return Step(seqs, feeds, layout, wanted, scored, {b: r for r, b in enumerate(readers)}, size, batch, pages)


def denoise_state(step: Step, out: Any, idx: list[int]) -> DenoiseState:
    """The reference loop's view of sequences ``idx`` (one policy) after the forward ``out``:
    tokens/masked/decoded [B, L]; logits [B, L, V], or [B, W, V] with ``rows`` for a policy that
    accepts a row subset."""
    seqs = [step.seqs[b] for b in idx]
    L = max(s.gen_length for s in seqs)
    device = out.logits.device
    pos = torch.arange(L)
    span = torch.tensor([s.block_span() for s in seqs], dtype=torch.long)  # [B, 2]
    lengths = torch.tensor([s.gen_length for s in seqs], dtype=torch.long)
    tokens = torch.nn.utils.rnn.pad_sequence([s.canvas for s in seqs], batch_first=True,
                                             padding_value=seqs[0].mask_id)
    valid = pos < lengths[:, None]
    active = (pos >= span[:, :1]) & (pos < span[:, 1:])
    is_mask = tokens == seqs[0].mask_id
    # Per-sequence numbers, one host-to-device copy: step, steps, seed, nfe, block size.
    numbers = torch.tensor([[s.step, s.settings.steps_per_block, s.seed, s.nfe, s.block_length if s.causal else e - a]
                            for s, (a, e) in zip(seqs, span.tolist())], dtype=torch.long)
    steps_done, steps, seed, nfe, block_size = numbers.T.contiguous().to(device)
    subset = seqs[0].policy.accepts_row_subset
    width = max(len(step.wanted[b]) for b in idx)
    return DenoiseState(
        logits=_logits(step, out.logits, idx, L, width, subset),
        rows=step.scored[idx, :width].to(device) if subset else None,
        tokens=tokens.to(device),
        masked=(is_mask & active).to(device),
        decoded=(valid & ~is_mask).to(device),
        step=steps_done,
        steps=steps,
        temperature=torch.tensor([s.temperature for s in seqs], dtype=torch.float32, device=device),
        seed=seed,
        nfe=nfe,
        attention=_attention(step, out.attention, idx, L),
        key_attention=_key_attention(step, out.attention, idx, L),
        block_size=block_size,
        canvas_length=lengths.to(device),
        memory=_stack_memory(seqs, L, device),
    )


def _attention(step: Step, attention: torch.Tensor | None, idx: list[int], L: int) -> torch.Tensor | None:
    """[B, L, L] canvas attention of sequences ``idx`` (None unless their policy reads it): each one's
    corner of the hook's span, zeros elsewhere; a view of the hook's output for whole canvases."""
    if idx[0] not in step.hook_rows:
        return None
    lay, rows = step.layout, [step.hook_rows[b] for b in idx]
    if step.hook_size == L and all((lay.span_start[b], lay.span_end[b]) == (0, L) and not lay.tail[b] for b in idx) \
            and rows == list(range(rows[0], rows[0] + len(idx))):
        return attention[rows[0]: rows[0] + len(idx)]
    out = torch.zeros((len(idx), L, L), dtype=attention.dtype, device=attention.device)
    for i, b in enumerate(idx):
        a0, e0 = lay.span_start[b], lay.span_end[b]
        c0 = step.hook_size - lay.tail[b] - (e0 - a0)  # the canvas's rows in the span
        out[i, a0:e0, a0:e0] = attention[step.hook_rows[b], c0: c0 + e0 - a0, c0: c0 + e0 - a0]
    return out


def _keyed(s: Sequence) -> bool:
    """Whether the request reads ``DenoiseState.key_attention`` (DAWN's ``tau_sink``)."""
    return s.policy.needs_attention and s.policy.key_attention_setting(s.params) is not None


def _key_attention(step: Step, attention: torch.Tensor | None, idx: list[int], L: int) -> torch.Tensor | None:
    """[B, L]: per canvas key of sequences ``idx``, the mean of its column over every row the sequence
    fed (cache mode ``none``: every query, prompt and suffix included; the hook's span covers them,
    ``prepare``); zeros for a sequence that does not read it; None when none does."""
    keyed = [i for i, b in enumerate(idx) if _keyed(step.seqs[b])]
    if not keyed or idx[0] not in step.hook_rows:
        return None
    lay = step.layout
    out = torch.zeros((len(idx), L), dtype=attention.dtype, device=attention.device)
    for i in keyed:
        b = idx[i]
        a0, e0 = lay.span_start[b], lay.span_end[b]
        fed = lay.rows - lay.row0[b]  # its rows, the last ones of the span
        c0 = step.hook_size - lay.tail[b] - (e0 - a0)  # its canvas's columns in the span
        out[i, a0:e0] = attention[step.hook_rows[b], step.hook_size - fed:, c0: c0 + e0 - a0].mean(dim=0)
    return out


def _logits(step: Step, logits: torch.Tensor, idx: list[int], L: int, width: int, subset: bool) -> torch.Tensor:
    """The policy's logits: its own rows (``subset``: [B, width, V], with ``DenoiseState.rows``),
    else [B, L, V] with row j scoring canvas position j, zeros where this forward has no row
    (cached positions, padding of a shorter canvas); a view of the forward's logits when every
    sequence's rows are exactly its whole canvas of length L (mode ``none``, one length)."""
    lay = step.layout
    if subset or all(len(step.wanted[b]) == L and lay.visible[b] == 0 for b in idx):
        rows = logits.narrow(1, 0, width)
        if idx == list(range(idx[0], idx[0] + len(idx))):  # one contiguous run of the batch: a view
            return rows[idx[0]: idx[0] + len(idx)]
        return rows.index_select(0, torch.tensor(idx, device=rows.device))
    out = logits.new_empty((len(idx), L, logits.shape[-1]))
    for i, b in enumerate(idx):  # each row written once: copied where scored, zeros elsewhere
        lo, hi = lay.visible[b], lay.visible_end[b]
        out[i, :lo] = 0
        out[i, lo:hi] = logits[b, : hi - lo]
        out[i, hi:] = 0
    return out


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


def _wanted(s: Sequence, lo: int, hi: int) -> torch.Tensor:
    """Canvas positions whose logits the policy reads, ascending, within the scored ``[lo, hi)``: the
    active block's masked ones (``accepts_row_subset``), plus the decoded ones (``reads_decoded_rows``),
    else all of them."""
    if not s.policy.accepts_row_subset:
        return torch.arange(lo, hi)
    rows = _committable(s)
    if s.policy.reads_decoded_rows:
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
    result = seqs[0].policy.step(state, stack_params([s.params for s in seqs], state.logits.device))
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


def _advance(s: Sequence) -> None:
    """Count the step; move to the next block if the active one just finished.

    A block finishes when it has no mask left or its step limit is spent (the step budget, unless the
    policy steps past it, ``Policy.step_limit``), as in the reference loop: a model may propose the
    mask id itself, and committing it leaves the position masked.
    """
    s.step += 1
    s.nfe += 1
    start, end = s.block_span()
    block = s.canvas[start:end]
    if s.step < s.step_limit and bool((block == s.mask_id).any()):
        return
    s.block, s.step = s.block + 1, 0


def _release(s: Sequence) -> list[int]:
    """The tokens ``s`` hands out after this step (``Sequence.release_end``); ``emitted`` follows."""
    end = s.release_end()
    tokens = s.canvas[s.emitted:end].tolist()
    s.emitted = end
    return tokens
