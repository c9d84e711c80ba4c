"""Where the plugin reaches into vLLM's configuration: only for our diffusion architectures.

vLLM calls ``MODELS_CONFIG_MAP[architecture].verify_and_update_config(vllm_config)`` from
``VllmConfig.__post_init__`` (``try_verify_and_update_config``, vllm/config/vllm.py), *before* the
platform's ``check_and_update_config`` fills ``worker_cls="auto"`` and before eager/cudagraph
settings are resolved. That is the one place that (a) sees the served architecture, (b) runs in the
process that builds the config (the ``LLM`` caller or the API server), whose result is pickled to
the EngineCore process (scheduler) and the workers (runner). An AR model never reaches this code,
so it keeps vLLM's own scheduler and worker.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .names import CPU_WORKER_CLS, GPU_WORKER_CLS, SCHEDULER_CLS, VALIDATOR_CLS

DIFFUSION_ARCHITECTURES = ("LLaDAModelLM", "DreamModel", "LLaDA2MoeModelLM")
logger = logging.getLogger(__name__)
# Answer length of a request without max_tokens when the checkpoint's generation_config.json has no
# max_new_tokens: vLLM would otherwise use the whole model length (minutes of canvas on an 8B model).
DEFAULT_MAX_NEW_TOKENS = 256


def fold_server_defaults(vllm_config: Any) -> Any:
    """Build the server's ``Defaults`` (built-in < checkpoint's ``generation_config.json`` "dapd"
    section < ``additional_config["dapd"]``; ``settings.server_defaults``, which fails naming a bad
    key) and write them back into ``additional_config["dapd"]``, which every engine process
    receives; give requests without ``max_tokens`` a bounded answer length. A block-causal model's
    block size and cache mode ``prefix`` are the defaults under the flags (``declare_attention``)."""
    from ..core.settings import ADDITIONAL_CONFIG_KEY, plan, server_defaults

    model = vllm_config.model_config
    generation = {} if model.generation_config == "vllm" else model.try_get_generation_config()
    if vllm_config.additional_config is None:
        vllm_config.additional_config = {}
    block = declare_attention(vllm_config)
    if block is not None:  # block-causal: the model's block size, and its exact KV reuse, by default
        flags = dict(vllm_config.additional_config.get(ADDITIONAL_CONFIG_KEY) or {})
        vllm_config.additional_config[ADDITIONAL_CONFIG_KEY] = {"block_length": block, "cache_mode": "prefix",
                                                                **flags}
    defaults = server_defaults(vllm_config.additional_config, generation)
    if block is not None:
        plan(defaults, None, 1, 1, block)  # a server default the model cannot take fails at start-up, naming it
    vllm_config.additional_config[ADDITIONAL_CONFIG_KEY] = defaults.as_config()
    if "max_tokens" not in model.get_diff_sampling_param():
        model.override_generation_config = {**(model.override_generation_config or {}),
                                            "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}
    return defaults


def declare_attention(vllm_config: Any) -> int | None:
    """Read the model's attention structure once, from its config (``models.attention_structure``), and
    write it to ``additional_config["dapd_attention"]``, which every engine process receives; returns
    the block size of a block-causal model, else None."""
    from vllm_dapd.models import attention_structure

    from ..core.settings import ATTENTION_KEY, causal_block

    model = vllm_config.model_config
    structure = attention_structure(model.architecture, model.hf_config)
    vllm_config.additional_config[ATTENTION_KEY] = {"kind": structure.kind, "block_size": structure.block_size}
    return causal_block(vllm_config.additional_config)


def keep_json_booleans() -> None:
    """Let ``vllm_xargs`` keep JSON ``true``/``false`` as bools in the OpenAI protocol models.

    vLLM types it ``dict[str, str | int | float | list[...]]``, so pydantic turns ``true`` into ``1``
    before any validator sees it, and ``block_length: true`` would pass as 1. Adding ``bool`` to the
    union (smart mode picks the exact type) keeps the bool, which ``settings`` then refuses for an
    integer key. FastAPI copies a model's schema when a route is declared; vLLM declares its routes
    when it builds the app (after the engine config, i.e. after this hook), so the rebuilt schema is
    the one requests are checked against. Diffusion models only: AR serving keeps vLLM's models.
    """
    import sys

    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    scalar = bool | str | int | float
    for cls in (ChatCompletionRequest, CompletionRequest):
        field = cls.model_fields["vllm_xargs"]
        if getattr(cls, "_dapd_json_booleans", False):
            continue
        field.annotation = dict[str, scalar | list[scalar]] | None
        cls.model_rebuild(force=True)
        cls._dapd_json_booleans = True
    late = [m for m in ("vllm.entrypoints.openai.chat_completion.api_router",
                        "vllm.entrypoints.openai.completion.api_router") if m in sys.modules]
    if late:
        logger.warning("vllm-dapd: %s declared before the engine config; vllm_xargs booleans arrive as 0/1",
                       ", ".join(late))


def configure_diffusion_engine(vllm_config: Any) -> None:
    """Select our scheduler/worker and switch off what a diffusion step cannot use."""
    from vllm.platforms import current_platform

    from .cost import install_response_cost
    from .infill import use_diffusion_renderer
    from .requests import install_request_checks
    from .kernel_kv import choose_attention
    from .live import install as install_live_view
    from .metrics import quiet_spec_decoding_log
    from ..core.settings import causal_block
    from .validation import install_admission

    # A bad server default fails at startup, naming the key; admission resolves requests over these.
    defaults = fold_server_defaults(vllm_config)
    choose_attention(vllm_config)  # kernel or portable attention; a bad --attention-backend fails here
    install_admission()  # each request's one Plan, made where it is admitted (engine/vllm/validation.py)
    keep_json_booleans()
    install_response_cost()  # every OpenAI choice carries its NFE and committed tokens
    install_live_view(defaults.settings.policy)  # GET /dapd/: the canvas live as it denoises
    install_request_checks()  # use_beam_search: 400 (engine/vllm/requests.py)
    quiet_spec_decoding_log()  # our stat logger prints a diffusion line instead
    # Our runner extends vLLM's V1 runner. V2 is chosen lazily from this variable (VllmConfig.
    # use_v2_model_runner), and children inherit it, so every V1/V2 branch (worker, admission-time
    # validator loader, the scheduler's cached request data) takes the V1 side.
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "false", "False"):
        logger.warning("vllm-dapd: diffusion models run on the V1 model runner; ignoring VLLM_USE_V2_MODEL_RUNNER")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    parallel = vllm_config.parallel_config
    if parallel.worker_cls == "auto":
        parallel.worker_cls = CPU_WORKER_CLS if current_platform.is_cpu() else GPU_WORKER_CLS
    scheduler = vllm_config.scheduler_config
    if scheduler.scheduler_cls is None:
        scheduler.scheduler_cls = SCHEDULER_CLS
    scheduler.async_scheduling = False  # our scheduler subclasses the synchronous Scheduler
    # A bidirectional prefix's KV depends on the canvas it was computed with: never share it by hash.
    # Block-causal models keep vLLM's setting: their finished blocks' KV is exact (scheduler.py).
    if causal_block(vllm_config.additional_config) is None:
        vllm_config.cache_config.enable_prefix_caching = False
    # The runner calls the plain-PyTorch model directly: no torch.compile graph, no CUDA graphs.
    model = vllm_config.model_config
    model.enforce_eager = True
    use_diffusion_renderer(model)  # OpenAI ``suffix``: FIM rendering as prompt<mask>suffix (engine/vllm/infill.py)
    # Per-request settings are checked at admission (HTTP 400), see validation.py.
    procs = list(model.logits_processors or [])
    if VALIDATOR_CLS not in procs:
        model.logits_processors = procs + [VALIDATOR_CLS]


def register_engine_hooks() -> None:
    """Add the config hook for each diffusion architecture (idempotent)."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    class DiffusionEngineConfig(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config: Any) -> None:
            configure_diffusion_engine(vllm_config)

    for arch in DIFFUSION_ARCHITECTURES:
        MODELS_CONFIG_MAP.setdefault(arch, DiffusionEngineConfig)
