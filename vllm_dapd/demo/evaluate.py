"""Score a model on task items: the reference denoising loop (exact mode) or the vLLM engine.

Used by training (periodic eval), the tests and ``benchmarks/accuracy_vs_steps.py``. Items are
batched by prompt length, because ``denoise`` runs without an attention mask and so needs equal
prompt lengths in a batch (every task here has a fixed prompt length). The decoded answer is what
a user sees: the canvas's regular tokens joined by spaces, special tokens skipped.

``evaluate_engine`` sends the same prompts through ``vllm.LLM`` (cache mode ``none``: the engine is
pinned token for token to the reference loop) and reads each request's NFE with
``vllm_dapd.cost`` (vLLM's own per-request record, one "spec step" per forward).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from vllm_dapd.decoding.generate import denoise
from vllm_dapd.demo.tasks import CANVAS, Item, is_correct
from vllm_dapd.demo.vocab import Vocab


@dataclass
class Outcome:
    item: Item
    output: str
    correct: bool
    nfe: int


def decode_answer(vocab: Vocab, ids: Sequence[int]) -> str:
    n = len(vocab.words)
    return " ".join(vocab.words[i] for i in ids if 0 <= i < n)


def evaluate(model: Any, vocab: Vocab, items: Sequence[Item], policy: str = "low_confidence",
             params: Any = None, steps: int = CANVAS, gen_length: int = CANVAS, batch_size: int = 256,
             attention_layers: Sequence[int] | None = None, seed: int = 0) -> list[Outcome]:
    """Decode every item greedily (temperature 0) with one block over the whole canvas."""
    groups: dict[int, list[int]] = defaultdict(list)
    prompts = [vocab.prompt_ids(item.prompt) for item in items]
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    outcomes: list[Outcome | None] = [None] * len(items)
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], dtype=torch.long)
            res = denoise(model, ids, gen_length=gen_length, block_length=gen_length, steps=steps,
                          policy=policy, params=params, temperature=0.0, seed=seed,
                          attention_layers=attention_layers)
            for row, i in enumerate(chunk):
                text = decode_answer(vocab, res.tokens[row].tolist())
                outcomes[i] = Outcome(items[i], text, is_correct(items[i], text), int(res.nfe[row]))
    return [o for o in outcomes if o is not None]


def accuracy(outcomes: Sequence[Outcome]) -> float:
    return sum(o.correct for o in outcomes) / max(len(outcomes), 1)


def evaluate_engine(llm: Any, vocab: Vocab, items: Sequence[Item], policy: str = "low_confidence",
                    params: dict[str, Any] | None = None, steps: int = CANVAS,
                    gen_length: int = CANVAS, seed: int = 0) -> list[Outcome]:
    """Like ``evaluate`` through a ``vllm.LLM`` serving the demo model, all items in one call."""
    from vllm import SamplingParams

    from vllm_dapd import cost

    extra = {"policy": policy, "block_length": gen_length, "steps": steps, **(params or {})}
    # seed 0 as in the reference loop: the random policy draws its order from the request seed
    sp = SamplingParams(max_tokens=gen_length, temperature=0.0, seed=seed, ignore_eos=True, extra_args=extra)
    outs = llm.generate([{"prompt_token_ids": vocab.prompt_ids(it.prompt)} for it in items], sp, use_tqdm=False)
    result = []
    for item, out in zip(items, outs):
        text = decode_answer(vocab, list(out.outputs[0].token_ids))
        nfe = cost(out.outputs[0]).nfe
        result.append(Outcome(item, text, is_correct(item, text), nfe))
    return result
