"""Confidence measures against hand-computed values and the references' formulas."""

from __future__ import annotations

import math

import pytest

import torch

from vllm_dapd.decoding import entropy, max_probability, negative_entropy, token_probability, top2_margin

P = [0.5, 0.3, 0.2]
LOGITS = torch.tensor(P).log().view(1, 1, 3)


def test_token_probability_is_softmax_of_the_chosen_token():
    for tok, p in enumerate(P):
        got = token_probability(LOGITS, torch.tensor([[tok]]))
        assert got.shape == (1, 1) and math.isclose(float(got), p, rel_tol=1e-6)
    assert math.isclose(float(max_probability(LOGITS)), 0.5, rel_tol=1e-6)


def test_top2_margin():
    assert math.isclose(float(top2_margin(LOGITS)), 0.2, rel_tol=1e-5)
    assert float(top2_margin(torch.zeros(1, 1, 4))) == 0.0  # a tie has no margin
    assert float(top2_margin(torch.zeros(1, 1, 1))) == 1.0  # one-word vocabulary: certain


def test_negative_entropy_as_dream():
    expected = sum(p * math.log(p + 1e-10) for p in P)  # Dream: sum p log(p + 1e-10)
    assert math.isclose(float(negative_entropy(LOGITS)), expected, rel_tol=1e-5)
    assert math.isclose(float(entropy(LOGITS)), -expected, rel_tol=1e-5)
    certain = torch.tensor([[[50.0, 0.0, 0.0]]])
    assert abs(float(negative_entropy(certain))) < 1e-6 and float(entropy(certain)) >= 0.0
    uniform = torch.zeros(1, 1, 8)
    assert math.isclose(float(entropy(uniform)), math.log(8), rel_tol=1e-5)


def test_batched_shapes_and_half_precision_upcast():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g)
    tokens = logits.argmax(-1)
    for fn in (lambda x, tk: token_probability(x, tk), lambda x, tk: top2_margin(x),
               lambda x, tk: negative_entropy(x), lambda x, tk: entropy(x)):
        full = fn(logits, tokens)
        assert full.shape == (3, 5) and full.dtype == torch.float32
        assert torch.allclose(fn(logits.bfloat16(), tokens), full, atol=2e-2)
        rows = torch.stack([fn(logits[b:b + 1], tokens[b:b + 1])[0] for b in range(3)])
        assert torch.equal(rows, full)
    # margin equals Dream's sort-based top1 - top2
    probs = torch.softmax(logits, -1).sort(-1, descending=True).values
    assert torch.allclose(top2_margin(logits), probs[..., 0] - probs[..., 1])


@pytest.mark.parametrize("scale, vocab, dtype", [(3.0, 4096, torch.float32), (30.0, 4096, torch.float32),
                                                 (0.0, 64, torch.float32), (3.0, 1, torch.float32),
                                                 (3.0, 512, torch.bfloat16)])
def test_softmax_entropy_is_both_measures_from_one_softmax(scale, vocab, dtype):
    """Random, peaked, uniform, one-word and bf16 logits: the probabilities bitwise, the entropy to
    fp32 rounding of its dot product."""
    from vllm_dapd.decoding.confidence import probabilities, softmax_entropy

    logits = (torch.randn(4, 16, vocab, generator=torch.Generator().manual_seed(0)) * scale).to(dtype)
    probs, ent = softmax_entropy(logits)
    assert torch.equal(probs, probabilities(logits))
    torch.testing.assert_close(ent, entropy(logits), rtol=5e-4, atol=5e-5)  # gamma defaults to 1e-2
    assert bool((ent >= 0).all())
