"""Dream (``model_type: Dream``, ``DreamModel``) in its real checkpoint layout (Qwen2 key names).

Reference: ``dream/model/modeling_dream.py`` (lizhuo-luo/DAWN, NVlabs/Fast-dLLM copies of the
Dream-org/Dream-v0-Instruct-7B remote code): a Qwen2 body (q/k/v with bias, GQA, SwiGLU MLP) with
the causal mask removed. Logits are shifted: row i predicts token i + 1 (``logits_shift = 1``), so
canvas position j is read from row j - 1, as ``generation_utils.py`` does with
``torch.cat([logits[:, :1], logits[:, :-1]], 1)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # duck-typed at run time: the model math imports without transformers
    from vllm_dapd.models.configs import DreamConfig
from vllm_dapd.models.transformer import ArchSpec, DiffusionTransformer, Slot


def dream_spec(config: DreamConfig) -> ArchSpec:
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act: unsupported value {config.hidden_act!r} for Dream (need 'silu')")
    scaling = getattr(config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ValueError(f"rope_scaling: unsupported value {scaling!r} for Dream (need null / default)")
    if getattr(config, "use_sliding_window", False):
        raise ValueError("use_sliding_window: sliding-window attention is not supported for Dream")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"hidden_size: {config.hidden_size} is not a multiple of num_attention_heads")
    return ArchSpec(
        vocab_rows=config.vocab_size,
        hidden=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        ffn_hidden=config.intermediate_size,
        rms_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        qkv_bias=True,
        tie_embeddings=bool(config.tie_word_embeddings),
        rope_fp32=False,
    )


def dream_layout(spec: ArchSpec) -> dict[str, Slot]:
    d, q, kv, f = spec.hidden, spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim, spec.ffn_hidden
    out = {"model.embed_tokens.weight": Slot("embed", None, (spec.vocab_rows, d)),
           "model.norm.weight": Slot("norm", None, (d,))}
    for i in range(spec.n_layers):
        b, m = f"model.layers.{i}", f"layers.{i}"
        out.update({
            f"{b}.input_layernorm.weight": Slot(f"{m}.attn_norm", None, (d,)),
            f"{b}.self_attn.q_proj.weight": Slot(f"{m}.qkv", ("q", "weight"), (q, d)),
            f"{b}.self_attn.q_proj.bias": Slot(f"{m}.qkv", ("q", "bias"), (q,)),
            f"{b}.self_attn.k_proj.weight": Slot(f"{m}.qkv", ("k", "weight"), (kv, d)),
            f"{b}.self_attn.k_proj.bias": Slot(f"{m}.qkv", ("k", "bias"), (kv,)),
            f"{b}.self_attn.v_proj.weight": Slot(f"{m}.qkv", ("v", "weight"), (kv, d)),
            f"{b}.self_attn.v_proj.bias": Slot(f"{m}.qkv", ("v", "bias"), (kv,)),
            f"{b}.self_attn.o_proj.weight": Slot(f"{m}.attn_out", None, (d, q)),
            f"{b}.post_attention_layernorm.weight": Slot(f"{m}.ffn_norm", None, (d,)),
            f"{b}.mlp.gate_proj.weight": Slot(f"{m}.gate_up", 0, (f, d)),
            f"{b}.mlp.up_proj.weight": Slot(f"{m}.gate_up", 1, (f, d)),
            f"{b}.mlp.down_proj.weight": Slot(f"{m}.ffn_out", None, (d, f)),
        })
    if not spec.tie_embeddings:
        out["lm_head.weight"] = Slot("head", None, (spec.vocab_rows, d))
    return out


class Dream(DiffusionTransformer):
    """Plain-PyTorch Dream (a ``DiffusionLM``); ``DreamForDiffusionLM`` is the vLLM face of it."""

    logits_shift = 1
    ignored_checkpoint_keys = ("rotary_emb.inv_freq",)

    def __init__(self, config: DreamConfig, factory: Any = None):
        super().__init__(dream_spec(config), factory)
        self.config = config
        self.mask_token_id = int(config.mask_token_id)
        if self.spec.tie_embeddings:  # some exporters still write the tied head
            self.ignored_checkpoint_keys = self.ignored_checkpoint_keys + ("lm_head.weight",)

    def checkpoint_layout(self) -> dict[str, Slot]:
        return dream_layout(self.spec)
