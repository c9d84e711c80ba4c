"""vLLM model runner for masked diffusion models: SchedulerOutput in, committed blocks out.

A mixin over vLLM's V1 runner (``GPUModelRunner``; ``CPUModelRunner`` on CPU), so one code path
serves both platforms. What we keep from the base: model loading (``load_model`` -> our model
class from the registry), the device, the worker <-> runner calls. What we replace:

- ``execute_model``: keeps its own per-request ``Sequence`` (canvas, active block, step counters),
  runs one batched denoising step for the scheduled requests (``stepper.denoise_step``) and returns
  a ``ModelRunnerOutput`` whose ``sampled_token_ids[i]`` is ``[]`` or the tokens of the block that
  request finished this step (vLLM's speculative-decoding shape: several tokens per step).
- Requests: each request's ``settings.Plan`` is made once, at admission, and the scheduler sends it
  with the request's first scheduling (``scheduler.DiffusionSchedulerOutput.dapd_plans``); the
  runner builds the request's ``Sequence`` (canvas of ``plan.gen_length``, its settings, params,
  scoring options) from it and never re-derives any of it.
- KV cache: the model does not use vLLM ``Attention`` layers, so ``get_kv_cache_spec`` declares one
  full-attention spec per layer itself and ``initialize_kv_cache`` allocates the pages: in vLLM's
  CPU kernel layout, attended in place (``kernel_kv.KernelKV``, ``--attention-backend CPU_ATTN``,
  the CPU default where the kernel takes the head size), or in the portable layout
  (``kv.PagedKV``: the stepper gathers the cached prefix into ``past_key_values`` for SDPA and
  writes the KV of final tokens back). The scheduler does vLLM's block accounting (admission,
  preemption, freeing on abort) for prompt + canvas; the runner follows each request's block ids.
- ``logprobs`` / ``prompt_logprobs``: ``scoring`` computes them in the same engine step (prompt
  scores once the prompt is fed, all scoring requests of the step sharing forwards; held until the
  request's first returned block, since vLLM only emits outputs that carry tokens).
- No profiling/warm-up forwards (CPU runs eager with an explicit KV size; see ``hooks``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec
from vllm.v1.outputs import LogprobsLists, LogprobsTensors, ModelRunnerOutput

from ..core import scoring
from .kernel_kv import KernelKV, uses_kernel
from ..core.kv import PagedKV
from ..core.sequence import Sequence
from .cost import score_entries
from .infill import split_hole
from .scheduler import DiffusionSchedulerOutput
from ..core.settings import Plan, causal_block
from ..core.stepper import denoise_step

logger = init_logger("vllm.dapd.runner")  # under "vllm", so vLLM's log config shows it


@dataclass
class DiffusionRunnerOutput(ModelRunnerOutput):
    """``ModelRunnerOutput`` plus, per request asked with ``trace=1``, what this step's forward
    committed: ``dapd_trace[req_id] = [(forward, canvas positions), ...]`` (forward counted from 1).

    The executor hands the runner's output object to the scheduler as is (in-process) or pickled
    (multiprocess executor), so the extra field arrives; ``DiffusionScheduler`` collects it."""

    dapd_trace: dict[str, list[tuple[int, list[int]]]] = field(default_factory=dict)
    # Per request asked with stream_canvas=1: [(forward, positions, tokens)] (engine/vllm/canvas.py).
    dapd_canvas: dict[str, list[tuple[int, list[int], list[int]]]] = field(default_factory=dict)
    # Per request that ran this step: its progress, the scheduler's only source of cost.
    dapd_progress: dict[str, Progress] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """One request's engine step: forwards run, tokens committed (returned), and the canvas
    positions not yet returned before the step (vLLM's "draft tokens")."""

    forwards: int
    committed: int
    canvas: int


class DiffusionRunnerMixin:
    """Goes before the vLLM runner class in the bases (``class X(DiffusionRunnerMixin, CPUModelRunner)``)."""

    def _dapd_state(self) -> dict[str, Sequence]:
        seqs = getattr(self, "_dapd_seqs", None)
        if seqs is None:
            seqs = self._dapd_seqs = {}
            self._dapd_prompt_scores: dict[str, Any] = {}  # req_id -> LogprobsTensors (None: to compute)
        return seqs

    # ------------------------------------------------------------------ KV cache

    def _kv_shape(self) -> tuple[int, int, int]:
        """(layers, kv heads on this rank, head dim), read from the loaded model."""
        layers = self.model.layers
        return len(layers), layers[0].qkv.num_kv_heads, self.model.spec.head_dim

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        n_layers, n_kv_heads, head_dim = self._kv_shape()
        # Not ``non_causal=True``, although our attention is: the engine core would then switch off
        # chunked prefill (vllm/v1/engine/core.py:271-290) after config validation, and a prompt
        # longer than max_num_batched_tokens would wait forever. Chunked prefill is harmless here:
        # the runner denoises only once the whole prompt is fed, and prefix caching is off (hooks).
        spec = FullAttentionSpec(block_size=self.cache_config.block_size, num_kv_heads=n_kv_heads,
                                 head_size=head_dim, dtype=self.kv_cache_dtype)
        return {f"layers.{i}": spec for i in range(n_layers)}

    def initialize_kv_cache(self, kv_cache_config: Any, is_profiling: bool = False,
                            kv_cache_allocation_context: Any = None) -> None:
        """Own the pages vLLM sized: one tensor per layer, in the portable layout (``kv.PagedKV``) or,
        with ``--attention-backend CPU_ATTN``, in vLLM's CPU kernel layout (``kernel_kv.KernelKV``)."""
        self.kv_cache_config = kv_cache_config
        n_layers, n_kv_heads, head_dim = self._kv_shape()
        block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        pages = KernelKV if uses_kernel(self.vllm_config) else PagedKV
        self._dapd_kv = pages(n_layers, kv_cache_config.num_blocks, block_size, n_kv_heads, head_dim,
                              self.kv_cache_dtype, self.device)
        self.kv_caches = self._dapd_kv.layers

    def may_reinitialize_input_batch(self, *args: Any, **kwargs: Any) -> None:
        pass

    # ------------------------------------------------------------------ no profiling forwards

    def profile_run(self, *args: Any, **kwargs: Any) -> None:
        pass

    def warming_up_model(self, *args: Any, **kwargs: Any) -> None:
        pass

    def capture_model(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def _dummy_run(self, *args: Any, **kwargs: Any) -> Any:
        return None

    def _dummy_sampler_run(self, *args: Any, **kwargs: Any) -> Any:
        return None

    def take_draft_token_ids(self) -> None:
        return None

    # ------------------------------------------------------------------ requests

    def _new_sequence(self, req_id: str, prompt_ids: list[int], sampling_params: Any, p: Plan) -> Sequence:
        """The request's denoising state, from its plan (settings, params, canvas size, options)."""
        seed = sampling_params.seed if sampling_params.seed is not None else random.getrandbits(31)
        mask_id = int(self.model.mask_token_id)
        prompt, suffix = list(prompt_ids), []
        if sampling_params.prompt_logprobs is None:  # infilling: the canvas fills the prompt's hole
            prompt, suffix = split_hole(prompt, mask_id)
        eos = sampling_params.eos_token_id
        stops = sorted(sampling_params.all_stop_token_ids)
        causal = causal_block(self.vllm_config.additional_config)  # block-causal: blocks from position 0
        return Sequence(
            causal=causal is not None,
            stop_id=eos if eos is not None else (stops[0] if stops else mask_id),
            max_tokens=sampling_params.max_tokens or p.gen_length,
            req_id=req_id, prompt=prompt, suffix=suffix, num_prompt_tokens=len(prompt_ids),
            gen_length=p.gen_length, settings=p.settings, params=p.params,
            mask_id=mask_id,
            temperature=float(sampling_params.temperature), seed=int(seed),
            num_logprobs=sampling_params.logprobs, num_prompt_logprobs=sampling_params.prompt_logprobs,
            score=p.score, stream_canvas=p.stream_canvas,
        )

    def _update_sequences(self, so: Any) -> None:
        """Follow the scheduler's request set and each request's KV pages.

        A preempted request keeps its ``Sequence`` (canvas and counters) but loses its pages: its
        cached prefix is reset, and the scheduler re-feeds prompt + committed tokens on resumption.
        """
        seqs = self._dapd_state()
        for req_id in so.finished_req_ids:
            seqs.pop(req_id, None)
            self._dapd_prompt_scores.pop(req_id, None)
        for req_id in so.preempted_req_ids or ():
            logger.debug("vllm-dapd: request %s preempted; its cached prefix will be recomputed", req_id)
            if req_id in seqs:
                seqs[req_id].block_ids, seqs[req_id].cached_len, seqs[req_id].suffix_block = [], 0, -1
        plans = so.dapd_plans if isinstance(so, DiffusionSchedulerOutput) else {}
        for new in so.scheduled_new_reqs:
            p = plans.get(new.req_id)
            if p is None:  # never re-plan here: the canvas must be the one the scheduler sized KV for
                raise RuntimeError(
                    f"{new.req_id}: scheduled for the first time without a plan (no DiffusionSchedulerOutput."
                    "dapd_plans entry); the diffusion runner needs vllm_dapd's DiffusionScheduler to send one")
            seq = seqs[new.req_id] = self._new_sequence(new.req_id, new.prompt_token_ids, new.sampling_params, p)
            if seq.num_prompt_logprobs is not None:
                self._dapd_prompt_scores.setdefault(new.req_id, None)
            seq.block_ids = list(new.block_ids[0]) if new.block_ids else []
            # Leading positions vLLM found in its prefix cache (block-causal models only; else 0):
            # their pages hold final KV another request wrote (scheduler.py, "Prefix caching").
            seq.cached_len = new.num_computed_tokens
        cached = so.scheduled_cached_reqs
        for req_id, new_ids, done in zip(cached.req_ids, cached.new_block_ids, cached.num_computed_tokens):
            seq = seqs.get(req_id)
            if seq is None:
                raise RuntimeError(f"{req_id}: scheduled but unknown to the diffusion runner")
            if req_id in cached.resumed_req_ids:
                seq.block_ids, seq.cached_len, seq.suffix_block = [], done, -1
            if new_ids is not None:
                seq.block_ids.extend(new_ids[0])

    # ------------------------------------------------------------------ the step

    def _choose(self, seqs: list[Sequence], trace: dict[str, list[tuple[int, list[int]]]]) -> dict[str, list[int]]:
        """Requests with ``score_choices`` (``scoring.choice_scores``): each returns its best choice,
        then its stop token up to ``max_tokens`` (so it ends whatever ``ignore_eos`` says), in one
        step; the estimates go to the client with its trace entries (``cost.encode_scores``)."""
        out = {}
        for s in seqs:
            s.score_values = scores = scoring.choice_scores(self.model, [s], self.device)[s.req_id]
            best = list(s.score.choices[max(range(len(scores)), key=scores.__getitem__)])
            out[s.req_id] = (best + [s.stop_id] * s.gen_length)[: max(s.max_tokens, len(best))][: s.gen_length]
            s.block, s.nfe = s.num_blocks, s.nfe + 1
            trace[s.req_id] = score_entries(scores)
        return out

    @torch.inference_mode()
    def execute_model(self, scheduler_output: Any, intermediate_tensors: Any = None) -> ModelRunnerOutput:
        so = scheduler_output
        self._update_sequences(so)
        seqs = self._dapd_state()
        req_ids = list(so.num_scheduled_tokens)
        # A request takes a denoising step once its whole prompt is fed (chunked prefill may take
        # several engine steps; those return nothing).
        computed = {new.req_id: new.num_computed_tokens for new in so.scheduled_new_reqs}
        computed.update(zip(so.scheduled_cached_reqs.req_ids, so.scheduled_cached_reqs.num_computed_tokens))
        ready = [seqs[r] for r in req_ids
                 if not seqs[r].finished
                 and computed.get(r, 0) + so.num_scheduled_tokens[r] >= seqs[r].num_prompt_tokens]
        kv = getattr(self, "_dapd_kv", None)
        pending = self._dapd_prompt_scores
        to_score = [s for s in ready if s.req_id in pending and pending[s.req_id] is None]
        if to_score:
            pending.update({r: LogprobsTensors(**t._asdict()) for r, t in
                            scoring.prompt_logprobs(self.model, to_score, self.device).items()})
        before = {s.req_id: (s.nfe, s.gen_length - min(s.block * s.block_length, s.gen_length)) for s in ready}
        choosing = [s for s in ready if s.score.choices]  # structured_outputs choice: no denoising
        if choosing:
            ready = [s for s in ready if not s.score.choices]
        committed = dict(zip((s.req_id for s in ready), denoise_step(self.model, ready, self.device, kv)))
        # Positions fed to the model by denoising steps, all requests, since start (what a prefix-cache hit saves).
        self.rows_fed = getattr(self, "rows_fed", 0) + sum(s.fed_rows for s in ready)
        trace, canvases = {}, {}
        if choosing:
            committed.update(self._choose(choosing, trace))
        sampled = [committed.get(r, []) for r in req_ids]
        for s in ready:
            if s.trace:  # the stepper counts forwards from 0
                entries = [(nfe + 1, positions) for nfe, positions in s.trace]
                s.trace = []
                if s.settings.trace:
                    trace[s.req_id] = entries
                if s.stream_canvas:  # committed tokens are final: the canvas holds them
                    canvases[s.req_id] = [(f, positions, s.canvas[positions].tolist()) for f, positions in entries]
        return DiffusionRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            logprobs=_lists(scoring.sample_logprobs(seqs, req_ids, sampled)),
            # vLLM emits prompt logprobs only with tokens: hold them until the first returned block.
            prompt_logprobs_dict={r: pending.pop(r) for r, t in zip(req_ids, sampled)
                                  if t and pending.get(r) is not None},
            dapd_trace=trace,
            dapd_canvas=canvases,
            dapd_progress={s.req_id: Progress(s.nfe - before[s.req_id][0], len(committed[s.req_id]),
                                              before[s.req_id][1]) for s in ready + choosing},
        )


def _lists(logprobs: scoring.SampleLogprobs | None) -> LogprobsLists | None:
    return None if logprobs is None else LogprobsLists(**logprobs._asdict())
