"""DAWN's absolute sink rule (``tau_sink``) in the loops: ``DenoiseState.key_attention`` is the mean,
over every query of the sequence (prompt and suffix included), of each canvas key's attention,
recomputed here from the model on the same tokens; the served step (one batch, mixed prompt
lengths, an infilling suffix, a dawn request without ``tau_sink`` in the same policy call) equals
the reference loop token for token; other cache modes are refused naming the key."""

from __future__ import annotations

import pytest
import torch

from dapd_paper_reference import sharpen_checkpoint
from vllm_dapd.decoding import denoise, get_policy
from vllm_dapd.decoding.generate import model_depth
from vllm_dapd.engine.core import offline
from vllm_dapd.engine.core.settings import DecodeSettings
from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_dream
from vllm_dapd.plugins.dawn import DawnPolicy

# tau_sink near the mean key's share 1/T (the random tiny model attends almost uniformly): some
# keys are sinks, not all
CASES = [  # prompt, suffix, max_tokens (distinct: the canvas length tells the rows apart), extra_args
    ([5, 6, 7, 8, 9], [], 8, {"tau_sink": 0.073}),
    ([11, 12, 13], [40, 41, 42], 12, {"tau_sink": 0.056, "block_length": 4}),
    ([20, 21, 22, 23, 24, 25, 26], [], 4, {}),  # relative sink_ratio, same policy call
]


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    return load_model(sharpen_checkpoint(make_tiny_dream(str(tmp_path_factory.mktemp("keyatt") / "dream")), 20))


def spy(monkeypatch) -> list:
    """Record every DAWN step's state (the policy itself runs unchanged)."""
    seen, step = [], DawnPolicy.step

    def recorded(self, state, params):
        seen.append(state)
        return step(self, state, params)

    monkeypatch.setattr(DawnPolicy, "step", recorded)
    return seen


def column_means(model, prompt, canvas, suffix, layers) -> torch.Tensor:
    x = torch.tensor([prompt + canvas + suffix])
    att = model(x, attention_span=(0, x.shape[1]), attention_layers=layers).attention  # [1, T, T]
    return att.mean(dim=1)[0, len(prompt): len(prompt) + len(canvas)]


def test_served_key_attention_is_every_querys_column_mean(dream, monkeypatch):
    seen = spy(monkeypatch)
    server = DecodeSettings(policy="dawn", block_length=8)
    requests = [offline.Request(p, x, n, suffix=s) for p, s, n, x in CASES]
    results = offline.run(dream, requests, server=server)
    layers = get_policy("dawn").attention_layers(None, model_depth(dream))
    by_length = {n: (p, s, bool(x)) for p, s, n, x in CASES}
    checked = 0
    for state in seen:
        assert state.key_attention is not None  # the group holds a tau_sink request at every step here
        for b, n in enumerate(state.canvas_length.tolist()):
            prompt, suffix, keyed = by_length[n]
            if keyed:
                want = column_means(dream, prompt, state.tokens[b, :n].tolist(), suffix, layers)
                torch.testing.assert_close(state.key_attention[b, :n], want, atol=1e-5, rtol=1e-4)
                checked += 1
    assert checked >= 4
    for (prompt, suffix, n, extra), r in zip(CASES, results):  # and the answers are the reference loop's
        block = extra.get("block_length", 8)
        ref = denoise(dream, torch.tensor([prompt]), gen_length=n, block_length=min(block, n), steps=n,
                      policy="dawn", params={k: v for k, v in extra.items() if k != "block_length"},
                      suffix_ids=torch.tensor([suffix], dtype=torch.long))
        assert r.tokens == ref.tokens[0].tolist() and r.nfe == int(ref.nfe[0]), (prompt, extra)


def test_reference_loop_key_attention_counts_the_prompts_queries(dream, monkeypatch):
    seen = spy(monkeypatch)
    prompt, n, tau = [5, 6, 7, 8, 9], 8, 0.073
    layers = get_policy("dawn").attention_layers(None, model_depth(dream))
    denoise(dream, torch.tensor([prompt]), gen_length=n, block_length=n, steps=n, policy="dawn",
            params={"tau_sink": tau})
    for state in seen:
        torch.testing.assert_close(state.key_attention[0], column_means(dream, prompt, state.tokens[0].tolist(), [],
                                                                        layers), atol=1e-5, rtol=1e-4)
    sinks = [s.key_attention[0] > tau for s in seen]
    assert any(bool(k.any()) and not bool(k.all()) for k in sinks)  # some keys are sinks, not all
    canvas_rows = [s.attention[0].mean(dim=0) > tau for s in seen]  # the canvas's queries alone
    assert any(not torch.equal(a, b) for a, b in zip(sinks, canvas_rows))  # the prompt's queries count


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_tau_sink_needs_cache_mode_none(dream, mode):
    with pytest.raises(ValueError, match="^tau_sink: .*cache_mode 'none'"):
        offline.sequences(dream, [offline.Request([5, 6], {"policy": "dawn", "tau_sink": 0.01, "cache_mode": mode}, 4)])
    offline.sequences(dream, [offline.Request([5, 6], {"policy": "dawn", "cache_mode": mode}, 4)])  # relative: fine
