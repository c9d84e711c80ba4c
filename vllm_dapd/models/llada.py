"""LLaDA (``model_type: llada``, ``LLaDAModelLM``) in its real checkpoint layout.

Reference: ``llada/model/modeling_llada.py`` (NVlabs/Fast-dLLM, lizhuo-luo/DAWN copies of the
GSAI-ML/LLaDA-8B-Instruct remote code), block type ``llama``: ``ff_proj`` is the SiLU gate,
``up_proj`` the linear branch, ``ff_out`` the down projection; ``attn_out`` the attention output.
Logits are aligned with positions (``logits_shift = 0``). The mask id comes from the config
(126336 in the 8B checkpoints); nothing here hard-codes token ids.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # duck-typed at run time: the model math imports without transformers
    from vllm_dapd.models.configs import LLaDAConfig
from vllm_dapd.models.transformer import ArchSpec, DiffusionTransformer, Slot


def _require(config: Any, field: str, ok: bool, want: str) -> None:
    if not ok:
        raise ValueError(f"{field}: unsupported value {getattr(config, field, None)!r} for LLaDA (need {want})")


def llada_spec(config: LLaDAConfig) -> ArchSpec:
    """Validate the config against what the reference's MDM path supports and build the spec."""
    _require(config, "block_type", str(config.block_type) == "llama", "'llama'")
    _require(config, "activation_type", str(config.activation_type) == "silu", "'silu' (llama block)")
    _require(config, "layer_norm_type", str(config.layer_norm_type) == "rms", "'rms'")
    _require(config, "rope", bool(config.rope), "true")
    _require(config, "alibi", not config.alibi, "false")
    _require(config, "attention_layer_norm", not config.attention_layer_norm, "false")
    _require(config, "block_group_size", config.block_group_size == 1, "1")
    _require(config, "include_bias", not config.include_bias, "false")
    _require(config, "include_qkv_bias", not config.include_qkv_bias, "false")
    _require(config, "layer_norm_with_affine", config.layer_norm_with_affine in (True, None), "true")
    _require(config, "d_model", config.d_model % config.n_heads == 0, "a multiple of n_heads")
    d = config.d_model
    return ArchSpec(
        vocab_rows=config.embedding_size or config.vocab_size,
        hidden=d,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        n_kv_heads=config.num_key_value_heads,
        head_dim=d // config.n_heads,
        ffn_hidden=config.intermediate_size,
        rms_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        qkv_bias=False,
        tie_embeddings=bool(config.weight_tying),
        rope_fp32=bool(config.rope_full_precision),
        embed_scale=math.sqrt(d) if config.input_emb_norm else 1.0,
        logit_scale=1.0 / math.sqrt(d) if config.scale_logits else 1.0,
    )


def llada_layout(spec: ArchSpec) -> dict[str, Slot]:
    """Checkpoint key -> where it goes in ``DiffusionTransformer``, with the expected shape."""
    d, kv, f = spec.hidden, spec.n_kv_heads * spec.head_dim, spec.ffn_hidden
    t = "model.transformer"
    out = {f"{t}.wte.weight": Slot("embed", None, (spec.vocab_rows, d)),
           f"{t}.ln_f.weight": Slot("norm", None, (d,))}
    for i in range(spec.n_layers):
        b, m = f"{t}.blocks.{i}", f"layers.{i}"
        out.update({
            f"{b}.attn_norm.weight": Slot(f"{m}.attn_norm", None, (d,)),
            f"{b}.q_proj.weight": Slot(f"{m}.qkv", ("q", "weight"), (spec.n_heads * spec.head_dim, d)),
            f"{b}.k_proj.weight": Slot(f"{m}.qkv", ("k", "weight"), (kv, d)),
            f"{b}.v_proj.weight": Slot(f"{m}.qkv", ("v", "weight"), (kv, d)),
            f"{b}.attn_out.weight": Slot(f"{m}.attn_out", None, (d, spec.n_heads * spec.head_dim)),
            f"{b}.ff_norm.weight": Slot(f"{m}.ffn_norm", None, (d,)),
            f"{b}.ff_proj.weight": Slot(f"{m}.gate_up", 0, (f, d)),
            f"{b}.up_proj.weight": Slot(f"{m}.gate_up", 1, (f, d)),
            f"{b}.ff_out.weight": Slot(f"{m}.ffn_out", None, (d, f)),
        })
    if not spec.tie_embeddings:
        out[f"{t}.ff_out.weight"] = Slot("head", None, (spec.vocab_rows, d))
    return out


class LLaDA(DiffusionTransformer):
    """Plain-PyTorch LLaDA (a ``DiffusionLM``); ``LLaDAForDiffusionLM`` is the vLLM face of it."""

    logits_shift = 0
    ignored_checkpoint_keys = ("rotary_emb.inv_freq",)

    def __init__(self, config: LLaDAConfig, factory: Any = None):
        super().__init__(llada_spec(config), factory)
        self.config = config
        self.mask_token_id = int(config.mask_token_id)

    def checkpoint_layout(self) -> dict[str, Slot]:
        return llada_layout(self.spec)
