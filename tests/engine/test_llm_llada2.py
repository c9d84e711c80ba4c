"""End to end through ``vllm.LLM``: a tiny LLaDA2 checkpoint (block-causal MoE, block size 4) served by our
scheduler + runner equals the block-diffusion reference loop (``decoding/block_diffusion.py``, full
recompute: the reference's own way) token for token: alone, batched with other prompt lengths, over
several blocks, with EOS, and with every registered policy in one batch; vLLM's prefix caching shares
the exact KV of a long prompt across requests. One engine for the module (pages of 16 positions)."""

from __future__ import annotations

import os

import pytest
import torch
from dapd_paper_reference import sharpen_checkpoint

from vllm_dapd import cost
from vllm_dapd.decoding import available_policies
from vllm_dapd.decoding.block_diffusion import block_diffusion_generate
from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_llada2

pytestmark = pytest.mark.slow
BLOCK = 4


@pytest.fixture(scope="module")
def tiny_llada2(tmp_path_factory) -> str:
    path = make_tiny_llada2(str(tmp_path_factory.mktemp("engine_llada2") / "llada2"), block_length=BLOCK)
    return sharpen_checkpoint(path, 20)  # confidences over the threshold happen


@pytest.fixture(scope="module")
def llm(tiny_llada2):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function (rows_fed)
    from vllm import LLM

    engine = LLM(model=tiny_llada2, max_model_len=256, gpu_memory_utilization=0.1, max_num_seqs=32,
                 dtype="float32", block_size=16, enable_prefix_caching=True)
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def model(tiny_llada2):
    return load_model(tiny_llada2)


def reference(model, prompt, max_tokens, steps, policy="llada2", eos=None, temperature=0.0, seed=0):
    out = block_diffusion_generate(model, torch.tensor([prompt]), max_tokens, steps=steps, policy=policy,
                                   eos_id=eos, temperature=temperature, seed=seed)
    return out.answers[0].tolist(), int(out.nfe[0])


def test_alone_and_batched_equal_the_reference_loop(llm, model):
    """LLaDA2's own rule (the server default policy here is low_confidence; ``llada2`` per request),
    several blocks, prompts whose tails fill 0..3 positions of their first block."""
    from vllm import SamplingParams

    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19], [20, 21, 22], [30, 31, 32, 33]]
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, extra_args={"policy": "llada2", "steps": 4})
    (alone,) = llm.generate([{"prompt_token_ids": prompts[0]}], sp, use_tqdm=False)
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    for prompt, out in zip(prompts, together):
        want, nfe = reference(model, prompt, 10, 4)
        assert list(out.outputs[0].token_ids) == want, f"prompt {prompt}"
        assert cost(out.outputs[0]).nfe == nfe  # one forward per step, as the reference counts them
    assert list(alone.outputs[0].token_ids) == list(together[0].outputs[0].token_ids)


def test_eos_ends_the_answer_as_in_the_reference(llm, model, tiny_llada2):
    """Without ``ignore_eos`` the answer stops after its first EOS, as the reference's (kept)."""
    from vllm import SamplingParams

    eos = model.config.eos_token_id
    prompts = [[40 + i, 41 + i, 42 + i, 43 + i, 44 + i] for i in range(0, 40, 4)]
    sp = SamplingParams(max_tokens=24, temperature=0.0, extra_args={"policy": "llada2", "steps": 2})
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert list(out.outputs[0].token_ids) == reference(model, prompt, 24, 2, eos=eos)[0], f"prompt {prompt}"


def test_every_policy_in_one_batch_equals_the_reference_loop(llm, model):
    """Every registered policy works inside the active block (DAPD and DAWN read the block's attention
    over its prefix keys): one request per policy, all in one batch, each equal to the reference loop
    run with that policy alone (sampling policies at temperature 0.7, per-request seeds)."""
    from vllm import SamplingParams

    policies = available_policies()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 250, (5 + i % 4,), generator=g).tolist() for i in range(len(policies))]
    params = [SamplingParams(max_tokens=9, temperature=0.7 if i % 2 else 0.0, seed=i, ignore_eos=True,
                             extra_args={"policy": p, "steps": 2}) for i, p in enumerate(policies)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wrong = [policy for i, (policy, prompt, out) in enumerate(zip(policies, prompts, outs))
             if list(out.outputs[0].token_ids) != reference(model, prompt, 9, 2, policy,
                                                            temperature=0.7 if i % 2 else 0.0, seed=i)[0]]
    assert not wrong


def test_a_block_length_the_model_does_not_declare_is_a_400(llm):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    for extra, name in (({"block_length": 8}, "block_length"), ({"cache_mode": "dual"}, "cache_mode")):
        with pytest.raises(VLLMValidationError, match=f"^{name}: "):
            llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4, extra_args=extra),
                         use_tqdm=False)


def test_infilling_is_refused_naming_suffix(llm, model):
    """A hole (the mask token) in the prompt would put the suffix in a later block, which a block-causal
    model never attends: a 400 naming ``suffix``, not an answer that ignores it."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="^suffix: .*block-causal"):
        llm.generate([{"prompt_token_ids": [1, 2, model.mask_token_id, 7, 8]}], SamplingParams(max_tokens=4),
                     use_tqdm=False)


def rows_fed(llm) -> int:
    (n,) = llm.collective_rpc(lambda self: getattr(self.model_runner, "rows_fed", 0))
    return n


def test_prefix_caching_skips_the_shared_prompt_and_gives_the_same_answer(llm, model):
    """A 70-token prompt: the first request feeds it all; a second request with the same prompt finds
    its whole 16-position pages in vLLM's prefix cache (64 positions, ``num_cached_tokens``), feeds
    64 positions fewer (the runner's count) and answers as the reference loop (no cache at all) does.
    A request in cache mode ``none`` writes no KV, so its pages are never cached: the next request with
    its prompt finds nothing and answers right; so do two identical requests admitted together."""
    from vllm import SamplingParams

    prompt = [(7 * i + 3) % 250 for i in range(70)]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, extra_args={"policy": "llada2", "steps": 2})
    want = reference(model, prompt, 8, 2)[0]
    fed = [rows_fed(llm)]
    outs = []
    for _ in range(2):
        outs += llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)
        fed.append(rows_fed(llm))
    assert [o.num_cached_tokens for o in outs] == [0, 64]
    assert [list(o.outputs[0].token_ids) for o in outs] == [want, want]
    assert (fed[1] - fed[0]) - (fed[2] - fed[1]) == 64  # the prefill the second request skipped
    other = [(5 * i + 1) % 250 for i in range(40)]
    want = reference(model, other, 8, 2)[0]
    none = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                          extra_args={"policy": "llada2", "steps": 2, "cache_mode": "none"})
    (uncached,) = llm.generate([{"prompt_token_ids": other}], none, use_tqdm=False)
    (after,) = llm.generate([{"prompt_token_ids": other}], sp, use_tqdm=False)
    assert after.num_cached_tokens == 0
    assert list(uncached.outputs[0].token_ids) == list(after.outputs[0].token_ids) == want
    third = [(3 * i + 2) % 250 for i in range(40)]
    pair = llm.generate([{"prompt_token_ids": third}] * 2, sp, use_tqdm=False)
    want = reference(model, third, 8, 2)[0]
    assert [list(o.outputs[0].token_ids) for o in pair] == [want, want]
