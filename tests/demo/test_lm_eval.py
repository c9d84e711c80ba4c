"""Likelihood scoring through the real server: ``vllm serve --plugin dapd`` (the demo model) scored
by the OpenAI completions API (``echo`` + ``logprobs``) and by lm-evaluation-harness'
``local-completions`` on the in-repo tasks (one generation task, one multiple-choice task).

One server for the module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_dapd.decoding.likelihood import ScoreSettings, elbo
from vllm_dapd.demo import CHECKPOINT
from vllm_dapd.demo.choices import CHAT
from vllm_dapd.models.loading import load_model

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")
TASKS = Path(__file__).resolve().parents[2] / "vllm_dapd" / "demo" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def server(tmp_path_factory, start_server):
    args = [CHECKPOINT, "--plugin", "dapd", "--max-model-len", "128", "--dtype", "float32"]
    with start_server(args, tmp_path_factory.mktemp("lm_eval") / "server.log") as (base, _):
        yield base


def test_echo_logprobs_suffix_sums_are_the_elbo(server):
    """What lm-eval sends for a log-likelihood request; two prompts in one request, next to a
    generation request. Every suffix sum equals the scorer's ELBO of that split (same seed)."""
    from concurrent.futures import ThreadPoolExecutor

    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    model = load_model(CHECKPOINT)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(CHECKPOINT)
    texts = [CHAT.format(content="sort 3 1 2 9 9 0 5 5") + "0 1 2 3 5 5 9 9<|eot_id|><|endoftext|>",
             CHAT.format(content="reverse 1 2 3 4 5 6") + "6 5 4 3 2 1<|eot_id|>"]
    prompts = [tok(t, add_special_tokens=False).input_ids for t in texts]
    ask = dict(model=CHECKPOINT, prompt=texts[1][:-40], max_tokens=10, temperature=0,
               extra_body={"vllm_xargs": {"block_length": 10}})
    with ThreadPoolExecutor(2) as pool:
        gen = pool.submit(client.completions.create, **ask)
        r = client.completions.create(model=CHECKPOINT, prompt=prompts, max_tokens=0, echo=True, logprobs=2,
                                      temperature=0, seed=1234,  # every position an ELBO term (no window)
                                      extra_body={"vllm_xargs": {"score_samples": 8, "score_window": 0}})
        beside = gen.result().choices[0].text
    assert beside and beside == client.completions.create(**ask).choices[0].text  # scoring beside: no change
    for ids, choice in zip(prompts, sorted(r.choices, key=lambda c: c.index)):
        lp = choice.logprobs
        assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
        for c in range(1, len(ids), 3):
            want = elbo(model, torch.tensor(ids), c, ScoreSettings(samples=8), seed=1234)
            assert sum(lp.token_logprobs[c:]) == pytest.approx(want, abs=1e-3 * (1 + abs(want)))
        for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
            assert max(top.values()) >= value - 1e-6  # the scored token's value is in its top dict


@pytest.mark.parametrize("body,name", [({"prompt_logprobs": -1}, "prompt_logprobs"),
                                       ({"vllm_xargs": {"score_samples": 0}}, "score_samples"),
                                       ({"vllm_xargs": {"score_estimator": "x"}}, "score_estimator")])
def test_bad_scoring_options_are_400_naming_the_parameter(server, body, name):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError, match=name):
        client.completions.create(model=CHECKPOINT, prompt="sort 1 2", max_tokens=1, echo=True, logprobs=1,
                                  extra_body=body)


def test_lm_eval_runs_generation_and_multiple_choice(server):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    args = (f"model={CHECKPOINT},base_url={server}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={CHECKPOINT},num_concurrent=4,max_retries=1")
    out = lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                  tasks=["dapd_demo_mc", "dapd_demo_gen"], limit=3,
                                  task_manager=TaskManager(include_path=str(TASKS)))
    res = out["results"]
    assert res["dapd_demo_mc"]["acc,none"] == 1.0  # every right answer outscores its corruptions
    assert res["dapd_demo_gen"]["exact,none"] == 1.0
