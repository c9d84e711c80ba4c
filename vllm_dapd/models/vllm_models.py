"""vLLM faces of LLaDA, Dream and LLaDA2: the same classes as the plain models, built with vLLM's
tensor-parallel layers (``layers.VllmFactory``) and constructed the way vLLM's model loader does.

Registered by ``vllm_dapd.models.register_models`` under the checkpoint architecture names
``LLaDAModelLM``, ``DreamModel`` and ``LLaDA2MoeModelLM`` (the engine refuses to serve the last one
for now: it is block-causal, see ``engine/vllm/hooks.py``; LLaDA2's routed experts are replicated per
tensor-parallel rank, ``layers.VllmFactory.experts``). Our diffusion runner (not vLLM's autoregressive one) calls
``run`` with one ``StepBatch`` (``forward`` is its keyword form), documented in ``transformer.py``:
besides vLLM's ``input_ids``/``positions`` it carries ``past_key_values`` (prefix KV per layer, [B, Hkv, P, D]),
``use_cache`` (return this forward's KV), ``key_padding_mask`` ([B, P + T]) and the attention hook
arguments, and returns ``ModelOutput`` (logits, optional attention, optional KV) rather than
hidden states. ``compute_logits`` / ``embed_input_ids`` exist so vLLM's interface checks pass.
Under tensor parallelism the KV and the per-rank head counts are local; the attention hook is
summed across ranks; logits come from vLLM's ``LogitsProcessor`` and may be None on ranks > 0
when it gathers to rank 0 (as in vLLM's own models).
Weights go through ``load_weights`` with the checkpoint's own key names (shape-checked, errors
name the key) into vLLM's weight loaders, which take the rank's shard under tensor parallelism.
"""

from __future__ import annotations

from typing import Any

from vllm_dapd.models.dream import Dream
from vllm_dapd.models.layers import VllmFactory
from vllm_dapd.models.llada import LLaDA
from vllm_dapd.models.llada2 import LLaDA2


def _factory(vllm_config: Any, prefix: str) -> VllmFactory:
    return VllmFactory(getattr(vllm_config, "quant_config", None), prefix)


class LLaDAForDiffusionLM(LLaDA):
    def __init__(self, *, vllm_config: Any, prefix: str = ""):
        super().__init__(vllm_config.model_config.hf_config, factory=_factory(vllm_config, prefix))


class DreamForDiffusionLM(Dream):
    def __init__(self, *, vllm_config: Any, prefix: str = ""):
        super().__init__(vllm_config.model_config.hf_config, factory=_factory(vllm_config, prefix))


class LLaDA2ForDiffusionLM(LLaDA2):
    def __init__(self, *, vllm_config: Any, prefix: str = ""):
        super().__init__(vllm_config.model_config.hf_config, factory=_factory(vllm_config, prefix))
