"""Which coupled pairs does DAPD commit together, and why did its graph let them? (docs/DAPD_GRAPH.md)

Runs ``dapd`` (reference loop, plain PyTorch, greedy, one block over the canvas) on dev prompts of
the dependency benchmark's ``perm``, ``grid`` and ``add`` families and records every step: the
committed set, each position's proposal and confidence, and the attention the policy read. A step
*breaks* an item when the canvas before it can still be completed to a valid answer and the canvas
after it cannot. Each breaking step is classified:

* ``joint``: every committed position alone keeps the canvas completable, two of them together do
  not (an exclusive choice: ``perm``/``grid`` pairs that commit the same symbol). The pair is a
  *missed pair*.
* ``carry``: a committed position alone breaks it, and committing one other member of the set
  first (then re-running the model) makes that position's proposal valid: the prediction needed
  the partner's token (``add``'s carries). The pair is a missed pair.
* ``marginal``: a position's proposal is invalid whatever else the set holds (the model's own
  error, not a coupling the graph could have seen).

For every missed pair the script reports why the policy let both in: whether the tuned graph had an
edge (share score >= ``edge_threshold`` / M) or the paper's row-normalised dependency exceeded tau,
both positions' confidence (>= 0.9: outside the graph in ``tuned``'s safe set, or the Staged union),
whether they proposed the same token (what ``conflict_bar`` links), and the pair's share
score in units of the uniform share 1/M against all masked pairs of that step.

    python benchmarks/dapd_conflicts.py --out benchmarks/results/dapd_conflicts   # ~10 min here
    python benchmarks/dapd_conflicts.py --quick                                   # seconds
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vllm_dapd.decoding.generate import denoise
from vllm_dapd.decoding.graph import renormalize_over, symmetrize
from vllm_dapd.demo.evaluate import decode_answer
from vllm_dapd.demo.tasks import is_correct
from vllm_dapd.demo.vocab import Vocab
from vllm_dapd.depbench import CHECKPOINT
from vllm_dapd.depbench.tasks import CANVAS, TASKS, all_words, held_out
from vllm_dapd.models.loading import load_model
from vllm_dapd.plugins.dapd import DapdPolicy

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = TASKS  # missed pairs are looked for everywhere; perm, grid and add are where they occur
# Every setting names conflict_bar, so no row moves when a default does (tuned's default is 0.9).
SETTINGS: dict[str, dict[str, Any]] = {
    "tuned, no same-token rule": {"variant": "tuned", "conflict_bar": 0.0},
    **{f"tuned + conflict {c}": {"variant": "tuned", "conflict_bar": c} for c in (0.5, 0.9, 0.99)},
    "tuned + conflict 0.9 + safe edges": {"variant": "tuned", "conflict_bar": 0.9, "safe_edges": True},
    "staged (authors')": {"variant": "staged", "conflict_bar": 0.0},
    **{f"staged + conflict {c}": {"variant": "staged", "conflict_bar": c} for c in (0.5, 0.9, 0.99)},
    "direct (authors')": {"variant": "direct", "conflict_bar": 0.0},
    "direct + conflict 0.9": {"variant": "direct", "conflict_bar": 0.9},
}


class Recording(DapdPolicy):
    """``dapd`` that keeps every step's state and result (the study reads them afterwards)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[dict[str, torch.Tensor]] = []

    def step(self, state, params):  # type: ignore[override]
        res = super().step(state, params)
        probs = torch.softmax(state.logits.float(), dim=-1)
        self.steps.append({"masked": state.masked.clone(), "tokens": res.tokens.clone(),
                           "conf": probs.gather(-1, res.tokens.unsqueeze(-1)).squeeze(-1),
                           "commit": res.commit & state.masked, "attention": state.attention.float().clone(),
                           "canvas": state.tokens.clone()})
        return res


def completable(canvas: list[int], mask_id: int, valid: list[tuple[int, ...]]) -> bool:
    return any(all(c == mask_id or c == v for c, v in zip(canvas, ans)) for ans in valid)


def share_scores(att: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """[L, L] tuned's score (share among masked keys, mean-symmetrised) x M (uniform share = 1)."""
    s = symmetrize(renormalize_over(att[None], masked[None]), torch.tensor([True]))[0]
    return s * masked.sum()


def paper_dependency(att: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """[L, L] the authors' row-max-normalised dependency among masked positions."""
    pair = masked[:, None] & masked[None, :] & ~torch.eye(len(masked), dtype=torch.bool)
    raw = (att + att.T) / 2 * pair
    return raw / raw.amax(dim=-1, keepdim=True).clamp_min(1e-8)


def study(model: Any, vocab: Vocab, family: str, items: list, params: dict[str, Any]) -> dict[str, Any]:
    pol = Recording()
    mask_id = vocab.mask_id
    prompts = torch.tensor([vocab.prompt_ids(it.prompt) for it in items])
    res = denoise(model, prompts, gen_length=CANVAS, block_length=CANVAS, steps=CANVAS, policy=pol,
                  params=params, temperature=0.0)
    p_len = prompts.shape[1]
    kinds: Counter = Counter()
    pairs: list[dict[str, Any]] = []
    all_scores: list[float] = []
    iu = torch.triu_indices(CANVAS, CANVAS, 1)
    for rec in pol.steps:  # every masked pair of every step, for the distribution the misses sit in
        masked = rec["masked"]
        s = symmetrize(renormalize_over(rec["attention"], masked), torch.ones(len(masked), dtype=torch.bool))
        s = s * masked.sum(-1).view(-1, 1, 1)
        all_scores += s[:, iu[0], iu[1]][masked[:, iu[0]] & masked[:, iu[1]]].tolist()
    wrong = 0
    for b, item in enumerate(items):
        # the answer's own positions (what follows is <|eot_id|> / padding, scored by is_correct)
        valid = [tuple(vocab.answer_ids(a, CANVAS))[:len(a.split())] for a in item.segments[0]]
        if is_correct(item, decode_answer(vocab, res.tokens[b].tolist())):
            continue  # every canvas on the way to a valid answer is completable: no breaking step
        wrong += 1
        for t, rec in enumerate(pol.steps):
            commit = rec["commit"][b]
            if not bool(commit.any()):
                continue
            masked = rec["masked"][b]
            before = rec["canvas"][b].tolist()
            props = rec["tokens"][b].tolist()
            after = [props[i] if commit[i] else before[i] for i in range(CANVAS)]
            score = share_scores(rec["attention"][b], masked)
            if not completable(before, mask_id, valid) or completable(after, mask_id, valid):
                continue
            members = commit.nonzero().flatten().tolist()
            alone_bad = [i for i in members if not completable(
                [props[i] if k == i else c for k, c in enumerate(before)], mask_id, valid)]
            found: list[tuple[int, int, str]] = []
            if not alone_bad:
                for x, i in enumerate(members):
                    for j in members[x + 1:]:
                        two = [props[k] if k in (i, j) else c for k, c in enumerate(before)]
                        if not completable(two, mask_id, valid):
                            found.append((i, j, "joint"))
            else:
                for i in alone_bad:
                    for j in members:
                        if j == i or j in alone_bad:
                            continue
                        x = torch.tensor(before)
                        x[j] = props[j]
                        seq = torch.cat([prompts[b], x])[None]
                        with torch.no_grad():
                            tok = int(model(seq).logits[0, p_len + i].argmax())
                        fixed = [tok if k == i else c for k, c in enumerate(x.tolist())]
                        if completable(fixed, mask_id, valid):
                            found.append((j, i, "carry"))
            kinds["joint" if found and found[0][2] == "joint" else "carry" if found else "marginal"] += 1
            dep = paper_dependency(rec["attention"][b], masked)
            m = int(masked.sum())
            for i, j, kind in found:
                conf = rec["conf"][b]
                pairs.append({"item": item.prompt, "step": t, "kind": kind, "i": i, "j": j, "masked": m,
                              "set_size": len(members), "score_x_uniform": float(score[i, j]),
                              "tuned_edge": bool(score[i, j] >= DapdPolicy.Params().edge_threshold),
                              "paper_dependency": [float(dep[i, j]), float(dep[j, i])],
                              "confidence": [float(conf[i]), float(conf[j])],
                              "same_token": props[i] == props[j]})
    s = np.array(all_scores) if all_scores else np.zeros(1)
    summary = {"items": len(items), "wrong": wrong, "breaking_steps": dict(kinds), "missed_pairs": len(pairs),
               "nfe_mean": float(res.nfe.float().mean())}
    if pairs:
        sc = np.array([p["score_x_uniform"] for p in pairs])
        summary.update({
            "with_tuned_edge": sum(p["tuned_edge"] for p in pairs),
            "both_confident_0.9": sum(min(p["confidence"]) >= 0.9 for p in pairs),
            "one_confident_0.9": sum(max(p["confidence"]) >= 0.9 > min(p["confidence"]) for p in pairs),
            "same_token": sum(p["same_token"] for p in pairs),
            "median_score_x_uniform": float(np.median(sc)),
            "pair_score_percentile": float(np.mean([(s < v).mean() for v in sc]) * 100)})
    summary["all_pairs_median_score_x_uniform"] = float(np.median(s))
    return {"summary": summary, "pairs": pairs, "all_scores": all_scores}


def one_token_per_step(model: Any, vocab: Vocab, items: list) -> float:
    """Accuracy (%) of ``low_confidence`` with one token per step, the benchmark's anchor."""
    from vllm_dapd.demo.evaluate import accuracy, evaluate

    return 100.0 * accuracy(evaluate(model, vocab, items, steps=CANVAS, gen_length=CANVAS))


def plot(out: dict[str, Any], path: Path) -> None:
    """Share scores (x the uniform share) of the missed pairs against every masked pair's, per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f in out if any(r["pairs"] for r in out[f].values())]
    fig, axes = plt.subplots(1, max(1, len(fams)), figsize=(5.5 * max(1, len(fams)), 4), squeeze=False)
    bins = np.linspace(0, 4, 33)
    for ax, fam in zip(axes[0], fams):
        ax.hist(np.clip(out[fam]["tuned, no same-token rule"]["all_scores"], 0, 4), bins, density=True, alpha=0.4,
                color="gray", label="every masked pair (tuned, all steps)")
        for name, r in out[fam].items():
            if r["pairs"] and "+" not in name:
                ax.hist(np.clip([p["score_x_uniform"] for p in r["pairs"]], 0, 4), bins, density=True,
                        histtype="step", lw=2, label=f"missed pairs, {name} ({len(r['pairs'])})")
        ax.axvline(DapdPolicy.Params().edge_threshold, color="k", ls="--", lw=1, label="tuned edge cut")
        ax.set_xlabel("share score x M (1 = uniform share)")
        ax.set_title(f"{fam}: pairs committed together that broke the answer")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=CHECKPOINT)
    ap.add_argument("--quick", action="store_true", help="8 dev prompts of perm and add (a smoke run)")
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--splits", nargs="+", default=["dev", "test"], choices=["dev", "test"])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--out", type=Path, default=RESULTS / "tmp" / "dapd_conflicts")
    args = ap.parse_args()
    if args.quick:
        args.items, args.splits, args.families = 8, ["dev"], ["perm", "add"]
    torch.set_num_threads(1)
    model, vocab = load_model(args.model).eval(), Vocab.build(all_words())
    out: dict[str, Any] = {}
    table: dict[str, Any] = {}
    for split in args.splits:
        for family in args.families:
            items = held_out(family, args.items, split)
            with torch.no_grad():
                table.setdefault(split, {}).setdefault("one token per step", {})[family] = {
                    "accuracy": one_token_per_step(model, vocab, items), "tpf": 1.0}
                for name, params in SETTINGS.items():
                    r = study(model, vocab, family, items, params)
                    s = r["summary"]
                    table[split].setdefault(name, {})[family] = {
                        "accuracy": 100.0 * (1 - s["wrong"] / s["items"]), "tpf": CANVAS / s["nfe_mean"]}
                    out.setdefault(split, {}).setdefault(family, {})[name] = r
                    print(split, family, name, json.dumps(s), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(out[args.splits[0]], args.out.with_suffix(".png"))
    for fams in out.values():
        for fam in fams.values():
            for r in fam.values():
                r.pop("all_scores", None)
    args.out.with_suffix(".json").write_text(json.dumps({
        "model": str(Path(args.model).name), "items_per_family_and_split": args.items,
        "plot_split": args.splits[0], "backend": "reference loop (plain PyTorch), greedy, one block of the canvas",
        "accuracy_tpf": table, "study": out}, indent=1))  # study: {split: {family: {setting: ...}}}
    for split in args.splits:
        print(f"\naccuracy % / TPF ({split})  " + " ".join(f"{f:>11s}" for f in args.families))
        for name, row in table[split].items():
            print(f"{name:26s} " + " ".join(f"{row[f]['accuracy']:5.1f}/{row[f]['tpf']:4.2f}" for f in args.families))


if __name__ == "__main__":
    main()
