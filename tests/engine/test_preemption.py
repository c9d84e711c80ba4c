"""Tight resources: 9 KV pages of 32 tokens and a token budget of 96 per step (one engine).

- Preemption: six requests of 20 + 64 tokens do not fit, so vLLM's scheduler preempts and resumes
  them. Cache mode ``none`` must still equal the reference loop. A ``prefix``/``dual`` request loses
  its pages and recomputes its cached KV from the canvas it has on resumption, so its answer must be
  the stepper's answer with the cache dropped before the steps where it was preempted.
- Chunked prefill: a 100-token prompt is fed over several steps; the runner denoises only once it
  is complete (vLLM would switch chunked prefill off for a ``non_causal`` KV spec, and then such a
  prompt would wait forever: the runner does not declare one).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from vllm_dapd.decoding import denoise
from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_llada

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_llada(tmp_path_factory) -> str:
    return make_tiny_llada(str(tmp_path_factory.mktemp("engine_tight") / "llada"))


@pytest.fixture(scope="module")
def llm(tiny_llada):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    engine = LLM(model=tiny_llada, max_model_len=256, gpu_memory_utilization=0.1, max_num_seqs=8, dtype="float32",
                 num_gpu_blocks_override=9, block_size=32, max_num_batched_tokens=96, disable_log_stats=False)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def reference(model, prompt, gen, block, steps_per_block):
    out = denoise(model, torch.tensor([prompt]), gen_length=gen, block_length=block,
                  steps=steps_per_block * (gen // block))
    return out.tokens[0].tolist()


def test_preempted_requests_resume_and_none_mode_stays_exact(llm, tiny_llada):
    from vllm import SamplingParams

    modes = ["none", "none", "prefix", "dual", "none", "prefix"]
    prompts = [[5 + i, 6, 7, 8, 9] * 4 for i in range(len(modes))]
    params = [SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True,
                             extra_args={"block_length": 16, "steps": 4, "cache_mode": m}) for m in modes]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions") > 0
    model = load_model(tiny_llada)
    for mode, prompt, out in zip(modes, prompts, outs):
        got = list(out.outputs[0].token_ids)
        if mode == "none":
            assert got == reference(model, prompt, 64, 16, 4)
        else:
            assert matches_a_resumed_run(model, prompt, mode, got), f"{mode} request {prompt[:2]}"


def matches_a_resumed_run(model, prompt, mode, got) -> bool:
    """Whether ``got`` is the stepper's answer for ``prompt`` with its cache dropped (a preemption)
    before none, one or two of its 16 steps (4 blocks x 4). That is what the runner does on
    resumption: ``cached_len`` 0 and no cached suffix, so the next forward recomputes every final
    position's KV from the canvas it has then. (This workload preempts a request at most twice.)"""
    from vllm_dapd.engine.core import offline
    from vllm_dapd.engine.core.stepper import denoise_step

    request = offline.Request(prompt, {"block_length": 16, "steps": 4, "cache_mode": mode}, max_tokens=64)
    for drops in (d for r in range(3) for d in itertools.combinations(range(1, 16), r)):
        (seq,), kv = offline.sequences(model, [request])
        out, step = [], 0
        while not seq.finished:
            if step in drops:
                seq.cached_len, seq.suffix_block = 0, -1
            out += denoise_step(model, [seq], torch.device("cpu"), kv)[0]
            step += 1
        if out == got:
            return True
    return False


def test_prompt_longer_than_the_step_budget(llm, tiny_llada):
    from vllm import SamplingParams

    prompts = [list(range(3, 103)), [5, 6, 7]]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, extra_args={"block_length": 16, "steps": 4})
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    model = load_model(tiny_llada)
    for prompt, out in zip(prompts, outs):
        assert list(out.outputs[0].token_ids) == reference(model, prompt, 32, 16, 4)
