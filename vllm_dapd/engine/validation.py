"""Admission-time validation of the decoding settings of a request (HTTP 400 instead of a dead engine).

vLLM runs every custom logits processor's ``validate_params(sampling_params)`` in the API process
when a request arrives (``InputProcessor._validate_params`` -> ``validate_logits_processors_parameters``,
vllm/v1/engine/input_processor.py, vllm/v1/sample/logits_processor/__init__.py); a
``VLLMValidationError`` there becomes an HTTP 400 with its message. ``hooks`` adds this class to
``model_config.logits_processors`` for diffusion models only. It never changes logits: our runner
does not run vLLM's sampler at all, and vLLM's runner would see an argmax-invariant no-op.

It only validates. The ``settings.plan`` it runs raises the same errors the scheduler's would, but
its result is thrown away: it cannot know the prompt length (room), so its answer length is not the
request's. The one ``Plan`` a request is served with is made by the scheduler at ``add_request``
(``engine/scheduler.py``) and sent from there to the runner.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from vllm.exceptions import VLLMValidationError
from vllm.logger import init_logger
from vllm.v1.sample.logits_processor import LogitsProcessor

from . import canvas
from .scoring import score_options
from .settings import DecodeSettings, causal_block, plan, server_settings

# vLLM's init_logger: a plain getLogger made before vLLM's dictConfig would be disabled by it.
logger = init_logger("vllm.dapd.validation")

_server: dict[int, DecodeSettings] = {}


def server_defaults() -> DecodeSettings:
    """The serving process's defaults (``additional_config["dapd"]``), read once."""
    settings = _server.get(0)
    if settings is None:
        from vllm.config import get_current_vllm_config_or_none

        config = get_current_vllm_config_or_none()
        settings = _server[0] = server_settings(config.additional_config if config is not None else None)
    return settings


_additional_config: dict[int, Any] = {}


def _server_config() -> Any:
    """The serving process's ``additional_config`` (scoring defaults live in its ``dapd`` section)."""
    if 0 not in _additional_config:
        from vllm.config import get_current_vllm_config_or_none

        config = get_current_vllm_config_or_none()
        _additional_config[0] = config.additional_config if config is not None else None
    return _additional_config[0]


def set_server_defaults(settings: DecodeSettings, additional_config: Any = None) -> None:
    _server[0] = settings
    if additional_config is not None:
        score_options(additional_config, None)  # a bad server default fails at startup, naming the key
        _additional_config[0] = additional_config


# Sampling options our runner does not implement: a clear 400 instead of a silent no-op or a crash
# deeper in vLLM (a grammar would reject tokens; token-id logprobs would be expected back).
UNSUPPORTED = ("structured_outputs", "logit_bias", "allowed_token_ids", "bad_words", "logprob_token_ids",
               "prompt_logprob_token_ids", "prompt_logprob_start")
# ``logprobs`` / ``prompt_logprobs`` are served (engine/scoring.py) for k >= 0; -1 (whole vocabulary) is not.
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


def check_choices(choices: tuple[tuple[int, ...], ...]) -> None:
    """``score_choices`` token ids must be ids of the served model's vocabulary."""
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    if config is None:
        return
    vocab = config.model_config.get_vocab_size()
    if any(t >= vocab for c in choices for t in c):
        raise ValueError(f"score_choices: token ids must be < {vocab} (the vocabulary size)")


class DecodeSettingsValidator(LogitsProcessor):
    """Rejects a request whose ``extra_args`` do not resolve to valid decoding settings, or that asks
    for a sampling option diffusion decoding does not implement."""

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
            # Validation only (the result is dropped): room is not known here (no prompt length),
            # so this is not the request's plan; the scheduler makes that one (engine/scheduler.py).
            max_tokens = sampling_params.max_tokens
            plan(server_defaults(), sampling_params.extra_args, max_tokens, max_tokens or 1,
                 causal_block(_server_config()))
            options = score_options(_server_config(), sampling_params.extra_args)
            if options.choices:
                check_choices(options.choices)
            canvas.check(sampling_params)
        except ValueError as e:
            raise VLLMValidationError(str(e), parameter=str(e).split(":", 1)[0]) from e
        warn_ignored(sampling_params)

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: Any) -> None:
        pass
