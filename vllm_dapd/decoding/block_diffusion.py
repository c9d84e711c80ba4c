"""The block-diffusion reference loop of LLaDA2 (plain PyTorch): the parity oracle for block-causal models.

Semantics of ``LLaDA2MoeModelLM.generate`` (inclusionAI's remote code) at temperature 0, kept
exactly:

* the sequence is the prompt followed by masks up to ``ceil((P + gen_length) / block_length)``
  whole blocks; blocks are counted from position 0, so the prompt's last partial block is decoded
  together with the first answer tokens, and the last block may run past ``P + gen_length`` (those
  positions are decoded too, then cut);
* attention is block-causal (``model.forward(block_size=...)``): a position sees its own block and
  the earlier ones, never a later block;
* ``steps = min(steps, gen_length // minimal_topk)`` forwards at most per block, with a transfer
  schedule of ``block_length // steps`` tokens per step (the remainder one more, first steps
  first). At each step every masked position of the active block gets its argmax token and that
  token's softmax probability; all positions above ``threshold`` are committed if there are at
  least as many as the schedule asks, else the schedule's count of the most confident ones. A
  block ends when it has no mask left;
* after a block, decoding stops when an ``eos_id`` appears in the answer so far; the answer is cut
  after its first ``eos_id`` (kept), else at ``gen_length``.

Batched over rows of equal prompt length (rows share the block grid); a row stops changing once it
has an ``eos_id``, and ``nfe[b]`` counts the forwards in which row ``b`` still had masks.

``kv_cache=True`` is the exact KV reuse block-causal attention allows: the prompt's whole blocks
and each finished block are run once with ``use_cache`` (their keys see only their own and earlier
blocks, which never change again) and every denoising step feeds only the active block. The
tokens are those of the full-recompute loop (``kv_cache=False``, the reference's own way), up to
floating-point reassociation; the cache costs one extra forward per finished block that has a
successor (not counted in ``nfe``).

Any policy (``policy=``, default ``llada2``: the rule above, ``plugins/llada2.py``): each step hands
the policy the whole answer canvas (the answer's whole blocks, prompt excluded) with only the
active block's positions scored and committable, as the vLLM engine does for block-causal models
(``engine/core/stepper.py``): logits for the block's rows alone (zeros elsewhere, or the rows a
row-subset policy reads), attention (DAPD, DAWN) among the block's canvas positions, read over
every key the block sees (prompt and earlier blocks), ``block_size`` the whole block (the prompt's
tail in the first block counts as committed), ``steps`` the per-block budget, per-row ``seed``
and forward count for sampling. The engine must equal this loop token for token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from typing import Any, Sequence

from .generate import model_depth
from .model_api import DiffusionLM
from .policy import DenoiseState, Policy, stack_params
from .registry import get_policy


@dataclass
class BlockDiffusionResult:
    answers: list[torch.Tensor]  # per row: the answer, cut after its first eos (what the reference returns)
    sequences: torch.Tensor  # [B, P + gen_length]: prompt + answer before the cut (masks where never decoded)
    nfe: torch.Tensor  # [B] long: denoising forwards while the row still had masks


def transfer_schedule(block_length: int, steps: int) -> list[int]:
    """Tokens to commit at each step of a block: ``block_length`` split over ``steps``, remainder first."""
    base, rem = divmod(block_length, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def _check(prompt_ids: torch.Tensor, gen_length: int, block_length: int, steps: int, threshold: float,
           minimal_topk: int) -> None:
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids: expected [B, P] with P >= 1, got shape {tuple(prompt_ids.shape)}")
    for name, v in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps),
                    ("minimal_topk", minimal_topk)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
    if gen_length // minimal_topk < 1:
        raise ValueError(f"minimal_topk: must be <= gen_length ({gen_length}), got {minimal_topk}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold: must be finite, got {threshold!r}")


@torch.no_grad()
def block_diffusion_generate(model: DiffusionLM, prompt_ids: torch.Tensor, gen_length: int,
                             block_length: int | None = None, steps: int = 32, threshold: float = 0.95,
                             minimal_topk: int = 1, eos_id: int | None = None,
                             kv_cache: bool = False, policy: str | Policy = "llada2", params: Any = None,
                             temperature: float = 0.0, seed: int | Sequence[int] = 0) -> BlockDiffusionResult:
    """Decode ``prompt_ids`` [B, P] (equal lengths) with LLaDA2's block-diffusion loop.

    ``block_length`` defaults to the model's declared block size (``model.attention_structure``);
    the defaults of ``steps`` / ``threshold`` are the reference ``generate``'s. ``policy`` (default
    ``llada2``, the reference's own rule, with ``threshold``) decides the commits of each step
    inside the active block; see "Any policy" in the module docstring."""
    structure = getattr(model, "attention_structure", None)
    if structure is None or structure.kind != "block_causal":
        raise ValueError("model: declares no block-causal attention_structure (a bidirectional model is "
                         "decoded with vllm_dapd.decoding.denoise)")
    if model.logits_shift != 0:
        raise ValueError("model: block diffusion needs position-aligned logits (logits_shift 0)")
    block_length = structure.block_size if block_length is None else block_length
    _check(prompt_ids, gen_length, block_length, steps, threshold, minimal_topk)
    pol = get_policy(policy) if isinstance(policy, str) else policy
    if params is None and pol.name == "llada2":
        params = {"threshold": threshold}
    rows = [pol.make_params(params) if params is None or isinstance(params, dict) else params] * prompt_ids.shape[0]
    B, P = prompt_ids.shape
    device = prompt_ids.device
    stacked = stack_params(rows, device)
    steps = min(steps, gen_length // minimal_topk)
    n_blocks = (P + gen_length + block_length - 1) // block_length
    L = n_blocks * block_length - P  # the canvas: the answer's whole blocks
    mask_id = model.mask_token_id
    x = torch.full((B, n_blocks * block_length), mask_id, dtype=torch.long, device=device)
    x[:, :P] = prompt_ids
    done = torch.zeros(B, dtype=torch.bool, device=device)
    nfe = torch.zeros(B, dtype=torch.long, device=device)
    layers = pol.attention_layers(rows[0], model_depth(model)) if pol.needs_attention else None
    seeds = torch.as_tensor(seed, dtype=torch.long, device=device).expand(B).clone()
    temp = torch.full((B,), float(temperature), dtype=torch.float32, device=device)
    pos = torch.arange(L, device=device)
    memory: dict[str, torch.Tensor] | None = None
    first = P // block_length
    cache = None
    if kv_cache and first > 0:  # the prompt's whole blocks: run once, exact for every later block
        cache = model(x[:, : first * block_length], block_size=block_length, use_cache=True).past_key_values
    for block in range(first, n_blocks):
        start, end = block * block_length, (block + 1) * block_length
        lo, hi = max(start, P) - P, end - P  # the active block's canvas positions
        for i in range(steps):
            canvas = x[:, P:]
            is_mask = canvas == mask_id
            masked = is_mask & (pos >= lo) & (pos < hi) & ~done[:, None]
            if not masked.any():
                break
            row0 = start if kv_cache else 0  # the input row holding position 0 .. of the fed tokens
            span = (lo + P - row0, end - row0) if layers is not None else None  # the block's canvas rows
            kw = dict(block_size=block_length, attention_span=span, attention_layers=layers)
            if kv_cache:
                out = model(x[:, start:end], past_key_values=cache, **kw)
            else:
                out = model(x[:, :end], **kw)
            logits = out.logits[:, -(hi - lo):]  # [B, hi - lo, V]: canvas positions lo .. hi
            state = DenoiseState(
                logits=logits, tokens=canvas.clone(), masked=masked, decoded=~is_mask,
                step=torch.full((B,), i, dtype=torch.long, device=device),
                steps=torch.full((B,), steps, dtype=torch.long, device=device),
                temperature=temp, seed=seeds, nfe=nfe.clone(),
                block_size=torch.full((B,), block_length, dtype=torch.long, device=device),
                canvas_length=torch.full((B,), L, dtype=torch.long, device=device), memory=memory)
            _place(state, pol, lo, hi, out.attention)
            res = pol.step(state, stacked)
            active = masked.any(-1)
            if res.memory is not None:  # rows without masks keep their last memory
                memory = {**{k: v if memory is None else torch.where(active.view(-1, *[1] * (v.dim() - 1)), v,
                                                                     memory[k])
                             for k, v in res.memory.items()},
                          "present": torch.ones(B, dtype=torch.bool, device=device)}
            x[:, P:] = torch.where(res.commit & masked, res.tokens, canvas)
            nfe += active
        if eos_id is not None:
            done |= (x[:, P:end] == eos_id).any(-1)
            if done.all():
                break
        if kv_cache and block + 1 < n_blocks:  # the finished block's keys and values, once
            present = model(x[:, start:end], block_size=block_length, past_key_values=cache,
                            use_cache=True).past_key_values
            cache = present if cache is None else [(torch.cat((c[0], p[0]), 2), torch.cat((c[1], p[1]), 2))
                                                   for c, p in zip(cache, present)]
    sequences = x[:, : P + gen_length]
    answers = []
    for b in range(B):  # once per row, after decoding
        answer, cut = sequences[b, P:], gen_length
        if eos_id is not None:
            hits = (answer == eos_id).nonzero()
            cut = int(hits[0, 0]) + 1 if len(hits) else gen_length
        answers.append(answer[:cut].clone())
    return BlockDiffusionResult(answers=answers, sequences=sequences.clone(), nfe=nfe)


def _place(state: DenoiseState, pol: Policy, lo: int, hi: int, attention: torch.Tensor | None) -> None:
    """Give ``state`` the active block's logits [B, hi - lo, V] the way the engine does: the rows of the
    policy's positions (``accepts_row_subset``: the block's masked ones, plus its decoded ones for
    ``reads_decoded_rows``; padded by repeating the last) or [B, L, V] with zeros outside the block;
    the attention among the block's positions in a zero [B, L, L]."""
    B, L = state.tokens.shape
    block = state.logits
    if pol.accepts_row_subset:
        wanted = []
        for b in range(B):
            keep = state.masked[b].clone()
            if pol.reads_decoded_rows:
                keep[lo:hi] |= state.decoded[b, lo:hi]
            idx = keep.nonzero().flatten()
            wanted.append(idx if len(idx) else torch.tensor([lo], device=idx.device))
        width = max(len(w) for w in wanted)
        state.rows = torch.stack([torch.cat((w, w[-1:].expand(width - len(w)))) for w in wanted])
        state.logits = block.gather(1, (state.rows - lo)[..., None].expand(-1, -1, block.shape[-1]))
    else:
        state.logits = block.new_zeros((B, L, block.shape[-1]))
        state.logits[:, lo:hi] = block
    if attention is not None:
        state.attention = attention.new_zeros((B, L, L))
        state.attention[:, lo:hi, lo:hi] = attention
