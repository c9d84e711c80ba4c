"""A real server for a block-causal model: ``vllm serve <tiny LLaDA2> --plugin dapd`` driven by the ``openai``
client (one server for the module); the answer's token ids equal the block-diffusion reference loop."""

from __future__ import annotations

import pytest
import torch
from dapd_paper_reference import sharpen_checkpoint

from vllm_dapd.decoding.block_diffusion import block_diffusion_generate
from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_llada2

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(tmp_path_factory, start_server):
    root = tmp_path_factory.mktemp("serve_llada2")
    path = sharpen_checkpoint(make_tiny_llada2(str(root / "llada2"), block_length=4), 20)
    args = [path, "--max-model-len", "256", "--dtype", "float32", "--block-size", "16", "--plugin", "dapd"]
    with start_server(args, root / "server.log") as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
        yield client, client.models.list().data[0].id, load_model(path)


def test_completion_equals_the_reference_loop_and_bad_block_length_is_a_400(served):
    client, name, model = served
    prompt = [17, 4, 99, 23, 5, 61]
    r = client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True, "vllm_xargs": {"policy": "llada2", "steps": 4}})
    want = block_diffusion_generate(model, torch.tensor([prompt]), 10, steps=4)
    assert r.choices[0].token_ids == want.answers[0].tolist() and r.choices[0].finish_reason == "length"
    cost = (r.model_extra or {})["metrics"]["speculative_decoding"]
    assert cost["num_spec_steps"] == int(want.nfe[0])  # forwards, as the reference counts them
    with pytest.raises(openai.BadRequestError, match="block_length"):
        client.completions.create(model=name, prompt=prompt, max_tokens=4, extra_body={"vllm_xargs": {"block_length": 8}})
    # Infilling: the suffix would be a later block, which a block-causal model never attends.
    with pytest.raises(openai.BadRequestError, match="suffix: infilling .* block-causal"):
        client.completions.create(model=name, prompt="ab", suffix="cd", max_tokens=4)
