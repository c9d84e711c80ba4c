"""Config classes for ``model_type: llada``, ``Dream`` and ``llada2_moe``, so checkpoints load offline
WITHOUT ``trust_remote_code`` (their ``auto_map`` points at remote Python we do not run).

Field names and defaults follow the references: ``configuration_llada.py`` (``ModelConfig`` +
``LLaDAConfig``) and ``configuration_dream.py`` (``DreamConfig``). ``attribute_map`` gives LLaDA
the standard names (``hidden_size``, ``num_attention_heads``...) that vLLM's ``ModelConfig`` reads.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# configuration_llada.py ModelConfig defaults (only fields a checkpoint's config.json may omit).
_LLADA_DEFAULTS: dict[str, Any] = dict(
    d_model=768, n_heads=12, n_kv_heads=None, n_layers=12, mlp_ratio=4, mlp_hidden_size=None,
    activation_type="swiglu", block_type="sequential", block_group_size=1, alibi=False,
    alibi_bias_max=8.0, rope=False, rope_full_precision=True, flash_attention=False,
    attention_dropout=0.1, multi_query_attention=None, attention_layer_norm=False,
    residual_dropout=0.1, embedding_dropout=0.1, input_emb_norm=False, layer_norm_type="default",
    layer_norm_with_affine=True, rms_norm_eps=1e-5, attention_layer_norm_with_affine=True,
    max_sequence_length=1024, rope_theta=10000.0, include_qkv_bias=False, include_bias=False,
    bias_for_layer_norm=None, scale_logits=False, vocab_size=50257, embedding_size=50304,
    weight_tying=True, mask_token_id=50256, init_device=None, init_fn="normal", init_std=0.02,
    init_cutoff_factor=None, precision=None,
)


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_sequence_length",
    }

    def __init__(self, use_cache: bool = False, eos_token_id: int = 50256, pad_token_id: int = 50256,
                 **kwargs: Any):
        for key, default in _LLADA_DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        self.use_cache = use_cache
        kwargs.setdefault("architectures", ["LLaDAModelLM"])
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    @property
    def num_key_value_heads(self) -> int:
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return 1 if self.multi_query_attention else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def intermediate_size(self) -> int:
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model


class DreamConfig(PretrainedConfig):
    model_type = "Dream"

    def __init__(self, vocab_size: int = 151936, hidden_size: int = 4096, intermediate_size: int = 22016,
                 num_hidden_layers: int = 32, num_attention_heads: int = 32, num_key_value_heads: int | None = 32,
                 hidden_act: str = "silu", max_position_embeddings: int = 32768, initializer_range: float = 0.02,
                 rms_norm_eps: float = 1e-6, use_cache: bool = False, tie_word_embeddings: bool = False,
                 rope_theta: float = 10000.0, rope_scaling: dict | None = None, use_sliding_window: bool = False,
                 sliding_window: int = 4096, max_window_layers: int = 28, attention_dropout: float = 0.0,
                 mask_token_id: int = 151666, pad_token_id: int = 151643, **kwargs: Any):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window if use_sliding_window else None
        self.max_window_layers = max_window_layers
        self.attention_dropout = attention_dropout
        self.mask_token_id = mask_token_id
        kwargs.setdefault("architectures", ["DreamModel"])
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def register_configs() -> None:
    """Make AutoConfig resolve ``llada`` / ``Dream`` / ``llada2_moe`` to our classes (idempotent)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for cls in (LLaDAConfig, DreamConfig, LLaDA2MoeConfig):
        if cls.model_type not in CONFIG_MAPPING:
            AutoConfig.register(cls.model_type, cls)


class LLaDA2MoeConfig(PretrainedConfig):
    """``model_type: llada2_moe`` (inclusionAI LLaDA2.0 / 2.1, ``LLaDA2MoeModelLM``).

    Fields and defaults as ``configuration_llada2_moe.py``, except ``vocab_size``: 157184 (LLaDA2.0's
    vocabulary) rather than 30592, so the default special ids lie inside it (transformers warns
    otherwise whenever it builds a default instance). Real config.json files add
    ``norm_topk_prob``, ``score_function``, ``moe_router_enable_expert_bias`` and ``router_dtype``
    (kept as given and validated in ``llada2.py``). The mask and end-of-text ids are not config
    fields there: ``mask_token_id`` / ``eos_token_id`` default to the reference ``generate``'s
    ``mask_id=156895`` / ``eos_id=156892`` (the LLaDA2 tokenizer's ``<|mask|>`` and
    ``<|endoftext|>``); a config.json that sets them wins.
    """

    model_type = "llada2_moe"

    def __init__(self, vocab_size: int = 157184, hidden_size: int = 1024, intermediate_size: int | None = None,
                 num_hidden_layers: int = 24, num_attention_heads: int = 16, num_key_value_heads: int = 0,
                 hidden_act: str = "silu", use_qkv_bias: bool = False, use_qk_norm: bool = True,
                 use_bias: bool = True, rms_norm_eps: float = 1e-5, norm_head: bool = False,
                 tie_word_embeddings: bool = False, embedding_dropout: float = 0.1, attention_dropout: float = 0.1,
                 output_dropout: float = 0.1, initializer_range: float = 0.02, max_position_embeddings: int = 16384,
                 rope_theta: float = 10000.0, use_cache: bool = True, use_sliding_window: bool = False,
                 sliding_window: int = 4096, max_window_layers: int = 28, rope_scaling: dict | None = None,
                 pad_token_id: int = 126081, num_experts: int | None = 16, num_shared_experts: int | None = 0,
                 num_experts_per_tok: int = 2, n_group: int = 8, topk_group: int = 4,
                 routed_scaling_factor: float = 2.5, moe_intermediate_size: int | None = None,
                 first_k_dense_replace: int = 0, head_dim: int | None = None, output_router_logits: bool = False,
                 partial_rotary_factor: float = 0.5, mask_token_id: int = 156895, eos_token_id: int = 156892,
                 **kwargs: Any):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.use_qkv_bias = use_qkv_bias
        self.use_qk_norm = use_qk_norm
        self.use_bias = use_bias
        self.rms_norm_eps = rms_norm_eps
        self.norm_head = norm_head
        self.embedding_dropout = embedding_dropout
        self.attention_dropout = attention_dropout
        self.output_dropout = output_dropout
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.use_cache = use_cache
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.max_window_layers = max_window_layers
        self.rope_scaling = rope_scaling
        self.num_experts = num_experts
        self.num_shared_experts = num_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.moe_intermediate_size = moe_intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.output_router_logits = output_router_logits
        self.partial_rotary_factor = partial_rotary_factor
        self.mask_token_id = mask_token_id
        kwargs.setdefault("architectures", ["LLaDA2MoeModelLM"])
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
