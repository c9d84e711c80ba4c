"""LLaDA2's mixture-of-experts MLP: a sigmoid router with group-limited top-k, routed experts and a
shared expert, in plain PyTorch.

Reference: ``modeling_llada2_moe.py`` (``LLaDA2MoeGate``, ``LLaDA2MoeSparseMoeBlock``), the
Hugging Face remote code of inclusionAI/LLaDA2.0-mini. Per token:

1. router logits ``h @ W^T`` in fp32 (whatever the model dtype), scores ``sigmoid(logits)``;
2. routing scores ``scores + expert_bias`` (the aux-loss-free balancing bias; it picks experts but
   does not weight them); experts form ``n_group`` equal groups, a group's score is the sum of its
   two best routing scores, the ``topk_group`` best groups stay eligible, and the ``top_k`` best
   eligible experts are chosen;
3. weights are the chosen experts' *unbiased* scores, normalised to sum 1 when ``top_k > 1``, times
   ``routed_scaling_factor``;
4. output ``sum_k w_k * expert_k(h)`` (each expert a SwiGLU MLP run in the model dtype, the
   weighted sum in fp32) plus the shared expert's SwiGLU MLP of ``h``.

The expert path is batched per expert, not per token: (token, choice) pairs are sorted by expert,
each expert runs one GEMM over its contiguous run of rows, the results are scattered back. The
experts' weights are stacked ([E, 2F, H] gate/up, [E, H, F] down), one tensor each, filled from
the per-expert checkpoint tensors. vLLM's fused MoE layer is not used (plain path only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def route(logits: torch.Tensor, expert_bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
          scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] (fp32) -> (expert ids [N, top_k] long, weights [N, top_k] fp32)."""
    N, E = logits.shape
    scores = torch.sigmoid(logits)
    biased = scores + expert_bias
    group_scores = biased.view(N, n_group, -1).topk(2, dim=-1).values.sum(-1)  # [N, n_group]
    groups = group_scores.topk(topk_group, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
    keep = keep[:, :, None].expand(N, n_group, E // n_group).reshape(N, E)
    ids = biased.masked_fill(~keep, float("-inf")).topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scaling


class PlainExperts(nn.Module):
    """E SwiGLU experts with stacked weights; ``forward(x [N, H], ids, weights)`` -> [N, H]."""

    def __init__(self, num_experts: int, hidden: int, ffn_hidden: int):
        super().__init__()
        self.ffn_hidden = ffn_hidden
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * ffn_hidden, hidden))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, ffn_hidden))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        N, k = ids.shape
        flat = ids.flatten()
        order = flat.argsort()
        rows = x.index_select(0, order // k)  # (token, choice) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.gate_up.shape[0]).tolist()  # one host sync per layer
        out = torch.empty_like(rows)
        start = 0
        for e, n in enumerate(counts):
            if n:
                gate, up = F.linear(rows[start:start + n], self.gate_up[e]).chunk(2, dim=-1)
                out[start:start + n] = F.linear(F.silu(gate) * up, self.down[e])
                start += n
        per_choice = torch.empty_like(out).index_copy_(0, order, out).view(N, k, -1)
        return (per_choice.to(weights.dtype) * weights[..., None]).sum(1).to(x.dtype)

    def param_for(self, shard: tuple[int, str]) -> torch.Tensor:
        e, which = shard  # which: "gate" | "up" | "down"
        F_ = self.ffn_hidden
        if which == "down":
            return self.down[e]
        return self.gate_up[e, :F_] if which == "gate" else self.gate_up[e, F_:]

    def load(self, tensor: torch.Tensor, shard: tuple[int, str]) -> str:
        with torch.no_grad():
            self.param_for(shard).copy_(tensor.to(self.gate_up.dtype))
        return "down" if shard[1] == "down" else "gate_up"


class Router(nn.Module):
    """The router's weight [E, H] and expert bias [E] (``mlp.gate.weight`` / ``mlp.gate.expert_bias``)."""

    def __init__(self, num_experts: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.expert_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)

    def param_for(self, shard: str) -> nn.Parameter:
        return self.expert_bias if shard == "expert_bias" else self.weight

    def load(self, tensor: torch.Tensor, shard: str) -> str:
        param = self.param_for(shard)
        with torch.no_grad():
            param.copy_(tensor.to(param.dtype))
        return shard


class SparseMoE(nn.Module):
    """Router + routed experts + optional shared expert (built from the same factory as dense MLPs)."""

    def __init__(self, moe: Any, hidden: int, factory: Any, name: str):
        super().__init__()
        self.spec = moe
        self.router = Router(moe.num_experts, hidden)
        self.experts = factory.experts(moe.num_experts, hidden, moe.ffn_hidden, f"{name}.experts")
        self.shared_gate_up = self.shared_out = None
        if moe.shared_ffn_hidden is not None:
            self.shared_gate_up = factory.gate_up(hidden, moe.shared_ffn_hidden, f"{name}.shared_gate_up")
            self.shared_out = factory.row(moe.shared_ffn_hidden, hidden, f"{name}.shared_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] (or [..., H]) -> same shape."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        s = self.spec
        logits = F.linear(x.float(), self.router.weight.float())
        ids, weights = route(logits, self.router.expert_bias, s.top_k, s.n_group, s.topk_group, s.routed_scaling)
        y = self.experts(x, ids, weights)
        if self.shared_gate_up is not None:
            gate, up = self.shared_gate_up(x)
            y = y + self.shared_out(F.silu(gate) * up)
        return y.view(shape)
