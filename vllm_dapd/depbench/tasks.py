"""Dependency benchmark tasks: answer positions coupled in different ways, multi-modal targets.

Design after ParallelBench (Kang et al., arXiv 2510.04767): tasks whose valid answers are many and
drawn uniformly for training, so a trained model's per-position marginals are genuinely ambiguous
and committing coupled positions together from those marginals is wrong, while deterministic
controls show what parallel decoding costs where positions are (nearly) independent. Families:

* coupled (the answer is one of many; positions constrain each other):
  - ``perm``: "perm c a f d" -> any ordering of the four items (24 valid answers). Exclusive
    choices: every position's marginal is uniform over the items; committing two positions at once
    repeats an item with probability ~1/4 per pair.
  - ``grid``: "grid b d a c" is row 1 of a 4x4 Latin square; answer rows 2 and 3 (8 tokens) so
    every row and column holds distinct symbols (24 valid answers). Row and column constraints.
  - ``pair``: "pair teal navy gold" -> one two-part entity per category (four per category, e.g.
    "old fox"); any entity is valid, but the halves only jointly (as "los vegas" from "los
    angeles" / "las vegas"). Different categories are independent.
* controls (one valid answer): ``sort`` (six digits), ``copy`` (six digits), ``add`` (two
  two-digit numbers, three-digit sum, carries couple the digits).

Every item is a demo ``Item`` with one segment listing every valid answer, so scoring is exact
(any valid answer accepted) and training targets are uniform over valid answers. Splits are
disjoint by a hash of the prompt: bucket 0 of 10 is ``test``, bucket 1 is ``dev``, the rest train.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from typing import Callable, Iterator

from vllm_dapd.demo.tasks import DIGITS, Item

LETTERS = tuple("abcdefgh")
CATEGORIES = ("red", "blue", "green", "gold", "gray", "pink", "teal", "navy", "lime", "rose", "sand", "plum")
FIRST = ("big", "old", "new", "dark", "top", "low")
SECOND = ("oak", "fox", "bay", "rock", "lake", "hill", "moor")
COUPLED = ("perm", "grid", "pair")
CONTROLS = ("sort", "copy", "add")
TASKS = COUPLED + CONTROLS
CANVAS = 10  # longest answer (grid, 8) + <|eot_id|> + padding
BUCKETS = 10
SPLIT_BUCKET = {"test": 0, "dev": 1}


def _entities() -> dict[str, tuple[str, ...]]:
    """Four two-part entities per category, no first or second half repeated inside a category
    (so independent halves almost never form a valid entity), fixed by a seed."""
    rng = random.Random("depbench/entities")
    table = {}
    for cat in CATEGORIES:
        firsts, seconds = rng.sample(FIRST, 4), rng.sample(SECOND, 4)
        table[cat] = tuple(f"{a} {b}" for a, b in zip(firsts, seconds))
    return table


ENTITIES = _entities()


def _perm(rng: random.Random) -> Item:
    xs = rng.sample(LETTERS, 4)
    return Item("perm", "perm " + " ".join(xs), (tuple(" ".join(p) for p in itertools.permutations(xs)),))


def latin_completions(row: tuple[str, ...]) -> tuple[str, ...]:
    """Every pair of rows that extends ``row`` to a 3x4 Latin rectangle, as 8-token answers."""
    def ok(new: tuple[str, ...], above: list[tuple[str, ...]]) -> bool:
        return all(all(x != r[i] for r in above) for i, x in enumerate(new))

    rows = [p for p in itertools.permutations(row) if ok(p, [row])]
    return tuple(" ".join(a + b) for a in rows for b in rows if ok(b, [row, a]))


def _grid(rng: random.Random) -> Item:
    row = tuple(rng.sample(LETTERS, 4))
    return Item("grid", "grid " + " ".join(row), (latin_completions(row),))


def _pair(rng: random.Random) -> Item:
    cats = [rng.choice(CATEGORIES) for _ in range(3)]
    answers = tuple(" ".join(c) for c in itertools.product(*(ENTITIES[k] for k in cats)))
    return Item("pair", "pair " + " ".join(cats), (answers,))


def _sort(rng: random.Random) -> Item:
    xs = [rng.choice(DIGITS) for _ in range(6)]
    return Item("sort", "sort " + " ".join(xs), ((" ".join(sorted(xs)),),))


def _copy(rng: random.Random) -> Item:
    xs = [rng.choice(DIGITS) for _ in range(6)]
    return Item("copy", "copy " + " ".join(xs), ((" ".join(xs),),))


def _add(rng: random.Random) -> Item:
    a, b = rng.randrange(10, 100), rng.randrange(10, 100)
    return Item("add", f"add {' '.join(str(a))} + {' '.join(str(b))}", ((" ".join(f"{a + b:03d}"),),))


GENERATORS: dict[str, Callable[[random.Random], Item]] = {
    "perm": _perm, "grid": _grid, "pair": _pair, "sort": _sort, "copy": _copy, "add": _add}


def bucket(prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little") % BUCKETS


def split_of(prompt: str) -> str:
    b = bucket(prompt)
    return next((name for name, k in SPLIT_BUCKET.items() if k == b), "train")


def train_stream(task: str, seed: int) -> Iterator[Item]:
    """Endless training items of ``task`` (dev and test prompts skipped), deterministic in ``seed``."""
    rng = random.Random(f"depbench/train/{task}/{seed}")
    while True:
        item = GENERATORS[task](rng)
        if split_of(item.prompt) == "train":
            yield item


def held_out(task: str, n: int, split: str = "test", seed: int = 0) -> list[Item]:
    """The first ``n`` distinct ``split`` ("dev" or "test") items of ``task`` for ``seed``."""
    if split not in SPLIT_BUCKET:
        raise ValueError(f"split: must be one of {sorted(SPLIT_BUCKET)}, got {split!r}")
    rng = random.Random(f"depbench/{split}/{task}/{seed}")
    seen: dict[str, Item] = {}
    for _ in range(1000 * n):
        if len(seen) == n:
            break
        item = GENERATORS[task](rng)
        if split_of(item.prompt) == split:
            seen.setdefault(item.prompt, item)
    if len(seen) < n:
        raise ValueError(f"n: only {len(seen)} distinct {split} items of {task!r} found")
    return list(seen.values())


def all_words() -> list[str]:
    words = list(TASKS) + list(DIGITS) + list(LETTERS) + ["+"] + list(CATEGORIES) + list(FIRST) + list(SECOND)
    return list(dict.fromkeys(words))
