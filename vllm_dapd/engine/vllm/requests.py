"""OpenAI request checks that need the whole request (not just its ``SamplingParams``).

Admission (``engine/vllm/validation.py``) sees a request's ``SamplingParams`` only. A few options never
reach them: ``use_beam_search`` turns a request into vLLM's beam search loop in the API process
(``OpenAIServingCompletion._create_completion`` calls ``beam_search`` with one-token steps and
``BeamSearchParams``), which a masked diffusion model answers with a wrong second beam and no cost.
``install_request_checks`` (called from ``hooks.configure_diffusion_engine``, so only when a
diffusion model is served) wraps the two serving methods that see a request before anything is
scheduled, ``OpenAIServingCompletion.render_completion_request`` and
``OpenAIServingChat.render_chat_request`` (both return an ``ErrorResponse`` for a bad request), and
answers such a request with an HTTP 400 naming the option.

Choices by likelihood: ``structured_outputs: {"choice": [...]}`` is turned, in the same place, into
the scoring option ``score_choices`` (each choice's token ids, ``engine/core/scoring.py``): the request's
``structured_outputs`` is dropped (no grammar is compiled), ``max_tokens`` becomes the longest
choice plus one (its EOS), and the runner answers with the choice of highest ELBO, every choice's
estimate in ``dapd.scores``. Every other structured-output kind stays a 400 (``validation.py``).
vLLM 0.32 no longer parses the older ``guided_choice`` field (it is ignored as an unknown field).
"""

from __future__ import annotations

import functools
from typing import Any, Callable


def request_problem(request: Any) -> tuple[str, str] | None:
    """``(parameter, message)`` for an OpenAI request a diffusion model cannot serve, else None."""
    if getattr(request, "use_beam_search", False):
        return "use_beam_search", ("use_beam_search: not supported with masked diffusion decoding (vllm-dapd): "
                                   "beam search extends a prefix one token at a time; use n with a seed "
                                   "or temperature for several answers")
    return None


CHOICE = "structured_outputs.choice"


def take_choices(request: Any, tokenizer: Any) -> None:
    """Move ``structured_outputs.choice`` into ``vllm_xargs["score_choices"]`` (token ids); raise
    ValueError naming the key for an empty, over-long or blank choice list."""
    from ..core.settings import MAX_CHOICES

    structured = getattr(request, "structured_outputs", None)
    choice = getattr(structured, "choice", None) if structured is not None else None
    if choice is None:
        return
    others = [k for k in ("json", "regex", "grammar", "json_object", "structural_tag")
              if getattr(structured, k, None) not in (None, False)]
    if others:
        raise ValueError(f"structured_outputs: choice cannot be combined with {', '.join(others)}")
    if not choice:
        raise ValueError(f"{CHOICE}: must list at least one choice")
    if len(choice) > MAX_CHOICES:
        raise ValueError(f"{CHOICE}: at most {MAX_CHOICES} choices, got {len(choice)}")
    ids = [tokenizer.encode(c, add_special_tokens=False) for c in choice]
    if not all(ids):
        raise ValueError(f"{CHOICE}: every choice must have at least one token")
    request.vllm_xargs = {**(request.vllm_xargs or {}), "score_choices": ids}
    request.structured_outputs = None
    request.max_tokens = max(len(c) for c in ids) + 1  # the longest choice and its EOS
    if hasattr(request, "max_completion_tokens"):  # chat: this one wins over max_tokens
        request.max_completion_tokens = request.max_tokens


def _checked(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    async def render(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        problem = request_problem(request)
        if problem is None:
            try:
                take_choices(request, self.renderer.get_tokenizer())
            except ValueError as e:
                problem = str(e).split(":", 1)[0], str(e)
        if problem is not None:
            param, message = problem
            return self.create_error_response(message, param=param)
        return await method(self, request, *args, **kwargs)

    render._dapd_checked = True
    return render


def install_request_checks() -> None:
    """Wrap vLLM's OpenAI request rendering with ``request_problem`` (idempotent)."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    for cls, name in ((OpenAIServingCompletion, "render_completion_request"),
                      (OpenAIServingChat, "render_chat_request")):
        method = getattr(cls, name)
        if not getattr(method, "_dapd_checked", False):
            setattr(cls, name, _checked(method))
