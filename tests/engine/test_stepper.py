"""The runner's batched denoising step against the reference loop (no vLLM engine needed).

``stepper.denoise_step`` is what the vLLM runner runs each engine step in cache mode ``none``; the
reference is ``vllm_dapd.decoding.denoise``. Real model code (tiny LLaDA/Dream checkpoints), mixed
prompt lengths in one padded batch, every row must equal its reference run alone.
"""

from __future__ import annotations

import pytest
import torch

from vllm_dapd.decoding import denoise, get_policy
from vllm_dapd.decoding.policy import DenoiseState
from vllm_dapd.engine.core import offline
from vllm_dapd.engine.core.offline import Request
from vllm_dapd.engine.core.sequence import Sequence, generation_length
from vllm_dapd.engine.core.settings import DecodeSettings
from vllm_dapd.engine.core.stepper import denoise_step
from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_dream, make_tiny_llada


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_stepper")
    return {"llada": load_model(make_tiny_llada(str(root / "llada"))),
            "dream": load_model(make_tiny_dream(str(root / "dream")))}


def request(prompt, gen, block, steps, policy="low_confidence", temperature=0.0, seed=0, mode="none", **more):
    """A request for a canvas of ``gen`` (a whole number of blocks) in cache mode ``mode``."""
    return Request(list(prompt), {"policy": policy, "block_length": block, "steps": steps, "cache_mode": mode, **more},
                   max_tokens=gen, temperature=temperature, seed=seed)


def run(model, requests, kv="paged"):
    """``offline.run``: every request to completion in one batch per step; each one's tokens."""
    return [r.tokens for r in offline.run(model, requests, kv=kv)]


def alone(model, requests):
    """Each request run by itself."""
    return [run(model, [r])[0] for r in requests]


def make_seq(model, *args, **kwargs) -> Sequence:
    """One request's ``Sequence`` (no pages), to step by hand."""
    return offline.sequences(model, [request(*args, **kwargs)], kv=None)[0][0]


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("policy", ["low_confidence", "dapd", "threshold", "klass", "ieb", "eb", "factor",
                                    "localleap", "random", "margin", "dawn"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_batch_of_mixed_prompts_equals_reference_loop(models, arch, policy, temperature):
    model = models[arch]
    g = torch.Generator().manual_seed(len(policy))
    prompts = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (5, 9, 3)]
    gen, block, steps = 16, 8, 4
    together = offline.run(model, [request(p, gen, block, steps, policy, temperature, seed=i)
                                   for i, p in enumerate(prompts)], kv=None)
    for i, p in enumerate(prompts):
        ref = denoise(model, torch.tensor([p]), gen_length=gen, block_length=block, steps=steps * (gen // block),
                      policy=policy, temperature=temperature, seed=i)
        assert together[i].tokens == ref.tokens[0].tolist(), f"row {i}"
        assert together[i].nfe == int(ref.nfe[0])


def test_blocks_are_emitted_one_per_finished_block(models):
    model = models["llada"]
    seq = make_seq(model, [1, 2, 3], 12, 4, 2)
    emitted = []
    while not seq.finished:
        emitted.append(len(denoise_step(model, [seq], torch.device("cpu"))[0]))
    # 3 blocks of 4, 2 steps each: nothing, block, nothing, block, ...
    assert emitted == [0, 4, 0, 4, 0, 4]


def test_short_last_block_and_length_cap():
    assert generation_length(13, 8, 1000) == 16  # rounded up to whole blocks
    assert generation_length(13, 8, 10) == 10  # capped by the room left in the model length
    s = Sequence("r", [1], 10, DecodeSettings(block_length=8), None, 0, 0.0, 0)
    assert s.num_blocks == 2 and s.block_span() == (0, 8)
    s.block = 1
    assert s.block_span() == (8, 10)


# ---------------------------------------------------------------- cache mode "prefix"



@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_prefix_pages_hold_the_prompt_kv_of_the_first_forward(models, arch):
    model = models[arch]
    (seq,), kv = offline.sequences(model, [request(range(3, 14), 8, 8, 8, mode="prefix")])
    denoise_step(model, [seq], torch.device("cpu"), kv)
    full = torch.cat((torch.tensor(seq.prompt), torch.full((8,), model.mask_token_id)))[None]
    presents = model(full, use_cache=True).past_key_values
    assert seq.cached_len == len(seq.prompt)
    for (k, v), (pk, pv) in zip(kv.gather(seq.block_ids, seq.cached_len), presents):
        torch.testing.assert_close(k, pk[0, :, : seq.cached_len])
        torch.testing.assert_close(v, pv[0, :, : seq.cached_len])


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_prefix_single_block_matches_a_literal_prefix_loop(models, arch):
    """One block: step 0 is a full forward that caches the prompt; later steps feed the canvas (Dream:
    plus the last prompt token) over the cached prompt KV."""
    model = models[arch]
    shift, mask = model.logits_shift, model.mask_token_id
    prompt, gen, steps = list(range(20, 29)), 8, 4
    got = run(model, [request(prompt, gen, gen, steps, mode="prefix")])[0]

    P = len(prompt)
    x = torch.cat((torch.tensor(prompt), torch.full((gen,), mask)))[None]
    cache = model(x, use_cache=True).past_key_values
    policy = get_policy("low_confidence")
    for i in range(steps):
        if i == 0:
            logits = model(x).logits[:, P - shift: P - shift + gen]
        else:
            a = P - shift
            out = model(x[:, a:], past_key_values=[(k[:, :, :a], v[:, :, :a]) for k, v in cache])
            logits = out.logits[:, :gen]
        canvas = x[:, P:]
        masked = canvas == mask
        if not masked.any():
            break
        state = DenoiseState(logits=logits, tokens=canvas.clone(), masked=masked, decoded=~masked,
                             step=torch.tensor([i]), steps=torch.tensor([steps]), temperature=torch.tensor([0.0]),
                             seed=torch.tensor([0]), nfe=torch.tensor([i]))
        res = policy.step(state, {})
        x[:, P:] = torch.where(res.commit & masked, res.tokens, canvas)
    assert got == x[0, P:].tolist()


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_prefix_mode_batch_equals_each_alone(models, arch):
    model = models[arch]
    g = torch.Generator().manual_seed(11)
    cases = [(torch.randint(0, 200, (n,), generator=g).tolist(), pol, mode)
             for n, pol, mode in ((5, "low_confidence", "prefix"), (9, "dapd", "prefix"), (3, "threshold", "prefix"),
                                  (7, "low_confidence", "none"))]

    requests = [request(prompt, 16, 4, 2, pol, 0.8, i, mode) for i, (prompt, pol, mode) in enumerate(cases)]
    assert run(model, requests) == alone(model, requests)


# ---------------------------------------------------------------- cache mode "dual"

def literal_policy_step(policy, fed_logits, span, P, shift, canvas, masked, mask, step, steps):
    """One greedy policy step of a literal loop over one row: the logits of the fed span [a, e)
    (absolute positions; Dream's row j - 1 scores position j) placed on the canvas, zeros elsewhere."""
    a, e = span
    gen = canvas.shape[1]
    logits = torch.zeros(1, gen, fed_logits.shape[-1])
    lo, hi = max(0, a + shift - P), min(gen, e + shift - P)
    logits[:, lo:hi] = fed_logits[:, P + lo - a - shift: P + hi - a - shift]
    state = DenoiseState(logits=logits, tokens=canvas.clone(), masked=masked, decoded=canvas != mask,
                         step=torch.tensor([step]), steps=torch.tensor([steps]),
                         temperature=torch.tensor([0.0]), seed=torch.tensor([0]), nfe=torch.tensor([0]))
    return policy.step(state, {})


def dual_literal(model, prompt, gen, block, steps):
    """Fast-dLLM dual cache written out densely for one row (greedy low_confidence): a block's first
    step feeds from the first uncached position to the end and caches the prefix and the canvas
    after the block; the block's other steps feed only the block (Dream: plus the token before it)
    over cached prefix + cached suffix keys, with explicit RoPE positions."""
    shift, mask, P = model.logits_shift, model.mask_token_id, len(prompt)
    x = torch.cat((torch.tensor(prompt), torch.full((gen,), mask)))[None]
    dense, cached, suffix_blk = None, 0, -1
    policy = get_policy("low_confidence")
    for blk in range(gen // block):
        bs, be = blk * block, (blk + 1) * block
        for i in range(steps):
            canvas = x[:, P:]
            masked = (canvas == mask) & (torch.arange(gen) >= bs) & (torch.arange(gen) < be)
            if not masked.any():
                break
            a = min(cached, P + bs - shift)
            e = P + be if suffix_blk == blk else P + gen
            reads = list(range(a)) + (list(range(P + be, P + gen)) if suffix_blk == blk else [])
            past = [(k[:, :, reads], v[:, :, reads]) for k, v in dense] if reads else None
            out = model(x[:, a:e], positions=torch.arange(a, e)[None], past_key_values=past, use_cache=True)
            res = literal_policy_step(policy, out.logits, (a, e), P, shift, canvas, masked, mask, i, steps)
            if dense is None:
                dense = [(torch.zeros(1, k.shape[1], P + gen, k.shape[3]), torch.zeros(1, k.shape[1], P + gen, k.shape[3]))
                         for k, _ in out.past_key_values]
            writes = list(range(cached, P + bs)) + (list(range(P + be, P + gen)) if suffix_blk != blk else [])
            for (dk, dv), (k, v) in zip(dense, out.past_key_values):
                for pos in writes:
                    dk[:, :, pos], dv[:, :, pos] = k[:, :, pos - a], v[:, :, pos - a]
            cached, suffix_blk = max(cached, P + bs), blk
            x[:, P:] = torch.where(res.commit & masked, res.tokens, canvas)
    return x[0, P:].tolist()


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_dual_matches_a_literal_dual_loop(models, arch):
    model = models[arch]
    prompt, gen, block, steps = list(range(30, 37)), 12, 4, 3
    got = run(model, [request(prompt, gen, block, steps, mode="dual")])[0]
    assert got == dual_literal(model, prompt, gen, block, steps)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_mixed_cache_modes_batch_equals_each_alone(models, arch):
    model = models[arch]
    g = torch.Generator().manual_seed(5)
    cases = [(torch.randint(0, 200, (n,), generator=g).tolist(), pol, mode)
             for n, pol, mode in ((6, "low_confidence", "dual"), (4, "dapd", "dual"), (9, "threshold", "prefix"),
                                  (5, "low_confidence", "none"), (6, "dapd", "dual"))]

    requests = [request(prompt, 12, 4, 2, pol, 0.6, i, mode) for i, (prompt, pol, mode) in enumerate(cases)]
    assert run(model, requests) == alone(model, requests)


def test_trace_records_committed_positions_per_forward(models):
    model = models["llada"]
    seq = offline.run(model, [request([1, 2, 3], 8, 4, 2, trace=True)])[0].sequence
    assert [nfe for nfe, _ in seq.trace] == [0, 1, 2, 3]
    assert sorted(p for _, ps in seq.trace for p in ps) == list(range(8))  # each position committed once


# ---------------------------------------------------------------- cache_refresh "block" (Fast-dLLM exact)

def fast_dllm_literal(model, prompt, gen, block, steps, dual):
    """Fast-dLLM's ``generate_with_prefix_cache`` / ``generate_with_dual_cache``
    (https://github.com/NVlabs/Fast-dLLM, llada/generate.py) written out for one row, greedy
    low_confidence: a block's first step is a forward over prompt + whole canvas whose KV before the
    block (dual: and after it) is the cache of the block's other steps; those feed from the block to
    the end of the canvas (dual: the block only). Dream scores position j with row j - 1, so its
    other steps also feed the token before the block, over the cache before that token."""
    shift, mask, P = model.logits_shift, model.mask_token_id, len(prompt)
    x = torch.cat((torch.tensor(prompt), torch.full((gen,), mask)))[None]
    policy = get_policy("low_confidence")
    for blk in range(gen // block):
        bs, be = P + blk * block, P + (blk + 1) * block
        for i in range(steps):
            canvas = x[:, P:]
            masked = (canvas == mask) & (torch.arange(P, P + gen) >= bs) & (torch.arange(P, P + gen) < be)
            if not masked.any():
                break
            if i == 0:  # refresh: everything is fed, everything is cached
                a, e = 0, P + gen
                out = model(x, use_cache=True)
                cache = out.past_key_values
            else:
                a, e = bs - shift, (be if dual else P + gen)
                reads = list(range(a)) + (list(range(be, P + gen)) if dual else [])
                out = model(x[:, a:e], positions=torch.arange(a, e)[None],
                            past_key_values=[(k[:, :, reads], v[:, :, reads]) for k, v in cache])
            res = literal_policy_step(policy, out.logits, (a, e), P, shift, canvas, masked, mask, i, steps)
            x[:, P:] = torch.where(res.commit & masked, res.tokens, canvas)
    return x[0, P:].tolist()


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_block_refresh_matches_a_literal_fast_dllm_loop(models, arch, mode):
    model = models[arch]
    prompt, gen, block, steps = list(range(40, 47)), 12, 4, 3  # 3 blocks
    want = fast_dllm_literal(model, prompt, gen, block, steps, dual=mode == "dual")
    (result,) = offline.run(model, [request(prompt, gen, block, steps, mode=mode, cache_refresh="block")])
    assert result.tokens == want
    assert result.nfe == 3 * steps


def test_block_refresh_differs_from_the_incremental_cache(models):
    """The option does something: over a few prompts, the default (``final``) departs from
    Fast-dLLM's loop somewhere, in each mode and for each model."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (7, 5, 9)]
    for arch in ("llada", "dream"):
        model = models[arch]
        for mode in ("prefix", "dual"):
            differs = False
            for prompt in prompts:
                want = fast_dllm_literal(model, prompt, 12, 4, 3, dual=mode == "dual")
                got = run(model, [request(prompt, 12, 4, 3, mode=mode, cache_refresh="final")])[0]
                differs |= got != want
            assert differs, (arch, mode)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_mixed_cache_refresh_batch_equals_each_alone(models, arch):
    model = models[arch]
    g = torch.Generator().manual_seed(8)
    cases = [(torch.randint(0, 200, (n,), generator=g).tolist(), pol, mode, refresh)
             for n, pol, mode, refresh in ((6, "low_confidence", "prefix", "block"), (4, "dapd", "dual", "block"),
                                           (9, "threshold", "prefix", "final"), (5, "low_confidence", "dual", "final"),
                                           (7, "dapd", "prefix", "block"), (3, "low_confidence", "none", "block"),
                                           (8, "low_confidence", "dual", "block"))]

    requests = [request(prompt, 12, 4, 2, pol, 0.6, i, mode, cache_refresh=refresh)
                for i, (prompt, pol, mode, refresh) in enumerate(cases)]
    assert run(model, requests) == alone(model, requests)


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("gens", [(12, 12, 12, 12), (12, 8, 12, 16)])
def test_interleaved_policies_and_canvas_lengths_equal_each_alone(models, arch, gens):
    """Mode ``none``: policies interleaved in the batch (a policy's rows are not one contiguous run
    of the forward) with one or several canvas lengths; every row equals its run alone."""
    model = models[arch]
    g = torch.Generator().manual_seed(11)
    cases = [(torch.randint(0, 200, (n,), generator=g).tolist(), pol, gen)
             for n, pol, gen in zip((6, 4, 9, 5), ("low_confidence", "threshold", "low_confidence", "klass"), gens)]

    requests = [request(prompt, gen, 4, 2, pol, 0.6, i) for i, (prompt, pol, gen) in enumerate(cases)]
    assert run(model, requests, kv=None) == [run(model, [r], kv=None)[0] for r in requests]


def shares_storage_with_the_forward(models, monkeypatch, policy, block, field):
    """One mode-``none`` step of three sequences with one canvas length; per policy call, whether the
    state's ``field`` is a view of the forward's own tensor of that name."""
    from vllm_dapd.engine.core import stepper

    model = models["llada"]
    seen = []
    real = stepper.denoise_state

    def spy(step, out, idx):
        state = real(step, out, idx)
        seen.append(getattr(state, field).untyped_storage().data_ptr()
                    == getattr(out, field).untyped_storage().data_ptr())
        return state

    monkeypatch.setattr(stepper, "denoise_state", spy)
    seqs, _ = offline.sequences(model, [request([1, 2, 3 + i, 4][: 2 + i], 8, block, 2, policy, seed=i)
                                        for i in range(3)], kv=None)
    denoise_step(model, seqs, torch.device("cpu"))
    return seen


def test_whole_canvas_logits_are_a_view_of_the_forward(models, monkeypatch):
    """Mode ``none``, one canvas length: the policy reads the forward's own logits (no [B, L, V] copy)."""
    assert shares_storage_with_the_forward(models, monkeypatch, "low_confidence", 8, "logits") == [True]


def test_whole_canvas_attention_is_a_view_of_the_hook(models, monkeypatch):
    """Mode ``none``, one canvas length: DAPD reads the hook's own attention tensor (no [B, L, L] copy)."""
    assert shares_storage_with_the_forward(models, monkeypatch, "dapd", 4, "attention") == [True]


class CountingModel:
    """The model, counting forwards (the stepper reads ``logits_shift`` and calls it)."""

    def __init__(self, model):
        self.model, self.logits_shift, self.calls = model, model.logits_shift, 0

    def run(self, batch):
        self.calls += 1
        return self.model.run(batch)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_one_forward_per_step_for_any_mix_of_policies_lengths_and_caches(models, arch):
    """DAPD and DAWN (different attention layers) with several canvas lengths and cache modes,
    next to policies that read no attention: one forward per step, every row equal to its run alone."""
    model = models[arch]
    g = torch.Generator().manual_seed(13)
    cases = [(torch.randint(0, 200, (n,), generator=g).tolist(), pol, gen, mode)
             for n, pol, gen, mode in ((6, "dapd", 12, "none"), (4, "dapd", 8, "none"), (9, "dawn", 16, "none"),
                                       (5, "low_confidence", 12, "none"), (7, "dapd", 12, "prefix"),
                                       (3, "dawn", 8, "dual"), (8, "threshold", 12, "dual"))]

    counting = CountingModel(model)
    requests = [request(prompt, gen, 4, 2, pol, 0.6, i, mode) for i, (prompt, pol, gen, mode) in enumerate(cases)]
    seqs, kv = offline.sequences(model, requests)
    together, steps = [[] for _ in seqs], 0
    while not all(s.finished for s in seqs):
        live = [i for i, s in enumerate(seqs) if not s.finished]
        for i, block in zip(live, denoise_step(counting, [seqs[i] for i in live], torch.device("cpu"), kv)):
            together[i] += block
        steps += 1
    assert counting.calls == steps
    assert together == alone(model, requests)


def test_logits_only_for_the_active_block_plus_decoded_rows_for_dawn(models, monkeypatch):
    """Two blocks of 4 over a canvas of 8: low_confidence gets (and the model computes) the rows of
    its active block's masked positions (4, then 2), DAWN those plus the decoded positions (its
    anchors: 4 + 0, 2 + 2, 4 + 4, 2 + 6), KLASS the whole canvas; all as in the reference."""
    model = models["llada"]
    widths, real = [], model.run

    def spy(batch):
        out = real(batch)
        widths.append(out.logits.shape[1])
        return out

    monkeypatch.setattr(model, "run", spy)
    for policy, width in (("low_confidence", {4, 2}), ("dawn", {4, 8}), ("klass", {8})):
        widths.clear()
        got = run(model, [request([5, 6, 7 + i], 8, 4, 2, policy, seed=i) for i in range(2)], kv=None)
        assert set(widths) == width
        for i in range(2):
            ref = denoise(model, torch.tensor([[5, 6, 7 + i]]), gen_length=8, block_length=4, steps=4,
                          policy=policy, temperature=0.0, seed=i)
            assert got[i] == ref.tokens[0].tolist()


def test_sample_logprobs_equal_with_block_rows_and_whole_canvas_rows(models, monkeypatch):
    """Committed tokens' logprobs come from the row that scored them, whichever rows the model computed."""
    model = models["dream"]
    policy = type(get_policy("low_confidence"))

    def logprobs(subset):
        monkeypatch.setattr(policy, "accepts_row_subset", subset)
        seqs, _ = offline.sequences(model, [request([5, 6, 7 + i], 12, 4, 2, temperature=0.5, seed=i)
                                            for i in range(2)], kv=None)
        for s in seqs:
            s.num_logprobs = 2
        tokens = offline.finish(model, seqs)
        return tokens, [{p: (ids.tolist(), vals.tolist(), rank) for p, (ids, vals, rank) in s.token_logprobs.items()}
                        for s in seqs]

    (tok_rows, lp_rows), (tok_all, lp_all) = logprobs(True), logprobs(False)
    assert tok_rows == tok_all
    assert [sorted(d) for d in lp_rows] == [list(range(12))] * 2
    for a, b in zip(lp_rows, lp_all):
        for p in a:
            assert a[p][0] == b[p][0] and a[p][2] == b[p][2]
            assert a[p][1] == pytest.approx(b[p][1], abs=1e-6)
