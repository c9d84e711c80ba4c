"""The likelihood scorer on the real tiny LLaDA / Dream models: sequences of different lengths packed
into one padded forward score exactly as each alone (padding kept out by the key padding mask)."""

from __future__ import annotations

import pytest
import torch

from vllm_dapd.decoding.likelihood import (ScoreSettings, left_to_right_top, left_to_right_top_many,
                                           suffix_contributions, suffix_contributions_many)


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_packed_rows_equal_each_sequence_alone(tiny_models, name):
    model = tiny_models[name]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 200, (n,), generator=g) for n in (5, 9, 7)]
    settings = ScoreSettings(samples=4, estimator="llada" if name == "llada" else "dream", chunk_tokens=64)
    packed = suffix_contributions_many(model, [(s, 2, 10 + i) for i, s in enumerate(seqs)], settings)
    tops = left_to_right_top_many(model, [(s, 2) for s in seqs], k=3, chunk_tokens=64)
    for i, s in enumerate(seqs):
        alone = suffix_contributions(model, s, settings, seed=10 + i, first=2)
        assert torch.allclose(packed[i][2:], alone[2:], atol=1e-4)
        top = left_to_right_top(model, s, k=3, first=2)
        assert torch.equal(tops[i]["top_ids"], top["top_ids"])
        assert torch.allclose(tops[i]["token"], top["token"], atol=1e-4)
