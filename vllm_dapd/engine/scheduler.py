"""vLLM scheduler for masked diffusion requests: the canvas rides vLLM's speculative-decoding path.

Why this works with the stock ``Scheduler`` (vllm/v1/core/sched/scheduler.py) and a few lines:

- Before every ``schedule()`` each running request gets ``spec_token_ids`` = one placeholder per
  still-masked canvas position (``gen_length - committed``). The base scheduler then schedules
  ``uncomputed committed tokens + canvas`` for it and allocates paged KV slots for all of them, so
  a request owns KV for prompt + whole canvas; the budget and preemption logic stay vLLM's.
- ``num_sampled_tokens_per_step = 0`` (as vLLM sets for its own dLLMs): ``update_from_output``
  then counts the runner's returned tokens as the accepted drafts and rolls ``num_computed_tokens``
  back over the rest. A step that commits nothing returns ``[]`` and leaves the request where it
  was; a step that finishes a block returns the block's tokens (streamed as one output), which are
  appended, stop-checked (EOS, ``max_tokens``) and cut as usual.
- After that, the committed tokens are marked *not computed*, so the next step schedules them as
  real tokens: in ``prefix``/``dual`` modes that forward writes their final KV. With
  ``cache_refresh=block`` the runner also recomputes the rest of the prefix at each block start
  (Fast-dLLM; ``engine/stepper.py``) beyond what is scheduled here. In ``none`` mode the runner
  ignores KV.

Per-request cost: the scheduler keeps vLLM's per-request acceptance record on (what
``--per-request-spec-decode-metrics`` turns on for draft models), which vLLM returns with the final
output (``CompletionOutput.spec_decode_metrics``; ``metrics.speculative_decoding`` in OpenAI
responses with n=1). Here a "spec step" is one forward: ``num_spec_steps`` = NFE and
``num_accepted_draft_tokens / num_spec_steps`` = committed tokens per forward; ``vllm_dapd.cost``
reads it, and ``vllm_dapd/engine/cost.py`` puts it on every OpenAI choice. The same counts go,
summed per step, into ``SchedulerStats.spec_decoding_stats`` for the ``vllm_dapd:`` Prometheus
counters (``vllm_dapd.engine.metrics``).

Trace (``trace=1``): the runner's output carries, per traced request, the canvas positions each
forward committed (``runner.DiffusionRunnerOutput.dapd_trace``); the scheduler collects them and,
on the request's final ``EngineCoreOutput``, puts them in ``routed_experts``, vLLM's one per-sequence
array that reaches ``CompletionOutput`` (``cost.encode_trace``; our dense models route no experts).
``vllm_dapd.trace`` and the ``dapd`` field of OpenAI choices read it back.

Plan (``settings.plan``: settings, policy params, canvas length) is decided here, once per request:
``add_request`` is the first place that knows the prompt length (room = ``max_model_len`` - prompt),
and the plan is kept in ``_plans`` until the request is freed (``_free_request``: finished or
aborted). The scheduler sizes the canvas's KV from it, and hands it to the runner with the request's
first scheduling: ``schedule`` sets ``SchedulerOutput.dapd_plans = {req_id: Plan}`` for that
step's ``scheduled_new_reqs``. The executor pickles the ``SchedulerOutput`` to the worker
processes (``MessageQueue.enqueue``), so the extra attribute arrives; the runner builds its
``Sequence`` from it and keeps it across preemption (a resumed request comes back in
``scheduled_cached_reqs``, without a plan). The admission validator (``engine/validation.py``)
runs the same function only to refuse bad values with an HTTP 400.

Prefix caching: off for bidirectional models (``vllm_dapd.engine.hooks``): there a prefix's KV
depends on the canvas it was computed with, so it is not a function of the tokens. For block-causal
models (LLaDA2) the KV of the prompt's whole blocks and of every finished block is exact, so vLLM's
own automatic prefix caching (pages identified by the hash of their tokens) shares it across
requests, with one change: vLLM hashes a page when it *schedules* its tokens, but our pages hold
final KV only once the runner has written it (a prompt's tail shares a block with the first answer
tokens, and a finished block's KV is written at the next step). So ``allocate_slots`` never caches
(``delay_cache_blocks``) and, after each step, ``update_from_output`` caches a request's pages up to
what the runner has written: the start of the block it denoised (``_final_kv_len``). A page's KV is
then a function of the page's tokens and those before it only if pages end on block boundaries:
caching is shared only when the page size is a multiple of the model's block size (else a warning,
and no page is ever cached). Requests in cache mode ``none`` or scoring ``choices`` write no KV and
cache nothing. A request that hits the cache starts with ``num_computed_tokens`` > 0; the runner
then reads those positions from the pages (``Sequence.cached_len``) and feeds the rest.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.metrics.stats import RequestSpecDecodeMetrics
from vllm.v1.spec_decode.metrics import SpecDecodingStats

from vllm.logger import init_logger

from . import canvas
from .scoring import score_options
from .cost import encode_trace
from .settings import DecodeSettings, Plan, causal_block, plan, server_settings

logger = init_logger("vllm.dapd.scheduler")
_PLACEHOLDER = 0  # draft token value; the runner keeps the real canvas
PLANS = "dapd_plans"  # SchedulerOutput attribute: {req_id: Plan} of the step's newly scheduled requests


class DiffusionScheduler(Scheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_sampled_tokens_per_step = 0
        # Always keep each request's cost record (vLLM only allows the flag with a draft model).
        if self.spec_decode_metrics_level == "none":
            self.spec_decode_metrics_level = "summary"
        self._server: DecodeSettings = server_settings(self.vllm_config.additional_config)
        self._causal = causal_block(self.vllm_config.additional_config)  # block size if block-causal
        self._share_kv = self._causal is not None and self.cache_config.enable_prefix_caching
        if self._share_kv:
            self._share_kv = self.cache_config.block_size % self._causal == 0
            if not self._share_kv:
                logger.warning("vllm-dapd: prefix caching shares nothing: the page size %d is not a multiple of "
                               "the model's block size %d (pass --block-size N * %d)", self.cache_config.block_size,
                               self._causal, self._causal)
            allocate = self.kv_cache_manager.allocate_slots

            def allocate_slots(*args: Any, **kwargs: Any) -> Any:  # pages are cached after the runner wrote them
                kwargs["delay_cache_blocks"] = True
                return allocate(*args, **kwargs)

            self.kv_cache_manager.allocate_slots = allocate_slots
        self._plans: dict[str, Plan] = {}  # live requests: made at add_request, dropped in _free_request
        self._no_kv: set[str] = set()  # live requests that write no KV (scoring ``choices``)
        self._unobserved_stats: SpecDecodingStats | None = None
        self._trace: dict[str, list[tuple[int, list[int]]]] = {}  # running traced requests
        self._freed_trace: dict[str, list[tuple[int, list[int]]]] = {}  # freed, until their last output

    def plan_of(self, request_id: str) -> Plan:
        """The request's plan, as decided at ``add_request`` (KeyError once the request is freed)."""
        return self._plans[request_id]

    def gen_length(self, request: Any) -> int:
        return self._plans[request.request_id].gen_length

    def schedule(self, throttle_prefills: bool = False):
        for request in self.running:
            remaining = self.gen_length(request) - request.num_output_tokens
            request.spec_token_ids = [_PLACEHOLDER] * max(remaining, 0)
        output = super().schedule(throttle_prefills)
        # The runner's only source of a request's settings and canvas (runner._update_sequences).
        setattr(output, PLANS, {new.req_id: self._plans[new.req_id] for new in output.scheduled_new_reqs})
        return output

    def add_request(self, request: Any) -> None:
        # An id already present is a streaming-input session's next chunk (vLLM queues it onto the
        # existing request): that request keeps the plan it was admitted with.
        new = request.request_id not in self.requests
        if new:
            room = self.max_model_len - request.num_prompt_tokens
            self._plans[request.request_id] = plan(self._server, request.sampling_params.extra_args,
                                                   request.max_tokens, room, self._causal,
                                                   request.num_prompt_tokens)
            if self._share_kv and score_options(self.vllm_config.additional_config,
                                                request.sampling_params.extra_args).choices:
                self._no_kv.add(request.request_id)
        super().add_request(request)
        if new and request.spec_decode_metrics is not None:
            # The histogram is indexed by tokens accepted in one step: up to a whole block.
            request.spec_decode_metrics = RequestSpecDecodeMetrics.new(self.gen_length(request))

    def update_from_output(self, scheduler_output, model_runner_output):
        canvases = getattr(model_runner_output, "dapd_canvas", None)
        outputs = self._step_outputs(scheduler_output, model_runner_output)
        if canvases:  # stream_canvas=1: one output per forward (engine/canvas.py)
            canvas.attach(outputs, canvases, self.requests, self._bare_output)
        return outputs

    def _bare_output(self, request: Any, carrier: Any) -> Any:
        """An output without tokens, for a forward of a stream_canvas request that finished no block
        (what the base class emits, less the tokens; its first one carries the prefill stats)."""
        from vllm.v1.engine import EngineCoreOutput

        prefill_stats = request.take_prefill_stats()
        if prefill_stats is not None:
            prefill_stats.finalize(self.kv_cache_manager.estimate_cached_tokens(request))
        return EngineCoreOutput(request_id=request.request_id, new_token_ids=[], prefill_stats=prefill_stats,
                                events=request.take_events(), trace_headers=request.trace_headers,
                                new_sampling_mask=carrier)

    def _final_kv_len(self, request: Any) -> int:
        """Leading positions of ``request`` whose final KV the runner has in the pages after a step that
        denoised it (block-causal, cache mode ``prefix``; 0: cache nothing): the start of the block it
        denoised, i.e. the prompt's whole blocks, then every block committed before this step."""
        p = self._plans[request.request_id]
        if p.settings.cache_mode != "prefix" or request.num_computed_tokens < request.num_prompt_tokens:
            return 0
        committed = request.num_output_tokens
        return request.num_prompt_tokens + committed if committed else \
            request.num_prompt_tokens // self._causal * self._causal

    def _step_outputs(self, scheduler_output, model_runner_output):
        if self._share_kv:  # before the base class frees finished requests
            for req_id in scheduler_output.num_scheduled_tokens:
                request = self.requests.get(req_id)
                if request is not None and req_id not in self._no_kv:
                    self.kv_cache_manager.cache_blocks(request, self._final_kv_len(request))
        for req_id, entries in getattr(model_runner_output, "dapd_trace", {}).items():
            if req_id in self.requests:
                self._trace.setdefault(req_id, []).extend(entries)
        index = model_runner_output.req_id_to_index
        # Forwards the base class does not count: the runner also denoises in the step that
        # completes a prompt (no drafts scheduled then), so NFE = num_spec_steps exactly.
        unobserved = []
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if (request is not None and request.spec_decode_metrics is not None and not request.is_finished()
                    and req_id not in scheduler_output.scheduled_spec_decode_tokens
                    and request.num_computed_tokens >= request.num_prompt_tokens and req_id in index):
                # (canvas, committed) read now: the base class may finish and free the request.
                unobserved.append((request, self.gen_length(request),
                                   len(model_runner_output.sampled_token_ids[index[req_id]])))
        if self.log_stats and unobserved:
            # Counted into this step's SchedulerStats by make_stats (called inside the base class).
            self._unobserved_stats = _new_stats()
            for _, canvas, committed in unobserved:
                _add(self._unobserved_stats, canvas, committed)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self._unobserved_stats = None
        if self._freed_trace:
            for batch in outputs.values():
                for out in batch.outputs:
                    entries = self._freed_trace.get(out.request_id)
                    if entries is not None and out.finish_reason is not None:
                        out.routed_experts = encode_trace(entries)
            self._freed_trace.clear()  # also drops traces of aborted requests
        for request, canvas, committed in unobserved:
            request.spec_decode_metrics.observe(num_draft_tokens=canvas, num_accepted=committed,
                                                detailed=self.spec_decode_metrics_level == "detailed")
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None or request.is_finished() or req_id not in index:
                continue
            committed = len(model_runner_output.sampled_token_ids[index[req_id]])
            # Committed tokens are rescheduled next step so their final KV gets written.
            request.num_computed_tokens = min(request.num_computed_tokens,
                                              request.num_tokens - committed)
        return outputs

    def make_spec_decoding_stats(self, spec_decoding_stats, num_draft_tokens, num_accepted_tokens,
                                 num_invalid_spec_tokens=None, request_id=None):
        """Aggregate cost for ``SchedulerStats``: one "draft" per request per forward, accepted = committed.

        The per-position lists stay empty (a canvas is not a draft sequence); ``vllm_dapd.metrics``
        turns these into the ``vllm_dapd:`` Prometheus counters."""
        if not self.log_stats:
            return None
        if spec_decoding_stats is None:
            spec_decoding_stats = _new_stats()
        _add(spec_decoding_stats, num_draft_tokens, num_accepted_tokens)
        return spec_decoding_stats

    def make_stats(self, spec_decoding_stats=None, *args: Any, **kwargs: Any):
        extra = self._unobserved_stats
        if extra is not None:
            self._unobserved_stats = None
            if spec_decoding_stats is None:
                spec_decoding_stats = extra
            else:
                _add(spec_decoding_stats, extra.num_draft_tokens, extra.num_accepted_tokens, extra.num_drafts)
        return super().make_stats(spec_decoding_stats, *args, **kwargs)

    def _free_request(self, request, *args: Any, **kwargs: Any):
        self._plans.pop(request.request_id, None)
        self._no_kv.discard(request.request_id)
        entries = self._trace.pop(request.request_id, None)
        if entries is not None:
            self._freed_trace[request.request_id] = entries
        return super()._free_request(request, *args, **kwargs)


def _new_stats() -> SpecDecodingStats:
    return SpecDecodingStats(num_spec_tokens=0)


def _add(stats: SpecDecodingStats, canvas: int, committed: int, forwards: int = 1) -> None:
    stats.num_drafts += forwards
    stats.num_draft_tokens += canvas
    stats.num_accepted_tokens += committed
