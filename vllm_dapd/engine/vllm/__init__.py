"""The vLLM glue of the diffusion engine: scheduler, model runner, workers, hooks, admission,
metrics, serving patches and the checked list of private vLLM symbols (``compat``). It drives
``vllm_dapd.engine.core``; the core never imports it."""
