"""A real server: ``vllm serve <tiny LLaDA> --plugin dapd`` on 127.0.0.1, driven by the ``openai`` client.

One server process for the module. Covers completion, chat, streaming (one chunk per committed
block), ``n``, seed reproducibility, 400s that name the parameter, abort mid-stream (the server
keeps serving and frees every KV block), and the ``vllm_dapd:`` counters on ``/metrics``.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import time
import urllib.request

import httpx
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


def metric(base: str, name: str, **labels: str) -> float:
    """Sum of ``name`` over its series on ``/metrics`` (only those with ``labels``, if given)."""
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(w in line for w in want))


def test_completion_and_chat(server):
    client, model, _ = server
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True, "vllm_xargs": {"steps": 4}})
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    # Per-request cost (vLLM's per-request acceptance record; one "spec step" per forward).
    cost = (r.model_extra or {})["metrics"]["speculative_decoding"]
    assert 1 <= cost["num_spec_steps"] <= 8 and cost["num_accepted_draft_tokens"] == 16  # 2 blocks of 8, <= 4 steps each



def test_chat_decodes_the_templated_prompt(server):
    """Chat = completion of the chat-templated prompt (vLLM's /tokenize renders the same template)."""
    client, model, base = server
    messages = [{"role": "user", "content": "Hi"}]
    ask = dict(max_tokens=8, temperature=0, extra_body={"ignore_eos": True, "vllm_xargs": {"steps": 4}})
    c = client.chat.completions.create(model=model, messages=messages, **ask)
    tokens = httpx.post(base + "/tokenize", json={"model": model, "messages": messages}).json()["tokens"]
    r = client.completions.create(model=model, prompt=tokens, **ask)
    assert c.usage.prompt_tokens == len(tokens) and c.usage.completion_tokens == 8
    assert c.choices[0].message.content == r.choices[0].text


def test_streaming_adds_up_to_the_answer(server):
    """Text comes at least once per block (24 tokens in blocks of 8), more often when a block's committed
    prefix grows before the block ends (``tests/engine/test_canvas.py``); the pieces add up to the answer."""
    client, model, _ = server
    ask = dict(model=model, prompt="def add(a, b):", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    chunks = [ch for ch in client.completions.create(stream=True, **ask) if ch.choices and ch.choices[0].text]
    assert len(chunks) >= 3  # a chunk's text may be empty only mid-character
    assert "".join(ch.choices[0].text for ch in chunks) == client.completions.create(**ask).choices[0].text


def test_n_and_seed_reproducibility(server):
    """A seed fixes a sampled answer; another seed, another choice of ``n`` or temperature 0 change it
    (the tiny random model's next-token distributions are near uniform: 8 equal sampled tokens by
    chance are out of the question)."""
    client, model, _ = server

    def texts(seed, temperature=1.0, n=2):
        return [c.text for c in client.completions.create(model=model, prompt="A", max_tokens=8, n=n, seed=seed,
                                                          temperature=temperature,
                                                          extra_body={"ignore_eos": True}).choices]

    first = texts(5)
    assert len(first) == 2 and first == texts(5)  # the seed is honoured
    assert first[0] != first[1]  # the n choices are sampled independently
    assert texts(6) != first  # the seed matters
    assert texts(5, temperature=0, n=1)[0] not in first  # the temperature matters


@pytest.mark.parametrize("xargs,param", [
    ({"policy": "nope"}, "policy"),
    ({"block_length": 0}, "block_length"),
    ({"policy": "threshold", "threshold": -1}, "threshold"),
    ({"no_such_knob": 3}, "no_such_knob"),
    ({"score_samples": 1025}, "score_samples"),  # every knob is bounded: Monte Carlo samples at most 1024
    ({"score_window": 2**31}, "score_window"),
    ({"stream_canvas": 1}, "stream_canvas"),  # on a request that is not streamed
    ({"dapd_plan": 1}, "dapd_plan"),  # reserved for the plan admission attaches
])
def test_bad_settings_are_400_naming_the_parameter(server, xargs, param):
    client, model, _ = server
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="A", max_tokens=8, extra_body={"vllm_xargs": xargs})
    assert e.value.status_code == 400 and e.value.body["message"].startswith(param + ":")


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
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="A", max_tokens=1000)
    assert e.value.status_code == 400 and e.value.body["message"].startswith("max_tokens")


def test_abort_mid_stream_frees_blocks_and_server_keeps_serving(server):
    client, model, base = server
    generated0 = metric(base, "vllm:generation_tokens_total")
    # One token per forward over 240 tokens: the client closes after 2 of 30 blocks, long before the end.
    stream = client.completions.create(model=model, prompt="count", max_tokens=240, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True, "vllm_xargs": {"steps": 8}})
    for i, _ in enumerate(stream):
        if i == 1:
            stream.close()
            break
    deadline = time.time() + 30
    while metric(base, "vllm:num_requests_running") or metric(base, "vllm:kv_cache_usage_perc"):
        assert time.time() < deadline, "request still running or KV blocks still held after abort"
        time.sleep(0.5)
    assert 8 <= metric(base, "vllm:generation_tokens_total") - generated0 < 240, "the request was not cut short"
    r = client.completions.create(model=model, prompt="again", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 8


def test_autoregressive_model_with_plugin_is_a_clear_error(tmp_path, start_server):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=512, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="exited during start-up"):
        with start_server(serve_args(str(tmp_path), "--plugin", "dapd", "--skip-tokenizer-init", "--load-format", "dummy"),
                          tmp_path / "server.log", timeout_s=240):
            pass
    assert "is not a masked diffusion model" in (tmp_path / "server.log").read_text()


def mixed_load(rnd: random.Random, model: str, n: int) -> list[dict]:
    """``n`` requests of every kind a server sees: completions and chat, greedy and seeded sampling,
    ``n=2``, streams the client drops after the first chunk, no ``max_tokens``, and malformed ones."""
    policies = ["low_confidence", "dapd", "threshold", "eb", "dawn", "entropy", "klass"]
    specs = []
    for i in range(n):
        xargs = {"policy": rnd.choice(policies), "cache_mode": rnd.choice(["none", "prefix", "dual"]),
                 "block_length": rnd.choice([4, 8]), "steps": rnd.choice([2, 4, 8])}
        body = {"model": model, "max_tokens": rnd.randint(4, 32), "temperature": 0, "ignore_eos": True,
                "vllm_xargs": xargs}
        kind = rnd.choices(["greedy", "seeded", "n2", "chat", "abort", "no_max", "bad"], [30, 15, 10, 15, 15, 5, 10])[0]
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": f"item {i} of {rnd.randint(0, 999)}"}]
        else:
            body["prompt"] = f"request {i}: " + " ".join(str(rnd.randint(0, 99)) for _ in range(rnd.randint(1, 12)))
        if kind in ("seeded", "n2"):
            body.update(temperature=1.0, seed=rnd.randint(0, 2**31 - 1), n=2 if kind == "n2" else 1)
        elif kind == "abort":
            body.update(stream=True, max_tokens=200, vllm_xargs={**xargs, "block_length": 4, "steps": 4})
        elif kind == "no_max":
            del body["max_tokens"]
        elif kind == "bad":
            key, value = rnd.choice([("steps", 1e30), ("block_length", 2**63), ("policy", "nope"),
                                     ("block_length", True), ("threshold", float("nan"))])
            body["vllm_xargs"] = {**xargs, key: value}
            if key == "threshold":
                body["vllm_xargs"]["policy"] = "threshold"
            body["expect"] = key
        specs.append({"kind": kind, "body": body})
    return specs


def send(client: httpx.Client, base: str, spec: dict) -> dict:
    body = {k: v for k, v in spec["body"].items() if k != "expect"}
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    if spec["kind"] == "abort":
        with client.stream("POST", base + path, json=body) as r:
            assert r.status_code == 200
            next(line for line in r.iter_lines() if line.startswith("data:"))  # then drop the connection
        return {"status": 200}
    r = client.post(base + path, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    return {"status": r.status_code, "json": r.json()}


def answers(response: dict) -> list[str]:
    return [c["text"] if "text" in c else c["message"]["content"] for c in response["json"]["choices"]]


def test_mixed_concurrent_load_no_errors_no_hangs_and_the_same_answers_as_alone(server):
    """A few hundred mixed requests at once (a tenth of them malformed, a sixth dropped mid-stream):
    every well-formed one answers, every malformed one is a 400 naming its key, the engine ends idle
    (nothing running or waiting, no KV block held), and every greedy or seeded answer equals the
    same request sent alone afterwards (fp32 server: the batch does not change an answer)."""
    _, model, base = server
    specs = mixed_load(random.Random(0), model, 300)
    with httpx.Client(timeout=httpx.Timeout(120.0)) as client:
        with cf.ThreadPoolExecutor(48) as pool:
            results = list(pool.map(lambda s: send(client, base, s), specs))
        deadline = time.time() + 30
        while any(metric(base, m) for m in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                                             "vllm:kv_cache_usage_perc")):
            assert time.time() < deadline, "engine not idle after the load"
            time.sleep(0.5)
        compared = 0
        for spec, res in zip(specs, results):
            if spec["kind"] == "bad":
                assert res["status"] == 400 and spec["body"]["expect"] in res["json"]["error"]["message"], res
                continue
            assert res["status"] == 200, (spec, res)
            if spec["kind"] in ("greedy", "seeded", "n2", "chat"):
                assert answers(send(client, base, spec)) == answers(res), spec
                compared += 1
    assert compared > 150
