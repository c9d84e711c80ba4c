"""Trace (``vllm_xargs={"trace": 1}``): which canvas positions each forward committed, per choice.

A real server (``vllm serve <tiny LLaDA> --plugin dapd``, blocks of 8) for completions and chat,
n=2, streaming and the diffusion stats log line; the encoding and ``tools/render_trace.py``
without a server.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

from vllm_dapd.engine.vllm.cost import encode_trace, trace
from vllm_dapd.models.tiny import make_tiny_llada

ROOT = Path(__file__).resolve().parents[2]
openai = pytest.importorskip("openai")
BLOCK = 8


def load_render_tool():
    spec = importlib.util.spec_from_file_location("render_trace", ROOT / "tools" / "render_trace.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- no server


class _Output:
    def __init__(self, routed_experts):
        self.routed_experts = routed_experts


def test_encoding_round_trip_keeps_forwards_that_commit_nothing():
    entries = [(1, [3, 0]), (2, []), (3, [1, 2])]
    rows = encode_trace(entries)
    assert rows.dtype == np.int32 and rows.shape == (5, 2)
    assert trace(_Output(rows)) == [[1, [3, 0]], [2, []], [3, [1, 2]]]
    assert trace(_Output(None)) is None
    assert trace(_Output(np.zeros((4, 3, 2)))) is None  # real routed experts: not a trace


def _grey_pixels(path: Path) -> int:
    """Pixels in the tool's "still masked" grey (#eeeeee)."""
    from matplotlib.image import imread

    rgb = np.round(imread(path)[..., :3] * 255)
    return int((rgb == 0xEE).all(-1).sum())


def test_render_tool_draws_the_trace(tmp_path):
    """A position is grey (masked) until the forward that commits it: a trace that commits all at
    forward 1 has no grey cell, one that commits later has; the command line draws a response
    file's trace exactly as ``render`` does."""
    render = load_render_tool()
    dapd = {"nfe": 3, "trace": [[1, [0, 3]], [2, [1]], [3, [2]]]}
    out = tmp_path / "trace.png"
    render.render(dapd["trace"], out, tokens=["a", "b", "c", "d"], title="demo")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    at_once, later = tmp_path / "at_once.png", tmp_path / "later.png"
    render.render([[1, [0, 1, 2, 3]], [2, []], [3, []]], at_once)
    render.render([[1, []], [2, []], [3, [0, 1, 2, 3]]], later)
    grey = _grey_pixels(at_once), _grey_pixels(later)
    assert grey[0] < 100 < 10000 < grey[1]  # 0 and 8 of 12 cells grey (measured: 11 stray pixels, 32216)
    # From a response JSON file, as on the command line.
    response = tmp_path / "response.json"
    response.write_text(json.dumps({"choices": [{"text": "abcd", "dapd": dapd}]}))
    render.main([str(response), "-o", str(tmp_path / "cli.png")])
    render.render(dapd["trace"], tmp_path / "direct.png")
    assert (tmp_path / "cli.png").read_bytes() == (tmp_path / "direct.png").read_bytes()


def test_diffusion_log_line_only_when_vllm_logs_stats(monkeypatch):
    """The line prints on vLLM's tick only when vLLM's own stats log exists (not --disable-log-stats)."""
    from types import SimpleNamespace

    from vllm.v1.metrics.stats import SchedulerStats

    from vllm_dapd.engine.vllm import metrics
    from vllm_dapd.engine.vllm.hooks import SCHEDULER_CLS
    from vllm_dapd.engine.vllm.scheduler import _add, _new_stats

    config = SimpleNamespace(scheduler_config=SimpleNamespace(scheduler_cls=SCHEDULER_CLS),
                             model_config=SimpleNamespace(served_model_name="m"))
    lines = []
    monkeypatch.setattr(metrics.logger, "info", lambda fmt, *args: lines.append(fmt % args))
    stat_logger = metrics.DiffusionStatLogger(config)
    for flag in (False, True):
        monkeypatch.setattr(metrics, "_vllm_logs_stats", flag)
        stats = _new_stats()
        _add(stats, 32, 12, forwards=4)
        stat_logger.record(SchedulerStats(spec_decoding_stats=stats), None)
        stat_logger.log()
    assert len(lines) == 1 and lines[0].startswith(metrics.LOG_PREFIX)
    assert "3.00 committed tokens/forward" in lines[0] and "(4 forwards, 12 tokens" in lines[0]


# ---------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def server(tmp_path_factory, start_server):
    root = tmp_path_factory.mktemp("engine_trace")
    model = make_tiny_llada(str(root / "llada"))
    args = [model, "--max-model-len", "256", "--dtype", "float32", "--plugin", "dapd",
            "--additional-config", json.dumps({"dapd": {"block_length": BLOCK}})]
    log = root / "server.log"
    with start_server(args, log, env={"VLLM_LOG_STATS_INTERVAL": "1"}) as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
        yield client, client.models.list().data[0].id, log


def dapd(choice) -> dict:
    return (choice.model_extra or {})["dapd"]


def check_trace(field: dict, max_tokens: int, every_position: bool = True) -> None:
    """One entry per forward, forwards 1..NFE in order, each canvas position of the whole blocks once.

    ``every_position=False`` (sampling): the tiny random model may sample the mask id, which leaves
    its position masked (not in the trace) until a later forward of the block or for good."""
    entries = field["trace"]
    assert len(entries) == field["nfe"]
    assert [f for f, _ in entries] == list(range(1, field["nfe"] + 1))
    positions = [p for _, ps in entries for p in ps]
    canvas = -(-max_tokens // BLOCK) * BLOCK
    assert len(set(positions)) == len(positions) and set(positions) <= set(range(canvas))
    if not every_position:
        return
    assert sorted(positions) == list(range(canvas)) and len(positions) == field["committed_tokens"]
    # Blocks in order: no position of block k+1 before the last of block k.
    first = {p: i for i, (_, ps) in enumerate(entries) for p in ps}
    for k in range(canvas // BLOCK - 1):
        assert max(first[p] for p in range(k * BLOCK, (k + 1) * BLOCK)) < min(
            first[p] for p in range((k + 1) * BLOCK, (k + 2) * BLOCK))


@pytest.mark.slow
def test_trace_only_when_asked(server):
    client, model, _ = server
    ask = dict(model=model, prompt="The capital of France is", max_tokens=12, temperature=0,
               extra_body={"ignore_eos": True, "vllm_xargs": {"steps": 4}})
    plain = client.completions.create(**ask)
    assert "trace" not in dapd(plain.choices[0])
    ask["extra_body"] = {"ignore_eos": True, "vllm_xargs": {"steps": 4, "trace": 1}}
    traced = client.completions.create(**ask)
    check_trace(dapd(traced.choices[0]), 12)
    assert traced.choices[0].text == plain.choices[0].text  # tracing changes nothing


@pytest.mark.slow
def test_chat_trace(server):
    client, model, _ = server
    c = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=16,
                                       temperature=0, extra_body={"ignore_eos": True, "vllm_xargs": {"trace": 1}})
    check_trace(dapd(c.choices[0]), 16)
    assert c.choices[0].model_extra.get("routed_experts") is None  # the carrier is not sent twice


@pytest.mark.slow
def test_n2_each_choice_its_own_trace(server):
    client, model, _ = server
    r = client.completions.create(model=model, prompt="A", max_tokens=16, n=2, temperature=1.0, seed=3,
                                  extra_body={"ignore_eos": True, "vllm_xargs": {"trace": 1, "steps": 8}})
    traces = [dapd(choice) for choice in r.choices]
    for field in traces:
        check_trace(field, 16, every_position=False)
    assert traces[0]["trace"] != traces[1]["trace"]  # two samples, two orders of commits


@pytest.mark.slow
def test_streamed_trace_on_the_last_chunk(server):
    client, model, _ = server
    stream = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=16, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True, "vllm_xargs": {"trace": 1}})
    fields = [(ch.choices[0].model_extra or {}).get("dapd") for ch in stream if ch.choices]
    assert all(f is None for f in fields[:-1]) and fields[-1] is not None
    check_trace(fields[-1], 16)


@pytest.mark.slow
def test_log_prints_the_diffusion_line_not_spec_decoding(server):
    client, model, log = server
    client.completions.create(model=model, prompt="Hello", max_tokens=8, extra_body={"ignore_eos": True})
    deadline = time.time() + 15
    while "Diffusion decoding:" not in log.read_text() and time.time() < deadline:
        time.sleep(0.5)
    text = log.read_text()
    assert "Diffusion decoding:" in text and "committed tokens/forward" in text
    assert "SpecDecoding metrics" not in text and "Avg Draft acceptance rate" not in text
