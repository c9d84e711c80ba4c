"""``engine.offline``: requests planned as the server plans them, pages handed out, and the padded
batch ``stepper.prepare`` builds from them (its token-for-token parity with the reference loop is
``test_stepper.py``)."""

from __future__ import annotations

import pytest
import torch

from vllm_dapd.engine.core import offline
from vllm_dapd.engine.core.kv import PagedKV
from vllm_dapd.engine.core.settings import DecodeSettings
from vllm_dapd.engine.core.stepper import denoise_step, prepare
from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_dream


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    return load_model(make_tiny_dream(str(tmp_path_factory.mktemp("offline") / "dream")))


def test_requests_are_planned_as_the_server_plans_them(dream):
    server = DecodeSettings(block_length=4)
    requests = [offline.Request([5, 6, 7], {"policy": "dapd"}, max_tokens=10),  # rounded up to whole blocks
                offline.Request([5] * 6, {"block_length": 8}, max_tokens=30)]  # capped by the model length
    seqs, kv = offline.sequences(dream, requests, server=server, kv=None, max_model_len=20)
    assert kv is None
    assert [(s.gen_length, s.block_length, s.settings.policy) for s in seqs] == [(12, 4, "dapd"),
                                                                                (14, 8, "low_confidence")]
    with pytest.raises(ValueError, match="^steps:"):
        offline.sequences(dream, [offline.Request([5], {"steps": 0}, 4)], kv=None)


def test_pages_are_disjoint_cover_each_request_and_the_pool_is_checked(dream):
    requests = [offline.Request([5] * n, {"cache_mode": "prefix"}, 8) for n in (3, 9, 1)]
    seqs, kv = offline.sequences(dream, requests)
    pages = [p for s in seqs for p in s.block_ids]
    assert len(pages) == len(set(pages)) and max(pages) < kv.num_blocks
    assert all(len(s.block_ids) * kv.block_size >= s.end for s in seqs)
    spec = dream.spec
    small = PagedKV(spec.n_layers, 4, 4, spec.n_kv_heads, spec.head_dim, torch.float32, "cpu")
    with pytest.raises(ValueError, match="^kv: 3 requests"):
        offline.sequences(dream, requests, kv=small)


def test_prepare_puts_each_fed_span_at_the_end_of_its_rows(dream):
    """Two prefix-mode requests past their prompt step and one in mode none (Dream: logits shift 1):
    each row holds its fed tokens left-padded with their absolute positions, the keys are its cached
    positions then its fed rows, and each logits row is the input row holding the position before
    the one it scores."""
    requests = [offline.Request(list(range(10, 10 + n)), {"cache_mode": mode, "block_length": 4, "steps": 2}, 8)
                for n, mode in ((3, "prefix"), (7, "prefix"), (5, "none"))]
    seqs, kv = offline.sequences(dream, requests)
    denoise_step(dream, seqs, torch.device("cpu"), kv)  # caches the prompts
    step = prepare(dream, seqs, torch.device("cpu"), kv)
    batch, T = step.batch, step.layout.rows
    P = max(len(f.reads) for f in step.feeds)
    assert step.batch.past_key_values[0][0].shape[2] == P
    for b, (s, f) in enumerate(zip(seqs, step.feeds)):
        r0 = T - (f.end - f.first)
        assert batch.input_ids[b, r0:].tolist() == s.tokens()[f.first: f.end].tolist()
        assert batch.positions[b, r0:].tolist() == list(range(f.first, f.end))
        assert batch.key_padding_mask[b].tolist() == ([True] * len(f.reads) + [False] * (P - len(f.reads))
                                                      + [False] * r0 + [True] * (T - r0))
        held = batch.positions[b, batch.logits_rows[b]]  # absolute position in each logits row's input row
        assert (held == len(s.prompt) + step.scored[b] - dream.logits_shift).all()
    assert batch.real_rows.tolist() == [b * T + r for b in range(3) for r in range(step.layout.row0[b], T)]


def test_the_engine_core_imports_nothing_from_vllm():
    """Every module of ``vllm_dapd.engine.core`` (the offline runner, the step, the pages, scoring)
    loads without vLLM; ``tests/test_import_cycles.py`` also reads their source for imports inside
    functions."""
    import pkgutil
    import subprocess
    import sys

    import vllm_dapd.engine.core as core

    names = [f"vllm_dapd.engine.core.{m.name}" for m in pkgutil.iter_modules(core.__path__)]
    assert {"vllm_dapd.engine.core.offline", "vllm_dapd.engine.core.stepper", "vllm_dapd.engine.core.kv"} <= set(names)
    code = (f"import sys; import {', '.join(names)}; "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
