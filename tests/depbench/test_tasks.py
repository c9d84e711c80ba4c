"""Dependency-benchmark tasks: valid answers are exactly the constraint's solutions, splits are
disjoint, the vocabulary covers every prompt and answer."""

import itertools
import random

import pytest

from vllm_dapd.demo.tasks import is_correct
from vllm_dapd.demo.vocab import UNK, Vocab
from vllm_dapd.depbench.tasks import (CANVAS, ENTITIES, GENERATORS, TASKS, all_words, held_out, latin_completions,
                                      split_of, train_stream)


def is_latin(rows: list[list[str]]) -> bool:
    return all(len(set(r)) == len(r) for r in rows) and all(len(set(c)) == len(c) for c in zip(*rows))


def test_latin_completions_are_all_and_only_valid_rows():
    row = ("a", "c", "b", "d")
    got = {tuple(a.split()) for a in latin_completions(row)}
    brute = {a + b for a in itertools.permutations(row) for b in itertools.permutations(row)
             if is_latin([list(row), list(a), list(b)])}
    assert got == brute and len(got) == 24


def test_answers_are_uniform_multimodal_and_exactly_scored():
    rng = random.Random(0)
    perm = GENERATORS["perm"](rng)
    items = perm.prompt.split()[1:]
    assert len(perm.segments[0]) == 24
    assert is_correct(perm, " ".join(reversed(items)))
    assert not is_correct(perm, " ".join([items[0]] * 4))  # a repeated item
    pair = GENERATORS["pair"](rng)
    cat = pair.prompt.split()[1]
    a, b = ENTITIES[cat][0].split(), ENTITIES[cat][1].split()
    assert not is_correct(pair, " ".join([a[0], b[1]] + pair.answer.split()[2:]))  # mixed halves
    seen = {pair.sample_answer(rng) for _ in range(400)}
    assert len(seen) > 40  # training targets are drawn among the valid answers


def test_controls_are_exact():
    rng = random.Random(1)
    add = GENERATORS["add"](rng)
    a, b = add.prompt.replace("add ", "").replace(" ", "").split("+")
    assert add.answer == " ".join(f"{int(a) + int(b):03d}")
    sort = GENERATORS["sort"](rng)
    assert add.segments[0] == (add.answer,) and sort.answer.split() == sorted(sort.prompt.split()[1:])


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_disjoint(task):
    dev, test = held_out(task, 32, "dev"), held_out(task, 32, "test")
    assert {i.prompt for i in dev}.isdisjoint({i.prompt for i in test})
    assert all(split_of(i.prompt) == "dev" for i in dev) and all(split_of(i.prompt) == "test" for i in test)
    stream = train_stream(task, 0)
    assert all(split_of(next(stream).prompt) == "train" for _ in range(200))


def test_vocabulary_covers_everything_and_fits_the_canvas():
    vocab = Vocab.build(all_words())
    unk = vocab.ids[UNK]
    for task in TASKS:
        for item in held_out(task, 16, "test"):
            assert unk not in vocab.encode(item.prompt)
            for answer in item.segments[0]:
                ids = vocab.answer_ids(answer, CANVAS)
                assert unk not in ids and len(ids) == CANVAS


def load_trainer():
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("training_demo", Path(__file__).parents[2] / "training" / "demo.py")
    trainer = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
    spec.loader.exec_module(trainer)
    return trainer


def test_task_batch_overrides_and_errors():
    # The second-phase trainer option (--task-batch): named tasks get their own batch, the rest
    # keep --batch; a bad entry is refused naming the option.
    import pytest

    task_batches = load_trainer().task_batches

    assert task_batches(32, "", ("perm", "grid")) == {"perm": 32, "grid": 32}
    assert task_batches(16, "grid=64", ("perm", "grid")) == {"perm": 16, "grid": 64}
    for bad in ("grid", "grid=0", "nope=3", "grid=x"):
        with pytest.raises(ValueError, match="--task-batch"):
            task_batches(16, bad, ("perm", "grid"))


def test_grow_appends_identity_layers_and_refuses_other_shapes():
    # A second phase may add layers on top (--init with a larger --layers): the grown model computes
    # exactly what the saved one did, its new layers are trainable (non-zero inner weights), and a
    # shrink or a width change is refused naming the option.
    import pytest
    import torch

    from vllm_dapd.models.llada import LLaDA

    trainer = load_trainer()
    vocab = Vocab.build(all_words())

    def model(layers, d=32):
        m = LLaDA(trainer.llada_config(vocab, d, layers, 2, 48))
        trainer.init_weights(m, layers, layers)
        return m.eval()

    small, big = model(2), model(4)
    assert trainer.grow(big, small.state_dict()) == 2
    x = torch.randint(0, vocab.size - 8, (2, 12))
    with torch.no_grad():
        assert torch.equal(big(x).logits, small(x).logits)
    assert all(layer.qkv.q.weight.abs().sum() > 0 for layer in big.layers[2:])
    with pytest.raises(ValueError, match="--layers"):
        trainer.grow(model(1), small.state_dict())
    with pytest.raises(ValueError, match="--init"):
        trainer.grow(model(2, d=16), small.state_dict())


def test_training_record_keeps_every_phase(tmp_path):
    # training.json of a later phase lists the earlier phases and the budget they add up to: CPU
    # minutes where recorded, wall minutes (an upper bound) for a phase that predates that record.
    import json

    trainer = load_trainer()
    first = {"steps": 3000, "minutes": 36.4, "seed": 0}
    (tmp_path / "training.json").write_text(json.dumps(first))
    second = trainer.with_phases(str(tmp_path), {"steps": 900, "minutes": 20.0, "cpu_minutes": 12.5, "seed": 1})
    assert second["phases"] == [first, {"steps": 900, "minutes": 20.0, "cpu_minutes": 12.5, "seed": 1}]
    assert second["budget_minutes"] == 48.9
    (tmp_path / "training.json").write_text(json.dumps(second))
    third = trainer.with_phases(str(tmp_path), {"steps": 10, "minutes": 2.0, "cpu_minutes": 1.0})
    assert [p["steps"] for p in third["phases"]] == [3000, 900, 10] and third["budget_minutes"] == 49.9
    assert trainer.with_phases("", {"minutes": 3.0})["budget_minutes"] == 3.0
