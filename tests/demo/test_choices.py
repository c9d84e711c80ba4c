"""Multiple-choice demo items: corruptions are wrong answers of the same length, and the lm-eval
task text tokenizes to exactly what the demo model was trained on."""

from __future__ import annotations

import json
import random

from transformers import AutoTokenizer

from vllm_dapd.demo import CHECKPOINT
from vllm_dapd.demo.choices import CHAT, choices
from vllm_dapd.demo.lm_eval_tasks import utils
from vllm_dapd.demo.tasks import TASKS, held_out, is_correct
from vllm_dapd.demo.vocab import Vocab


def test_corruptions_are_wrong_and_keep_the_length():
    rng = random.Random(0)
    for task in TASKS:
        for item in held_out(task, 30):
            options, gold = choices(item, rng)
            assert options[gold] == item.answer and len(set(options)) == 4
            for i, o in enumerate(options):
                assert is_correct(item, o) == (i == gold)
                assert len(o.split()) == len(item.answer.split())
                assert 1 <= sum(a != b for a, b in zip(o.split(), item.answer.split())) <= 2 or i == gold


def test_task_text_tokenizes_to_the_training_layout():
    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    vocab = Vocab.build()
    with open(utils.DATA, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == len(TASKS) * utils.PER_TASK
    for row in rows[:: len(rows) // 12]:
        content = row["context"][len(CHAT.split("{content}")[0]):-len(CHAT.split("{content}")[1])]
        ids = tok(row["context"], add_special_tokens=False).input_ids
        assert ids == vocab.prompt_ids(content)
        for choice in row["choices"]:
            whole = tok(row["context"] + choice, add_special_tokens=False).input_ids
            answer = choice.split("<|eot_id|>")[0]
            assert whole[len(ids):] == vocab.answer_ids(answer)
    assert rows == utils.rows()  # the committed data is what the generator makes
