"""LLaDA, Dream and LLaDA2 in their real checkpoint layouts, as plain PyTorch modules and as vLLM models.

Map: ``transformer.py`` (the shared math and forward contract), ``attention.py`` (RoPE, SDPA, the
attention hook, the block-causal mask), ``layers.py`` (plain vs vLLM tensor-parallel projection
factory), ``moe.py`` (LLaDA2's router and experts), ``llada.py`` / ``dream.py`` / ``llada2.py``
(config -> spec, checkpoint key layout), ``configs.py`` (AutoConfig classes),
``loading.py`` (plain loading/saving, header-only checks), ``vllm_models.py`` (vLLM classes),
``tokenizer.py`` (offline tokenizers, chat templates, special ids), ``tiny.py`` (test checkpoints).

Import-light on purpose: the parity-fixture script imports submodules under an old transformers
without vLLM. ``register_models`` is what the plugin calls.
"""

from __future__ import annotations

from typing import Any

_registered = False

# vLLM architecture name (config.json "architectures") -> "module:class" of our vLLM model class.
ARCHITECTURES = {
    "LLaDAModelLM": "vllm_dapd.models.vllm_models:LLaDAForDiffusionLM",
    "DreamModel": "vllm_dapd.models.vllm_models:DreamForDiffusionLM",
    "LLaDA2MoeModelLM": "vllm_dapd.models.vllm_models:LLaDA2ForDiffusionLM",
}


def attention_structure(architecture: str, hf_config: Any) -> Any:
    """The decode-time ``transformer.AttentionStructure`` of a checkpoint, from its config alone (what
    the model instance also declares, ``DiffusionTransformer.attention_structure``)."""
    from vllm_dapd.models.transformer import AttentionStructure

    if architecture == "LLaDA2MoeModelLM":
        from vllm_dapd.models.llada2 import llada2_attention

        return llada2_attention(hf_config)
    return AttentionStructure("bidirectional")


def register_models() -> None:
    """Register configs (AutoConfig), Dream's tokenizer name (AutoTokenizer) and the vLLM
    architectures (lazily imported classes). Idempotent; cheap after the first call."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    from vllm_dapd.models.configs import register_configs
    from vllm_dapd.models.tokenizer import register_tokenizers

    register_configs()
    register_tokenizers()
    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    _registered = True
