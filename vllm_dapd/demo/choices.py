"""Multiple-choice versions of the demo tasks: the right answer against corrupted ones.

A corruption changes one or two answer words to other words of the same kind (a digit for a
digit, a city word for a city word), re-drawn until the result is not an accepted answer (cities
accept several answers). Used by the ordering benchmark (``benchmarks/likelihood_ordering.py``)
and the lm-evaluation-harness tasks (``vllm_dapd/demo/lm_eval_tasks``).
"""

from __future__ import annotations

import random

from vllm_dapd.demo.tasks import CITIES, DIGITS, Item, is_correct

CITY_WORDS = tuple(sorted({w for cities in CITIES.values() for c in cities for w in c.split()}))

# The chat template of the demo tokenizer (LLaDA-8B-Instruct's), rendered for one user turn plus the
# assistant header: what ``Vocab.prompt_ids`` encodes (pinned by tests/demo/test_choices.py).
CHAT = ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def corrupt(item: Item, rng: random.Random, changes: int) -> str:
    """The reference answer with ``changes`` words replaced, never an accepted answer."""
    words = item.answer.split()
    pool = DIGITS if item.task in ("sort", "reverse") else CITY_WORDS
    for _ in range(1000):
        out = list(words)
        for i in rng.sample(range(len(words)), changes):
            out[i] = rng.choice([w for w in pool if w != words[i]])
        text = " ".join(out)
        if not is_correct(item, text):
            return text
    raise ValueError(f"changes: could not corrupt {item.answer!r}")


def choices(item: Item, rng: random.Random, n_wrong: int = 3) -> tuple[list[str], int]:
    """(answers, index of the right one): the reference answer and ``n_wrong`` distinct corruptions
    (one or two words changed), shuffled."""
    wrong: list[str] = []
    while len(wrong) < n_wrong:
        text = corrupt(item, rng, 1 + len(wrong) % 2)
        if text not in wrong:
            wrong.append(text)
    options = [item.answer, *wrong]
    rng.shuffle(options)
    return options, options.index(item.answer)
