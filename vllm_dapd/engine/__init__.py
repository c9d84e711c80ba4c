"""The vLLM-facing engine: masked diffusion decoding as a vLLM scheduler + model runner.

Data flow of one engine step (see docs/ENGINE_DESIGN.md):
``scheduler.DiffusionScheduler.schedule`` (canvas as draft tokens, paged KV for prompt + canvas)
-> ``worker``/``runner.DiffusionRunnerMixin.execute_model`` (per-request ``sequence.Sequence``)
-> ``stepper.denoise_step`` (prepare one ``StepBatch`` -> ``model.run`` -> one policy call per
policy; ``kv.PagedKV`` for prefix/dual) -> committed blocks as ``sampled_token_ids`` and each
request's progress (``runner.Progress``) -> ``DiffusionScheduler.update_from_output`` (append, stop
checks, stream, re-feed for KV, record the progress). ``offline.run`` loops the same step without vLLM.
Selection (``hooks``), per-request settings (``settings``), admission checks (``validation``) and
``--plugin`` (``cli``) are wired by ``vllm_dapd.plugin.register``.
"""
