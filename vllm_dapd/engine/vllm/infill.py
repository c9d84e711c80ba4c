"""Infilling: OpenAI ``suffix`` on ``/v1/completions``, through vLLM's own FIM rendering hook.

vLLM 0.32 answers a completion request with a ``suffix`` by asking the served model's renderer for
``render_completion_suffix(prompt, suffix)`` (vllm/renderers/online_renderer.py); the base renderer
returns None, which is the 400 "suffix is only supported for models with FIM completion rendering".
A model opts in through its ``tokenizer_mode``, which picks both the tokenizer class and the
renderer class (``TokenizerRegistry`` / ``RENDERER_REGISTRY``, as vLLM's ``cohere`` mode does).
``register`` adds the mode ``dapd`` (vLLM's HF tokenizer, ``DiffusionRenderer``) in every process
(general plugins load everywhere); ``hooks.configure_diffusion_engine`` sets it for our diffusion
architectures when the mode is ``auto``/``hf``, as vLLM itself defaults DeepSeek-V4 to its own.

The rendered prompt is ``prompt + <mask> + suffix``: the hole is one mask token, the dLLM's own
notation for "fill this in". So there is one request format for every entry point: a
``vllm.LLM`` user writes the same template (text with the mask token, or token ids). The runner
splits a prompt at its first mask token (``split_hole``): the tokens before it are the prompt, the
tokens after it the suffix, and the canvas of ``max_tokens`` masks goes in between
(``sequence.Sequence.suffix``). The suffix is fixed context: every step attends it, no policy commits
over it, and the returned text is the canvas alone. vLLM counts the hole and the suffix as prompt
tokens (``usage.prompt_tokens``, the ``max_model_len`` check), so its KV accounting covers prompt +
suffix + canvas with one slot to spare.

Every policy and cache mode takes a suffix. Cache mode ``none`` equals the reference loop
(``vllm_dapd.decoding.denoise(..., suffix_ids=...)``) token for token; ``prefix`` feeds the suffix
with the canvas at every step (its KV depends on the canvas, so it is never final); ``dual`` caches
it with the canvas after the active block (Fast-dLLM's dual cache). Those two are Fast-dLLM's
approximations, as without a suffix; no literal Fast-dLLM loop with a suffix exists to compare.

Refused with an HTTP 400 naming ``suffix`` (``check_suffix``): an empty suffix, one that contains
the mask token (or a prompt that does, with a suffix: the hole would be ambiguous), and one that
leaves no room for an answer in ``max_model_len``. A prompt with ``prompt_logprobs`` is scored as
written (no hole is split off: the scorer's ELBO is over the prompt's own tokens).
"""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMValidationError
from vllm.renderers.hf import HfRenderer

MODE = "dapd"  # the tokenizer_mode (and renderer mode) of diffusion models


def split_hole(prompt: list[int], mask_id: int) -> tuple[list[int], list[int]]:
    """``(prompt, suffix)``: the tokens before and after the prompt's first mask token (the hole);
    ``(prompt, [])`` when it has none."""
    try:
        hole = prompt.index(mask_id)
    except ValueError:
        return prompt, []
    return prompt[:hole], prompt[hole + 1:]


def mask_token(hf_config: Any, tokenizer: Any) -> tuple[int, str]:
    """The model's mask token id (its config's ``mask_token_id``) and its text in ``tokenizer``."""
    mask_id = int(hf_config.mask_token_id)
    return mask_id, tokenizer.convert_ids_to_tokens(mask_id)


def check_suffix(prompt_ids: list[int], suffix_ids: list[int], mask_id: int, max_model_len: int) -> None:
    """Raise ValueError naming ``suffix`` (or ``prompt``) for an infilling request that cannot run."""
    if not suffix_ids:
        raise ValueError("suffix: must not be empty (leave it out for a plain completion)")
    if mask_id in suffix_ids:
        raise ValueError("suffix: must not contain the mask token (the suffix is fixed context)")
    if mask_id in prompt_ids:
        raise ValueError("prompt: must not contain the mask token when a suffix is given (the hole "
                         "between prompt and suffix is the only one)")
    room = max_model_len - len(prompt_ids) - 1 - len(suffix_ids)
    if room < 1:
        raise ValueError(f"suffix: too long: prompt ({len(prompt_ids)} tokens) + suffix ({len(suffix_ids)} "
                         f"tokens) leave no room for an answer in max_model_len {max_model_len}")


class DiffusionRenderer(HfRenderer):
    """vLLM's HF renderer plus FIM rendering for masked diffusion models: ``prompt<mask>suffix``."""

    def render_completion_suffix(self, prompt: str, suffix: str) -> str | None:
        tokenizer = self.get_tokenizer()
        mask_id, mask = mask_token(self.model_config.hf_config, tokenizer)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        suffix_ids = tokenizer.encode(suffix, add_special_tokens=False)
        try:
            check_suffix(prompt_ids, suffix_ids, mask_id, self.model_config.max_model_len)
        except ValueError as e:
            raise VLLMValidationError(str(e), parameter=str(e).split(":", 1)[0]) from e
        return f"{prompt}{mask}{suffix}"


def register() -> None:
    """Add the ``dapd`` tokenizer/renderer mode (idempotent; cheap: no import of the renderer)."""
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    if MODE not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register(MODE, "vllm.tokenizers.hf", "CachedHfTokenizer")
    if MODE not in RENDERER_REGISTRY.renderers:
        RENDERER_REGISTRY.register(MODE, __name__, "DiffusionRenderer")


def use_diffusion_renderer(model_config: Any) -> None:
    """Serve a diffusion model through ``DiffusionRenderer`` (an explicit other mode is kept)."""
    register()
    if model_config.tokenizer_mode in ("auto", "hf"):
        model_config.tokenizer_mode = MODE
