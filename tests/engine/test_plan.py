"""One plan per request: made at admission, read back by the scheduler, received by the runner.

An in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the EngineCore and its worker run in
this process), so a spy on ``settings.plan`` sees every call that admission, the scheduler and the
runner make. The scheduler-level tests run a second ``DiffusionScheduler`` on the engine's config
and send its output through pickle, as the multiprocess executor sends it to the workers.
"""

from __future__ import annotations

import pickle
import sys
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.slow  # one in-process engine (~30 s on a busy CPU)

MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """The engine, and afterwards this process as it was: an in-process engine caches vLLM's
    environment variables, freezes the GC heap and pins torch to one thread (replacing
    ``torch.set_num_threads``)."""
    import gc

    import vllm.envs as envs
    from vllm import LLM

    from vllm_dapd.models.tiny import make_tiny_llada

    patch = pytest.MonkeyPatch()
    patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    patch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    path = make_tiny_llada(str(tmp_path_factory.mktemp("plan") / "llada"))
    engine = LLM(model=path, max_model_len=MAX_MODEL_LEN, dtype="float32", max_num_seqs=8,
                 additional_config={"dapd": {"block_length": 8}})
    try:
        yield engine
    finally:
        engine.llm_engine.engine_core.shutdown()
        envs.disable_envs_cache()
        gc.unfreeze()
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        patch.undo()


def spy_on_plan(monkeypatch) -> list[tuple[str, object]]:
    """``settings.plan`` replaced, in every module that holds it, by a spy recording (the calling
    function's name, the plan made)."""
    import vllm_dapd.engine.vllm.runner  # noqa: F401  (every holder loaded before the spy goes in)
    import vllm_dapd.engine.vllm.scheduler  # noqa: F401
    import vllm_dapd.engine.core.settings as settings
    import vllm_dapd.engine.vllm.validation  # noqa: F401

    real, calls = settings.plan, []

    def spy(*args, **kwargs):
        made = real(*args, **kwargs)
        calls.append((sys._getframe(1).f_code.co_name, made))
        return made

    holders = [(m, name) for m in list(sys.modules.values()) if (getattr(m, "__name__", "") or "").startswith(
        "vllm_dapd") for name, value in list(vars(m).items()) if value is real]
    assert {m.__name__ for m, _ in holders} >= {"vllm_dapd.engine.core.settings", "vllm_dapd.engine.vllm.validation",
                                                "vllm_dapd.engine.vllm.scheduler"}
    for module, name in holders:
        monkeypatch.setattr(module, name, spy)
    return calls


def runner_plans(monkeypatch) -> list:
    """The plans the runner builds its sequences from, in order."""
    from vllm_dapd.engine.vllm.runner import DiffusionRunnerMixin

    real, got = DiffusionRunnerMixin._new_sequence, []

    def recording(self, req_id, prompt_ids, sampling_params, p):
        got.append(p)
        return real(self, req_id, prompt_ids, sampling_params, p)

    monkeypatch.setattr(DiffusionRunnerMixin, "_new_sequence", recording)
    return got


def test_each_request_is_resolved_once_at_admission_and_served_by_that_plan(llm, monkeypatch):
    from vllm import SamplingParams

    calls, received = spy_on_plan(monkeypatch), runner_plans(monkeypatch)
    cases = [  # prompt, max_tokens, extra_args, n
        ([3, 4, 5], 8, None, 1),
        ([6, 7], 13, {"policy": "threshold", "threshold": 0.5, "block_length": 4, "steps": 2}, 1),
        (list(range(3, 43)), 32, {"score_samples": 4}, 1),  # 40-token prompt: room 24, so a 24-token canvas
        ([9, 10], 8, {"steps": 2}, 2),  # n=2: one admission, two engine requests sharing its plan
    ]
    params = [SamplingParams(max_tokens=m, n=n, temperature=1.0, seed=1, ignore_eos=True, extra_args=x)
              for _, m, x, n in cases]
    outs = llm.generate([{"prompt_token_ids": p} for p, *_ in cases], params, use_tqdm=False)

    assert [who for who, _ in calls] == ["admit"] * len(cases)  # once per request, never downstream
    made = [p for _, p in calls]
    assert [p.gen_length for p in made] == [8, 16, 24, 8]
    assert (made[1].settings.block_length, made[1].params.threshold, made[2].score.samples) == (4, 0.5, 4)
    # The runner built every sequence (two for n=2) from the admitted plans, equal after the trip.
    assert sorted(map(repr, received)) == sorted(map(repr, made + [made[3]]))
    assert [len(o.token_ids) for out in outs for o in out.outputs] == [8, 13, 24, 8, 8]


def test_a_request_that_skipped_admission_is_resolved_by_the_scheduler_once(llm, monkeypatch):
    """An ``EngineCoreRequest`` handed to the engine directly never passes ``process_inputs``."""
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    calls, received = spy_on_plan(monkeypatch), runner_plans(monkeypatch)
    engine = llm.llm_engine
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, extra_args={"block_length": 4})
    request = EngineCoreRequest(request_id="direct", prompt_token_ids=[3, 4, 5], mm_features=None,
                                sampling_params=sp, pooling_params=None, arrival_time=0.0, lora_request=None,
                                cache_salt=None, data_parallel_rank=None)
    engine.add_request("direct", request, sp)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert [who for who, _ in calls] == ["_admitted_plan"]
    assert received == [calls[0][1]] and received[0].settings.block_length == 4
    assert len(outs[-1].outputs[0].token_ids) == 8


# ------------------------------------------------------------------ the scheduler and the runner alone

def make_scheduler(vllm_config):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_dapd.engine.vllm.scheduler import DiffusionScheduler

    block = vllm_config.cache_config.block_size
    spec = FullAttentionSpec(block_size=block, num_kv_heads=1, head_size=8, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=20, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layers.0"], spec)])
    return DiffusionScheduler(vllm_config=vllm_config, kv_cache_config=kv, block_size=block, log_stats=True,
                              structured_output_manager=StructuredOutputManager(vllm_config))


def make_runner():
    from vllm_dapd.engine.vllm.runner import DiffusionRunnerMixin

    class Runner(DiffusionRunnerMixin):  # only what _update_sequences reads
        model = SimpleNamespace(mask_token_id=1)
        vllm_config = SimpleNamespace(additional_config={})

    return Runner()


def request(req_id: str, prompt_len: int, max_tokens: int, extra_args=None):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra_args)
    return Request(req_id, list(range(3, 3 + prompt_len)), params, None)


def step_output(req_ids, sampled):
    from vllm_dapd.engine.vllm.runner import DiffusionRunnerOutput

    return DiffusionRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                 sampled_token_ids=sampled, logprobs=None, prompt_logprobs_dict={})


def test_the_scheduler_reads_the_admitted_plan_and_the_runner_builds_from_it(llm, monkeypatch):
    from vllm.v1.request import RequestStatus

    from vllm_dapd.engine.vllm.scheduler import DiffusionSchedulerOutput
    from vllm_dapd.engine.core.settings import PLAN_KEY, Defaults, DecodeSettings, plan

    admitted = plan(Defaults(DecodeSettings(block_length=4)), None, 12, 1000)  # not what the scheduler would make
    calls = spy_on_plan(monkeypatch)
    scheduler = make_scheduler(llm.llm_engine.vllm_config)
    scheduler.add_request(request("a", 10, 32, {PLAN_KEY: admitted.to_dict()}))
    assert calls == [] and scheduler.plan_of("a") == admitted
    so = scheduler.schedule()
    assert isinstance(so, DiffusionSchedulerOutput) and so.dapd_plans == {"a": admitted}
    assert len(so.scheduled_spec_decode_tokens) == 0 and so.num_scheduled_tokens == {"a": 10}

    runner = make_runner()
    runner._update_sequences(pickle.loads(pickle.dumps(so)))  # as the mp executor sends it
    seq = runner._dapd_seqs["a"]
    assert (seq.gen_length, seq.canvas.numel(), seq.block_length) == (12, 12, 4)
    assert seq.block_ids == list(so.scheduled_new_reqs[0].block_ids[0])

    # The step that completes the prompt commits a first block; later steps carry no plan.
    scheduler.update_from_output(so, step_output(["a"], [[5] * 4]))
    so = scheduler.schedule()
    assert so.dapd_plans == {} and len(so.scheduled_spec_decode_tokens["a"]) == 12 - 4
    runner._update_sequences(pickle.loads(pickle.dumps(so)))
    assert runner._dapd_seqs["a"] is seq and calls == []

    # Aborted: the plan is freed with the request, and the runner drops its Sequence.
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler._plans == {}
    runner._update_sequences(pickle.loads(pickle.dumps(scheduler.schedule())))
    assert "a" not in runner._dapd_seqs


def test_a_finished_request_frees_its_plan(llm):
    scheduler = make_scheduler(llm.llm_engine.vllm_config)
    scheduler.add_request(request("a", 10, 8))  # one block of 8 (the server's): done in one step
    so = scheduler.schedule()
    scheduler.update_from_output(so, step_output(["a"], [[5] * 8]))
    assert "a" not in scheduler.requests and scheduler._plans == {}


def scheduler_output(new=(), plans=None, preempted=(), resumed=(), new_block_ids=()):
    from vllm.v1.core.sched.output import SchedulerOutput

    from vllm_dapd.engine.vllm.scheduler import DiffusionSchedulerOutput

    cached = SimpleNamespace(req_ids=list(resumed), resumed_req_ids=set(resumed),
                             new_block_ids=list(new_block_ids), num_computed_tokens=[0] * len(resumed))
    base = SchedulerOutput(scheduled_new_reqs=list(new), scheduled_cached_reqs=cached, num_scheduled_tokens={},
                           total_num_scheduled_tokens=0, scheduled_spec_decode_tokens={},
                           scheduled_encoder_inputs={}, finished_req_ids=set(), free_encoder_mm_hashes=[],
                           preempted_req_ids=set(preempted))
    return base if plans is None else DiffusionSchedulerOutput.of(base, plans)


def test_the_runner_keeps_its_sequence_across_preemption_and_never_plans():
    from vllm import SamplingParams

    from vllm_dapd.engine.core.settings import Defaults, DecodeSettings, plan

    runner = make_runner()
    params = SamplingParams(max_tokens=16, temperature=0.0)
    new = SimpleNamespace(req_id="a", prompt_token_ids=[3, 4, 5], sampling_params=params, block_ids=([0, 1],),
                          num_computed_tokens=0)
    p = plan(Defaults(DecodeSettings(block_length=4)), None, 12, 100)  # not what the request's own inputs give
    runner._update_sequences(scheduler_output([new], {"a": p}))
    seq = runner._dapd_seqs["a"]
    assert (seq.gen_length, seq.block_length, seq.block_ids) == (12, 4, [0, 1])
    seq.cached_len = 3
    runner._update_sequences(scheduler_output(preempted=["a"]))
    runner._update_sequences(scheduler_output(resumed=["a"], new_block_ids=[([7, 8],)]))  # resumed: no plan needed
    assert runner._dapd_seqs["a"] is seq and seq.block_ids == [7, 8] and seq.cached_len == 0

    other = SimpleNamespace(req_id="b", prompt_token_ids=[3], sampling_params=params, block_ids=([2],),
                            num_computed_tokens=0)
    for plans in (None, {"a": p}):  # a plain SchedulerOutput, or no plan for this request
        with pytest.raises(RuntimeError, match="b: scheduled for the first time without a plan"):
            runner._update_sequences(scheduler_output([other], plans))
