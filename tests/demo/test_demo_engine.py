"""The demo checkpoint served by ``vllm.LLM`` with the plugin: chat template, stop on EOT, answers.

One engine start for the module (~30 s on CPU). What a user of ``vllm serve`` sees: the tokenizer's
chat template wraps the task prompt, the answer stops at ``<|eot_id|>``, and the text is exact.
"""

from __future__ import annotations

import os

import pytest

from vllm_dapd.demo import CHECKPOINT
from vllm_dapd.demo.tasks import CANVAS, TASKS, held_out, is_correct

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    engine = LLM(model=CHECKPOINT, max_model_len=128, dtype="float32")
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.mark.parametrize("extra", [{}, {"policy": "dapd"}])  # dapd at its defaults
def test_chat_answers_are_exact(llm, extra) -> None:
    from vllm import SamplingParams

    items = [it for task in TASKS for it in held_out(task, 3)]
    sp = SamplingParams(max_tokens=CANVAS, temperature=0.0, extra_args={"block_length": CANVAS, **extra})
    outs = llm.chat([[{"role": "user", "content": it.prompt}] for it in items], sp, use_tqdm=False)
    for item, out in zip(items, outs):
        assert out.outputs[0].finish_reason == "stop", item.prompt
        assert is_correct(item, out.outputs[0].text), (item.prompt, out.outputs[0].text)
