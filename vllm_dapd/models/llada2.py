"""LLaDA2.x (``model_type: llada2_moe``, ``LLaDA2MoeModelLM``) in its real checkpoint layout.

Reference: ``modeling_llada2_moe.py`` / ``configuration_llada2_moe.py``, the Hugging Face remote
code of inclusionAI/LLaDA2.0-mini (as vendored in yks23/Information-Gain-Sampler,
``dllm/dllm/pipelines/llada2/models``). Per layer: a fused ``query_key_value`` projection (rows
[q; k; v]), RMSNorm of q and k over each head (``use_qk_norm``), RoPE on the first
``head_dim * partial_rotary_factor`` dims of each head (cos/sin cast to the activation dtype, as
HF Llama), attention output ``dense`` (with a bias when ``use_bias``), then a dense SwiGLU MLP for
the first ``first_k_dense_replace`` layers and a mixture of experts after (``moe.py``). Logits
are aligned with positions (``logits_shift = 0``, "LLaDA2.0 will use same label position logits").

LLaDA2 is a block-diffusion model: trained and decoded with attention causal across blocks and
bidirectional inside one (``attention_structure``). The reference forward is bidirectional when
called without a mask; its ``generate`` passes the block-causal mask (``forward(block_size=...)``
here). ``LLADA2_BLOCK_SIZE`` is its default ``block_length`` (32; also SGLang's), overridable by a
``block_length`` field in config.json.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_dapd.models.configs import LLaDA2MoeConfig
from vllm_dapd.models.transformer import ArchSpec, AttentionStructure, DiffusionTransformer, MoESpec, Slot

LLADA2_BLOCK_SIZE = 32


def _require(config: Any, field: str, ok: bool, want: str) -> None:
    if not ok:
        raise ValueError(f"{field}: unsupported value {getattr(config, field, None)!r} for LLaDA2 (need {want})")


def llada2_attention(config: Any) -> AttentionStructure:
    """Block-causal over blocks of config.json's ``block_length`` (default ``LLADA2_BLOCK_SIZE``)."""
    block = getattr(config, "block_length", None) or LLADA2_BLOCK_SIZE
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block_length: config.json must give a positive integer, got {block!r}")
    return AttentionStructure("block_causal", block)


def llada2_spec(config: LLaDA2MoeConfig) -> ArchSpec:
    """Validate the config against what the reference computes and build the spec."""
    g = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    _require(config, "hidden_act", g("hidden_act") == "silu", "'silu'")
    _require(config, "num_key_value_heads", (g("num_key_value_heads") or 0) > 0
             and config.num_attention_heads % config.num_key_value_heads == 0,
             "a positive divisor of num_attention_heads")
    scaling = g("rope_scaling")
    _require(config, "rope_scaling", not scaling or scaling.get("rope_type", scaling.get("type")) == "default",
             "null / default")
    _require(config, "use_sliding_window", not g("use_sliding_window", False), "false")
    _require(config, "norm_head", not g("norm_head", False), "false (the reference's lm_head is a plain linear)")
    # The reference router is a sigmoid whose top-k weights it always renormalises (top_k > 1).
    _require(config, "score_function", g("score_function", "sigmoid") in (None, "sigmoid"), "'sigmoid'")
    _require(config, "norm_topk_prob", g("norm_topk_prob", True) in (None, True), "true")
    head_dim = int(config.head_dim or config.hidden_size // config.num_attention_heads)
    rotary = int(head_dim * float(g("partial_rotary_factor", 1.0)))
    _require(config, "partial_rotary_factor", 2 <= rotary <= head_dim and rotary % 2 == 0,
             "a factor giving an even rotary width in [2, head_dim]")
    moe = None
    if g("num_experts") is not None:
        E, k, groups, keep = config.num_experts, config.num_experts_per_tok, config.n_group, config.topk_group
        _require(config, "n_group", groups >= 1 and E % groups == 0 and E // groups >= 2,
                 "a divisor of num_experts with >= 2 experts per group")
        _require(config, "topk_group", 1 <= keep <= groups and keep * (E // groups) >= k,
                 "1 .. n_group, holding at least num_experts_per_tok experts")
        _require(config, "moe_intermediate_size", (g("moe_intermediate_size") or 0) > 0, "a positive width")
        shared = g("num_shared_experts")
        moe = MoESpec(num_experts=E, top_k=k, n_group=groups, topk_group=keep,
                      routed_scaling=float(config.routed_scaling_factor), ffn_hidden=config.moe_intermediate_size,
                      shared_ffn_hidden=None if shared is None else config.moe_intermediate_size * shared,
                      dense_layers=int(g("first_k_dense_replace", 0)))
    if moe is None or moe.dense_layers > 0:
        _require(config, "intermediate_size", (g("intermediate_size") or 0) > 0, "a positive width (dense layers)")
    return ArchSpec(
        vocab_rows=config.vocab_size,
        hidden=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        ffn_hidden=int(g("intermediate_size") or 0),
        rms_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        qkv_bias=bool(g("use_qkv_bias", False)),
        tie_embeddings=bool(g("tie_word_embeddings", False)),
        rope_fp32=False,
        qkv_fused=True,
        qk_norm=bool(g("use_qk_norm", True)),
        rotary_dim=rotary,
        attn_out_bias=bool(g("use_bias", True)),
        moe=moe,
    )


def llada2_layout(spec: ArchSpec) -> dict[str, Slot]:
    """Checkpoint key -> where it goes in ``DiffusionTransformer``, with the expected shape."""
    d, hd, f = spec.hidden, spec.head_dim, spec.ffn_hidden
    q = spec.n_heads * hd
    out = {"model.word_embeddings.weight": Slot("embed", None, (spec.vocab_rows, d)),
           "model.norm.weight": Slot("norm", None, (d,))}
    for i in range(spec.n_layers):
        b, m = f"model.layers.{i}", f"layers.{i}"
        qkv = (spec.n_heads + 2 * spec.n_kv_heads) * hd
        out.update({
            f"{b}.input_layernorm.weight": Slot(f"{m}.attn_norm", None, (d,)),
            f"{b}.attention.query_key_value.weight": Slot(f"{m}.qkv", (None, "weight"), (qkv, d)),
            f"{b}.attention.dense.weight": Slot(f"{m}.attn_out", "weight", (d, q)),
            f"{b}.post_attention_layernorm.weight": Slot(f"{m}.ffn_norm", None, (d,)),
        })
        if spec.qkv_bias:
            out[f"{b}.attention.query_key_value.bias"] = Slot(f"{m}.qkv", (None, "bias"), (qkv,))
        if spec.attn_out_bias:
            out[f"{b}.attention.dense.bias"] = Slot(f"{m}.attn_out", "bias", (d,))
        if spec.qk_norm:
            out[f"{b}.attention.query_layernorm.weight"] = Slot(f"{m}.q_norm", None, (hd,))
            out[f"{b}.attention.key_layernorm.weight"] = Slot(f"{m}.k_norm", None, (hd,))
        moe = spec.moe
        if moe is None or i < moe.dense_layers:
            out.update({
                f"{b}.mlp.gate_proj.weight": Slot(f"{m}.gate_up", 0, (f, d)),
                f"{b}.mlp.up_proj.weight": Slot(f"{m}.gate_up", 1, (f, d)),
                f"{b}.mlp.down_proj.weight": Slot(f"{m}.ffn_out", None, (d, f)),
            })
            continue
        E, fe = moe.num_experts, moe.ffn_hidden
        out[f"{b}.mlp.gate.weight"] = Slot(f"{m}.moe.router", "weight", (E, d))
        out[f"{b}.mlp.gate.expert_bias"] = Slot(f"{m}.moe.router", "expert_bias", (E,))
        for e in range(E):
            x = f"{b}.mlp.experts.{e}"
            out.update({
                f"{x}.gate_proj.weight": Slot(f"{m}.moe.experts", (e, "gate"), (fe, d)),
                f"{x}.up_proj.weight": Slot(f"{m}.moe.experts", (e, "up"), (fe, d)),
                f"{x}.down_proj.weight": Slot(f"{m}.moe.experts", (e, "down"), (d, fe)),
            })
        if moe.shared_ffn_hidden is not None:
            fs, x = moe.shared_ffn_hidden, f"{b}.mlp.shared_experts"
            out.update({
                f"{x}.gate_proj.weight": Slot(f"{m}.moe.shared_gate_up", 0, (fs, d)),
                f"{x}.up_proj.weight": Slot(f"{m}.moe.shared_gate_up", 1, (fs, d)),
                f"{x}.down_proj.weight": Slot(f"{m}.moe.shared_out", None, (d, fs)),
            })
    if not spec.tie_embeddings:
        out["lm_head.weight"] = Slot("head", None, (spec.vocab_rows, d))
    return out


class LLaDA2(DiffusionTransformer):
    """Plain-PyTorch LLaDA2 MoE (a ``DiffusionLM``; block diffusion, see ``attention_structure``)."""

    logits_shift = 0
    ignored_checkpoint_keys = ("rotary_emb.inv_freq",)

    def __init__(self, config: LLaDA2MoeConfig, factory: Any = None):
        super().__init__(llada2_spec(config), factory)
        self.config = config
        self.mask_token_id = int(config.mask_token_id)
        self.attention_structure = llada2_attention(config)
        if self.spec.tie_embeddings:  # a tied head may still be written
            self.ignored_checkpoint_keys = self.ignored_checkpoint_keys + ("lm_head.weight",)

    def checkpoint_layout(self) -> dict[str, Slot]:
        return llada2_layout(self.spec)
