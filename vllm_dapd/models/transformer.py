"""The one definition of the LLaDA/Dream/LLaDA2 math: a pre-norm RoPE + SwiGLU (or MoE) transformer.

LLaDA (``modeling_llada.py`` ``LLaDALlamaBlock``) and Dream (``modeling_dream.py``
``DreamDecoderLayer``, a Qwen2 layer without the causal mask) compute the same thing per layer:
``x += o(attn(rope(q), rope(k), v))`` on ``rms_norm(x)``, then ``x += down(silu(gate) * up)`` on
``rms_norm(x)``. They differ only in what ``ArchSpec`` records (q/k/v bias, RoPE rounding, optional
embedding/logit scales, the logit shift) and in checkpoint key names, which each model maps onto
this module tree in ``checkpoint_layout``. LLaDA2 (``modeling_llada2_moe.py``) is the same layer
with a fused q/k/v matrix, per-head q/k RMSNorm, partial RoPE and, past its first dense layers, a
mixture-of-experts MLP (``moe.py``); it is a block-diffusion model (``AttentionStructure``).

Forward contract (plain PyTorch and vLLM alike): ``run(batch)`` takes one ``batch.StepBatch`` (what
the engine's stepper builds); ``forward(input_ids, attention_span, attention_layers, **fields)`` is
its keyword form (the reference loops, vLLM's flat [T] ids, tests). The fields:
- ``input_ids`` [B, T] (or [T], vLLM's flat convention, treated as one sequence);
- ``positions`` [B, T]: RoPE positions; default ``P + arange(T)`` or, with a padding mask, the
  count of real tokens before each one (left padding gets the positions an unpadded run would);
- ``past_key_values``: per layer ``(k, v)`` of cached tokens, each [B, Hkv_local, P, D], keys
  already rotated; they are attended, not recomputed. Attention is order-free over keys, so the
  cache may hold the prompt and committed blocks (prefix cache) or prefix + suffix (Fast-dLLM's
  dual cache); pass ``positions`` explicitly when the rows are not the P tokens that follow it;
- ``key_padding_mask`` [B, P + T] bool, True where the key is a real token;
- ``block_size``: block-causal attention (``attention.block_causal_mask``, LLaDA2's block diffusion):
  a query sees the keys of its own block and of earlier ones, blocks counted from position 0; None
  (the default, and what every reference forward without a mask does) is bidirectional;
- ``use_cache``: also return this forward's own ``(k, v)`` per layer, [B, Hkv_local, T, D];
- ``hook`` (``batch.AttentionHook``; keyword form ``attention_span`` / ``attention_layers`` /
  ``attention_rows``): the attention hook (``attention.span_attention``): rows [start, end) of this forward, for the batch rows
  ``attention_rows`` (default all), averaged over ``attention_layers`` (one list for every row, or
  one list per attention row: the union is computed, each row averages its own);
- ``logits_rows`` [B, R]: only these input rows get logits, per sequence (the engine: the rows its
  policies read, e.g. the active block's; skips the prompt's vocabulary matmul); they must be real
  rows when ``real_rows`` is given;
- ``real_rows`` [N]: the flat rows ``b * T + t`` that are not padding; the projections and the MLP
  then run on those N rows only (attention itself runs on the padded batch), so a request feeding
  its 1000-token prompt costs the 63 others feeding 32-row blocks nothing extra in GEMMs;
- ``paged`` (``attention.PagedAttention``): attention runs packed too, over KV pages that hold
  every cached key (the engine's ``--attention-backend CPU_ATTN`` path, ``engine/vllm/kernel_kv.py``);
  each layer's KV goes to the pages (``use_cache`` returns nothing), ``past_key_values`` must be
  None, and ``key_padding_mask`` [B, paged.past_len + T] is read by the attention hook only.
Returns ``ModelOutput(logits [B, T (or R), V], attention [B' (attention rows), S, S] | None,
past_key_values | None)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vllm_dapd.decoding.model_api import DiffusionOutput
from vllm_dapd.models.attention import (PagedAttention, apply_rope, attend, block_causal_mask, rope_cos_sin,
                                        rope_inv_freq, span_attention)
from vllm_dapd.models.batch import AttentionHook, StepBatch
from vllm_dapd.models.layers import PlainFactory, RMSNorm

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ArchSpec:
    """Everything the shared math needs to know, read from a model's config."""

    vocab_rows: int  # embedding rows = logits width (LLaDA: embedding_size, may exceed vocab_size)
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int
    rms_eps: float
    rope_theta: float
    qkv_bias: bool
    tie_embeddings: bool
    rope_fp32: bool  # LLaDA rope_full_precision; Dream rotates in the activation dtype
    embed_scale: float = 1.0  # LLaDA input_emb_norm multiplies embeddings by sqrt(d_model)
    logit_scale: float = 1.0  # LLaDA scale_logits multiplies logits by 1/sqrt(d_model)
    # LLaDA2: one fused [q; k; v] matrix, RMSNorm of q and k per head before RoPE, RoPE on the first
    # ``rotary_dim`` dims of each head only (0: all), a bias on the attention output, MoE layers.
    qkv_fused: bool = False
    qk_norm: bool = False
    rotary_dim: int = 0
    attn_out_bias: bool = False
    moe: MoESpec | None = None


@dataclass(frozen=True)
class MoESpec:
    """LLaDA2's MoE MLP (``moe.py``): layers ``dense_layers`` and up are MoE, the first ones dense."""

    num_experts: int
    top_k: int
    n_group: int
    topk_group: int
    routed_scaling: float
    ffn_hidden: int  # per routed expert
    shared_ffn_hidden: int | None  # the shared expert's width (None: no shared expert)
    dense_layers: int


@dataclass(frozen=True)
class AttentionStructure:
    """How a model's tokens attend at decode time: ``bidirectional`` (LLaDA, Dream: every token sees
    the whole sequence) or ``block_causal`` (LLaDA2: causal across blocks of ``block_size``
    positions, bidirectional inside one; the prompt's and finished blocks' KV is then exact)."""

    kind: str
    block_size: int | None = None


@dataclass
class ModelOutput(DiffusionOutput):
    """``DiffusionOutput`` plus this forward's per-layer (k, v) when ``use_cache`` was asked."""

    past_key_values: list[KV] | None = None


class Slot(NamedTuple):
    """Where one checkpoint tensor goes: module path in our tree, shard id, expected shape."""

    module: str
    shard: Any
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Packed:
    """The real rows of a padded [B, T] batch: ``index`` [N] long, flat row ``b * T + t`` of each."""

    index: torch.Tensor
    shape: tuple[int, int]

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...]."""
        return t.reshape(-1, *t.shape[2:]).index_select(0, self.index)

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...], zeros on padding rows."""
        out = t.new_zeros((self.shape[0] * self.shape[1], *t.shape[1:]))
        return out.index_copy_(0, self.index, t).view(*self.shape, *t.shape[1:])


class Block(nn.Module):
    def __init__(self, spec: ArchSpec, factory: Any, name: str, index: int):
        super().__init__()
        self.spec, self.index = spec, index
        self.attn_norm = RMSNorm(spec.hidden, spec.rms_eps)
        self.qkv = factory.qkv(spec.hidden, spec.head_dim, spec.n_heads, spec.n_kv_heads, spec.qkv_bias, f"{name}.qkv",
                               fused=spec.qkv_fused)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_eps) if spec.qk_norm else None
        self.attn_out = factory.row(spec.n_heads * spec.head_dim, spec.hidden, f"{name}.attn_out",
                                    bias=spec.attn_out_bias)
        self.ffn_norm = RMSNorm(spec.hidden, spec.rms_eps)
        self.moe = None
        if spec.moe is not None and index >= spec.moe.dense_layers:
            from vllm_dapd.models.moe import SparseMoE

            self.moe = SparseMoE(spec.moe, spec.hidden, factory, f"{name}.moe")
        else:
            self.gate_up = factory.gate_up(spec.hidden, spec.ffn_hidden, f"{name}.gate_up")
            self.ffn_out = factory.row(spec.ffn_hidden, spec.hidden, f"{name}.ffn_out")

    def _rotate(self, x: torch.Tensor, norm: RMSNorm | None, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Per-head q or k [..., D]: LLaDA2's RMSNorm over the head dim (if any), then RoPE."""
        if norm is not None:
            x = norm(x)
        return apply_rope(x, cos, sin, self.spec.rope_fp32)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: KV | None,
                key_mask: torch.Tensor | None, span: tuple[int, int] | None,
                rows: torch.Tensor | None = None, packed: Packed | None = None,
                paged: PagedAttention | None = None) -> tuple[torch.Tensor, KV | None, torch.Tensor | None]:
        """x [B, T, hidden], or [N, hidden] with ``packed`` (the real rows of a padded [B, T] batch:
        the GEMMs skip the padding; attention runs padded). With ``paged`` (needs ``packed``; cos/sin
        are then the packed rows' [N, 1, D]), attention runs packed over the KV pages and this layer's
        KV goes to the pages, not to the returned ``present`` (None)."""
        if paged is not None:
            return self._forward_paged(x, cos, sin, key_mask, span, rows, packed, paged)
        B, T = (x.shape[0], x.shape[1]) if packed is None else packed.shape
        D = self.spec.head_dim
        h, hk = self.qkv.num_heads, self.qkv.num_kv_heads  # local to this tensor-parallel rank
        q, k, v = self.qkv(self.attn_norm(x))
        if packed is not None:
            q, k, v = packed.unpack(q), packed.unpack(k), packed.unpack(v)
        q = self._rotate(q.view(B, T, h, D).transpose(1, 2), self.q_norm, cos, sin)
        k = self._rotate(k.view(B, T, hk, D).transpose(1, 2), self.k_norm, cos, sin)
        v = v.view(B, T, hk, D).transpose(1, 2)
        present = (k, v)
        past_len = 0
        if past is not None:
            past_len = past[0].shape[2]
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        attn = None
        if span is not None:  # the hook reads only the batch rows asked for (``rows``; default all)
            if rows is None:
                attn = span_attention(q, k, key_mask, span, past_len)
            else:
                attn = span_attention(q[rows], k[rows], None if key_mask is None else key_mask[rows], span, past_len)
        out = attend(q, k, v, key_mask).transpose(1, 2).reshape(B, T, h * D)
        if packed is not None:
            out = packed.pack(out)
        return self._rest(x, out), present, attn

    def _forward_paged(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None,
                       span: tuple[int, int] | None, rows: torch.Tensor | None, packed: Packed,
                       paged: PagedAttention) -> tuple[torch.Tensor, None, torch.Tensor | None]:
        N, D = x.shape[0], self.spec.head_dim
        h, hk = self.qkv.num_heads, self.qkv.num_kv_heads
        q, k, v = self.qkv(self.attn_norm(x))
        q = self._rotate(q.view(N, h, D), self.q_norm, cos, sin)
        k = self._rotate(k.view(N, hk, D), self.k_norm, cos, sin)
        v = v.view(N, hk, D)
        attn = None
        if span is not None:  # the hook: padded [B', heads, T, D] rows, cached keys from the pages
            qp, kp = packed.unpack(q).transpose(1, 2), packed.unpack(k).transpose(1, 2)
            if rows is not None:
                qp, kp, key_mask = qp[rows], kp[rows], None if key_mask is None else key_mask[rows]
            keys = torch.cat((paged.past_keys(self.index).to(kp.dtype), kp), dim=2)
            attn = span_attention(qp, keys, key_mask, span, paged.past_len)
        out = paged.attend(self.index, q, k, v).to(x.dtype).reshape(N, h * D)
        return self._rest(x, out), None, attn

    def _rest(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The attention output projection and the MLP (dense SwiGLU or MoE), both residual."""
        x = x + self.attn_out(out)
        h = self.ffn_norm(x)
        if self.moe is not None:
            return x + self.moe(h)
        gate, up = self.gate_up(h)
        return x + self.ffn_out(F.silu(gate) * up)


class DiffusionTransformer(nn.Module):
    """Shared body + head. Subclasses set ``mask_token_id``, ``logits_shift`` and the layout."""

    mask_token_id: int
    logits_shift: int
    attention_structure = AttentionStructure("bidirectional")

    def __init__(self, spec: ArchSpec, factory: Any = None):
        super().__init__()
        factory = factory or PlainFactory()
        self.spec, self.factory = spec, factory
        self.embed = factory.embedding(spec.vocab_rows, spec.hidden, "embed")
        self.layers = nn.ModuleList(Block(spec, factory, f"layers.{i}", i) for i in range(spec.n_layers))
        self.norm = RMSNorm(spec.hidden, spec.rms_eps)
        self.head = factory.head(spec.vocab_rows, spec.hidden, "head", self.embed if spec.tie_embeddings else None)
        self._inv_freq: torch.Tensor | None = None

    # ------------------------------------------------------------------ forward

    def _positions(self, B: int, T: int, past_len: int, key_mask: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor:
        if key_mask is None:
            return (past_len + torch.arange(T, device=device)).expand(B, T)
        return (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T] long (or [T], vLLM's flat convention)
        attention_span: tuple[int, int] | None = None,  # [start, end) rows of this forward
        attention_layers: Sequence[int] | Sequence[Sequence[int]] | None = None,  # layers to average
        *,
        attention_rows: torch.Tensor | None = None,  # [B'] long: batch rows the hook reads (default all)
        intermediate_tensors: Any = None,
        **inputs: Any,  # the other ``StepBatch`` fields: positions, key_padding_mask, past_key_values, ...
    ) -> ModelOutput:
        """Keyword form of ``run`` (the reference loops, vLLM, tests); vLLM's flat [T] ids are one sequence."""
        if intermediate_tensors is not None:
            raise ValueError("intermediate_tensors: pipeline parallelism is not supported")
        flat = input_ids.dim() == 1
        if flat:
            input_ids = input_ids[None]
            if inputs.get("positions") is not None:
                inputs["positions"] = inputs["positions"].reshape(1, -1)
            if inputs.get("inputs_embeds") is not None:
                inputs["inputs_embeds"] = inputs["inputs_embeds"].reshape(1, *inputs["inputs_embeds"].shape[-2:])
        hook = None if attention_span is None else AttentionHook(attention_span, attention_layers, attention_rows)
        out = self.run(StepBatch(input_ids, hook=hook, **inputs))
        if flat and out.logits is not None:  # None on TP ranks > 0 when vLLM gathers logits to rank 0
            out.logits = out.logits[0]
        return out

    def run(self, batch: StepBatch) -> ModelOutput:
        """One forward over ``batch`` (the contract in the module docstring)."""
        input_ids, positions, key_padding_mask = batch.input_ids, batch.positions, batch.key_padding_mask
        past_key_values, paged, real_rows, logits_rows = (batch.past_key_values, batch.paged, batch.real_rows,
                                                          batch.logits_rows)
        hook, block_size, inputs_embeds = batch.hook, batch.block_size, batch.inputs_embeds
        attention_rows = None if hook is None else hook.rows
        B, T = input_ids.shape
        if past_key_values is not None and len(past_key_values) != len(self.layers):
            raise ValueError(f"past_key_values: need {len(self.layers)} layers, got {len(past_key_values)}")
        if paged is not None and past_key_values is not None:
            raise ValueError("paged: the pages hold the cached keys; pass no past_key_values")
        past_len = (paged.past_len if paged is not None
                    else 0 if past_key_values is None else past_key_values[0][0].shape[2])
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, past_len + T):
                raise ValueError(f"key_padding_mask: expected shape {(B, past_len + T)}, "
                                 f"got {tuple(key_padding_mask.shape)}")
            key_padding_mask = key_padding_mask.to(device=input_ids.device, dtype=torch.bool)
        if positions is None:
            positions = self._positions(B, T, past_len, key_padding_mask, input_ids.device)
        attn_mask = key_padding_mask
        if block_size is not None:  # [B, T, P + T]: block-causal, and padding keys stay masked
            if paged is not None:
                raise ValueError("block_size: block-causal attention is not supported on the paged path")
            attn_mask = self._block_mask(positions, past_len, key_padding_mask, int(block_size))
        span = None if hook is None else self._check_span(hook.span, T)
        chosen, weights, counts = set(), None, None
        if span is not None:
            chosen, weights, counts = self._hook_layers(hook.layers, B if attention_rows is None
                                                        else len(attention_rows), input_ids.device)

        if self._inv_freq is None or self._inv_freq.device != input_ids.device:
            self._inv_freq = rope_inv_freq(self.spec.rotary_dim or self.spec.head_dim, self.spec.rope_theta,
                                           input_ids.device)
        cos, sin = rope_cos_sin(positions, self._inv_freq)

        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if self.spec.embed_scale != 1.0:  # after either, as modeling_llada.py applies input_emb_norm
            x = x * self.spec.embed_scale
        packed = None
        if paged is not None and real_rows is None:
            real_rows = torch.arange(B * T, device=x.device)
        if real_rows is not None:  # GEMMs on the real rows only (left-padded batches of mixed lengths)
            packed = Packed(real_rows.to(x.device), (B, T))
            x = packed.pack(x)
        if paged is not None:  # attention runs packed too: RoPE tables of the real rows, [N, 1, D]
            cos, sin = packed.pack(cos[:, 0])[:, None], packed.pack(sin[:, 0])[:, None]
        presents: list[KV] | None = [] if batch.use_cache and paged is None else None
        attn_sum = None
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            x, present, attn = layer(x, cos, sin, past, attn_mask, span if i in chosen else None,
                                     attention_rows, packed, paged)
            if presents is not None:
                presents.append(present)
            if attn is not None:
                if weights is not None:  # 1.0 where the row averages layer i, else 0.0: sums stay exact
                    attn = attn * weights[i][:, None, None]
                attn_sum = attn if attn_sum is None else attn_sum + attn
        if packed is not None and logits_rows is not None:  # rows of x = positions in real_rows
            where = torch.full((B * T,), -1, dtype=torch.long, device=x.device)
            where[packed.index] = torch.arange(len(packed.index), device=x.device)
            wanted = logits_rows.to(x.device) + T * torch.arange(B, device=x.device)[:, None]
            x = x.index_select(0, where[wanted.flatten()]).view(B, -1, x.shape[-1])
        elif packed is not None:
            x = packed.unpack(x)
        elif logits_rows is not None:  # the rows a policy reads (e.g. the active block): [B, R, hidden]
            x = x.gather(1, logits_rows.to(x.device)[..., None].expand(-1, -1, x.shape[-1]))
        x = self.norm(x)
        logits = self.compute_logits(x)
        attention = None
        if attn_sum is not None:  # heads may be split across TP ranks: sum them all, then average
            attention = self.factory.reduce_heads(attn_sum) / (self.spec.n_heads * counts)
        return ModelOutput(logits=logits, attention=attention, past_key_values=presents)

    def _block_mask(self, positions: torch.Tensor, past_len: int, key_mask: torch.Tensor | None,
                    block_size: int) -> torch.Tensor:
        """Key positions: from the padding mask's running count, else cached keys at 0 .. P - 1
        followed by this forward's ``positions``."""
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        B = positions.shape[0]
        if key_mask is not None:
            key_pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            past = torch.arange(past_len, device=positions.device).expand(B, past_len)
            key_pos = torch.cat((past, positions), dim=1)
        mask = block_causal_mask(positions, key_pos, block_size)
        return mask if key_mask is None else mask & key_mask[:, None, :]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Final-norm'd hidden states [..., hidden] -> logits [..., vocab_rows] (vLLM interface)."""
        head = self.head if self.head is not None else self.embed
        return self.factory.logits(head, hidden_states, self.spec.logit_scale)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """vLLM interface: what ``forward(inputs_embeds=...)`` takes (embed_scale is applied there)."""
        return self.embed(input_ids)

    def _check_span(self, span: tuple[int, int] | None, T: int) -> tuple[int, int] | None:
        if span is None:
            return None
        start, end = int(span[0]), int(span[1])
        if not 0 <= start < end <= T:
            raise ValueError(f"attention_span: need 0 <= start < end <= {T}, got {span}")
        return start, end

    def _hook_layers(self, layers: Sequence[int] | Sequence[Sequence[int]] | None, rows: int,
                     device: torch.device) -> tuple[set[int], dict[int, torch.Tensor] | None, Any]:
        """Layers the hook computes, and how each attention row averages them: (union, per-layer
        [rows] 0/1 weights or None when every row reads the same layers, divisor: the layer count,
        an int or a [rows, 1, 1] tensor)."""
        if layers is None or not len(layers) or isinstance(layers[0], int):
            chosen = self._chosen_layers(layers)
            return chosen, None, len(chosen)
        if len(layers) != rows:
            raise ValueError(f"attention_layers: need one list per attention row ({rows}), got {len(layers)}")
        sets = [self._chosen_layers(row) for row in layers]
        union = set().union(*sets)
        if all(s == sets[0] for s in sets):
            return union, None, len(union)
        weights = {i: torch.tensor([float(i in s) for s in sets], device=device) for i in union}
        counts = torch.tensor([float(len(s)) for s in sets], device=device)[:, None, None]
        return union, weights, counts

    def _chosen_layers(self, layers: Sequence[int] | None) -> set[int]:
        """Negative ids mean "the last k layers": those past the model's depth are dropped, so a
        policy's default of the last 4 layers (DAWN) reads all layers of a 2-layer model. A
        non-negative id must exist."""
        n = len(self.layers)
        chosen = set()
        for layer in (-1,) if layers is None else layers:
            if layer < -n:
                continue
            if layer >= n:
                raise ValueError(f"attention_layers: layer {layer} out of range for {n} layers")
            chosen.add(layer % n)
        if not chosen:
            raise ValueError("attention_layers: empty")
        return chosen

    # ------------------------------------------------------------------ weights

    def checkpoint_layout(self) -> dict[str, Slot]:
        """Checkpoint key -> Slot, for every tensor the checkpoint must contain."""
        raise NotImplementedError

    ignored_checkpoint_keys: tuple[str, ...] = ()  # suffixes of harmless extra keys

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load (name, tensor) pairs in the real checkpoint layout; returns our loaded parameter names.

        Shape is checked here (errors name the key) before vLLM's weight loaders see the tensor;
        a missing or unknown key is an error naming it.
        """
        layout = self.checkpoint_layout()
        loaded: set[str] = set()
        seen: set[str] = set()
        for name, tensor in weights:
            slot = layout.get(name)
            if slot is None:
                if name.endswith(self.ignored_checkpoint_keys):
                    continue
                raise ValueError(f"{name}: unexpected checkpoint tensor for {type(self).__name__}")
            if tuple(tensor.shape) != slot.shape:
                raise ValueError(f"{name}: expected shape {slot.shape}, checkpoint has {tuple(tensor.shape)}")
            module = self.get_submodule(slot.module)
            loaded.add(f"{slot.module}.{module.load(tensor, slot.shard)}")
            seen.add(name)
        missing = sorted(set(layout) - seen)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"{missing[0]}: missing from the checkpoint{more}")
        return loaded
