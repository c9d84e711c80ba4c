"""One plan per request: the scheduler decides it at ``add_request``, the runner only receives it.

A real ``DiffusionScheduler`` (tiny LLaDA config, no engine, no processes) and a bare runner mixin:
the scheduler's ``SchedulerOutput`` goes through pickle, as the multiprocess executor sends it to
the workers, and the runner builds its ``Sequence`` from the carried plan. The runner's own inputs
would give another answer length (its model length is larger), and ``settings.plan`` raises if
anything but the scheduler's ``add_request`` calls it.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.slow  # builds a VllmConfig (~20 s on a busy CPU)

MAX_MODEL_LEN = 64
BLOCK = 16  # KV page size


@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_dapd.models.tiny import make_tiny_llada

    path = make_tiny_llada(str(tmp_path_factory.mktemp("plan") / "llada"))
    config = EngineArgs(model=path, max_model_len=MAX_MODEL_LEN, dtype="float32", block_size=BLOCK,
                        additional_config={"dapd": {"block_length": 8}}).create_engine_config()
    config.cache_config.num_gpu_blocks = 20
    return config


def make_scheduler(vllm_config):
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_dapd.engine.scheduler import DiffusionScheduler

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=8, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=20, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layers.0"], spec)])
    return DiffusionScheduler(vllm_config=vllm_config, kv_cache_config=kv, block_size=BLOCK, log_stats=True,
                              structured_output_manager=StructuredOutputManager(vllm_config))


def make_runner(additional_config, max_model_len: int):
    from vllm_dapd.engine.runner import DiffusionRunnerMixin

    class Runner(DiffusionRunnerMixin):  # only what _update_sequences reads
        vllm_config = SimpleNamespace(additional_config=additional_config)
        model_config = SimpleNamespace(max_model_len=max_model_len)
        model = SimpleNamespace(mask_token_id=1)

    return Runner()


def request(req_id: str, prompt_len: int, max_tokens: int, extra_args=None):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra_args)
    return Request(req_id, list(range(3, 3 + prompt_len)), params, None)


def step_output(req_ids, sampled):
    from vllm_dapd.engine.runner import DiffusionRunnerOutput

    return DiffusionRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                 sampled_token_ids=sampled, logprobs=None, prompt_logprobs_dict={})


def test_the_scheduler_plans_once_and_the_runner_builds_from_its_plan(vllm_config, monkeypatch):
    import sys

    import vllm_dapd.engine.runner  # noqa: F401  (loaded before the spies go in)
    import vllm_dapd.engine.scheduler as scheduler_module
    import vllm_dapd.engine.settings as settings
    from vllm.v1.request import RequestStatus

    real_plan, calls = settings.plan, []

    def counted(*args, **kwargs):
        calls.append(args)
        return real_plan(*args, **kwargs)

    def refused(*args, **kwargs):
        raise AssertionError("only the scheduler's add_request may call settings.plan")

    # Every module that holds settings.plan under any name refuses it, except the scheduler.
    holders = [(m, name) for m in list(sys.modules.values()) if (getattr(m, "__name__", "") or "").startswith(
        "vllm_dapd") for name, value in list(vars(m).items()) if value is real_plan]
    assert (scheduler_module, "plan") in holders
    for module, name in holders:
        monkeypatch.setattr(module, name, counted if module is scheduler_module else refused)

    scheduler = make_scheduler(vllm_config)
    # 40-token prompt, max_tokens 32, block 8: room is 64 - 40 = 24, so the canvas is 24, not 32.
    scheduler.add_request(request("a", 40, 32))
    assert len(calls) == 1 and scheduler.plan_of("a").gen_length == 24
    so = scheduler.schedule()
    assert set(so.dapd_plans) == {"a"} and so.dapd_plans["a"] is scheduler.plan_of("a")

    # The runner's model length is larger: re-planning there would give a 32-token canvas.
    runner = make_runner(vllm_config.additional_config, max_model_len=1000)
    runner._update_sequences(pickle.loads(pickle.dumps(so)))  # as the mp executor sends it
    seq = runner._dapd_seqs["a"]
    assert seq.gen_length == 24 and seq.canvas.numel() == 24 and seq.block_length == 8
    assert seq.block_ids == list(so.scheduled_new_reqs[0].block_ids[0])

    # The step that completes the prompt commits a first block; later steps carry no plan.
    scheduler.update_from_output(so, step_output(["a"], [[5] * 8]))
    so = scheduler.schedule()
    assert so.dapd_plans == {} and len(so.scheduled_spec_decode_tokens["a"]) == 24 - 8
    runner._update_sequences(pickle.loads(pickle.dumps(so)))
    assert runner._dapd_seqs["a"] is seq
    assert len(calls) == 1  # one plan for the request's whole life

    # Aborted: the plan is freed with the request, and the runner drops its Sequence.
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler._plans == {}
    so = scheduler.schedule()
    runner._update_sequences(pickle.loads(pickle.dumps(so)))
    assert "a" not in runner._dapd_seqs


def test_a_finished_request_frees_its_plan(vllm_config):
    scheduler = make_scheduler(vllm_config)
    scheduler.add_request(request("a", 10, 8))  # one block of 8: done in one step
    so = scheduler.schedule()
    scheduler.update_from_output(so, step_output(["a"], [[5] * 8]))
    assert "a" not in scheduler.requests and scheduler._plans == {}


def test_the_runner_keeps_its_sequence_across_preemption_and_never_plans(vllm_config):
    from vllm_dapd.engine.settings import DecodeSettings, plan

    runner = make_runner(vllm_config.additional_config, max_model_len=MAX_MODEL_LEN)

    def step(new=(), plans=None, preempted=(), resumed=(), new_block_ids=()):
        cached = SimpleNamespace(req_ids=list(resumed), resumed_req_ids=set(resumed),
                                 new_block_ids=list(new_block_ids), num_computed_tokens=[0] * len(resumed))
        out = SimpleNamespace(finished_req_ids=set(), preempted_req_ids=set(preempted),
                              scheduled_new_reqs=list(new), scheduled_cached_reqs=cached)
        if plans is not None:
            out.dapd_plans = plans
        return out

    from vllm import SamplingParams

    params = SamplingParams(max_tokens=16, temperature=0.0)
    new = SimpleNamespace(req_id="a", prompt_token_ids=[3, 4, 5], sampling_params=params, block_ids=([0, 1],),
                          num_computed_tokens=0)
    p = plan(DecodeSettings(block_length=4), None, 12, 100)  # not what the runner's own inputs give
    runner._update_sequences(step([new], {"a": p}))
    seq = runner._dapd_seqs["a"]
    assert (seq.gen_length, seq.block_length, seq.block_ids) == (12, 4, [0, 1])
    seq.cached_len = 3
    runner._update_sequences(step(preempted=["a"]))
    runner._update_sequences(step(resumed=["a"], new_block_ids=[([7, 8],)]))  # resumed: no plan needed
    assert runner._dapd_seqs["a"] is seq and seq.block_ids == [7, 8] and seq.cached_len == 0

    other = SimpleNamespace(req_id="b", prompt_token_ids=[3], sampling_params=params, block_ids=([2],),
                            num_computed_tokens=0)
    for plans in (None, {"a": p}):  # no plans at all, or none for this request
        with pytest.raises(RuntimeError, match="b: scheduled for the first time without a plan"):
            runner._update_sequences(step([other], plans))
