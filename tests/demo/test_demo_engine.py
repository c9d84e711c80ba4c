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


def infill_items(n: int, seed: int = 0):
    """Cities answers with one word hidden: (chat prompt + words before, hidden word, words after).

    Only infilling solves them: the hidden word is the first half of a two-word city, and which
    half fits ("los" before "angeles", "las" before "vegas") is only in the suffix."""
    import random

    from vllm_dapd.demo.tasks import CITIES

    rng = random.Random(f"infill/{seed}")
    items = []
    for _ in range(n):
        countries = [rng.choice(sorted(CITIES)) for _ in range(4)]
        words = " ".join(rng.choice(CITIES[c]) for c in countries).split()
        k = 2 * rng.randrange(4)
        items.append((countries, words[:k], words[k], words[k + 1:]))
    return items


def test_infilling_solves_the_demo_cities_and_equals_the_reference_loop(llm) -> None:
    """A prompt with a hole (the mask token) then a suffix: the engine fills the hole; its tokens
    equal ``denoise(suffix_ids=...)``'s, and the filled city is one of the country's."""
    import torch
    from vllm import SamplingParams

    from vllm_dapd.decoding import denoise
    from vllm_dapd.demo.tasks import CITIES
    from vllm_dapd.models.loading import load_model

    tok = llm.get_tokenizer()
    mask, eot, eos = (tok.convert_tokens_to_ids(t) for t in ("<|mdm_mask|>", "<|eot_id|>", "<|endoftext|>"))
    cases = []
    for countries, before, hidden, after in infill_items(12):
        chat = tok.apply_chat_template([{"role": "user", "content": "cities " + " ".join(countries)}],
                                       tokenize=False, add_generation_prompt=True)
        prompt = tok.encode(chat + " ".join(before), add_special_tokens=False)
        suffix = tok.encode(" ".join(after), add_special_tokens=False) + [eot, eos]
        cases.append((countries, len(before) // 2, prompt, suffix))
    sp = SamplingParams(max_tokens=1, temperature=0.0, extra_args={"policy": "dapd"})
    outs = llm.generate([{"prompt_token_ids": p + [mask] + s} for *_, p, s in cases], sp, use_tqdm=False)
    model = load_model(CHECKPOINT)
    right = 0
    for (countries, k, prompt, suffix), out in zip(cases, outs):
        got = list(out.outputs[0].token_ids)
        ref = denoise(model, torch.tensor([prompt]), 1, 1, 1, policy="dapd", suffix_ids=torch.tensor([suffix]))
        assert got == ref.tokens[0].tolist()
        city = " ".join(tok.convert_ids_to_tokens(got + suffix[:1]))
        right += city in CITIES[countries[k]]
    assert right >= 11, f"{right} of 12 infilled cities are valid"  # 'upper'/'lower hutt' both fit


def test_choices_answer_the_argmax_of_the_scorers_elbos(llm) -> None:
    """``score_choices`` (what ``structured_outputs`` choice becomes): the answer is the choice whose
    ELBO given the prompt, from ``likelihood.elbo_many`` with the request's seed, is highest; the
    estimates come back (``vllm_dapd.scores``) equal to the scorer's; the right answer wins."""
    import random

    import torch
    from vllm import SamplingParams

    from vllm_dapd import scores
    from vllm_dapd.decoding.likelihood import ScoreSettings, elbo_many
    from vllm_dapd.demo.choices import choices
    from vllm_dapd.models.loading import load_model

    tok = llm.get_tokenizer()
    rng = random.Random(3)
    items = [it for task in TASKS for it in held_out(task, 2)]
    cases = []
    for item in items:
        options, right = choices(item, rng)
        chat = tok.apply_chat_template([{"role": "user", "content": item.prompt}], tokenize=False,
                                       add_generation_prompt=True)
        prompt = tok.encode(chat, add_special_tokens=False)
        cases.append((prompt, [tok.encode(o, add_special_tokens=False) for o in options], right))
    params = [SamplingParams(max_tokens=CANVAS, temperature=0.0, seed=7 + i,
                             extra_args={"score_choices": ids, "score_samples": 8})
              for i, (_, ids, _) in enumerate(cases)]
    outs = llm.generate([{"prompt_token_ids": p} for p, _, _ in cases], params, use_tqdm=False)
    model = load_model(CHECKPOINT)
    won = 0
    for i, ((prompt, ids, right), out) in enumerate(zip(cases, outs)):
        ref = elbo_many(model, [(torch.tensor(prompt + c), len(prompt), 7 + i) for c in ids], ScoreSettings(samples=8))
        best = int(ref.argmax())
        got = list(out.outputs[0].token_ids)
        assert got[: len(ids[best])] == ids[best] and out.outputs[0].finish_reason == "stop"
        assert torch.allclose(torch.tensor(scores(out.outputs[0])), ref.float(), atol=1e-4)
        won += best == right
    assert won >= len(cases) - 1, f"the right answer won {won} of {len(cases)}"
