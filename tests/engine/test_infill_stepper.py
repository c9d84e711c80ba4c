"""Infilling (a suffix after the canvas) in the batched stepper against the reference loop, no engine.

``denoise(..., suffix_ids=...)`` is the oracle: prompt + canvas + suffix, the suffix fixed context.
The stepper must equal it token for token in cache mode ``none`` for every policy, with sequences
with and without a suffix (and of different lengths) in one padded batch; in ``prefix``/``dual``
a batch must equal each request alone and the suffix must be attended (its KV is in the pages).
"""

from __future__ import annotations

import pytest
import torch

from vllm_dapd.decoding import denoise
from vllm_dapd.engine.core import offline
from vllm_dapd.engine.vllm.infill import check_suffix, split_hole
from vllm_dapd.engine.core.stepper import denoise_step
from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_dream, make_tiny_llada


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_infill")
    return {"llada": load_model(make_tiny_llada(str(root / "llada"))),
            "dream": load_model(make_tiny_dream(str(root / "dream")))}


def request(prompt, suffix, gen, overrides, temperature=0.0, seed=0, mode="none"):
    return offline.Request(list(prompt), {**overrides, "cache_mode": mode}, max_tokens=gen, temperature=temperature,
                           seed=seed, suffix=list(suffix))


def run(model, requests):
    return [r.tokens for r in offline.run(model, requests)]


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("policy", ["low_confidence", "dapd", "dawn", "klass", "threshold", "ieb", "margin"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_batch_with_suffixes_equals_reference_loop(models, arch, policy, temperature):
    model = models[arch]
    g = torch.Generator().manual_seed(len(policy) + 3)
    cases = [(torch.randint(0, 200, (n,), generator=g).tolist(), torch.randint(0, 200, (s,), generator=g).tolist())
             for n, s in ((5, 4), (9, 0), (3, 7))]
    gen, block, steps = 12, 6, 3
    overrides = {"policy": policy, "block_length": block, "steps": steps}
    together = offline.run(model, [request(p, s, gen, overrides, temperature, seed=i) for i, (p, s) in enumerate(cases)],
                           kv=None)
    for i, (p, s) in enumerate(cases):
        ref = denoise(model, torch.tensor([p]), gen_length=gen, block_length=block, steps=steps * (gen // block),
                      policy=policy, temperature=temperature, seed=i, suffix_ids=torch.tensor([s], dtype=torch.long))
        assert together[i].tokens == ref.tokens[0].tolist(), f"row {i}"
        assert together[i].nfe == int(ref.nfe[0])
        assert ref.sequences[0, len(p) + gen:].tolist() == s  # the suffix is never committed over


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_the_suffix_is_attended(models, arch):
    """The answer's logits depend on the suffix: two suffixes give two different first forwards."""
    model = models[arch]
    prompt, gen = torch.tensor([[5, 6, 7, 8]]), 6
    masks = torch.full((1, gen), model.mask_token_id)
    x = [torch.cat((prompt, masks, torch.tensor([s])), 1) for s in ([9, 10], [30, 31])]
    a, b = (model(t).logits[0, 4 - model.logits_shift: 4 - model.logits_shift + gen] for t in x)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_cached_modes_with_suffix_batch_equals_each_alone(models, arch):
    model = models[arch]
    g = torch.Generator().manual_seed(5)
    cases = [(torch.randint(0, 200, (n,), generator=g).tolist(), torch.randint(0, 200, (s,), generator=g).tolist(),
              pol, mode) for n, s, pol, mode in ((6, 3, "low_confidence", "dual"), (4, 5, "dapd", "dual"),
                                                 (9, 2, "threshold", "prefix"), (5, 0, "low_confidence", "none"),
                                                 (6, 4, "dawn", "prefix"))]

    requests = [request(prompt, suffix, 12, {"policy": pol, "block_length": 4, "steps": 2}, 0.6, i, mode)
                for i, (prompt, suffix, pol, mode) in enumerate(cases)]
    assert run(model, requests) == [run(model, [r])[0] for r in requests]


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_modes_read_the_suffix(models, mode):
    """In ``prefix``/``dual`` the suffix reaches every step: changing it changes the answer's logits
    at a later step (dual: through the KV cached at the block start)."""
    model = models["llada"]
    seen = []
    for suffix in ([9, 10, 11], [40, 41, 42]):
        (seq,), kv = offline.sequences(model, [request([5, 6, 7], suffix, 8, {"block_length": 4, "steps": 4},
                                                       mode=mode)])
        denoise_step(model, [seq], torch.device("cpu"), kv)  # block start: caches prefix (+ dual: the suffix)
        captured = {}
        real = model.run

        def spy(batch):
            out = real(batch)
            captured["logits"] = out.logits
            return out

        model.run = spy
        try:
            denoise_step(model, [seq], torch.device("cpu"), kv)
        finally:
            del model.run
        seen.append(captured["logits"])
    assert not torch.allclose(seen[0], seen[1])


def test_split_hole_and_checks():
    assert split_hole([1, 2, 9, 3, 4], 9) == ([1, 2], [3, 4])
    assert split_hole([1, 2], 9) == ([1, 2], [])
    assert split_hole([1, 9], 9) == ([1], [])
    for prompt, suffix, limit, key in (([1], [], 10, "suffix"), ([1], [9], 10, "suffix"), ([9], [2], 10, "prompt"),
                                       ([1, 2], [3] * 7, 10, "suffix")):
        with pytest.raises(ValueError, match=f"^{key}:"):
            check_suffix(prompt, suffix, 9, limit)
    check_suffix([1, 2], [3] * 6, 9, 10)  # one position left for the answer
    with pytest.raises(ValueError, match="^suffix_ids:"):
        denoise(_Dummy(), torch.tensor([[1]]), 2, 2, 2, suffix_ids=torch.tensor([[9]]))


class _Dummy:
    mask_token_id = 9
    logits_shift = 0
