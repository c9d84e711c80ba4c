"""Per-choice cost in OpenAI responses: every choice carries ``dapd = {nfe, committed_tokens,
tokens_per_forward}`` (``vllm_dapd/engine/vllm/cost.py``), also where vLLM drops its own per-request record
(``n > 1``, a list of prompts), and on the final streamed chunk of each choice.

One server for the module (``vllm serve <tiny LLaDA> --plugin dapd``, block_length 8). With
``steps`` 4 and ``max_tokens`` 16 (two blocks), a sequence takes 2 to 8 forwards and commits 16 tokens.
"""

from __future__ import annotations

import json

import pytest

from vllm_dapd.models.tiny import make_tiny_llada

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

ASK = dict(max_tokens=16, temperature=0, extra_body={"ignore_eos": True, "vllm_xargs": {"steps": 4}})
SAMPLE = {**ASK, "temperature": 1.0, "seed": 3}  # n > 1 needs sampling


@pytest.fixture(scope="module")
def server(tmp_path_factory, start_server):
    root = tmp_path_factory.mktemp("engine_cost")
    model = make_tiny_llada(str(root / "llada"))
    args = [model, "--max-model-len", "256", "--dtype", "float32", "--plugin", "dapd",
            "--additional-config", json.dumps({"dapd": {"block_length": 8}})]
    with start_server(args, root / "server.log") as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
        yield client, client.models.list().data[0].id


def check(cost: dict, completion_tokens: int = 16) -> None:
    assert set(cost) == {"nfe", "committed_tokens", "tokens_per_forward"}, cost
    assert 2 <= cost["nfe"] <= 8, cost  # 2 blocks, 1 to 4 forwards each
    assert cost["committed_tokens"] == completion_tokens == 16, cost
    assert cost["tokens_per_forward"] == pytest.approx(cost["committed_tokens"] / cost["nfe"])


def dapd(choice) -> dict:
    return (choice.model_extra or {})["dapd"]


def test_single_completion_agrees_with_vllms_record(server):
    client, model = server
    r = client.completions.create(model=model, prompt="The capital of France is", **ASK)
    cost = dapd(r.choices[0])
    check(cost, r.usage.completion_tokens)
    spec = r.model_extra["metrics"]["speculative_decoding"]
    assert (cost["nfe"], cost["committed_tokens"]) == (spec["num_spec_steps"], spec["num_accepted_draft_tokens"])


def test_n_gives_each_choice_its_own_cost(server):
    client, model = server
    body = {**ASK["extra_body"], "return_token_ids": True}
    r = client.completions.create(model=model, prompt="A", n=3, **{**SAMPLE, "extra_body": body})
    assert len(r.choices) == 3 and not (r.model_extra or {}).get("metrics")  # vLLM drops its record for n > 1
    for choice in r.choices:
        check(dapd(choice), len(choice.model_extra["token_ids"]))
    assert r.usage.completion_tokens == sum(dapd(c)["committed_tokens"] for c in r.choices)


def test_list_of_prompts_gives_each_choice_its_own_cost(server):
    client, model = server
    prompts = ["one two", "three"]
    r = client.completions.create(model=model, prompt=prompts, **ASK)
    assert sorted(c.index for c in r.choices) == [0, 1] and not (r.model_extra or {}).get("metrics")
    for choice in r.choices:
        check(dapd(choice))
    # Greedy: a prompt's cost does not depend on the batch, so each choice matches its prompt asked alone.
    alone = [dapd(client.completions.create(model=model, prompt=p, **ASK).choices[0]) for p in prompts]
    assert [dapd(c) for c in sorted(r.choices, key=lambda c: c.index)] == alone
    r = client.completions.create(model=model, prompt=prompts, n=2, **SAMPLE)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    for choice in r.choices:
        check(dapd(choice))


def test_chat_choices_carry_cost(server):
    client, model = server
    messages = [{"role": "user", "content": "Hi"}]
    c = client.chat.completions.create(model=model, messages=messages, n=2, **SAMPLE)
    assert len(c.choices) == 2
    for choice in c.choices:
        check(dapd(choice))


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_final_chunk_of_each_choice_carries_cost(server, chat):
    client, model = server
    if chat:
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], n=2,
                                                stream=True, **SAMPLE)
    else:
        stream = client.completions.create(model=model, prompt=["one", "two"], n=2, stream=True, **SAMPLE)
    costs = {}
    for chunk in stream:
        for choice in chunk.choices:
            extra = choice.model_extra or {}
            assert ("dapd" in extra) == (choice.finish_reason is not None), choice
            if choice.finish_reason is not None:
                costs[choice.index] = extra["dapd"]
    assert sorted(costs) == ([0, 1] if chat else [0, 1, 2, 3])
    for cost in costs.values():
        check(cost)
