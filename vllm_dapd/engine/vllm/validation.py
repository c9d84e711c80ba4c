"""Admission: each request is resolved once (``settings.plan``) and refused with an HTTP 400 if bad.

Two vLLM hooks in the process that admits requests (the API server, or the ``vllm.LLM`` caller):

- ``DecodeSettingsValidator.validate_params(sampling_params)``: vLLM runs every custom logits
  processor's ``validate_params`` when a request arrives (``InputProcessor._validate_params`` ->
  ``validate_logits_processors_parameters``, vllm/v1/engine/input_processor.py,
  vllm/v1/sample/logits_processor/__init__.py); a ``VLLMValidationError`` there becomes an HTTP 400
  with its message. ``hooks`` adds this class to ``model_config.logits_processors`` for diffusion
  models only. It checks the sampling options our runner does not implement and never changes
  logits (our runner does not run vLLM's sampler). It sees only the caller's ``SamplingParams``,
  before the prompt is tokenised, so it cannot size the canvas.
- ``admit``, run by ``install_admission``'s wrapper of ``InputProcessor.process_inputs`` on the
  request it returns: the prompt is tokenised and ``max_tokens`` final there, and the request owns
  its copy of the params. ``admit`` calls ``settings.plan`` (the request's one resolution), checks
  what needs the served model (``score_choices`` ids within the vocabulary; ``stream_canvas`` only
  on a streamed request), and attaches the plan as a plain dict under
  ``extra_args[settings.PLAN_KEY]``, which vLLM carries to the EngineCore; a bad value is a
  ``VLLMValidationError`` naming the key, as from ``validate_params``. With ``n > 1`` vLLM fans the
  admitted request out into ``n`` engine requests that share its params, hence its plan. Each
  chunk of a streaming-input session passes ``process_inputs`` and so is admitted (checked) on its
  own; the scheduler keeps the plan of the session's first chunk.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from vllm.exceptions import VLLMValidationError
from vllm.logger import init_logger
from vllm.v1.sample.logits_processor import LogitsProcessor

from . import canvas
from .names import VALIDATOR_CLS
from ..core.settings import PLAN_KEY, Defaults, Plan, causal_block, plan, server_defaults

# vLLM's init_logger: a plain getLogger made before vLLM's dictConfig would be disabled by it.
logger = init_logger("vllm.dapd.validation")


# Sampling options our runner does not implement: a clear 400 instead of a silent no-op or a crash
# deeper in vLLM (a grammar would reject tokens; token-id logprobs would be expected back).
UNSUPPORTED = ("structured_outputs", "logit_bias", "allowed_token_ids", "bad_words", "logprob_token_ids",
               "prompt_logprob_token_ids", "prompt_logprob_start")
# ``logprobs`` / ``prompt_logprobs`` are served (engine/core/scoring.py) for k >= 0; -1 (whole vocabulary) is not.
LOGPROBS = ("logprobs", "prompt_logprobs")


# Sampling options that have no meaning for a policy's commit rule: accepted, logged as ignored.
IGNORED = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
           "repetition_penalty": 1.0}
_INT64 = 2**63
_warned: set[str] = set()


def warn_ignored(sampling_params: Any) -> list[str]:
    """Names of the ignored options this request sets; each is logged once per process (a checkpoint's
    generation_config.json may set top_p for every request, so a 400 would refuse them all)."""
    ignored = [name for name, neutral in IGNORED.items() if getattr(sampling_params, name, neutral) != neutral]
    new = [name for name in ignored if name not in _warned]
    if new:
        _warned.update(new)
        logger.warning("vllm-dapd: %s ignored: the unmasking policy decides which tokens to commit "
                       "(temperature and seed apply; this is logged once per option)", ", ".join(new))
    return ignored


def check_sampling(sampling_params: Any) -> None:
    """The numbers our runner puts in tensors: ``seed`` (int64), ``temperature`` (finite float32)."""
    seed = getattr(sampling_params, "seed", None)
    if seed is not None and not -_INT64 <= seed < _INT64:
        raise ValueError(f"seed: must fit a signed 64-bit integer, got {seed}")
    temperature = getattr(sampling_params, "temperature", 0.0)
    if not math.isfinite(temperature) or abs(temperature) > float(torch.finfo(torch.float32).max):
        raise ValueError(f"temperature: must be a finite number, got {temperature!r}")


def check_choices(choices: tuple[tuple[int, ...], ...], vocab_size: int) -> None:
    """``score_choices`` token ids must be ids of the served model's vocabulary."""
    if any(t >= vocab_size for c in choices for t in c):
        raise ValueError(f"score_choices: token ids must be < {vocab_size} (the vocabulary size)")


def check_no_hole(prompt_ids: list[int] | None, hf_config: Any) -> None:
    """A block-causal model cannot infill: the suffix after the hole would be a later block, which
    no step attends. Refuses a prompt with the mask token (a ``suffix``, or a hole written in it)."""
    mask_id = getattr(hf_config, "mask_token_id", None)
    if prompt_ids is not None and mask_id is not None and int(mask_id) in prompt_ids:
        raise VLLMValidationError("suffix: infilling (a suffix, or a mask token in the prompt) needs a "
                                  "bidirectional model; the served model is block-causal and never attends "
                                  "a later block", parameter="suffix")


def _refusal(e: ValueError) -> VLLMValidationError:
    return VLLMValidationError(str(e), parameter=str(e).split(":", 1)[0])


def admit(sampling_params: Any, prompt_len: int, defaults: Defaults, max_model_len: int,
          vocab_size: int | None = None, causal: int | None = None) -> Plan:
    """Resolve an admitted request (its own ``SamplingParams``, ``max_tokens`` filled) once and
    attach the plan under ``extra_args[PLAN_KEY]``; a bad value is a VLLMValidationError naming it."""
    try:
        p = plan(defaults, sampling_params.extra_args, sampling_params.max_tokens, max_model_len - prompt_len,
                 causal, prompt_len)
        if p.score.choices and vocab_size is not None:
            check_choices(p.score.choices, vocab_size)
        if p.stream_canvas:
            canvas.check(sampling_params)
    except ValueError as e:
        raise _refusal(e) from e
    # A new dict: the caller's (shared when vLLM skips the clone) keeps what it had.
    sampling_params.extra_args = {**(sampling_params.extra_args or {}), PLAN_KEY: p.to_dict()}
    return p


def _defaults(processor: Any) -> Defaults:
    """The serving process's defaults (the folded ``additional_config["dapd"]``), read once."""
    defaults = getattr(processor, "_dapd_defaults", None)
    if defaults is None:
        defaults = processor._dapd_defaults = server_defaults(processor.vllm_config.additional_config)
    return defaults


def install_admission() -> None:
    """Wrap ``InputProcessor.process_inputs`` so that every request it makes for a diffusion model
    leaves it with its plan (``admit``). Idempotent; a model without our validator is left alone.
    Installed before the engine builds its ``InputProcessor``, whose async variant is made from
    ``self.process_inputs`` at construction, so it goes through the wrapper too."""
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, "_dapd_admits", False):
        return

    @functools.wraps(original)
    def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        request = original(self, *args, **kwargs)
        model = self.model_config
        if request.sampling_params is not None and VALIDATOR_CLS in (model.logits_processors or ()):
            prompt_len = (len(request.prompt_token_ids) if request.prompt_token_ids is not None
                          else len(request.prompt_embeds))
            causal = causal_block(self.vllm_config.additional_config)
            if causal is not None and request.sampling_params.prompt_logprobs is None:
                check_no_hole(request.prompt_token_ids, model.hf_config)
            admit(request.sampling_params, prompt_len, _defaults(self), model.max_model_len,
                  model.get_vocab_size(), causal)
        return request

    process_inputs._dapd_admits = True
    InputProcessor.process_inputs = process_inputs


class DecodeSettingsValidator(LogitsProcessor):
    """Rejects a request that asks for a sampling option diffusion decoding does not implement, or
    whose seed or temperature do not fit our tensors (its settings are ``admit``'s)."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        for name in UNSUPPORTED:
            value = getattr(sampling_params, name, None)
            if value is not None and not (isinstance(value, (list, dict)) and not value):
                raise VLLMValidationError(f"{name}: not supported with masked diffusion decoding (vllm-dapd)",
                                          parameter=name)
        for name in LOGPROBS:
            if (getattr(sampling_params, name, None) or 0) < 0:
                raise VLLMValidationError(f"{name}: -1 (the whole vocabulary) is not supported with masked "
                                          "diffusion decoding (vllm-dapd); ask for k >= 0", parameter=name)
        try:
            check_sampling(sampling_params)
        except ValueError as e:
            raise _refusal(e) from e
        warn_ignored(sampling_params)

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: Any) -> None:
        pass
