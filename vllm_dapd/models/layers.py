"""Projection factory: the same model code builds plain PyTorch layers or vLLM tensor-parallel ones.

Why a factory: the math of LLaDA and Dream lives once (``transformer.py``). Standalone use (tests,
training the demo model, the reference denoising loop) wants plain ``nn.Linear`` layers whose
parameters line up one to one with the checkpoint tensors, so a load is a straight copy and the
arithmetic is the reference's own (separate q/k/v matmuls, like ``modeling_llada.py``). Under vLLM
the same modules come from ``QKVParallelLinear`` / ``MergedColumnParallelLinear`` /
``RowParallelLinear`` / ``VocabParallelEmbedding`` / ``ParallelLMHead`` so tensor parallelism can
shard them (heads split across ranks; the attention code reads the *local* head counts).

Every wrapper has the same small interface, whatever backs it:
- ``forward`` returns plain tensors (a tuple for the fused q/k/v and gate/up projections);
- ``load(tensor, shard)`` copies one checkpoint tensor into the right (slice of a) parameter and
  returns the local name of the parameter it wrote, so ``load_weights`` can report loaded names;
- ``param_for(shard)`` (plain only) gives the parameter a checkpoint tensor fills exactly, for the
  zero-copy reader in ``loading.py``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm as both references compute it: normalise in fp32, cast back, then scale.

    ``modeling_llada.py`` ``RMSLayerNorm`` and ``modeling_dream.py`` ``DreamRMSNorm`` agree on this
    order (weight multiplies the *down-cast* normalised input), which matters for bf16 parity.
    Replicated (not sharded) under tensor parallelism, so one class serves both modes.
    """

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def load(self, tensor: torch.Tensor, shard: Any = None) -> str:
        _copy(self.weight, tensor)
        return "weight"

    def param_for(self, shard: Any = None) -> nn.Parameter:
        return self.weight


def _copy(param: torch.Tensor, tensor: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(tensor.to(param.dtype))


# ---------------------------------------------------------------- plain PyTorch layers


class PlainQKV(nn.Module):
    """q/k/v projections; returns (q, k, v). Separate (LLaDA, Dream) or, with ``fused``, one matrix
    whose rows are [q; k; v] (LLaDA2's ``query_key_value``), as each checkpoint stores them."""

    def __init__(self, hidden: int, head_dim: int, n_heads: int, n_kv_heads: int, bias: bool, fused: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads = n_heads, n_kv_heads
        if fused:
            self.qkv = nn.Linear(hidden, (n_heads + 2 * n_kv_heads) * head_dim, bias=bias)
            self._sizes = [n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim]
        else:
            self.q = nn.Linear(hidden, n_heads * head_dim, bias=bias)
            self.k = nn.Linear(hidden, n_kv_heads * head_dim, bias=bias)
            self.v = nn.Linear(hidden, n_kv_heads * head_dim, bias=bias)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fused:
            q, k, v = self.qkv(x).split(self._sizes, dim=-1)
            return q, k, v
        return self.q(x), self.k(x), self.v(x)

    def param_for(self, shard: tuple[str | None, str]) -> nn.Parameter:
        which, kind = shard  # ("q" | "k" | "v", or None for the fused matrix; "weight" | "bias")
        return getattr(self.qkv if which is None else getattr(self, which), kind)

    def load(self, tensor: torch.Tensor, shard: tuple[str | None, str]) -> str:
        _copy(self.param_for(shard), tensor)
        return f"{shard[0] or 'qkv'}.{shard[1]}"


class PlainGateUp(nn.Module):
    """Separate gate and up projections of the SwiGLU MLP; returns (gate, up)."""

    def __init__(self, hidden: int, ffn_hidden: int):
        super().__init__()
        self.gate = nn.Linear(hidden, ffn_hidden, bias=False)
        self.up = nn.Linear(hidden, ffn_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate(x), self.up(x)

    def param_for(self, shard: int) -> nn.Parameter:
        return (self.gate, self.up)[shard].weight

    def load(self, tensor: torch.Tensor, shard: int) -> str:
        _copy(self.param_for(shard), tensor)
        return f"{('gate', 'up')[shard]}.weight"


class PlainLinear(nn.Linear):
    """Output projections (attention out, MLP down) and the untied LM head; shard "bias" is the bias."""

    def param_for(self, shard: Any = None) -> nn.Parameter:
        return self.bias if shard == "bias" else self.weight

    def load(self, tensor: torch.Tensor, shard: Any = None) -> str:
        _copy(self.param_for(shard), tensor)
        return "bias" if shard == "bias" else "weight"


class PlainEmbedding(nn.Embedding):
    def param_for(self, shard: Any = None) -> nn.Parameter:
        return self.weight

    def load(self, tensor: torch.Tensor, shard: Any = None) -> str:
        _copy(self.weight, tensor)
        return "weight"


class PlainFactory:
    """Builds plain layers; ``logits`` is a matmul against the head (or tied embedding) weight."""

    vllm = False

    def qkv(self, hidden: int, head_dim: int, n_heads: int, n_kv_heads: int, bias: bool, name: str,
            fused: bool = False) -> nn.Module:
        return PlainQKV(hidden, head_dim, n_heads, n_kv_heads, bias, fused)

    def gate_up(self, hidden: int, ffn_hidden: int, name: str) -> nn.Module:
        return PlainGateUp(hidden, ffn_hidden)

    def row(self, in_features: int, out_features: int, name: str, bias: bool = False) -> nn.Module:
        return PlainLinear(in_features, out_features, bias=bias)

    def experts(self, num_experts: int, hidden: int, ffn_hidden: int, name: str) -> nn.Module:
        from vllm_dapd.models.moe import PlainExperts

        return PlainExperts(num_experts, hidden, ffn_hidden)

    def embedding(self, rows: int, hidden: int, name: str) -> nn.Module:
        return PlainEmbedding(rows, hidden)

    def head(self, rows: int, hidden: int, name: str, tied: nn.Module | None) -> nn.Module | None:
        return None if tied is not None else PlainLinear(hidden, rows, bias=False)

    def logits(self, head: nn.Module, hidden: torch.Tensor, scale: float) -> torch.Tensor:
        logits = F.linear(hidden, head.weight)
        return logits * scale if scale != 1.0 else logits

    def reduce_heads(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a per-head quantity over all heads: here every head is local."""
        return t


# ---------------------------------------------------------------- vLLM tensor-parallel layers


def _vllm_load(param: torch.Tensor, tensor: torch.Tensor, *shard: Any) -> None:
    loader = getattr(param, "weight_loader", None)
    if loader is None:
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        loader = default_weight_loader
    loader(param, tensor, *shard)


class VllmQKV(nn.Module):
    def __init__(self, hidden: int, head_dim: int, n_heads: int, n_kv_heads: int, bias: bool,
                 quant_config: Any, prefix: str):
        super().__init__()
        from vllm.model_executor.layers.linear import QKVParallelLinear

        self.proj = QKVParallelLinear(hidden, head_dim, n_heads, n_kv_heads, bias=bias,
                                      quant_config=quant_config, prefix=f"{prefix}.proj")
        self.num_heads, self.num_kv_heads = self.proj.num_heads, self.proj.num_kv_heads
        self._sizes = [self.num_heads * head_dim, self.num_kv_heads * head_dim, self.num_kv_heads * head_dim]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, _ = self.proj(x)
        q, k, v = out.split(self._sizes, dim=-1)
        return q, k, v

    def load(self, tensor: torch.Tensor, shard: tuple[str | None, str]) -> str:
        which, kind = shard  # which None: the fused [q; k; v] tensor, split by vLLM's loader
        _vllm_load(getattr(self.proj, kind), tensor, *(() if which is None else (which,)))
        return f"proj.{kind}"


class VllmGateUp(nn.Module):
    def __init__(self, hidden: int, ffn_hidden: int, quant_config: Any, prefix: str):
        super().__init__()
        from vllm.model_executor.layers.linear import MergedColumnParallelLinear

        self.proj = MergedColumnParallelLinear(hidden, [ffn_hidden] * 2, bias=False,
                                               quant_config=quant_config, prefix=f"{prefix}.proj")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = self.proj(x)
        gate, up = out.chunk(2, dim=-1)
        return gate, up

    def load(self, tensor: torch.Tensor, shard: int) -> str:
        _vllm_load(self.proj.weight, tensor, shard)
        return "proj.weight"


class VllmRow(nn.Module):
    def __init__(self, in_features: int, out_features: int, quant_config: Any, prefix: str, bias: bool = False):
        super().__init__()
        from vllm.model_executor.layers.linear import RowParallelLinear

        self.proj = RowParallelLinear(in_features, out_features, bias=bias,
                                      quant_config=quant_config, prefix=f"{prefix}.proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.proj(x)
        return out

    def load(self, tensor: torch.Tensor, shard: Any = None) -> str:
        kind = "bias" if shard == "bias" else "weight"
        _vllm_load(getattr(self.proj, kind), tensor)
        return f"proj.{kind}"


class VllmWeightWrapper(nn.Module):
    """Holds a VocabParallelEmbedding or ParallelLMHead under a fixed child name ``layer``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.layer(ids)

    def load(self, tensor: torch.Tensor, shard: Any = None) -> str:
        _vllm_load(self.layer.weight, tensor)
        return "layer.weight"


class VllmFactory:
    """Builds vLLM's tensor-parallel layers (needs vLLM's distributed state initialised)."""

    vllm = True

    def __init__(self, quant_config: Any = None, prefix: str = ""):
        self.quant_config = quant_config
        self.prefix = prefix
        self._logits_processor: Any = None

    def _name(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def qkv(self, hidden: int, head_dim: int, n_heads: int, n_kv_heads: int, bias: bool, name: str,
            fused: bool = False) -> nn.Module:
        return VllmQKV(hidden, head_dim, n_heads, n_kv_heads, bias, self.quant_config, self._name(name))

    def gate_up(self, hidden: int, ffn_hidden: int, name: str) -> nn.Module:
        return VllmGateUp(hidden, ffn_hidden, self.quant_config, self._name(name))

    def row(self, in_features: int, out_features: int, name: str, bias: bool = False) -> nn.Module:
        return VllmRow(in_features, out_features, self.quant_config, self._name(name), bias)

    def experts(self, num_experts: int, hidden: int, ffn_hidden: int, name: str) -> nn.Module:
        """LLaDA2's routed experts, replicated on every tensor-parallel rank (not sharded): the MoE
        input is the full hidden state on each rank, so each rank computes the full, identical
        output and no reduction is needed. Correct at any TP size; costs the experts' memory per rank."""
        from vllm_dapd.models.moe import PlainExperts

        return PlainExperts(num_experts, hidden, ffn_hidden)

    def embedding(self, rows: int, hidden: int, name: str) -> nn.Module:
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        return VllmWeightWrapper(VocabParallelEmbedding(rows, hidden, quant_config=self.quant_config,
                                                        prefix=self._name(name) + ".layer"))

    def head(self, rows: int, hidden: int, name: str, tied: nn.Module | None) -> nn.Module | None:
        from vllm.model_executor.layers.logits_processor import LogitsProcessor
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        self._logits_processor = LogitsProcessor(rows)
        if tied is not None:
            return None
        return VllmWeightWrapper(ParallelLMHead(rows, hidden, quant_config=self.quant_config,
                                                prefix=self._name(name) + ".layer"))

    def logits(self, head: nn.Module, hidden: torch.Tensor, scale: float) -> torch.Tensor:
        # LogitsProcessor applies the (possibly quantised) head and gathers vocab shards across ranks.
        layer = head.layer if isinstance(head, VllmWeightWrapper) else head
        logits = self._logits_processor(layer, hidden)
        return logits * scale if scale != 1.0 else logits

    def reduce_heads(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a per-head quantity (the attention hook's head sum) over tensor-parallel ranks."""
        from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce

        return tensor_model_parallel_all_reduce(t) if get_tensor_model_parallel_world_size() > 1 else t
