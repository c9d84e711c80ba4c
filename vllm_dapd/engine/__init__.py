"""Masked diffusion decoding as a vLLM scheduler + model runner, in two halves.

``core`` (no vLLM import): a request's ``settings.Plan``, its ``sequence.Sequence``, one step
(``stepper.denoise_step``: prepare one ``StepBatch`` -> ``model.run`` -> one policy call per policy),
the KV pages (``kv``), scoring, and ``offline.run``, which loops the step without vLLM.
``vllm`` (the glue): ``scheduler.DiffusionScheduler`` (canvas as draft tokens, paged KV for prompt +
canvas, the admitted plan to the runner) -> ``worker`` / ``runner.DiffusionRunnerMixin.execute_model``
(core's step; committed blocks as ``sampled_token_ids`` and each request's progress) ->
``DiffusionScheduler.update_from_output`` (append, stop checks, stream, record the progress).
Selection (``hooks``), admission (``validation``) and ``--plugin`` (``cli``) are wired by
``vllm_dapd.plugin.register``. See docs/ENGINE_DESIGN.md.
"""
