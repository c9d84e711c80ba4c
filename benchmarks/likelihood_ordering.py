"""Ordering sanity of the Monte Carlo ELBO on the demo model: does the right answer outscore
answers with one or two words changed?

For every test-split item of every demo task, the ELBO estimate of the answer canvas (answer words,
``<|eot_id|>``, ``<|endoftext|>`` padding: what the model was trained on) given the chat prompt is
computed for the reference answer and three corruptions (``vllm_dapd.demo.choices``; one or two
words changed, never an accepted answer). Reported: the share of (item, corruption) pairs where the
right answer scores higher, and the share of items where it scores highest of the four (the
multiple-choice accuracy lm-eval's ``acc`` would give). Target: >= 95% of pairs.

    python benchmarks/likelihood_ordering.py --quick     # 20 items per task, seconds
    python benchmarks/likelihood_ordering.py              # 200 items per task, 32 samples
Writes ``benchmarks/results/tmp/likelihood_ordering.json`` and ``.png`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from vllm_dapd.decoding.likelihood import ScoreSettings, elbo_many
from vllm_dapd.demo import CHECKPOINT
from vllm_dapd.demo.choices import choices
from vllm_dapd.demo.tasks import TASKS, held_out
from vllm_dapd.demo.vocab import Vocab
from vllm_dapd.models.loading import load_model

RESULTS = Path(__file__).resolve().parent / "results"


def ordering(model, vocab: Vocab, task: str, n: int, settings: ScoreSettings, seed: int = 0) -> dict:
    rng = random.Random(f"ordering/{task}/{seed}")
    items, rows = held_out(task, n), []
    for item in items:
        options, gold = choices(item, rng)
        prompt = vocab.prompt_ids(item.prompt)
        rows.append((len(prompt), [prompt + vocab.answer_ids(o) for o in options], gold))
    flat = [(torch.tensor(t), P, seed) for P, opts, _ in rows for t in opts]
    scores = elbo_many(model, flat, settings).view(len(rows), 4)
    golds = torch.tensor([g for *_, g in rows])
    right = scores[torch.arange(len(rows)), golds]
    wrong = scores.clone()
    wrong[torch.arange(len(rows)), golds] = float("inf")
    pairs = (right[:, None] > wrong).sum().item()
    return {"task": task, "items": len(rows), "pairs": 3 * len(rows), "pairs_right_above": int(pairs),
            "pair_share": pairs / (3 * len(rows)), "top1_share": float((scores.argmax(1) == golds).float().mean()),
            "mean_margin_nats": float((right - wrong.masked_fill(wrong.isinf(), float("-inf")).max(1).values).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--items", type=int, default=None, help="items per task (default 200; --quick 20)")
    ap.add_argument("--samples", type=int, default=32, help="Monte Carlo samples per ELBO")
    ap.add_argument("--out", type=Path, default=RESULTS / "tmp" / "likelihood_ordering")
    args = ap.parse_args()
    n = args.items or (20 if args.quick else 200)
    torch.manual_seed(0)
    model, vocab = load_model(CHECKPOINT), Vocab.build()
    settings = ScoreSettings(samples=args.samples)
    t0 = time.time()
    per_task = [ordering(model, vocab, task, n, settings) for task in TASKS]
    pairs = sum(r["pairs_right_above"] for r in per_task)
    total = sum(r["pairs"] for r in per_task)
    result = {"model": "demo checkpoint", "estimator": settings.estimator, "samples": settings.samples,
              "items_per_task": n, "pair_share": pairs / total, "target_pair_share": 0.95,
              "met": pairs / total >= 0.95, "seconds": round(time.time() - t0, 1), "per_task": per_task}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([r["task"] for r in per_task], [100 * r["pair_share"] for r in per_task], label="pairs right > corrupted")
    ax.plot([r["task"] for r in per_task], [100 * r["top1_share"] for r in per_task], "ko", label="right answer top of 4")
    ax.axhline(95, color="r", ls="--", lw=1, label="target 95%")
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_title(f"ELBO ordering, demo model, {settings.samples} samples")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(json.dumps({k: v for k, v in result.items() if k != "per_task"}))
    for r in per_task:
        print(r)


if __name__ == "__main__":
    main()
