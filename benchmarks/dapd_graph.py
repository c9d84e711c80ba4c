"""How well does attention recover the true coupling of answer positions? (docs/DAPD_GRAPH.md)

DAPD (arXiv 2603.12996) reads "i attends strongly to j" as "X_i and X_j are coupled" and validates
it on synthetic data by the AUC of attention scores for true edges vs non-edges. This script does
the same on the dependency benchmark's coupled families at the first denoising step (every answer
position masked), where a wrong graph costs the most: true edges are the pairs the task's
constraint links directly (``perm``: every pair of items; ``grid``: cells sharing a row or a
column; ``pair``: the two halves of one entity), non-edges every other pair of canvas positions
(the ``<|eot_id|>``/``<|endoftext|>`` padding is deterministic, so uncoupled, but still masked).
Scores are built as DAPD builds them, for every choice of layers (each layer, last, last half,
all) and of score (share among masked keys or raw attention; max or mean symmetrisation).
Plain PyTorch model (the attention hook the engine uses), dev split.

    python benchmarks/dapd_graph.py --out benchmarks/results/dapd_graph
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from vllm_dapd.decoding.graph import renormalize_over, symmetrize
from vllm_dapd.demo.vocab import Vocab
from vllm_dapd.depbench import CHECKPOINT
from vllm_dapd.depbench.tasks import CANVAS, COUPLED, all_words, held_out
from vllm_dapd.models.loading import load_model

RESULTS = Path(__file__).resolve().parent / "results"


def true_edges(task: str) -> tuple[int, set[tuple[int, int]]]:
    """(answer length, directly constrained pairs i < j)."""
    if task == "perm":
        return 4, set(itertools.combinations(range(4), 2))
    if task == "grid":
        return 8, {(i, j) for i, j in itertools.combinations(range(8), 2) if i // 4 == j // 4 or i % 4 == j % 4}
    if task == "pair":
        return 6, {(0, 1), (2, 3), (4, 5)}
    raise ValueError(f"task: no coupling defined for {task!r}")


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a true edge > score of a non-edge), ties count half."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def scores(att: torch.Tensor, kind: str) -> torch.Tensor:
    """[B, C, C] symmetric scores among the canvas (every position masked at step 0)."""
    masked = torch.ones(att.shape[:2], dtype=torch.bool)
    s = renormalize_over(att, masked) if kind.startswith("share") else att
    use_mean = torch.full((att.shape[0],), kind.endswith("mean"))
    return symmetrize(s, use_mean)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=CHECKPOINT)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS / "tmp" / "dapd_graph")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, vocab = load_model(args.model), Vocab.build(all_words())
    n_layers = len(model.layers)
    layer_sets = {f"layer {i}": (i,) for i in range(n_layers)}
    layer_sets.update({"last": (-1,), "last half": tuple(range(-(n_layers // 2), 0)), "all": tuple(range(n_layers))})
    kinds = ("share-max", "share-mean", "raw-max", "raw-mean")
    out: dict = {}
    for task in COUPLED:
        n, edges = true_edges(task)
        items = held_out(task, args.items, "dev")
        ids = torch.tensor([vocab.prompt_ids(it.prompt) + [vocab.mask_id] * CANVAS for it in items])
        p = ids.shape[1] - CANVAS
        out[task] = {}
        for lname, layers in layer_sets.items():
            with torch.no_grad():
                att = model(ids, attention_span=(p, p + CANVAS), attention_layers=layers).attention.float()
            for kind in kinds:
                s = scores(att, kind)
                pos = np.concatenate([s[:, i, j].numpy() for i, j in edges])
                neg = np.concatenate([s[:, i, j].numpy() for i, j in itertools.combinations(range(CANVAS), 2)
                                      if (i, j) not in edges])
                # mass a masked answer row puts on the other answer rows vs on the padding rows
                out[task].setdefault(lname, {})[kind] = {
                    "auc": None if neg is None else auc(pos, neg), "edge_mean": float(pos.mean()),
                    "non_edge_mean": None if neg is None else float(neg.mean()),
                    "uniform_share": 1.0 / CANVAS}
            a = att[:, :n, :]
            out[task][lname]["answer_mass"] = {"to_answer": float(a[:, :, :n].sum(-1).mean()),
                                               "to_padding": float(a[:, :, n:].sum(-1).mean())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"model": str(args.model), "items": args.items,
                                                         "split": "dev", "results": out}, indent=1))
    plot(out, kinds, list(layer_sets), args.out.with_suffix(".png"))
    for task, rows in out.items():
        print(f"\n{task}: AUC (true edges vs non-edges), edge mean / non-edge mean")
        for lname, r in rows.items():
            print(f"  {lname:10s} " + "  ".join(
                f"{k}: " + (f"{r[k]['auc']:.2f}" if r[k]["auc"] is not None else "  - ")
                + f" ({r[k]['edge_mean']:.3f}/" + (f"{r[k]['non_edge_mean']:.3f})" if r[k]["non_edge_mean"]
                                                   is not None else "-)") for k in kinds)
                  + f"  mass answer/pad {r['answer_mass']['to_answer']:.2f}/{r['answer_mass']['to_padding']:.2f}")


def plot(out: dict, kinds: tuple[str, ...], layer_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in out if any(out[t][ln][k]["auc"] is not None for ln in layer_names for k in kinds)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    x = np.arange(len(layer_names))
    for ax, task in zip(axes[0], tasks):
        for k_i, k in enumerate(kinds):
            ax.bar(x + 0.2 * (k_i - 1.5), [out[task][ln][k]["auc"] or 0 for ln in layer_names], 0.2, label=k)
        ax.axhline(0.5, color="k", lw=0.8, ls="--")
        ax.set_xticks(x, layer_names, rotation=30, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{task}: AUC of attention scores, true edges vs non-edges (step 0)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
