"""Batched greedy independent set: the conflict-free commit set of DAPD and DAWN.

Both policies want the set a sequential greedy would pick: visit the candidates by descending
priority (confidence), take a node unless a neighbour was already taken, stop after ``max_size``
taken (DAWN: llada/gdllm_utils.py ``select_parallel_tokens_conflict_mis``; DAPD: arXiv 2603.12996,
"selecting an independent set on the graph"). That loop is over nodes, per sequence.

Here the same set is computed for the whole batch in parallel rounds (the "deterministic
parallel greedy MIS" of Blelloch, Fineman and Shun, SPAA 2012): in each round every undecided
node that outranks all of its undecided neighbours is taken, and their neighbours are dropped.
A node is only decided once every better-ranked neighbour is, so each decision equals the
sequential one: the result is the lexicographically-first maximal independent set. Rounds are
few in practice (O(log^2 L) for random orders; L/2 at worst, a path in rank order), each is one
batched [B, L, L] reduction, and the loop exits early when no row has an undecided node.

The cap: the sequential greedy takes nodes in rank order, so stopping after ``k`` takes yields
the ``k`` best-ranked members of the uncapped set. Working in rank-sorted order makes that a
cumulative count, and lets nodes behind ``k`` taken ones be dropped early.
"""

from __future__ import annotations

import torch

from .select import top_k_mask


def greedy_order(priority: torch.Tensor) -> torch.Tensor:
    """[B, L] long: positions by descending priority, ties by lowest index (stable sort)."""
    return torch.sort(priority, dim=-1, descending=True, stable=True).indices


def greedy_independent_set(
    adjacency: torch.Tensor,  # [B, L, L] bool; read as undirected (a | a^T), diagonal ignored
    priority: torch.Tensor,  # [B, L] float; higher = visited first; ties -> lower index first
    candidates: torch.Tensor,  # [B, L] bool; only these may be taken (others are not in the graph)
    max_size: torch.Tensor | int | None = None,  # [B] long (or one int): stop after this many taken
    directed: bool = False,
) -> torch.Tensor:
    """[B, L] bool: the sequential greedy independent set among ``candidates``, batched.

    ``directed``: ``adjacency[i, j]`` means "i may not join once j is taken" and is read as given
    (not symmetrised): a node is tested only against the better-ranked nodes already taken, along
    its own row (DAPD's authors: a candidate joins when its row-normalised dependency to every
    chosen position is <= tau).
    """
    if adjacency.dim() != 3 or adjacency.shape[1] != adjacency.shape[2]:
        raise ValueError(f"adjacency: expected [B, L, L], got {tuple(adjacency.shape)}")
    bsz, length = adjacency.shape[:2]
    if priority.shape != (bsz, length) or candidates.shape != (bsz, length):
        raise ValueError(
            f"priority/candidates: expected [{bsz}, {length}], "
            f"got {tuple(priority.shape)} and {tuple(candidates.shape)}"
        )
    if torch.isnan(priority).any():
        raise ValueError("priority: contains NaN (no order is defined)")
    device = adjacency.device
    cap = None
    if max_size is not None:
        cap = torch.as_tensor(max_size, dtype=torch.long, device=device).expand(bsz)
        if (cap < 0).any():
            raise ValueError(f"max_size: must be >= 0, got {cap.tolist()}")

    candidates = candidates.bool()
    # Rank-sorted frame: node r of row b is the r-th in greedy order, so "outranks" = lower index.
    order = greedy_order(priority)  # [B, L]
    cand = candidates.gather(1, order)  # [B, L]
    adj = adjacency.bool() if directed else adjacency.bool() | adjacency.bool().transpose(1, 2)
    adj = adj.gather(1, order.unsqueeze(-1).expand(-1, -1, length))
    adj = adj.gather(2, order.unsqueeze(1).expand(-1, length, -1))  # [B, L, L] permuted both ways
    eye = torch.eye(length, dtype=torch.bool, device=device)
    adj = adj & cand.unsqueeze(1) & cand.unsqueeze(2) & ~eye
    adj_f = adj.to(torch.float32)
    better = torch.tril(adj_f, diagonal=-1)  # [B, r, s]: s < r and adjacent

    taken = torch.zeros_like(cand)
    undecided = cand.clone() if cap is None else cand & (cap > 0).unsqueeze(1)
    while bool(undecided.any()):
        # Taken now: undecided and no undecided better-ranked neighbour (one batched mat-vec).
        blocked = torch.bmm(better, undecided.to(torch.float32).unsqueeze(-1)).squeeze(-1) > 0
        win = undecided & ~blocked
        taken |= win
        # Directed: only a node's own edges to better-ranked winners drop it.
        hit = torch.bmm(better if directed else adj_f, win.to(torch.float32).unsqueeze(-1)).squeeze(-1) > 0
        undecided &= ~win & ~hit
        if cap is not None:
            # k taken ahead of a node already fill the cap: it can no longer be among the first k.
            undecided &= torch.cumsum(taken.long(), dim=1) < cap.unsqueeze(1)
    if cap is not None:
        taken &= torch.cumsum(taken.long(), dim=1) <= cap.unsqueeze(1)
    return torch.zeros_like(taken).scatter(1, order, taken)


def is_independent(adjacency: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """[B] bool: no two chosen positions are adjacent (either direction; diagonal ignored)."""
    adj = adjacency.bool() | adjacency.bool().transpose(1, 2)
    adj = adj & ~torch.eye(adj.shape[-1], dtype=torch.bool, device=adj.device)
    pair = chosen.unsqueeze(1) & chosen.unsqueeze(2)
    return ~(adj & pair).flatten(1).any(dim=1)


def top_up(chosen: torch.Tensor, score: torch.Tensor, eligible: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: ``chosen`` plus the best-scored other ``eligible`` positions, up to ``floor`` [B].

    The step budget (``schedule.min_commits``) outranks independence: when the set is smaller than
    the floor, the most confident remaining positions join it even if coupled to it.
    """
    need = (floor.long() - chosen.sum(dim=-1)).clamp_min(0)
    return chosen | top_k_mask(score, eligible & ~chosen, need)
