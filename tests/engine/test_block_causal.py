"""Block-causal models (LLaDA2) in the engine's step (no vLLM engine needed): ``stepper.denoise_step``
over paged KV equals the block-diffusion reference loop (``decoding/block_diffusion.py``) token for
token, for every policy, batched with other prompt lengths; each step feeds only up to the active
block's end; the grid arithmetic of ``Sequence`` and ``settings.plan``."""

from __future__ import annotations

import pytest
import torch
from dapd_paper_reference import sharpen_checkpoint

from vllm_dapd.decoding import available_policies
from vllm_dapd.decoding.block_diffusion import block_diffusion_generate
from vllm_dapd.engine.core.kv import PagedKV
from vllm_dapd.engine.core.sequence import Sequence
from vllm_dapd.engine.core.settings import DecodeSettings, Defaults, plan
from vllm_dapd.engine.core.layout import Feed
from vllm_dapd.engine.core.stepper import denoise_step
from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_llada2

BLOCK = 4  # the tiny model's declared block size
PAGE = 4


def run_stepper(model, seqs, kv=None) -> dict[str, list[int]]:
    """Step ``seqs`` together until all finish: each request's committed tokens."""
    out: dict[str, list[int]] = {s.req_id: [] for s in seqs}
    live = list(seqs)
    while live:
        for s, block in zip(live, denoise_step(model, live, torch.device("cpu"), kv)):
            out[s.req_id] += block
        live = [s for s in live if not s.finished]
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny_llada2(str(tmp_path_factory.mktemp("block_causal") / "llada2"), block_length=BLOCK)
    return load_model(sharpen_checkpoint(path, 20))  # confidences over the threshold happen


def make_seq(model, req_id, prompt, max_tokens, steps, policy, cache_mode="prefix", temperature=0.0, seed=0,
             first_page=0):
    p = plan(Defaults(DecodeSettings(block_length=BLOCK, cache_mode=cache_mode)), {"policy": policy, "steps": steps},
             max_tokens, 1000, BLOCK, len(prompt))
    s = Sequence(req_id, list(prompt), p.gen_length, p.settings, p.params, model.mask_token_id, temperature, seed,
                 causal=True)
    pages = -(-(len(prompt) + p.gen_length) // PAGE)
    s.block_ids = [(first_page + 5 * i) % 97 for i in range(pages)]  # scattered, disjoint per request
    return s


def pages(model):
    spec = model.spec
    return PagedKV(spec.n_layers, 97, PAGE, spec.n_kv_heads, spec.head_dim, torch.float32, "cpu")


def reference(model, prompt, max_tokens, steps, policy, temperature=0.0, seed=0, kv_cache=True):
    out = block_diffusion_generate(model, torch.tensor([prompt]), max_tokens, steps=steps, policy=policy,
                                   temperature=temperature, seed=seed, kv_cache=kv_cache)
    return out.sequences[0, len(prompt):].tolist(), int(out.nfe[0])


def test_plan_and_grid_count_blocks_from_position_0():
    """Prompt of 6, blocks of 4: the first block holds 2 prompt tokens and canvas 0..1; a 5-token
    answer needs blocks up to position 12, so the canvas is 6 positions (3 blocks in canvas terms)."""
    p = plan(Defaults(DecodeSettings(block_length=BLOCK)), None, 5, 1000, BLOCK, 6)
    assert p.gen_length == 6 and p.settings.block_length == BLOCK
    s = Sequence("r", list(range(6)), p.gen_length, p.settings, p.params, 0, 0.0, 0, causal=True)
    assert s.block_offset == 2 and s.num_blocks == 2 and s.block_span() == (0, 2) and s.grid_start() == 4
    s.block = 1
    assert s.block_span() == (2, 6) and s.grid_start() == 8
    with pytest.raises(ValueError, match="^block_length: the served model is block-causal with block size 4"):
        plan(Defaults(DecodeSettings(block_length=BLOCK)), {"block_length": 8}, 5, 1000, BLOCK, 6)
    with pytest.raises(ValueError, match="^cache_mode: 'dual'"):
        plan(Defaults(DecodeSettings(block_length=BLOCK)), {"cache_mode": "dual"}, 5, 1000, BLOCK, 6)


def test_each_step_feeds_only_up_to_the_active_block(model):
    """Fed spans: prompt + first block at the first step, then the active block alone, except a block's
    first step, which also writes the block finished last step; never a position past the block."""
    prompt = [5, 6, 7, 8, 9, 10]
    s = make_seq(model, "r", prompt, 9, BLOCK, "low_confidence")
    kv, spans = pages(model), []
    while not s.finished:
        f = Feed.of(s, 0, 10**6)
        spans.append(((f.first, f.end), s.block))
        denoise_step(model, [s], torch.device("cpu"), kv)
    for (a, e), block in spans:
        assert e == len(prompt) + s.block_span(block)[1]  # the active block's end
    assert spans[0][0] == (0, 8)
    assert all(e - a <= 2 * BLOCK for (a, e), _ in spans[1:])
    assert any(e - a == BLOCK for (a, e), _ in spans)  # the active block alone over the cached prefix


@pytest.mark.parametrize("policy", available_policies())
def test_batch_equals_reference_loop_for_every_policy(model, policy):
    """Two prompts of different lengths (so different grid offsets) stepped together over pages:
    each equals the reference loop run alone (exact KV reuse of the prompt and finished blocks), full
    recompute for row 0, the reference's block KV cache for row 1."""
    g = torch.Generator().manual_seed(len(policy))
    prompts = [torch.randint(0, 250, (n,), generator=g).tolist() for n in (6, 9)]
    temperature = 0.0 if policy != "random" else 0.7
    seqs = [make_seq(model, f"r{i}", p, 8, 2, policy, temperature=temperature, seed=i, first_page=11 * i)
            for i, p in enumerate(prompts)]
    got = run_stepper(model, seqs, pages(model))
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        want, nfe = reference(model, p, 8, 2, policy, temperature, seed=i, kv_cache=i == 1)
        assert got[f"r{i}"][:8] == want[:8], f"row {i}"
        assert s.nfe == nfe


def test_cache_mode_none_recomputes_and_agrees(model):
    """Mode ``none``: every step feeds prompt .. active block end (the block-causal mask keeps later
    blocks out), the same tokens as the cached run."""
    prompt = [3, 1, 4, 1, 5, 9, 2]
    a = run_stepper(model, [make_seq(model, "a", prompt, 12, 4, "llada2", cache_mode="none")])["a"]
    b = run_stepper(model, [make_seq(model, "b", prompt, 12, 4, "llada2")], pages(model))["b"]
    assert a[:12] == b[:12] == reference(model, prompt, 12, 4, "llada2")[0]


@pytest.mark.parametrize("policy", ["llada2", "dapd"])
def test_kernel_path_equals_the_reference_loop(tmp_path, policy):
    """Pages in vLLM's CPU kernel layout (head size 32, pages of 16): steps that feed one block attend
    the pages in place, steps crossing a block boundary (the mask) take the portable path over the
    same pages; both together give the reference loop's tokens."""
    from vllm_dapd.engine.vllm.kernel_kv import KernelKV

    path = make_tiny_llada2(str(tmp_path / "llada2"), hidden_size=128, num_attention_heads=4, block_length=BLOCK)
    model = load_model(sharpen_checkpoint(path, 20))
    spec = model.spec
    assert spec.head_dim == 32
    kv = KernelKV(spec.n_layers, 64, 16, spec.n_kv_heads, spec.head_dim, torch.float32, "cpu")
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    seqs = []
    for i, p in enumerate(prompts):
        s = make_seq(model, f"r{i}", p, 10, 2, policy)
        s.block_ids = [3 + 7 * i + j for j in range(-(-(len(p) + s.gen_length) // 16))]
        seqs.append(s)
    kernel_steps, step = [], kv.step
    kv.step = lambda *args, **kwargs: kernel_steps.append(1) or step(*args, **kwargs)  # steps on the kernel
    got = run_stepper(model, seqs, kv)
    assert kernel_steps
    for i, p in enumerate(prompts):
        assert got[f"r{i}"][:10] == reference(model, p, 10, 2, policy, kv_cache=False)[0][:10], f"row {i}"


def test_offline_run_plans_a_block_causal_model_as_the_server_does(model):
    """``engine.core.run`` on LLaDA2 needs no settings: the model's block size and cache mode
    ``prefix`` by default, blocks from position 0, batched prompts of different grid offsets, each
    equal to the reference loop, token for token and forward for forward."""
    from vllm_dapd.engine.core import Request, run

    prompts = [[5, 6, 7, 8, 9, 10], [3, 1, 4, 1, 5, 9, 2, 6, 5]]
    results = run(model, [Request(p, {"policy": "llada2", "steps": 2}, max_tokens=7) for p in prompts])
    for p, r in zip(prompts, results):
        assert r.sequence.causal and r.sequence.settings.block_length == BLOCK
        assert r.sequence.settings.cache_mode == "prefix"
        want, nfe = reference(model, p, 7, 2, "llada2")
        assert r.tokens[:7] == want[:7] and r.nfe == nfe
    with pytest.raises(ValueError, match="^block_length: the served model is block-causal"):
        run(model, [Request(prompts[0], {"block_length": 8})])
