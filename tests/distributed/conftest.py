"""Shared pieces of the tensor-parallel tests: a TP=2 ``vllm.LLM`` on the CPU platform and the
check of its output against the TP=1 plain model (reference loop / stepper alone)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from vllm_dapd.decoding import available_policies, denoise
from vllm_dapd.engine.core import offline
from vllm_dapd.engine.core.settings import DecodeSettings, resolve
from vllm_dapd.models.loading import load_model

BLOCK, GEN = 8, 16


def omp_bind_for(tp: int) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` giving each rank its own CPUs ("0|1"), or None if too few.

    vLLM's automatic binding gives each CPU worker a whole NUMA node and refuses TP > NUMA nodes
    (vllm/utils/ompmultiprocessing.py); a one-node machine needs the explicit per-rank lists.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < tp:
        return None
    per = len(cpus) // tp
    return "|".join(",".join(map(str, cpus[r * per:(r + 1) * per])) for r in range(tp))


def tp_cases() -> list[tuple[list[int], dict, float, int]]:
    """Every policy in exact mode (temperature 0, cache mode none), plus sampling and the caches."""
    cases = [([5 + i, 6, 7, 8 + i], {"steps": 4, "policy": p}, 0.0, i) for i, p in enumerate(available_policies())]
    cases += [([11, 12, 13], {"steps": 4, "policy": "dapd"}, 0.7, 21),
              ([30, 31, 32, 33, 34], {"steps": 4, "cache_mode": "prefix", "policy": "dawn"}, 0.0, 22),
              ([40, 41, 42], {"steps": 4, "cache_mode": "dual", "policy": "dapd"}, 0.0, 23)]
    return cases


def expected_tokens(model, prompt: list[int], extra: dict, temp: float, seed: int) -> list[int]:
    """TP=1 answer: the reference loop (cache mode none) or the stepper alone with its own pages."""
    settings, _ = resolve(DecodeSettings(block_length=BLOCK), extra)
    if settings.cache_mode == "none":
        ref = denoise(model, torch.tensor([prompt]), gen_length=GEN, block_length=settings.block_length,
                      steps=settings.steps_per_block * (GEN // settings.block_length), policy=settings.policy,
                      temperature=temp, seed=seed)
        return ref.tokens[0].tolist()
    request = offline.Request(prompt, extra, GEN, temp, seed)
    return offline.run(model, [request], server=DecodeSettings(block_length=BLOCK))[0].tokens


def run_tp_engine(path: str, tp: int, cases) -> list[list[int]]:
    """Generate every case in one batch on a ``tensor_parallel_size=tp`` engine (mp executor)."""
    from vllm import LLM, SamplingParams

    bind = omp_bind_for(tp)
    if bind is None:
        pytest.skip(f"TP={tp} on vLLM's CPU platform binds one CPU set per rank; this machine has "
                    f"{len(os.sched_getaffinity(0))} CPU(s)")
    saved = {k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE")}
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        llm = LLM(model=path, max_model_len=256, gpu_memory_utilization=0.1, max_num_seqs=16, dtype="float32",
                  tensor_parallel_size=tp, distributed_executor_backend="mp",
                  additional_config={"dapd": {"block_length": BLOCK}})
        try:
            params = [SamplingParams(max_tokens=GEN, temperature=t, seed=s, ignore_eos=True, extra_args=x)
                      for _, x, t, s in cases]
            outs = llm.generate([{"prompt_token_ids": p} for p, *_ in cases], params, use_tqdm=False)
        finally:
            llm.llm_engine.engine_core.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="session")
def tp() -> SimpleNamespace:
    return SimpleNamespace(cases=tp_cases, expected=expected_tokens, run=run_tp_engine, load=load_model,
                           omp_bind_for=omp_bind_for)
