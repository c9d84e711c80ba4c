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

DIFFUSION_ARCHITECTURES = ("LLaDAModelLM", "DreamModel")
SCHEDULER_CLS = "vllm_dapd.engine.scheduler.DiffusionScheduler"
VALIDATOR_CLS = "vllm_dapd.engine.validation:DecodeSettingsValidator"
CPU_WORKER_CLS = "vllm_dapd.engine.worker.DiffusionCPUWorker"
GPU_WORKER_CLS = "vllm_dapd.engine.worker.DiffusionGPUWorker"
logger = logging.getLogger(__name__)


def configure_diffusion_engine(vllm_config: Any) -> None:
    """Select our scheduler/worker and switch off what a diffusion step cannot use."""
    from vllm.platforms import current_platform

    from .settings import resolve, server_settings

    from .validation import set_server_defaults

    # A bad server default fails at startup, naming the key; admission validates against these.
    server = server_settings(vllm_config.additional_config)
    resolve(server, None)  # the default policy exists and its parameters are valid
    set_server_defaults(server, vllm_config.additional_config)
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
    # A diffusion prefix's KV depends on the canvas it was computed with: never share it by hash.
    vllm_config.cache_config.enable_prefix_caching = False
    # The runner calls the plain-PyTorch model directly: no torch.compile graph, no CUDA graphs.
    model = vllm_config.model_config
    model.enforce_eager = True
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
