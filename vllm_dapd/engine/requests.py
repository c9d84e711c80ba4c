"""OpenAI request checks that need the whole request (not just its ``SamplingParams``).

Admission (``engine/validation.py``) sees a request's ``SamplingParams`` only. A few options never
reach them: ``use_beam_search`` turns a request into vLLM's beam search loop in the API process
(``OpenAIServingCompletion._create_completion`` calls ``beam_search`` with one-token steps and
``BeamSearchParams``), which a masked diffusion model answers with a wrong second beam and no cost.
``install_request_checks`` (called from ``hooks.configure_diffusion_engine``, so only when a
diffusion model is served) wraps the two serving methods that see a request before anything is
scheduled, ``OpenAIServingCompletion.render_completion_request`` and
``OpenAIServingChat.render_chat_request`` (both return an ``ErrorResponse`` for a bad request), and
answers such a request with an HTTP 400 naming the option.
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


def _checked(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    async def render(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        problem = request_problem(request)
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

    for cls, name in ((OpenAIServingCompletion, "render_completion_request"), (OpenAIServingChat, "render_chat_request")):
        method = getattr(cls, name)
        if not getattr(method, "_dapd_checked", False):
            setattr(cls, name, _checked(method))
