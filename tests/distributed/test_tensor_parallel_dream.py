"""TP=2 == TP=1 for Dream (GQA: 4 query heads, 2 KV heads -> 2 + 1 per rank; shifted logits),
through ``vllm.LLM`` on the CPU platform, one engine. See ``test_tensor_parallel.py``.

Head size 32, so the TP=2 engine runs the kernel attention path (the CPU default where vLLM's
kernel takes the head size; each rank keeps its own KV heads' pages) while the TP=1 answer comes
from the portable path; the LLaDA test (head size 16) covers TP on the portable path."""

from __future__ import annotations

import pytest

from vllm_dapd.models.tiny import make_tiny_dream

pytestmark = pytest.mark.slow


def test_dream_gqa_tp2_equals_tp1_for_every_policy(tmp_path_factory, tp):
    path = make_tiny_dream(str(tmp_path_factory.mktemp("tp_dream") / "dream"), hidden_size=128,
                           num_attention_heads=4, num_key_value_heads=2)
    cases = tp.cases()
    got = tp.run(path, 2, cases)
    model = tp.load(path)
    assert model.spec.n_kv_heads == 2 and model.spec.head_dim == 32
    for (prompt, extra, temp, seed), tokens in zip(cases, got):
        assert tokens == tp.expected(model, prompt, extra, temp, seed), f"prompt {prompt} {extra} T={temp}"
