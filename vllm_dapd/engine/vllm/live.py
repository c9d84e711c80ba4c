"""``GET /dapd/``: a live view of the canvas, one static page served by the plugin.

The page (``static/live.html``: plain HTML, CSS and JavaScript, no build step, no external assets)
sends a streamed chat or completion request with ``vllm_xargs={"stream_canvas": 1}``
(``engine/vllm/canvas.py``) and draws each forward's commits as they arrive, every position coloured by
the forward that committed it; the answer (``delta.content``) below, NFE and tokens/forward from the
last chunk's ``dapd`` field at the end. The server fills in its policy names (its default selected).

The route is added through vLLM's endpoint-plugin interface (``vllm.plugins.endpoint_plugins``:
an object with ``attach_router(app)`` and ``init_state``). vLLM loads such plugins only when they
are allow-listed in ``VLLM_PLUGINS``, which would also filter our general plugin; instead
``install`` (called from ``hooks.configure_diffusion_engine``, so only when a diffusion model is
served, in the process that builds the app) wraps ``vllm.plugins.load_endpoint_plugins``, which
``attach_endpoint_plugins`` imports at call time, to add ours to what vLLM loads.
"""

from __future__ import annotations

import functools
import html
from pathlib import Path
from typing import Any

PATH = "/dapd/"
PAGE = Path(__file__).with_name("static") / "live.html"


def render(policies: list[str], default_policy: str) -> str:
    """The page with the server's policies filled in."""
    page = PAGE.read_text(encoding="utf-8")
    options = "\n".join(f'<option value="{html.escape(p)}"{" selected" if p == default_policy else ""}>'
                        f"{html.escape(p)}</option>" for p in policies)
    return page.replace("<!--POLICIES-->", options)


class LiveView:
    """An endpoint plugin (vLLM's ``EndpointPlugin`` protocol) serving the page."""

    name = "dapd-live-view"
    required_tasks = None

    def __init__(self, default_policy: str) -> None:
        self.default_policy = default_policy

    def attach_router(self, app: Any) -> None:
        from fastapi.responses import HTMLResponse, RedirectResponse

        from vllm_dapd.decoding.registry import available_policies

        body = render(sorted(available_policies()), self.default_policy)

        async def live_view() -> HTMLResponse:
            return HTMLResponse(body)

        async def to_live_view() -> RedirectResponse:
            return RedirectResponse(PATH)

        app.add_api_route(PATH, live_view, methods=["GET"], include_in_schema=False)
        app.add_api_route(PATH.rstrip("/"), to_live_view, methods=["GET"], include_in_schema=False)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        pass


def install(default_policy: str) -> None:
    """Add the live view to the endpoint plugins vLLM attaches when it builds the app (idempotent)."""
    import vllm.plugins

    load = vllm.plugins.load_endpoint_plugins
    original = getattr(load, "_dapd_original", load)

    @functools.wraps(original)
    def load_endpoint_plugins(*args: Any, **kwargs: Any) -> list[Any]:
        return [*original(*args, **kwargs), LiveView(default_policy)]

    load_endpoint_plugins._dapd_original = original
    vllm.plugins.load_endpoint_plugins = load_endpoint_plugins
