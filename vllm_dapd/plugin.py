"""Entry point ``vllm.general_plugins: dapd``. vLLM calls ``register`` in every process; it must be cheap
and idempotent."""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm_dapd.engine.vllm.compat import check_at_startup

    check_at_startup()  # fail start-up, naming vLLM's version, if an internal we rely on changed
    _registered = True
    from vllm_dapd.models import register_models

    register_models()
    from vllm_dapd.engine.vllm.cli import install_cli_option
    from vllm_dapd.engine.vllm.hooks import register_engine_hooks

    register_engine_hooks()
    from vllm_dapd.engine.vllm.infill import register as register_infill

    register_infill()  # the "dapd" tokenizer/renderer mode (OpenAI suffix): resolvable in every process
    install_cli_option()
