"""Shared test helpers: fake denoising states and a tiny deterministic fake diffusion LM.

Plain functions, handed to tests through the session fixture ``helpers`` (session scope, so
hypothesis tests may use it) and the ``fake_lm`` fixture; ``vllm_server`` (a real ``vllm serve`` on
a free loopback port) through the ``start_server`` fixture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Sequence

import pytest
import torch

from vllm_dapd.decoding.model_api import DiffusionOutput
from vllm_dapd.decoding.policy import DenoiseState, Policy

MASK_ID = 0  # fake models and states use token 0 as the mask


def random_attention(B: int, L: int, gen: torch.Generator) -> torch.Tensor:
    """[B, L, L] row-stochastic-ish attention (rows sum to <= 1, as if part went to the prompt)."""
    a = torch.rand(B, L, L, generator=gen, dtype=torch.float32) ** 3
    a = a / a.sum(-1, keepdim=True)
    return a * (0.5 + 0.5 * torch.rand(B, L, 1, generator=gen))


def make_state(
    B: int = 2,
    L: int = 8,
    V: int = 16,
    seed: int = 0,
    masked_frac: float = 0.7,
    step: int | Sequence[int] = 0,
    steps: int | Sequence[int] = 4,
    temperature: float | Sequence[float] = 0.0,
    attention: bool = False,
    logit_scale: float = 3.0,
    block: tuple[int, int] | None = None,  # [start, end) of the active block; None = whole canvas
) -> DenoiseState:
    """A random but reproducible DenoiseState (mask id 0, tokens elsewhere in [1, V))."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, generator=g) * logit_scale
    tokens = torch.randint(1, max(V, 2), (B, L), generator=g)
    is_mask = torch.rand(B, L, generator=g) < masked_frac
    in_block = torch.zeros(B, L, dtype=torch.bool)
    lo, hi = block if block is not None else (0, L)
    in_block[:, lo:hi] = True
    masked = is_mask & in_block
    decoded = ~is_mask & (torch.arange(L) < hi)
    tokens = torch.where(is_mask, torch.full_like(tokens, MASK_ID), tokens)

    def vec(x, dtype):
        return torch.tensor(list(x) if isinstance(x, (list, tuple)) else [x] * B, dtype=dtype)

    att = random_attention(B, L, g) if attention else None
    return DenoiseState(
        logits=logits,
        tokens=tokens,
        masked=masked,
        decoded=decoded,
        step=vec(step, torch.long),
        steps=vec(steps, torch.long),
        temperature=vec(temperature, torch.float32),
        seed=torch.arange(B, dtype=torch.long) + 1000 * seed,
        nfe=vec(step, torch.long),
        attention=att,
        block_size=vec(hi - lo, torch.long),  # both loops set it (the active block's size)
        # every query's column means, as the loops give them (here: the canvas rows' own)
        key_attention=None if att is None else att.mean(dim=1),
    )


def select_rows(state: DenoiseState, rows: Sequence[int]) -> DenoiseState:
    """The sub-batch of ``state`` made of ``rows`` (every [B, ...] tensor indexed)."""
    idx = torch.tensor(list(rows), dtype=torch.long)
    out = {}
    for f in dataclasses.fields(state):
        v = getattr(state, f.name)
        out[f.name] = v.index_select(0, idx) if isinstance(v, torch.Tensor) else v
    return DenoiseState(**out)


def varied_params(policy: Policy, rnd) -> object:
    """Valid Params with every float field scaled by a random factor (defaults where invalid).

    Generic on purpose, so it also covers policies added later (dapd, dawn): ints and bools keep
    their defaults, except the known enum-like ``proxy`` of ``eb``.
    """
    base = policy.make_params()
    overrides = {}
    for f in dataclasses.fields(base):
        v = getattr(base, f.name)
        if isinstance(v, float) and not isinstance(v, bool):
            overrides[f.name] = v * rnd.uniform(0.5, 1.5) if v != 0 else rnd.uniform(0.0, 1.0)
        if policy.name == "eb" and f.name == "proxy":
            overrides[f.name] = rnd.randrange(3)
    for name, value in list(overrides.items()):
        try:
            policy.make_params({name: value})
        except ValueError:
            del overrides[name]
    try:
        return policy.make_params(overrides)
    except ValueError:
        return base


class FakeLM:
    """A deterministic toy masked diffusion LM over vocab ``V`` (mask id ``MASK_ID``).

    Logits of position t depend on its own token, its position and the mean embedding of the whole
    row (so they change as tokens are committed). Each row is computed on its own: the batch never
    changes a row's output. ``mask_token_id`` never wins (its logit is pushed down), like real
    models. Attention (when a span is asked for) is a softmax of embedding dot products over all
    keys, cropped to the span, mimicking the DiffusionLM protocol.
    """

    def __init__(self, V: int = 32, d: int = 16, seed: int = 0, logits_shift: int = 0, sharp: float = 4.0):
        g = torch.Generator().manual_seed(seed)
        self.V = V
        self.mask_token_id = MASK_ID
        self.logits_shift = logits_shift
        self.emb = torch.randn(V, d, generator=g)
        self.pos = torch.randn(512, d, generator=g) * 0.5
        self.out = torch.randn(d, V, generator=g) * sharp / d**0.5
        self.calls: list[tuple[torch.Tensor, object, object]] = []

    def __call__(self, input_ids, attention_span=None, attention_layers=None) -> DiffusionOutput:
        self.calls.append((input_ids.clone(), attention_span, attention_layers))
        T = input_ids.shape[1]
        h = self.emb[input_ids] + self.pos[:T]  # [B, T, d]
        h = torch.tanh(h + h.mean(dim=1, keepdim=True))
        logits = h @ self.out  # [B, T, V]
        logits[..., MASK_ID] = -1e4
        attn = None
        if attention_span is not None:
            s, e = attention_span
            full = torch.softmax(h @ h.transpose(1, 2) / h.shape[-1] ** 0.5, dim=-1)  # [B, T, T]
            attn = full[:, s:e, s:e]
        return DiffusionOutput(logits=logits, attention=attn)


def stepper_alone(model, prompt: list[int], gen: int, server, extra: dict, temperature: float, seed: int) -> list[int]:
    """One request (settings ``extra`` over the ``server``'s) through the engine's step alone
    (``engine.offline.run``, portable pages): the tokens it commits. What the engine tests compare an
    engine's batched answers with."""
    from vllm_dapd.engine.core import offline

    request = offline.Request(prompt, extra, gen, temperature, seed)
    return offline.run(model, [request], server=server)[0].tokens


@pytest.fixture
def fake_lm() -> FakeLM:
    return FakeLM()


@pytest.fixture(scope="session")
def helpers() -> SimpleNamespace:
    """The helpers above, as a session fixture (safe inside hypothesis tests)."""
    return SimpleNamespace(
        make_state=make_state, select_rows=select_rows, varied_params=varied_params,
        random_attention=random_attention, FakeLM=FakeLM, MASK_ID=MASK_ID, stepper_alone=stepper_alone,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(args: Sequence[str], log_path: Path, timeout_s: float = 300,
                env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """``vllm serve ARGS`` (this environment's console script, the command users run) on a free
    loopback port; yields ``(base_url, process)`` once ``/health`` answers; stops it on exit.
    A server that exits during start-up fails with the tail of its log."""
    port = free_port()
    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([vllm, "serve", *args, "--host", "127.0.0.1", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited during start-up:\n{Path(log_path).read_text()[-3000:]}")
                try:
                    urllib.request.urlopen(base + "/health", timeout=2)
                    break
                except OSError:
                    if time.time() > deadline:
                        raise TimeoutError(f"server not healthy after {timeout_s:.0f} s; log: {log_path}")
                    time.sleep(1)
            yield base, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="session")
def start_server():
    """``vllm_server`` above, for module-scoped server fixtures."""
    return vllm_server
