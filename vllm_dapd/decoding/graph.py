"""Dependency graphs from attention, batched over [B, L, L] (the shared math of DAPD and DAWN).

``attention[b, i, j]`` is the head/layer-averaged softmax attention from canvas query ``i`` to
canvas key ``j``, each row normalised over *all* keys, prompt included (see ``DenoiseState``), so
a canvas row sums to at most 1. Both policies read "i attends strongly to j" as "the prediction at
i depends on the token at j" and turn that into a graph (DAPD: arXiv 2603.12996, abstract: "edges
capture strong token interactions, non-edges weak dependence"; DAWN: llada/generate.py
``get_transfer_index_dawn``, edges where averaged attention >= tau_edge).
"""

from __future__ import annotations

import torch


def check_attention(attention: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """Validate the attention a graph policy needs (errors name the field)."""
    if attention is None:
        raise ValueError("attention: this policy needs attention scores (needs_attention), got None")
    if attention.shape != (batch, length, length):
        raise ValueError(f"attention: expected [{batch}, {length}, {length}], got {tuple(attention.shape)}")
    if not torch.isfinite(attention).all():
        raise ValueError("attention: contains NaN or inf")
    return attention.float()


def pair_mask(nodes: torch.Tensor) -> torch.Tensor:
    """[B, L, L] bool: both ends in ``nodes`` [B, L], no self pairs."""
    eye = torch.eye(nodes.shape[-1], dtype=torch.bool, device=nodes.device)
    return nodes.unsqueeze(2) & nodes.unsqueeze(1) & ~eye


def dependency_graph(
    attention: torch.Tensor,  # [B, L, L] float; scores[i, j]: i attends to j
    nodes: torch.Tensor,  # [B, L] bool; the graph's vertices
    threshold: torch.Tensor,  # [B] float; edge where score >= threshold (per sequence)
    symmetric: bool = True,
) -> torch.Tensor:
    """[B, L, L] bool adjacency: ``i -> j`` where ``attention[i, j] >= threshold``, only among
    ``nodes``, no self loops; with ``symmetric`` an edge in either direction links both ways
    (DAWN's conflict graph ``edge | edge^T``, gdllm_utils.py ``select_parallel_tokens_conflict_mis``).
    """
    edges = attention >= threshold.to(attention.dtype).view(-1, 1, 1)
    edges = edges & pair_mask(nodes)
    if symmetric:
        edges = edges | edges.transpose(1, 2)
    return edges


def same_token_links(tokens: torch.Tensor, conf: torch.Tensor, nodes: torch.Tensor, bar: torch.Tensor
                     ) -> torch.Tensor:
    """[B, L, L] bool: pairs of ``nodes`` [B, L] that propose the same token (``tokens`` [B, L])
    while either confidence (``conf`` [B, L]) is below ``bar`` [B]; ``bar`` 0 links none.

    Exclusive choices (a permutation's slots, a Latin row's cells) are not linked by attention while
    they are all masked, and both propose the same item; two confident copies (a sorted list's
    repeated digit) stay unlinked. Used by ``ieb`` (``conflict_bar``) and ``dapd`` (``conflict_bar``).
    """
    unsure = conf < bar.to(conf.dtype).view(-1, 1)
    same = tokens.unsqueeze(2) == tokens.unsqueeze(1)
    return same & (unsure.unsqueeze(2) | unsure.unsqueeze(1)) & pair_mask(nodes)


def renormalize_over(attention: torch.Tensor, keys: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """[B, L, L]: each row restricted to ``keys`` [B, L] and rescaled to sum to 1 over them.

    Why: the raw scores share each row with the prompt and the decoded context, so their scale
    drifts with prompt length and progress. Restricted to the still-masked keys, a score is the
    share of "attention to unknowns" that goes to one unknown, the coupling that matters for the
    masked-token graph. A row with no mass on ``keys`` stays zero (no edges).
    """
    scores = attention * keys.unsqueeze(1).to(attention.dtype)
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(eps)


def symmetrize(scores: torch.Tensor, use_mean: torch.Tensor) -> torch.Tensor:
    """[B, L, L]: ``max(s, s^T)`` (coupled if either attends), or ``(s + s^T) / 2`` where
    ``use_mean`` [B] bool is set (coupled if strong on average)."""
    t = scores.transpose(1, 2)
    return torch.where(use_mean.view(-1, 1, 1), (scores + t) / 2, torch.maximum(scores, t))


def attention_sinks(attention: torch.Tensor, valid: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: keys whose mean incoming attention exceeds ``ratio`` x the average key's.

    DAWN (llada/gdllm_utils.py ``detect_attn_sinks_``) flags key ``j`` when its mean incoming
    attention over all queries exceeds an absolute ``tau_sink`` = 0.01. The mean key gets 1/T of a
    row (T keys), so that rule flags *every* key once T < 100 and means ~10x the mean key at
    GSM8K 5-shot lengths (T ~ 1000). This rule keeps DAWN's intent (drop keys that soak up
    abnormal mass) independent of length: the reference is the mean, over ``valid`` keys, of the
    per-key mean incoming attention from ``valid`` queries, i.e. 1/T under uniform attention; at
    most 1/ratio of the keys can exceed ratio x their mean, so the graph never empties wholesale.
    """
    rows = valid.to(attention.dtype)  # [B, L]
    n = rows.sum(dim=-1).clamp_min(1)  # [B]
    incoming = (attention * rows.unsqueeze(2)).sum(dim=1) / n.unsqueeze(1)  # [B, L] mean over queries
    reference = (incoming * rows).sum(dim=-1) / n  # [B] mean over keys
    return valid & (incoming > ratio.to(attention.dtype).unsqueeze(1) * reference.unsqueeze(1))


def absolute_sinks(key_attention: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: DAWN's own rule (``detect_attn_sinks_``): keys whose mean incoming attention over
    *every* query of the sequence (``key_attention`` [B, L], ``DenoiseState.key_attention``)
    exceeds ``tau`` [B] (its ``tau_sink``)."""
    return key_attention > tau.to(key_attention.dtype).unsqueeze(1)


def drop_keys(attention: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[B, L, L]: columns of ``keys`` [B, L] set to zero (DAWN's sink filter, no renormalisation)."""
    return attention.masked_fill(keys.unsqueeze(1), 0.0)
