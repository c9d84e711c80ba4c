"""End to end through ``vllm.LLM``: our scheduler + runner serve a tiny LLaDA checkpoint (cache mode ``none``).

One engine for the whole module (start-up is ~25 s on CPU). Every request is checked token for
token against the reference loop run alone, so batching, padding and per-request settings are
covered at once.
"""

from __future__ import annotations

import os

import pytest
import torch

from dapd_paper_reference import check_engine_cases, sharpen_checkpoint
from vllm_dapd import cost
from vllm_dapd.decoding import denoise
from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_llada

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_llada(tmp_path_factory) -> str:
    # head sharpened: confidences reach 0.9 and 1.0, so confidence rules (DAPD's) are exercised
    return sharpen_checkpoint(make_tiny_llada(str(tmp_path_factory.mktemp("engine_llm") / "llada")), 20)


@pytest.fixture(scope="module")
def llm(tiny_llada):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    engine = LLM(model=tiny_llada, max_model_len=256, gpu_memory_utilization=0.1, max_num_seqs=8,
                 dtype="float32", additional_config={"dapd": {"block_length": 8}})
    yield engine
    engine.llm_engine.engine_core.shutdown()


def reference(model, prompt, gen, block, steps, policy, temperature, seed):
    out = denoise(model, torch.tensor([prompt]), gen_length=gen, block_length=block,
                  steps=steps * (gen // block), policy=policy, temperature=temperature, seed=seed)
    return out.tokens[0].tolist(), int(out.nfe[0])


def test_mixed_batch_matches_reference_per_request(llm, tiny_llada):
    from vllm import SamplingParams

    model = load_model(tiny_llada)
    cases = [  # prompt, max_tokens, extra_args, temperature, seed
        ([5, 6, 7, 8, 9], 16, {"steps": 4}, 0.0, 3),
        ([11, 12, 13, 14, 15, 16, 17, 18, 19], 16, {"steps": 4, "policy": "dapd"}, 0.7, 1),
        ([20, 21, 22], 13, {"steps": 2, "policy": "threshold", "block_length": 4}, 0.0, 2),
        ([30, 31, 32, 33], 8, {}, 0.9, 7),
    ]
    params = [SamplingParams(max_tokens=n, temperature=t, seed=s, ignore_eos=True, extra_args=x)
              for _, n, x, t, s in cases]
    outs = llm.generate([{"prompt_token_ids": p} for p, *_ in cases], params, use_tqdm=False)
    for (prompt, n, extra, temp, seed), out in zip(cases, outs):
        block = extra.get("block_length", 8)
        gen = -(-n // block) * block
        ref, nfe = reference(model, prompt, gen, block, extra.get("steps", block),
                             extra.get("policy", "low_confidence"), temp, seed)
        got = list(out.outputs[0].token_ids)
        assert len(got) == n and out.outputs[0].finish_reason == "length"
        assert got == ref[:n], f"prompt {prompt}"
        # Per-request cost through vLLM's own per-request record: one "spec step" per forward.
        assert cost(out.outputs[0]) == (nfe, gen, gen / nfe)  # vllm_dapd.cost: one "spec step" per forward


def test_dapd_paper_variants_equal_the_authors_loop_per_request(llm, tiny_llada):
    """``dapd`` staged/direct through the engine (cache mode none) equals the authors' loop
    (``tests/dapd_paper_reference.py``) run on each request alone, tokens and forwards."""
    check_engine_cases(llm, load_model(tiny_llada))


def test_n_gives_each_output_its_own_cost(llm):
    """``vllm_dapd.cost`` per sequence: with n=3 each output has its own record (its own NFE)."""
    from vllm import SamplingParams

    sp = SamplingParams(n=3, max_tokens=16, temperature=1.0, seed=11, ignore_eos=True,
                        extra_args={"steps": 4, "policy": "threshold", "threshold": 0.3})
    (out,) = llm.generate([{"prompt_token_ids": [3, 4, 5, 6]}], sp, use_tqdm=False)
    costs = [cost(o) for o in out.outputs]
    assert len(costs) == 3 and None not in costs
    for o, c in zip(out.outputs, costs):
        assert 2 <= c.nfe <= 8 and c.committed_tokens == len(o.token_ids) == 16
        assert c.tokens_per_forward == c.committed_tokens / c.nfe


def test_invalid_settings_are_rejected_at_admission_and_engine_keeps_serving(llm):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    for extra, name in (({"policy": "nope"}, "policy"), ({"block_length": 0}, "block_length"),
                        ({"not_a_knob": 1}, "not_a_knob"), ({"cache_refresh": "x"}, "cache_refresh")):
        with pytest.raises(VLLMValidationError, match=name):
            llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4, extra_args=extra),
                         use_tqdm=False)
    for kwargs, name in (({"logprobs": -1}, "logprobs"), ({"prompt_logprobs": -1}, "prompt_logprobs"),
                         ({"logit_bias": {5: 1.0}}, "logit_bias"), ({"extra_args": {"score_samples": 0}}, "score_samples"),
                         ({"extra_args": {"score_nope": 1}}, "score_nope")):
        with pytest.raises(VLLMValidationError, match=name):
            llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4, **kwargs), use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_cache_modes_through_the_engine_equal_the_stepper_alone(llm, tiny_llada, helpers):
    """Cache modes ``prefix``/``dual`` end to end: the engine's pages (vLLM block ids) give what the
    stepper gives with its own pages, in one batch mixing all three modes and both ``cache_refresh``
    semantics (``block``: Fast-dLLM's refresh at every block start)."""
    from vllm import SamplingParams

    from vllm_dapd.engine.core.settings import DecodeSettings

    model = load_model(tiny_llada)
    cases = [([40, 41, 42, 43, 44, 45], {"cache_mode": "prefix", "steps": 4}, 0.0, 1),
             ([50, 51, 52], {"cache_mode": "prefix", "policy": "dapd", "steps": 2, "block_length": 4}, 0.5, 2),
             ([60, 61, 62, 63], {"cache_mode": "none", "steps": 4}, 0.0, 3),
             ([70, 71, 72, 73, 74], {"cache_mode": "dual", "steps": 4}, 0.0, 4),
             ([80, 81], {"cache_mode": "dual", "policy": "dapd", "steps": 2, "block_length": 4}, 0.7, 5),
             ([90, 91, 92, 93], {"cache_mode": "prefix", "cache_refresh": "block", "steps": 2, "block_length": 4},
              0.0, 6),
             ([100, 101, 102, 103, 104], {"cache_mode": "dual", "cache_refresh": "block", "policy": "dapd",
                                          "steps": 4}, 0.6, 7)]
    params = [SamplingParams(max_tokens=16, temperature=t, seed=s, ignore_eos=True, extra_args=x) for _, x, t, s in cases]
    outs = llm.generate([{"prompt_token_ids": p} for p, *_ in cases], params, use_tqdm=False)
    server = DecodeSettings(block_length=8)
    for (prompt, extra, temp, seed), out in zip(cases, outs):
        alone = helpers.stepper_alone(model, prompt, 16, server, extra, temp, seed)
        assert list(out.outputs[0].token_ids) == alone, f"prompt {prompt}"


def test_a_stop_token_committed_early_waits_for_its_block(llm):
    """The runner releases a block's committed prefix before the block ends, but not a stop token:
    a request that stops at one still runs its block to the end, as the reference loop counts it
    (same forwards, the same tokens up to the stop token)."""
    from vllm import SamplingParams

    from vllm_dapd import trace

    def run(**kwargs):
        sp = SamplingParams(max_tokens=8, temperature=0.0, seed=1, ignore_eos=True,
                            extra_args={"steps": 8, "trace": 1}, **kwargs)  # one block, one token per forward
        return llm.generate([{"prompt_token_ids": [9, 10, 11, 12]}], sp, use_tqdm=False)[0].outputs[0]

    full = run()
    tokens, forwards = list(full.token_ids), trace(full)
    assert cost(full).nfe == 8 and len(tokens) == 8
    # The position q of a token that first occurs there and whose prefix [0, q] is committed before the last forward.
    done, q = set(), None
    for f, positions in forwards[:-1]:
        done.update(positions)
        q = max((p for p in range(8) if set(range(p + 1)) <= done and tokens.index(tokens[p]) == p), default=q)
    assert q is not None, forwards  # the case this test is about
    out = run(stop_token_ids=[tokens[q]])
    assert list(out.token_ids) == tokens[: q + 1] and out.finish_reason == "stop"
    assert cost(out) == cost(full)  # the whole block: 8 forwards, 8 committed


def test_logprobs_of_a_prefix_released_early_are_its_commit_time_ones(llm, tiny_llada):
    """Tokens handed out before their block ends keep the logprobs of the forward that committed them
    (the stepper alone records them per position)."""
    from vllm import SamplingParams

    from vllm_dapd.engine.core import offline
    from vllm_dapd.engine.core.settings import DecodeSettings

    prompt, extra = [9, 10, 11, 12], {"steps": 8}  # the prompt whose prefix comes early (test above)
    sp = SamplingParams(max_tokens=8, temperature=0.0, seed=1, ignore_eos=True, logprobs=2, extra_args=extra)
    out = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0].outputs[0]
    seqs, kv = offline.sequences(load_model(tiny_llada), [offline.Request(prompt, extra, 8, 0.0, 1)],
                                 server=DecodeSettings(block_length=8))
    seqs[0].num_logprobs = 2
    tokens = offline.finish(load_model(tiny_llada), seqs, kv)[0]
    assert list(out.token_ids) == tokens and len(out.logprobs) == 8
    for i, (token, top) in enumerate(zip(tokens, out.logprobs)):
        ids, values, rank = seqs[0].token_logprobs[i]
        assert top[token].logprob == pytest.approx(float(values[0]), abs=1e-5) and top[token].rank == rank
        assert {int(t) for t in ids[1:]} <= set(top)
