"""Fast-dLLM's Dream threshold loop (``tests/fastdllm_dream_reference.py``) on a tiny Dream model:
``threshold`` with ``dream_quota`` and ``overrun`` equals it token for token and forward for forward,
past ``steps`` too, through the reference loop (``decoding.denoise``) and through the served step
(``engine.core.offline.run``, all requests in one batch). ``vllm.LLM``: ``tests/engine/test_llm_dream.py``.
"""

from __future__ import annotations

import pytest
import torch

from dapd_paper_reference import sharpen_checkpoint
from fastdllm_dream_reference import OVERRUN_CASES, overrun_args, reference_answer
from vllm_dapd.decoding import denoise
from vllm_dapd.engine.core import offline
from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_dream


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    # head sharpened: confidences spread over (0, 1], so the threshold passes some and not others
    return load_model(sharpen_checkpoint(make_tiny_dream(str(tmp_path_factory.mktemp("fdllm") / "dream")), 20))


@pytest.fixture(scope="module")
def references(dream):
    return [reference_answer(dream, p, n, s, t) for p, n, s, t in OVERRUN_CASES]


def test_the_cases_overrun_their_budget(references):
    """Non-vacuous: the loop keeps stepping past ``steps`` in some cases (there ``exact_schedule``
    alone would commit the rest at the last step)."""
    assert sum(len(transfers) > s for (_, transfers), (_, _, s, _) in zip(references, OVERRUN_CASES)) >= 3


@pytest.mark.parametrize("case", range(len(OVERRUN_CASES)))
def test_reference_loop_equals_fastdllm_dream(dream, references, case):
    prompt, n, steps, thr = OVERRUN_CASES[case]
    want, transfers = references[case]
    params = {k: v for k, v in overrun_args(n, steps, thr).items() if k not in ("policy", "steps", "block_length")}
    out = denoise(dream, torch.tensor([prompt]), gen_length=n, block_length=n, steps=steps, policy="threshold",
                  params=params, trace=True)
    assert out.tokens[0].tolist() == want
    assert int(out.nfe[0]) == len(transfers)
    P = len(prompt)
    assert [t[0].tolist() for t in out.trace] == [t[0, P:].tolist() for t in transfers]  # forward for forward


def test_served_step_equals_fastdllm_dream(dream, references):
    requests = [offline.Request(p, {**overrun_args(n, s, t), "trace": True}, max_tokens=n)
                for p, n, s, t in OVERRUN_CASES]
    for r, (want, transfers), (prompt, *_) in zip(offline.run(dream, requests, kv=None), references, OVERRUN_CASES):
        assert r.tokens == want
        assert r.nfe == len(transfers)
        P = len(prompt)
        assert [sorted(pos) for _, pos in r.sequence.trace] == \
            [torch.nonzero(t[0, P:]).flatten().tolist() for t in transfers]


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_overrun_steps_past_the_budget_in_the_cache_modes(dream, mode):
    """The cache modes step past ``steps`` too (no fixed number of forwards per block): each block
    ends when it has no mask, within ``max(steps, block_length)`` forwards."""
    requests = [offline.Request(p, {**overrun_args(n, s, t), "cache_mode": mode}, max_tokens=n)
                for p, n, s, t in OVERRUN_CASES]
    results = offline.run(dream, requests)
    assert any(r.nfe > s for r, (_, _, s, _) in zip(results, OVERRUN_CASES))
    for r, (_, n, s, _) in zip(results, OVERRUN_CASES):
        assert dream.mask_token_id not in r.tokens and len(r.tokens) == n and r.nfe <= max(s, n)
