"""A real server: ``vllm serve <tiny LLaDA> --plugin dapd`` on 127.0.0.1, driven by the ``openai`` client.

One server process for the module. Covers completion, chat, streaming (one chunk per committed
block), ``n``, seed reproducibility, 400s that name the parameter, abort mid-stream (the server
keeps serving and frees every KV block), and the ``vllm_dapd:`` counters on ``/metrics``.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from vllm_dapd.models.tiny import make_tiny_llada

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")


def serve_args(model: str, *extra: str) -> list[str]:
    return [model, "--max-model-len", "256", "--dtype", "float32", *extra]


@pytest.fixture(scope="module")
def server(tmp_path_factory, start_server):
    root = tmp_path_factory.mktemp("engine_serve")
    model = make_tiny_llada(str(root / "llada"))
    args = serve_args(model, "--plugin", "dapd", "--additional-config", json.dumps({"dapd": {"block_length": 8}}))
    with start_server(args, root / "server.log") as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
        yield client, client.models.list().data[0].id, base


def metric(base: str, name: str) -> float:
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_completion_and_chat(server):
    client, model, _ = server
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True, "vllm_xargs": {"steps": 4}})
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    # Per-request cost (vLLM's per-request acceptance record; one "spec step" per forward).
    cost = (r.model_extra or {})["metrics"]["speculative_decoding"]
    assert 1 <= cost["num_spec_steps"] <= 8 and cost["num_accepted_draft_tokens"] == 16  # 2 blocks of 8, <= 4 steps each
    c = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                       temperature=0)
    assert c.choices[0].finish_reason in ("length", "stop")


def test_streaming_gives_one_chunk_per_block(server):
    client, model, _ = server
    stream = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=24, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = [ch for ch in stream if ch.choices and ch.choices[0].text]
    assert len(chunks) == 3  # 24 tokens in blocks of 8 (a chunk's text may be empty only mid-character)


def test_n_and_seed_reproducibility(server):
    client, model, _ = server
    ask = dict(model=model, prompt="A", max_tokens=8, n=2, temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    first = [c.text for c in client.completions.create(**ask).choices]
    second = [c.text for c in client.completions.create(**ask).choices]
    assert len(first) == 2 and first == second


@pytest.mark.parametrize("xargs,param", [
    ({"policy": "nope"}, "policy"),
    ({"block_length": 0}, "block_length"),
    ({"policy": "threshold", "threshold": -1}, "threshold"),
    ({"no_such_knob": 3}, "no_such_knob"),
])
def test_bad_settings_are_400_naming_the_parameter(server, xargs, param):
    client, model, _ = server
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="A", max_tokens=8, extra_body={"vllm_xargs": xargs})
    assert e.value.status_code == 400 and param in str(e.value)


def test_metrics_count_forwards_and_committed_tokens(server):
    client, model, base = server
    forwards0 = metric(base, "vllm_dapd:forwards_total")
    committed0 = metric(base, "vllm_dapd:committed_tokens_total")
    steps0 = metric(base, "vllm_dapd:committed_tokens_per_forward_count")
    nfe = completion_tokens = 0
    for prompt in ("one", "two", "three"):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True, "vllm_xargs": {"steps": 4}})
        cost = (r.model_extra or {})["metrics"]["speculative_decoding"]
        nfe += cost["num_spec_steps"]
        completion_tokens += r.usage.completion_tokens
    time.sleep(1)  # stats reach the API server with the engine's next output
    forwards = metric(base, "vllm_dapd:forwards_total") - forwards0
    committed = metric(base, "vllm_dapd:committed_tokens_total") - committed0
    assert completion_tokens == 48 and 3 <= nfe <= 24  # 2 blocks of 8, <= 4 steps each, per request
    assert forwards == nfe  # the counter is the per-request NFE, summed (requests ran one after another)
    assert committed >= completion_tokens  # the canvas is committed whole
    assert metric(base, "vllm_dapd:committed_tokens_per_forward_count") > steps0
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    assert f'vllm_dapd:forwards_total{{engine="0",model_name="{model}"}}' in text


def test_stop_string_ends_the_output_before_it(server):
    client, model, _ = server
    ask = dict(model=model, prompt="The capital of", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**ask).choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    r = client.completions.create(stop=[stop], **ask)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[: text.index(stop)]


def test_max_tokens_beyond_model_length_is_400(server):
    client, model, _ = server
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="A", max_tokens=1000)


def test_abort_mid_stream_frees_blocks_and_server_keeps_serving(server):
    client, model, base = server
    stream = client.completions.create(model=model, prompt="count", max_tokens=240, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True, "vllm_xargs": {"policy": "low_confidence"}})
    for i, _ in enumerate(stream):
        if i == 1:  # after the second block (the tiny model may already be done: best effort)
            stream.close()
            break
    deadline = time.time() + 30
    while metric(base, "vllm:num_requests_running") or metric(base, "vllm:kv_cache_usage_perc"):
        assert time.time() < deadline, "request still running or KV blocks still held after abort"
        time.sleep(0.5)
    r = client.completions.create(model=model, prompt="again", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_autoregressive_model_with_plugin_is_a_clear_error(tmp_path, start_server):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=512, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="exited during start-up"):
        with start_server(serve_args(str(tmp_path), "--plugin", "dapd", "--skip-tokenizer-init", "--load-format", "dummy"),
                          tmp_path / "server.log", timeout_s=240):
            pass
    assert "is not a masked diffusion model" in (tmp_path / "server.log").read_text()
