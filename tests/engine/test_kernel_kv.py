"""The kernel path (``--attention-backend CPU_ATTN``): KV pages in vLLM's CPU attention layout,
attended in place by vLLM's paged-attention kernel, against the portable gather + SDPA path.

Needs vLLM's CPU ops (``torch.ops._C``), no engine. Tiny models with head size 32 (the kernel's
smallest), Dream with grouped KV heads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vllm_dapd.engine.core import offline
from vllm_dapd.engine.vllm.kernel_kv import KernelKV, KernelStep
from vllm_dapd.engine.core.kv import PagedKV
from vllm_dapd.engine.core.stepper import denoise_step
from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_dream, make_tiny_llada

PAGES, BLOCK = 48, 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel_kv")
    return {"llada": load_model(make_tiny_llada(str(root / "llada"), n_heads=2)),  # head size 32
            "dream": load_model(make_tiny_dream(str(root / "dream"), num_attention_heads=2,
                                                num_key_value_heads=1))}


def random_pages(cls, dtype, block_size, tables, seed=0):
    """Pages of ``cls`` with random KV at every slot of ``tables``; returns (pages, {table: (k, v)})."""
    kv = cls(2, 12, block_size, 2, 32, dtype, "cpu")
    g = torch.Generator().manual_seed(seed)
    for table in tables:
        n = len(table) * block_size
        kv.scatter(table, torch.arange(n), [(torch.randn(2, n, 32, generator=g), torch.randn(2, n, 32, generator=g))
                                            for _ in range(2)])
    return kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_kernel_pages_read_back_what_was_written(dtype, block_size):
    tables = [[7, 2], [0, 9, 4]]
    kernel, plain = (random_pages(cls, dtype, block_size, tables) for cls in (KernelKV, PagedKV))
    assert kernel.layers[0].shape == (12, 2, block_size, 64)  # vLLM's CPU layout, keys then values
    positions = [torch.tensor([0, 5, block_size + 3, 2 * block_size - 1]), torch.arange(3 * block_size)]
    for table, pos in zip(tables, positions):
        for (k1, v1), (k2, v2) in zip(kernel.gather_at(table, pos), plain.gather_at(table, pos)):
            assert torch.equal(k1, k2) and torch.equal(v1, v2)
    width = 3 * block_size + 2
    a, b = kernel.gather_padded(tables, positions, width), plain.gather_padded(tables, positions, width)
    for (k1, v1), (k2, v2) in zip(a, b):
        assert k1.shape == (2, 2, width, 32)
        assert torch.equal(k1[0, :, :4], k2[0, :, :4]) and torch.equal(v1[1], v2[1])


def test_kernel_pages_read_back_with_rows_and_dims_beyond_bf16_integers():
    """Block size 256 and head size 512: indices bf16 cannot hold exactly (the layout probe splits them)."""
    kernel, plain = (cls(1, 3, 256, 1, 512, torch.bfloat16, "cpu") for cls in (KernelKV, PagedKV))
    positions = torch.arange(512)
    kv = [(torch.randn(1, 512, 512), torch.randn(1, 512, 512))]
    for pages in (kernel, plain):
        pages.scatter([2, 0], positions, kv)
    (k1, v1), (k2, v2) = kernel.gather_at([2, 0], positions)[0], plain.gather_at([2, 0], positions)[0]
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_kernel_attention_equals_sdpa_over_the_pages_and_keeps_protected_slots():
    tables, lengths, fed = [[3, 5, 1], [8], [10, 0]], [40, 9, 20], [(30, 40), (0, 9), (11, 20)]
    kv = random_pages(KernelKV, torch.float32, 16, tables, seed=1)
    g = torch.Generator().manual_seed(2)
    rows = [torch.arange(a, e) for a, e in fed]
    N = sum(len(r) for r in rows)
    q, k, v = (torch.randn(N, h, 32, generator=g) for h in (4, 2, 2))
    protect = [torch.tensor([30, 31]), torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)]
    before = [kv.gather_at(t, torch.arange(n)) for t, n in zip(tables, lengths)]
    step = kv.step(tables, rows, lengths, protect, [], [], 0)
    assert isinstance(step, KernelStep)
    out = step.attend(0, q, k, v)
    start = 0
    for b, (table, n, (a, e)) in enumerate(zip(tables, lengths, fed)):
        keys, values = (t.clone() for t in before[b][0])  # [Hkv, n, D]: the cache, then this step's rows
        keys[:, a:e], values[:, a:e] = k[start: start + e - a].transpose(0, 1), v[start: start + e - a].transpose(0, 1)
        ref = F.scaled_dot_product_attention(q[start: start + e - a].transpose(0, 1)[None], keys[None], values[None],
                                             enable_gqa=True)[0].transpose(0, 1)
        torch.testing.assert_close(out[start: start + e - a], ref, atol=1e-5, rtol=1e-5)
        after = kv.gather_at(table, torch.arange(n))[0]
        kept = set(protect[b].tolist())
        for p in range(a, e):  # fed rows are stored, except the protected ones
            expect = before[b][0][0][:, p] if p in kept else keys[:, p]
            assert torch.equal(after[0][:, p], expect), (b, p)
        start += e - a


def make(model, i, prompt, gen, policy, mode, refresh, temperature):
    """The request's ``Sequence`` without pages (``run_like_vllm`` gives them as vLLM does)."""
    request = offline.Request(list(prompt), {"policy": policy, "block_length": 4, "steps": 2, "cache_mode": mode,
                                             "cache_refresh": refresh}, max_tokens=gen, temperature=temperature, seed=i)
    (seq,), _ = offline.sequences(model, [request], kv=None)
    seq.req_id = f"r{i}"
    return seq


def run_like_vllm(model, seqs, kv):
    """Step to the end; pages as vLLM allocates them: the prompt's at the first step, then all."""
    out = {s.req_id: [] for s in seqs}
    for i, s in enumerate(seqs):
        s.block_ids = [5 * i + j for j in range(-(-len(s.prompt) // BLOCK))]
    live = list(seqs)
    while live:
        for s, block in zip(live, denoise_step(model, live, torch.device("cpu"), kv)):
            out[s.req_id] += block
        for i, s in enumerate(seqs):
            s.block_ids = [5 * i + j for j in range(-(-(len(s.prompt) + s.gen_length) // BLOCK))]
        live = [s for s in live if not s.finished]
    return out


CASES = [  # prompt length, canvas, policy, cache mode, refresh, temperature
    (5, 12, "low_confidence", "prefix", "final", 0.0), (9, 8, "dapd", "dual", "final", 0.0),
    (3, 16, "dawn", "prefix", "final", 0.7), (7, 12, "threshold", "none", "final", 0.0),
    (11, 8, "dapd", "prefix", "block", 0.7), (4, 12, "low_confidence", "dual", "block", 0.0),
]


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_kernel_path_commits_the_tokens_of_the_portable_path(models, arch, monkeypatch):
    model = models[arch]
    g = torch.Generator().manual_seed(3)
    cases = [(torch.randint(0, 200, (n,), generator=g).tolist(), *rest) for n, *rest in CASES]
    spec = model.spec
    plain = PagedKV(spec.n_layers, PAGES, BLOCK, spec.n_kv_heads, spec.head_dim, torch.float32, "cpu")
    kernel = KernelKV(spec.n_layers, PAGES, BLOCK, spec.n_kv_heads, spec.head_dim, torch.float32, "cpu")
    calls = []
    attend = KernelStep.attend
    monkeypatch.setattr(KernelStep, "attend", lambda self, *a: calls.append(1) or attend(self, *a))
    want_seqs = [make(model, i, *c) for i, c in enumerate(cases)]
    got_seqs = [make(model, i, *c) for i, c in enumerate(cases)]
    want = run_like_vllm(model, want_seqs, plain)
    assert not calls
    got = run_like_vllm(model, got_seqs, kernel)
    assert got == want
    forwards = max(s.nfe for s in got_seqs)
    assert len(calls) == spec.n_layers * forwards  # the first step too (prompt pages only: own rows)
    for s in got_seqs:  # the pages hold the same final KV on both paths
        cached = torch.arange(s.cached_len)
        for (k1, v1), (k2, v2) in zip(kernel.gather_at(s.block_ids, cached), plain.gather_at(s.block_ids, cached)):
            torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)


def test_unsupported_head_size_is_refused():
    with pytest.raises(ValueError, match="attention-backend CPU_ATTN: head size 16"):
        KernelKV(1, 4, 16, 2, 16, torch.float32)


def attention_config(backend, head, block_size=None):
    from types import SimpleNamespace

    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return SimpleNamespace(attention_config=SimpleNamespace(backend=backend and AttentionBackendEnum[backend]),
                           model_config=SimpleNamespace(get_head_size=lambda: head),
                           cache_config=SimpleNamespace(block_size=block_size))


@pytest.mark.parametrize("backend, head, kernel", [
    (None, 32, True), (None, 16, False),  # unset: the kernel where it runs
    ("CPU_ATTN", 64, True), ("TORCH_SDPA", 32, False),
])
def test_the_attention_backend_is_resolved_once_and_written_back(backend, head, kernel):
    from vllm_dapd.engine.vllm.kernel_kv import choose_attention, uses_kernel

    config = attention_config(backend, head)
    assert choose_attention(config) is kernel
    assert config.attention_config.backend.name == ("CPU_ATTN" if kernel else "TORCH_SDPA")
    assert uses_kernel(config) is kernel


@pytest.mark.parametrize("backend, head, block, message", [
    ("FLASH_ATTN", 32, None, "--attention-backend FLASH_ATTN: diffusion models"),
    ("CPU_ATTN", 16, None, "--attention-backend CPU_ATTN: head size 16 is not supported"),
    ("CPU_ATTN", 32, 24, "--attention-backend CPU_ATTN: block size 24 must be a multiple of 16"),
])
def test_a_bad_attention_backend_is_refused_naming_the_flag(backend, head, block, message):
    from vllm_dapd.engine.vllm.kernel_kv import choose_attention

    with pytest.raises(ValueError, match=message):
        choose_attention(attention_config(backend, head, block))


def test_a_sequence_reading_the_cache_without_all_its_pages_takes_the_portable_path(models, monkeypatch):
    """Not what vLLM does (it allocates prompt + canvas from the second step on), but a step must
    still be right: one page for 5 + 12 positions, so the kernel cannot attend it once it reads the
    cached prompt; that step runs gather + SDPA over the same pages."""
    model = models["llada"]
    spec = model.spec
    calls = []
    attend = KernelStep.attend
    monkeypatch.setattr(KernelStep, "attend", lambda self, *a: calls.append(1) or attend(self, *a))
    out = {}
    for cls in (PagedKV, KernelKV):
        kv = cls(spec.n_layers, PAGES, BLOCK, spec.n_kv_heads, spec.head_dim, torch.float32, "cpu")
        seq = make(model, 0, [40, 41, 42, 43, 44], 12, "low_confidence", "prefix", "final", 0.0)
        seq.block_ids, tokens = [3], []
        while not seq.finished:
            tokens += denoise_step(model, [seq], torch.device("cpu"), kv)[0]
        out[cls] = tokens
    assert out[KernelKV] == out[PagedKV]
    assert len(calls) == spec.n_layers  # the first step only (it reads nothing cached)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_attention_of_a_sequence_does_not_depend_on_the_batch(dtype):
    """Bitwise: a sequence's attention rows are the same alone and next to sequences of other
    lengths (packed rows, no padding; the kernel's KV split is off, so each row reduces over its
    keys in one order). The portable path pads every prefix to the batch's longest, which changes
    SDPA's reduction. (The GEMMs around attention may still round differently with the batch's row
    count, so whole-model logits are not promised bitwise.)"""
    tables = [[3, 5, 1], [8], [10, 0, 2, 4]]
    kv = random_pages(KernelKV, dtype, 16, tables, seed=5)
    g = torch.Generator().manual_seed(6)
    fed = [torch.arange(30, 40), torch.arange(0, 9), torch.arange(40, 60)]
    lengths = [45, 9, 64]
    qkv = [tuple(torch.randn(len(f), h, 32, generator=g).to(dtype) for h in (4, 2, 2)) for f in fed]
    none = torch.tensor([], dtype=torch.long)

    def attend(idx):
        step = kv.step([tables[b] for b in idx], [fed[b] for b in idx], [lengths[b] for b in idx],
                       [none for _ in idx], [], [], 0)
        q, k, v = (torch.cat([qkv[b][j] for b in idx]) for j in range(3))
        return step.attend(0, q, k, v)

    alone = attend([0])
    for idx in ([0, 1], [0, 2], [0, 1, 2]):
        assert torch.equal(attend(idx)[: len(fed[0])], alone), idx
    assert torch.equal(attend([1, 0, 2])[len(fed[1]): len(fed[1]) + len(fed[0])], alone)
