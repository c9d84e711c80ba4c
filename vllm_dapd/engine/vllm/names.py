"""Where our engine classes live, as the dotted paths vLLM's config takes (``scheduler_cls``,
``worker_cls``, logits processors). A leaf module: ``hooks`` writes them into the config, ``metrics``
recognises our engine by them, and neither imports the other."""

SCHEDULER_CLS = "vllm_dapd.engine.vllm.scheduler.DiffusionScheduler"
VALIDATOR_CLS = "vllm_dapd.engine.vllm.validation:DecodeSettingsValidator"
CPU_WORKER_CLS = "vllm_dapd.engine.vllm.worker.DiffusionCPUWorker"
GPU_WORKER_CLS = "vllm_dapd.engine.vllm.worker.DiffusionGPUWorker"
