"""End to end through ``vllm.LLM`` with ``attention_backend="CPU_ATTN"``: the runner keeps its pages
in vLLM's CPU kernel layout and attends them in place (``engine/vllm/kernel_kv.py``). Every request must
commit what the stepper commits alone on the portable path (gather + SDPA), in one batch mixing
cache modes, refresh semantics and attention-reading policies."""

from __future__ import annotations

import os

import pytest
import torch

from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_llada

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_llada(tmp_path_factory) -> str:
    return make_tiny_llada(str(tmp_path_factory.mktemp("engine_kernel") / "llada"), n_heads=2)  # head size 32


@pytest.fixture(scope="module")
def llm(tiny_llada):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function, below
    from vllm import LLM

    engine = LLM(model=tiny_llada, max_model_len=256, gpu_memory_utilization=0.1, max_num_seqs=8,
                 dtype="float32", attention_backend="CPU_ATTN", additional_config={"dapd": {"block_length": 8}})
    yield engine
    engine.llm_engine.engine_core.shutdown()


def test_runner_keeps_its_pages_in_the_kernel_layout(llm):
    (layout,) = llm.collective_rpc(lambda self: (type(self.model_runner._dapd_kv).__name__,
                                                 list(self.model_runner.kv_caches[0].shape[1:])))
    assert layout == ("KernelKV", [2, 128, 64])  # [blocks, kv heads, block size, 2 * head size]


def test_kernel_engine_commits_what_the_portable_stepper_commits(llm, tiny_llada, helpers):
    from vllm import SamplingParams

    from vllm_dapd.engine.core.settings import DecodeSettings

    model = load_model(tiny_llada)
    cases = [([40, 41, 42, 43, 44, 45], {"cache_mode": "prefix", "steps": 4}, 0.0, 1),
             ([50, 51, 52], {"cache_mode": "prefix", "policy": "dapd", "steps": 2, "block_length": 4}, 0.5, 2),
             ([60, 61, 62, 63], {"cache_mode": "none", "policy": "dawn", "steps": 4}, 0.0, 3),
             ([70, 71, 72, 73, 74], {"cache_mode": "dual", "steps": 4}, 0.0, 4),
             ([80, 81], {"cache_mode": "dual", "policy": "dapd", "steps": 2, "block_length": 4}, 0.7, 5),
             ([90, 91, 92, 93], {"cache_mode": "prefix", "cache_refresh": "block", "steps": 2, "block_length": 4},
              0.0, 6),
             ([100, 101, 102, 103, 104], {"cache_mode": "dual", "cache_refresh": "block", "policy": "dawn",
                                          "steps": 4}, 0.6, 7)]
    params = [SamplingParams(max_tokens=16, temperature=t, seed=s, ignore_eos=True, extra_args=x)
              for _, x, t, s in cases]
    outs = llm.generate([{"prompt_token_ids": p} for p, *_ in cases], params, use_tqdm=False)
    server = DecodeSettings(block_length=8)
    for (prompt, extra, temp, seed), out in zip(cases, outs):
        alone = helpers.stepper_alone(model, prompt, 16, server, extra, temp, seed)
        assert list(out.outputs[0].token_ids) == alone, f"prompt {prompt}"


@pytest.fixture(scope="module")
def llm_bf16(tiny_llada, llm):
    """A second engine in bf16, vLLM's CPU default dtype (``llm`` first: one engine starts at a time)."""
    from vllm import LLM

    engine = LLM(model=tiny_llada, max_model_len=256, gpu_memory_utilization=0.1, max_num_seqs=16,
                 dtype="bfloat16", additional_config={"dapd": {"block_length": 8}})  # unset: the kernel path
    yield engine
    engine.llm_engine.engine_core.shutdown()


def test_bf16_greedy_answers_do_not_depend_on_the_batch(llm_bf16):
    """Each request alone, then all 12 at once (prompts of 2-40 tokens, every cache mode, DAPD/DAWN
    and confidence policies): the same answers. On the portable path the batch's padding changes
    bf16 rounding and flips near ties (``benchmarks/attention_paths.py``: 30 of 64 answers)."""
    from vllm import SamplingParams

    g = torch.Generator().manual_seed(8)
    policies, modes = ("low_confidence", "dapd", "dawn", "threshold"), ("none", "prefix", "dual")
    lengths = torch.randint(2, 41, (12,), generator=g)
    prompts = [torch.randint(5, 100, (int(n),), generator=g).tolist() for n in lengths]
    params = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                             extra_args={"policy": policies[i % 4], "cache_mode": modes[i % 3], "steps": 4})
              for i in range(12)]
    (layout,) = llm_bf16.collective_rpc(lambda self: type(self.model_runner._dapd_kv).__name__)
    assert layout == "KernelKV"
    alone = [llm_bf16.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0].outputs[0].token_ids
             for p, sp in zip(prompts, params)]
    together = llm_bf16.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in together] == [list(a) for a in alone]
