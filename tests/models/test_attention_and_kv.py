"""The attention hook equals a naive full-softmax computation, and prefix KV reproduces a full
forward (logits, attention normalised over prefix keys too)."""

from __future__ import annotations

import math

import pytest
import torch

import vllm_dapd.models.transformer as transformer


def _naive_attention(model, ids, mask, span, layers) -> torch.Tensor:
    """Capture each chosen layer's q/k projections, rotate, softmax over ALL keys, average heads."""
    spec, captured = model.spec, {}
    hooks = [model.layers[i].qkv.register_forward_hook(
        lambda mod, inp, out, i=i: captured.__setitem__(i, out)) for i in layers]
    with torch.no_grad():
        model(ids, key_padding_mask=mask)
    for h in hooks:
        h.remove()
    B, T = ids.shape
    D, H, Hkv = spec.head_dim, spec.n_heads, spec.n_kv_heads
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0).double() if mask is not None else torch.arange(T).double().expand(B, T)
    inv = 1.0 / spec.rope_theta ** (torch.arange(0, D, 2).double() / D)
    ang = pos[..., None] * inv  # [B, T, D/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]

    def rot(x, heads):
        x = x.double().view(B, T, heads, D).transpose(1, 2)
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)

    total = 0
    for i in layers:
        q, k, _ = captured[i]
        q, k = rot(q, H), rot(k, Hkv).repeat_interleave(H // Hkv, dim=1)
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        p = s.softmax(-1).mean(1)  # [B, T, T]
        total = total + p[:, span[0]:span[1], span[0]:span[1]]
    return (total / len(layers)).float()


@pytest.mark.parametrize("name", ["llada", "dream"])
@pytest.mark.parametrize("layers", [[-1], [0, 1]])
def test_attention_hook_equals_naive_softmax(name, layers, tiny_models):
    model = tiny_models[name]
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (2, 14), generator=gen)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[1, :5] = False  # left-padded second row
    span = (6, 14)
    with torch.no_grad():
        got = model(ids, attention_span=span, attention_layers=layers, key_padding_mask=mask).attention
    want = _naive_attention(model, ids, mask, span, [i % len(model.layers) for i in layers])
    assert got.shape == (2, 8, 8)
    assert (got - want).abs().max().item() < 1e-5
    assert (got.sum(-1) <= 1 + 1e-5).all()


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_hook_per_row_layers_and_rows_equal_separate_calls(name, tiny_models):
    """One forward serving rows that average different layers (DAPD's last layer next to DAWN's
    last four), for a subset of the batch, gives each row exactly what a call of its own gives."""
    model = tiny_models[name]
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 300, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[2, :4] = False
    span = (5, 12)
    with torch.no_grad():
        mixed = model(ids, attention_span=span, attention_layers=[[-1], [0, 1]], attention_rows=torch.tensor([2, 0]),
                      key_padding_mask=mask).attention
        last = model(ids, attention_span=span, attention_layers=[-1], key_padding_mask=mask).attention
        both = model(ids, attention_span=span, attention_layers=[0, 1], key_padding_mask=mask).attention
    assert mixed.shape == (2, 7, 7)
    assert torch.equal(mixed[0], last[2]) and torch.equal(mixed[1], both[0])
    with pytest.raises(ValueError, match="attention_layers"):
        model(ids, attention_span=span, attention_layers=[[-1], [0]], key_padding_mask=mask)


def test_hook_runs_only_on_chosen_layers(tiny_models, monkeypatch):
    calls = []
    real = transformer.span_attention
    monkeypatch.setattr(transformer, "span_attention", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        tiny_models["llada"](ids, attention_span=(2, 10), attention_layers=[-1])
        tiny_models["llada"](ids)
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_prefix_kv_matches_full_forward(name, tiny_models):
    model = tiny_models[name]
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 300, (2, 16), generator=gen)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, :3] = False  # left padding lives in the prefix
    P = 9
    with torch.no_grad():
        full = model(ids, attention_span=(P + 1, 16), attention_layers=[0, -1], key_padding_mask=mask,
                     use_cache=True)
        # Bidirectional: the prefix's K/V depend on the canvas, so feed the full forward's own prefix
        # K/V back; the canvas rows must then come out exactly as in the full forward.
        past = [(k[:, :, :P], v[:, :, :P]) for k, v in full.past_key_values]
        tail = model(ids[:, P:], attention_span=(1, 16 - P), attention_layers=[0, -1], key_padding_mask=mask,
                     past_key_values=past, use_cache=True)
    assert len(full.past_key_values) == len(model.layers)
    k, v = tail.past_key_values[0]
    assert k.shape == (2, model.spec.n_kv_heads, 16 - P, model.spec.head_dim) and v.shape == k.shape
    assert (tail.logits - full.logits[:, P:]).abs().max().item() < 1e-5
    assert (tail.attention - full.attention).abs().max().item() < 1e-5


def test_logits_rows_and_flat_input(tiny_models):
    model = tiny_models["dream"]
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        full = model(ids).logits
        part = model(ids, logits_rows=torch.arange(5, 12)[None]).logits
        flat = model(ids[0], positions=torch.arange(12)).logits
        embeds = model(ids, inputs_embeds=model.embed(ids)).logits
    assert torch.equal(embeds, full)
    assert part.shape == (1, 7, full.shape[-1])
    assert (part - full[:, 5:]).abs().max().item() < 1e-5
    assert flat.shape == full[0].shape and (flat - full[0]).abs().max().item() < 1e-5


def test_bad_hook_arguments_are_named(tiny_models):
    model, ids = tiny_models["llada"], torch.randint(0, 300, (1, 6))
    with pytest.raises(ValueError, match="attention_span"):
        model(ids, attention_span=(4, 9))
    with pytest.raises(ValueError, match="attention_layers"):
        model(ids, attention_span=(0, 6), attention_layers=[7])
    with pytest.raises(ValueError, match="key_padding_mask"):
        model(ids, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))


def test_last_k_layers_clip_to_model_depth(tiny_models):
    """DAWN's default "last 4 layers" on a 2-layer model averages the 2 layers it has."""
    model, ids = tiny_models["llada"], torch.randint(0, 300, (1, 8))
    assert len(model.layers) == 2
    want = model(ids, attention_span=(2, 8), attention_layers=[0, 1]).attention
    got = model(ids, attention_span=(2, 8), attention_layers=[-4, -3, -2, -1]).attention
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="attention_layers: empty"):
        model(ids, attention_span=(2, 8), attention_layers=[-5])


def test_dual_cache_prefix_and_suffix_keys(tiny_models):
    """A middle block with cached prefix AND suffix keys (Fast-dLLM dual cache) and explicit positions
    reproduces the full forward's rows for that block."""
    model = tiny_models["llada"]
    ids = torch.randint(0, 300, (1, 18), generator=torch.Generator().manual_seed(5))
    lo, hi = 8, 12
    with torch.no_grad():
        full = model(ids, use_cache=True, attention_span=(lo, hi))
        past = [(torch.cat((k[:, :, :lo], k[:, :, hi:]), 2), torch.cat((v[:, :, :lo], v[:, :, hi:]), 2))
                for k, v in full.past_key_values]
        mid = model(ids[:, lo:hi], positions=torch.arange(lo, hi)[None], past_key_values=past,
                    attention_span=(0, hi - lo))
    assert (mid.logits - full.logits[:, lo:hi]).abs().max().item() < 1e-5
    assert (mid.attention - full.attention).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_real_rows_skip_the_padding_in_the_gemms(name, tiny_models, monkeypatch):
    """``real_rows``: projections and MLP see only the N real rows; logits, attention hook and KV of
    the real rows equal the padded forward's."""
    model = tiny_models[name]
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 300, (3, 10), generator=gen)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, :6], mask[2, :3] = False, False
    real = torch.nonzero(mask.flatten()).squeeze(1)
    rows = torch.tensor([[6, 7, 9], [0, 5, 9], [3, 4, 8]])
    kwargs = dict(key_padding_mask=mask, attention_span=(6, 10), attention_layers=[-1], logits_rows=rows,
                  use_cache=True)
    seen = []
    qkv = model.layers[0].qkv
    monkeypatch.setattr(qkv, "forward", lambda x, _f=qkv.forward: seen.append(x.shape[0]) or _f(x))
    with torch.no_grad():
        padded = model(ids, **kwargs)
        packed = model(ids, real_rows=real, **kwargs)
    assert seen == [3, len(real)]  # [B, T, h] padded, then [N, h]
    assert (packed.logits - padded.logits).abs().max().item() < 1e-5
    assert (packed.attention - padded.attention).abs().max().item() < 1e-6
    for (k0, v0), (k1, v1) in zip(padded.past_key_values, packed.past_key_values):
        m = mask[:, None, :, None]
        assert ((k1 - k0).abs() * m).max().item() < 1e-5 and ((v1 - v0).abs() * m).max().item() < 1e-5
