"""The plain-PyTorch reference denoising loop ("exact" mode: a full forward over prompt + canvas per step).

This is the parity oracle of the project: with ``policy="low_confidence"`` and temperature 0 it
must equal ML-GSAI/LLaDA ``generate.py`` ``generate`` token for token; the vLLM engine must in turn
equal this loop. Semantics kept from that reference:

* the answer (``gen_length`` masks after the prompt) is split into blocks of ``block_length``,
  decoded left to right; ``steps`` is split evenly across blocks (``ValueError`` naming the
  parameter when a split is not exact);
* within a block a policy commits only masked positions of that block; later blocks stay masked
  and are never chosen;
* the model sees the whole sequence every step (no KV cache).

Differences, on purpose:

* a block ends as soon as it has no mask. LLaDA's loop always spends ``steps / num_blocks``
  forwards per block, committing nothing in the surplus ones (possible only when a block has fewer
  masks than steps); tokens are identical, our NFE is lower in that case;
* randomness comes from each row's ``seed`` and forward count (``sampling.py``), so a row decodes
  the same alone or in a batch. A scalar ``seed`` is shared by every row (identical prompts then
  give identical answers); pass one seed per row for distinct samples;
* ``nfe[b]`` counts the forwards in which row ``b`` still had masks in its block (its cost alone);
* a policy may keep a block stepping past its budget like its reference loop
  (``Policy.step_limit``, threshold's ``overrun``); ``steps`` stays the budget the policy reads.

Rows must share the prompt length: like the LLaDA reference, the model is called without an
attention mask, so left padding would be attended and change the answer. Batch prompts of equal
length (or one at a time).

Infilling (``suffix_ids``, [B, S]): the canvas sits between the prompt and the suffix, ``x = prompt
+ gen_length masks + suffix``. The suffix is fixed context: every forward attends it, no policy
commits over it (only canvas positions are ever committable), and the answer is the canvas alone.
Dream's shift needs nothing special at the boundary: canvas position ``j`` is still scored by row
``P + j - 1`` (the last canvas position by a canvas row), and the suffix rows score nothing.

Dream-style models (``model.logits_shift == 1``) score canvas position ``j`` with row ``P + j - 1``
of the full logits (Dream's ``cat([logits[:, :1], logits[:, :-1]])``). Attention, when the policy
needs it, is asked for the canvas span ``[P, P + gen_length)`` itself (unshifted, as DAWN's Dream
code uses it); for ``DenoiseState.key_attention`` (DAWN's ``tau_sink``) for the whole sequence, whose
column means over all queries it keeps before cutting the canvas corner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .model_api import DiffusionLM
from .policy import DenoiseState, Policy, stack_params
from .registry import get_policy


@dataclass
class DenoiseResult:
    tokens: torch.Tensor  # [B, gen_length] long; the answer
    sequences: torch.Tensor  # [B, P + gen_length (+ S)] long; prompt + answer (+ suffix) (LLaDA's generate's return)
    nfe: torch.Tensor  # [B] long; forwards spent while the row still had masks
    commit_step: torch.Tensor  # [B, gen_length] long; forward index at which each position was committed
    trace: list[torch.Tensor] | None = None  # per forward: [B, gen_length] bool committed positions


def _per_row(value: Any, B: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype).flatten()
    if t.numel() == 1:
        return t.expand(B).clone()
    if t.numel() != B:
        raise ValueError(f"{name}: need one value or one per row ({B}), got {t.numel()}")
    return t.clone()


def _params_list(policy: Policy, params: Any, B: int) -> list[Any]:
    if params is None or isinstance(params, Mapping):
        return [policy.make_params(params)] * B
    if isinstance(params, (list, tuple)):
        if len(params) != B:
            raise ValueError(f"params: need one Params or one per row ({B}), got {len(params)}")
        return [policy.make_params(p) if p is None or isinstance(p, Mapping) else p for p in params]
    return [params] * B


def _check_layout(prompt_ids: torch.Tensor, gen_length: int, block_length: int, steps: int, shift: int) -> int:
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids: expected [B, P], got shape {tuple(prompt_ids.shape)}")
    for name, v in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
    if gen_length % block_length:
        raise ValueError(f"block_length: {block_length} does not divide gen_length {gen_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps: {steps} is not divisible by the number of blocks {num_blocks}")
    if shift and prompt_ids.shape[1] < shift:
        raise ValueError("prompt_ids: a shifted-logits model (Dream) needs a non-empty prompt")
    return num_blocks


@torch.no_grad()
def denoise(
    model: DiffusionLM,
    prompt_ids: torch.Tensor,  # [B, P] long, same P for every row (see module docstring)
    gen_length: int = 128,
    block_length: int = 128,
    steps: int = 128,
    policy: str | Policy = "low_confidence",
    params: Any = None,  # one Params / overrides dict for all rows, or a list with one per row
    temperature: float | Sequence[float] | torch.Tensor = 0.0,
    seed: int | Sequence[int] | torch.Tensor = 0,
    trace: bool = False,
    attention_layers: Sequence[int] | None = None,  # default: policy.default_attention_layers
    progress: bool = False,
    suffix_ids: torch.Tensor | None = None,  # [B, S] long: fixed context after the canvas (infilling)
) -> DenoiseResult:
    """Decode ``gen_length`` tokens after each prompt with ``policy``; see the module docstring."""
    pol = get_policy(policy) if isinstance(policy, str) else policy
    shift = int(getattr(model, "logits_shift", 0))
    num_blocks = _check_layout(prompt_ids, gen_length, block_length, steps, shift)
    spb = steps // num_blocks
    B, P = prompt_ids.shape
    device = prompt_ids.device
    mask_id = int(model.mask_token_id)
    rows = _params_list(pol, params, B)
    stacked = stack_params(rows, device=device)
    temp = _per_row(temperature, B, torch.float32, "temperature").to(device)
    if (temp < 0).any() or not torch.isfinite(temp).all():
        raise ValueError("temperature: must be finite and >= 0")
    seeds = _per_row(seed, B, torch.long, "seed").to(device)
    keyed = pol.needs_attention and any(pol.key_attention_setting(r) for r in rows)  # DAWN's tau_sink
    span = (P, P + gen_length) if pol.needs_attention else None
    if attention_layers is None:
        depth = model_depth(model)
        per_row = {pol.attention_layers(r, depth) for r in rows}
        if len(per_row) > 1:
            raise ValueError("params: rows of one call must read the same attention layers")
        attention_layers = per_row.pop()
    layers = tuple(attention_layers)

    suffix = _check_suffix(suffix_ids, B, mask_id, device)
    x = torch.cat([prompt_ids.long(), torch.full((B, gen_length), mask_id, dtype=torch.long, device=device),
                   suffix], 1)
    G = P + gen_length  # end of the canvas in x
    if keyed:  # every query's row: the whole sequence's attention, cut to the canvas below
        span = (0, x.shape[1])
    nfe = torch.zeros(B, dtype=torch.long, device=device)
    commit_step = torch.full((B, gen_length), -1, dtype=torch.long, device=device)
    history: list[torch.Tensor] | None = [] if trace else None
    pos = torch.arange(gen_length, device=device)
    bar = _progress(steps, progress)
    forward = 0
    memory: dict[str, torch.Tensor] | None = None  # the policy's StepResult.memory, kept per row
    limit = torch.tensor([pol.step_limit(r, spb, block_length) for r in rows], device=device)  # [B] per block
    for blk in range(num_blocks):
        in_block = (pos >= blk * block_length) & (pos < (blk + 1) * block_length)  # [G]
        for i in range(int(limit.max())):
            canvas = x[:, P:G]
            is_mask = canvas == mask_id
            masked = is_mask & in_block & (i < limit).unsqueeze(1)
            active = masked.any(dim=-1)  # [B]
            if not bool(active.any()):
                break
            out = model(x, attention_span=span, attention_layers=layers if span else None)
            attention = out.attention if span else None
            if keyed:  # [B, T, T] -> the column means over all T queries, and the canvas corner
                key_attention, attention = attention.mean(dim=1)[:, P:G], attention[:, P:G, P:G]
            state = DenoiseState(
                logits=out.logits[:, P - shift: P - shift + gen_length],
                tokens=canvas.clone(),
                masked=masked,
                decoded=~is_mask,
                step=torch.full((B,), i, dtype=torch.long, device=device),
                steps=torch.full((B,), spb, dtype=torch.long, device=device),
                temperature=temp,
                seed=seeds,
                nfe=nfe.clone(),
                attention=attention,
                key_attention=key_attention if keyed else None,
                block_size=torch.full((B,), int(in_block.sum()), dtype=torch.long, device=device),
                canvas_length=torch.full((B,), gen_length, dtype=torch.long, device=device),
                memory=memory,
            )
            res = pol.step(state, stacked)
            if res.memory is not None:  # rows of finished requests keep their last memory
                present = torch.ones(B, dtype=torch.bool, device=device)
                memory = {**{k: v if memory is None else torch.where(_rows(active, v), v, memory[k])
                             for k, v in res.memory.items()}, "present": present}
            commit = res.commit & masked
            x[:, P:G] = torch.where(commit, res.tokens, canvas)
            commit_step[commit] = forward
            nfe += active.long()
            forward += 1
            if history is not None:
                history.append(commit.cpu())
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return DenoiseResult(tokens=x[:, P:G].clone(), sequences=x, nfe=nfe, commit_step=commit_step, trace=history)


def _check_suffix(suffix_ids: torch.Tensor | None, B: int, mask_id: int, device: torch.device) -> torch.Tensor:
    """The suffix as [B, S] long on ``device`` (S = 0 without one); a mask token in it is an error."""
    if suffix_ids is None:
        return torch.empty((B, 0), dtype=torch.long, device=device)
    suffix = torch.as_tensor(suffix_ids, dtype=torch.long, device=device)
    if suffix.dim() == 1:
        suffix = suffix.expand(B, -1)
    if suffix.dim() != 2 or suffix.shape[0] != B:
        raise ValueError(f"suffix_ids: expected [B, S] with B = {B}, got shape {tuple(suffix.shape)}")
    if bool((suffix == mask_id).any()):
        raise ValueError("suffix_ids: must not contain the mask token (the suffix is fixed context)")
    return suffix


def model_depth(model: Any) -> int | None:
    """The model's layer count, or None when it does not say (``layers`` of our transformer)."""
    layers = getattr(model, "layers", None)
    return len(layers) if layers is not None else None


def _rows(active: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``active`` [B] bool shaped to broadcast over ``like`` [B, ...]."""
    return active.view(-1, *([1] * (like.dim() - 1)))


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but the loop must not need it
        return None
    return tqdm(total=total, desc="denoise", unit="step")
