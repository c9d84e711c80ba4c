"""lm-evaluation-harness tasks over the demo model's test split (offline, local JSON).

``demo_test.jsonl`` (committed; rebuild with ``python -m vllm_dapd.demo.lm_eval_tasks.utils``) has,
per test item, the chat-templated prompt (``context``), the reference answer and the task's
accepted answers (``accepted``: one per segment, joined by ``|``), and multiple-choice options (the
reference plus three corruptions of one or two words, ``vllm_dapd.demo.choices``). A choice is
scored as the whole answer canvas the demo model was trained on: answer words, ``<|eot_id|>``,
``<|endoftext|>`` padding to 10 tokens (``Vocab.answer_ids``).
"""

from __future__ import annotations

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "demo_test.jsonl")
PER_TASK = 40


def load(**kwargs):
    """``custom_dataset`` for the task YAMLs: {"test": Dataset} read from the committed JSONL."""
    import datasets

    with open(DATA, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {"test": datasets.Dataset.from_list(rows)}


def canvas(answer: str) -> str:
    """The text of the 10-token answer canvas (``Vocab.answer_ids``) for ``answer``."""
    from vllm_dapd.demo.tasks import CANVAS

    n = len(answer.split()) + 1
    return answer + "<|eot_id|>" + "<|endoftext|>" * (CANVAS - n)


def exact(references, predictions, **kwargs) -> float:
    """Exact match of the generated answer against every accepted answer (``is_correct``)."""
    from vllm_dapd.demo.tasks import Item, is_correct

    ref = json.loads(references[0])
    item = Item(ref["task"], "", tuple(tuple(s) for s in ref["segments"]))
    return float(is_correct(item, predictions[0]))


def rows(per_task: int = PER_TASK, seed: int = 0) -> list[dict]:
    from vllm_dapd.demo.choices import CHAT, choices
    from vllm_dapd.demo.tasks import TASKS, held_out

    rng = random.Random(f"lm_eval/{seed}")
    out = []
    for task in TASKS:
        for item in held_out(task, per_task, seed=1):
            options, gold = choices(item, rng)
            out.append({"task": task, "context": CHAT.format(content=item.prompt), "answer": item.answer,
                        "reference": json.dumps({"task": task, "segments": item.segments}),
                        "choices": [canvas(o) for o in options], "gold": gold})
    return out


if __name__ == "__main__":
    with open(DATA, "w", encoding="utf-8") as f:
        for row in rows():
            f.write(json.dumps(row) + "\n")
    print(DATA)
