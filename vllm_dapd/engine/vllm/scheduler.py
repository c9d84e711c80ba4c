"""vLLM scheduler for masked diffusion requests: the canvas rides vLLM's speculative-decoding path.

Why this works with the stock ``Scheduler`` (vllm/v1/core/sched/scheduler.py) and a few lines:

- Before every ``schedule()`` each running request gets ``spec_token_ids`` = one placeholder per
  still-masked canvas position (``gen_length - committed``). The base scheduler then schedules
  ``uncomputed committed tokens + canvas`` for it and allocates paged KV slots for all of them, so
  a request owns KV for prompt + whole canvas; the budget and preemption logic stay vLLM's.
- ``num_sampled_tokens_per_step = 0`` (as vLLM sets for its own dLLMs): ``update_from_output``
  then counts the runner's returned tokens as the accepted drafts and rolls ``num_computed_tokens``
  back over the rest. A step that releases nothing returns ``[]`` and leaves the request where it
  was; otherwise it returns the tokens the request releases (a finished block's, and the committed
  prefix of the active block: ``runner``), streamed as one output, appended, stop-checked (EOS,
  ``max_tokens``) and cut as usual.
- After that, the committed tokens are marked *not computed*, so the next step schedules them as
  real tokens: in ``prefix``/``dual`` modes that forward writes their final KV. With
  ``cache_refresh=block`` the runner also recomputes the rest of the prefix at each block start
  (Fast-dLLM; ``engine/core/stepper.py``) beyond what is scheduled here. In ``none`` mode the runner
  ignores KV.

Per-request cost: the runner reports, per request it ran, its forwards, committed tokens and
not-yet-returned canvas (``runner.DiffusionRunnerOutput.dapd_progress``); the scheduler records
exactly that and infers nothing. It goes into vLLM's per-request acceptance record (what
``--per-request-spec-decode-metrics`` turns on for draft models; here always on), which vLLM
returns with the final output (``CompletionOutput.spec_decode_metrics``;
``metrics.speculative_decoding`` in OpenAI responses with n=1): a "spec step" is one forward,
``num_spec_steps`` = NFE and ``num_accepted_draft_tokens / num_spec_steps`` = committed tokens per
forward; ``vllm_dapd.cost`` reads it, and ``vllm_dapd/engine/vllm/cost.py`` puts it on every OpenAI
choice. ``RunnerRecord`` ignores vLLM's own per-draft observations (the runner also runs forwards
vLLM schedules no drafts for, e.g. the step completing a prompt). The same counts go, summed per
step, into ``SchedulerStats.spec_decoding_stats`` for the ``vllm_dapd:`` Prometheus counters
(``vllm_dapd.engine.vllm.metrics``).

Trace (``trace=1``): the runner's output carries, per traced request, the canvas positions each
forward committed (``runner.DiffusionRunnerOutput.dapd_trace``); the scheduler collects them and,
on the request's final ``EngineCoreOutput``, puts them in ``routed_experts``, vLLM's one per-sequence
array that reaches ``CompletionOutput`` (``cost.encode_trace``; our dense models route no experts).
``vllm_dapd.trace`` and the ``dapd`` field of OpenAI choices read it back.

Plan (``settings.Plan``: settings, policy params, canvas length, scoring options): made once per
request, at admission (``validation.admit``), and carried here in ``extra_args[settings.PLAN_KEY]``;
``add_request`` reads it back (``Plan.from_dict``, no re-resolution) and keeps it in ``_plans``
until the request is freed (``_free_request``: finished or aborted). A request that arrives without
one (an ``EngineCoreRequest`` handed to the engine directly skips admission) is resolved here,
once (``settings.plan``, room = ``max_model_len`` - prompt). The scheduler sizes the canvas's KV
from the plan and hands it to the runner with the request's first scheduling: ``schedule`` returns
a ``DiffusionSchedulerOutput``, vLLM's ``SchedulerOutput`` plus the declared field ``dapd_plans =
{req_id: Plan}`` for that step's ``scheduled_new_reqs``. The executor hands the object to the
workers as is (in process) or pickled (``MessageQueue.enqueue``); the runner builds its
``Sequence`` from the plan and keeps it across preemption (a resumed request comes back in
``scheduled_cached_reqs``, without a plan).

Prefix caching: off for bidirectional models (``vllm_dapd.engine.vllm.hooks``): there a prefix's KV
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

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.metrics.stats import RequestSpecDecodeMetrics
from vllm.v1.spec_decode.metrics import SpecDecodingStats
from vllm.logger import init_logger

from . import canvas
from .cost import encode_trace
from ..core.settings import PLAN_KEY, Defaults, Plan, causal_block, plan, server_defaults

logger = init_logger("vllm.dapd.scheduler")
_PLACEHOLDER = 0  # draft token value; the runner keeps the real canvas


@dataclass
class DiffusionSchedulerOutput(SchedulerOutput):
    """vLLM's ``SchedulerOutput`` plus the plan of each request scheduled for the first time."""

    dapd_plans: dict[str, Plan] = field(default_factory=dict)

    @classmethod
    def of(cls, output: SchedulerOutput, plans: dict[str, Plan]) -> "DiffusionSchedulerOutput":
        """``output``'s fields (the same objects, not copies) and ``plans``."""
        return cls(**{f.name: getattr(output, f.name) for f in dataclasses.fields(SchedulerOutput)},
                   dapd_plans=plans)


class DiffusionScheduler(Scheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_sampled_tokens_per_step = 0
        # Always keep each request's cost record (vLLM only allows the flag with a draft model).
        if self.spec_decode_metrics_level == "none":
            self.spec_decode_metrics_level = "summary"
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
        self._defaults: Defaults | None = None  # for requests that skipped admission (made when needed)
        self._plans: dict[str, Plan] = {}  # live requests: read at add_request, dropped in _free_request
        self._step_stats: SpecDecodingStats | None = None  # the runner's report, until make_stats reads it
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
        return DiffusionSchedulerOutput.of(output, {new.req_id: self._plans[new.req_id]
                                                    for new in output.scheduled_new_reqs})

    def add_request(self, request: Any) -> None:
        # An id already present is a streaming-input session's next chunk (vLLM queues it onto the
        # existing request): that request keeps the plan it was admitted with.
        new = request.request_id not in self.requests
        if new:
            self._plans[request.request_id] = self._admitted_plan(request)
        super().add_request(request)
        if new and request.spec_decode_metrics is not None:
            # The histogram is indexed by tokens accepted in one step: up to a whole block.
            request.spec_decode_metrics = RunnerRecord.new(self.gen_length(request))

    def _admitted_plan(self, request: Any) -> Plan:
        """The plan admission attached; resolved here only for a request that skipped admission."""
        extra_args = request.sampling_params.extra_args or {}
        if PLAN_KEY in extra_args:
            return Plan.from_dict(extra_args[PLAN_KEY])
        if self._defaults is None:
            self._defaults = server_defaults(self.vllm_config.additional_config)
        return plan(self._defaults, extra_args, request.max_tokens, self.max_model_len - request.num_prompt_tokens,
                    self._causal, request.num_prompt_tokens)

    def update_from_output(self, scheduler_output, model_runner_output):
        canvases = getattr(model_runner_output, "dapd_canvas", None)
        outputs = self._step_outputs(scheduler_output, model_runner_output)
        if canvases:  # stream_canvas=1: one output per forward (engine/vllm/canvas.py)
            canvas.attach(outputs, canvases, self.requests, self._bare_output)
        return outputs

    def _bare_output(self, request: Any, carrier: Any) -> Any:
        """An output without tokens, for a forward of a stream_canvas request that handed out no tokens
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
        denoised it (block-causal, cache mode ``prefix``; 0: cache nothing): the prompt's whole blocks,
        then every block finished before this step. Tokens returned before this step end in the block
        denoised now at the latest (the runner also returns a block's committed prefix before the block
        ends), so that is the grid start of the block holding the first position not yet returned."""
        p = self._plans[request.request_id]
        if p.settings.cache_mode != "prefix" or p.score.choices or request.num_computed_tokens < request.num_prompt_tokens:
            return 0
        return (request.num_prompt_tokens + request.num_output_tokens) // self._causal * self._causal

    def _step_outputs(self, scheduler_output, model_runner_output):
        if self._share_kv:  # before the base class frees finished requests
            for req_id in scheduler_output.num_scheduled_tokens:
                request = self.requests.get(req_id)
                if request is not None:
                    self.kv_cache_manager.cache_blocks(request, self._final_kv_len(request))
        for req_id, entries in getattr(model_runner_output, "dapd_trace", {}).items():
            if req_id in self.requests:
                self._trace.setdefault(req_id, []).extend(entries)
        self._record(getattr(model_runner_output, "dapd_progress", {}))
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self._step_stats = None
        index = model_runner_output.req_id_to_index
        if self._freed_trace:
            for batch in outputs.values():
                for out in batch.outputs:
                    entries = self._freed_trace.get(out.request_id)
                    if entries is not None and out.finish_reason is not None:
                        out.routed_experts = encode_trace(entries)
            self._freed_trace.clear()  # also drops traces of aborted requests
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None or request.is_finished() or req_id not in index:
                continue
            committed = len(model_runner_output.sampled_token_ids[index[req_id]])
            # Committed tokens are rescheduled next step so their final KV gets written.
            request.num_computed_tokens = min(request.num_computed_tokens,
                                              request.num_tokens - committed)
        return outputs

    def _record(self, progress: dict[str, Any]) -> None:
        """The runner's per-request progress into each request's record (before the base class may
        finish the request and emit it) and into this step's stats (``make_stats``)."""
        stats = _new_stats() if self.log_stats and progress else None
        for req_id, p in progress.items():
            request = self.requests.get(req_id)
            if request is None or request.is_finished():
                continue
            if isinstance(request.spec_decode_metrics, RunnerRecord):
                request.spec_decode_metrics.record(p.canvas, p.committed, p.forwards,
                                                   detailed=self.spec_decode_metrics_level == "detailed")
            if stats is not None:
                _add(stats, p.canvas, p.committed, p.forwards)
        self._step_stats = stats

    def make_spec_decoding_stats(self, spec_decoding_stats, *args: Any, **kwargs: Any):
        """vLLM's per-draft count is ignored: the runner's report is the record (``make_stats``)."""
        return spec_decoding_stats

    def make_stats(self, spec_decoding_stats=None, *args: Any, **kwargs: Any):
        """Cost for ``SchedulerStats``: one "draft" per request per forward, accepted = committed. The
        per-position lists stay empty (a canvas is not a draft sequence); ``vllm_dapd.metrics`` turns
        these into the ``vllm_dapd:`` Prometheus counters."""
        stats, self._step_stats = self._step_stats, None
        return super().make_stats(stats, *args, **kwargs)

    def _free_request(self, request, *args: Any, **kwargs: Any):
        self._plans.pop(request.request_id, None)
        entries = self._trace.pop(request.request_id, None)
        if entries is not None:
            self._freed_trace[request.request_id] = entries
        return super()._free_request(request, *args, **kwargs)


class RunnerRecord(RequestSpecDecodeMetrics):
    """vLLM's per-request acceptance record, filled only from the runner's report (``record``)."""

    def observe(self, *args: Any, **kwargs: Any) -> None:
        pass  # vLLM's own count, one per scheduled draft

    def record(self, canvas: int, committed: int, forwards: int, detailed: bool) -> None:
        """One observation per forward; the step's canvas and committed tokens go on the first."""
        for _ in range(forwards):
            super().observe(num_draft_tokens=canvas, num_accepted=committed, detailed=detailed)
            canvas = committed = 0


def _new_stats() -> SpecDecodingStats:
    return SpecDecodingStats(num_spec_tokens=0)


def _add(stats: SpecDecodingStats, canvas: int, committed: int, forwards: int = 1) -> None:
    stats.num_drafts += forwards
    stats.num_draft_tokens += canvas
    stats.num_accepted_tokens += committed
