"""Accuracy versus denoising steps (NFE) for every policy, on the demo model's test split.

Why: parallel decoding buys speed (fewer forwards, NFE) at the price of committing positions
from marginals; the question is how much accuracy each policy keeps as NFE falls. The demo tasks
(``vllm_dapd/demo/tasks.py``) are exact-match scored and include ``cities``, whose two-word answers
are only jointly consistent, so committing coupled positions together shows up as errors.

Each policy is swept over what sets its speed: the step budget for the fixed-count baselines
(``low_confidence``, ``entropy``, ``margin``, ``random``), the confidence threshold / factor /
entropy budget for ``threshold`` / ``factor`` / ``eb``, the edge threshold (and a few step
budgets) for ``dapd``, the confidence bars for ``dawn``. One block over the whole canvas (10 tokens),
greedy (temperature 0). Writes ``accuracy_vs_steps.json`` and ``.png`` to the scratch folder ``benchmarks/results/tmp/``;
``--out benchmarks/results/accuracy_vs_steps`` refreshes the committed result.

    python benchmarks/accuracy_vs_steps.py --quick                 # about a minute (2-core CPU)
    python benchmarks/accuracy_vs_steps.py                         # full sweep, 200 items per task
    python benchmarks/accuracy_vs_steps.py --backend reference \
        --out benchmarks/results/accuracy_vs_steps_reference       # same sweep, no vLLM

Backends (the JSON and the plot say which one produced them): ``engine`` (default) serves the
prompts through ``vllm.LLM`` with the plugin (cache mode ``none``, all items of a point in one
batch) and reads NFE from vLLM's per-request record; ``reference`` runs the plain-PyTorch
exact-mode loop (``vllm_dapd.decoding.generate``), the oracle the engine is pinned to token for
token. The committed results of the two agree on every point (accuracy per task and NFE).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vllm_dapd.demo import CHECKPOINT
from vllm_dapd.demo.evaluate import accuracy, evaluate, evaluate_engine
from vllm_dapd.demo.tasks import CANVAS, TASKS, held_out
from vllm_dapd.demo.vocab import Vocab
from vllm_dapd.models.loading import load_model

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = sorted({CANVAS, CANVAS // 2, 4, 3, 2, 1}, reverse=True)

# policy -> [(label, params, steps)]; steps None = CANVAS (adaptive policies stop early on their own)
SWEEPS: dict[str, list[tuple[str, dict[str, Any], int | None]]] = {
    **{p: [(f"steps={s}", {}, s) for s in BUDGETS] for p in ("low_confidence", "entropy", "margin", "random")},
    "threshold": [(f"threshold={t}", {"threshold": t}, None) for t in (0.99, 0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05)],
    "factor": [(f"factor={f}", {"factor": f}, None) for f in (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)],
    "eb": [(f"gamma={g}", {"gamma": g}, None) for g in (0.001, 0.01, 0.1, 0.3, 1.0, 3.0)],
    "dapd": [(f"edge={e}", {"variant": "tuned", "edge_threshold": e}, None) for e in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)]
    + [(f"edge=1.0,steps={s}", {"variant": "tuned", "edge_threshold": 1.0}, s) for s in (4, 3, 2)],
    "dawn": [(f"high={h},low={lo}", {"tau_high": h, "tau_anchor": h, "tau_induce": lo, "tau_low": lo}, None)
             for h, lo in ((0.99, 0.9), (0.9, 0.7), (0.8, 0.5), (0.7, 0.3), (0.5, 0.1), (0.3, 0.05))],
}
# --quick: these indices (0-based) into each policy's sweep
QUICK = {"low_confidence": [0, 2, 3, 4], "entropy": [0, 3], "margin": [0, 3], "random": [0, 3],
         "threshold": [0, 2, 4, 6], "factor": [1, 3, 5], "eb": [1, 3, 5], "dapd": [1, 3, 5, 7, 8, 9],
         "dawn": [0, 2, 4]}


def run_point(model: Any, llm: Any, vocab: Vocab, items: dict[str, list], policy: str, params: dict,
              steps: int | None, layers: tuple[int, ...] | None) -> dict[str, Any]:
    """One sweep point on every task: ``llm`` (engine backend) or ``model`` (reference loop)."""
    start = time.time()
    if llm is not None:
        flat = [it for task_items in items.values() for it in task_items]
        outs = evaluate_engine(llm, vocab, flat, policy=policy, params=params, steps=steps or CANVAS)
    else:
        outs = [o for task_items in items.values() for o in evaluate(
            model, vocab, task_items, policy=policy, params=params, steps=steps or CANVAS,
            attention_layers=layers)]
    per_task = {task: accuracy([o for o in outs if o.item.task == task]) for task in items}
    nfe = [o.nfe for o in outs]
    mean_nfe = float(np.mean(nfe))
    return {"accuracy": float(np.mean(list(per_task.values()))), "per_task": per_task, "nfe": mean_nfe,
            "tokens_per_forward": CANVAS / mean_nfe, "seconds": round(time.time() - start, 2)}


def start_engine(path: str, max_num_seqs: int) -> Any:
    """``vllm.LLM`` on the demo checkpoint (plugin loaded by vLLM's entry point), exact cache mode."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    return LLM(model=path, max_model_len=128, max_num_seqs=min(max_num_seqs, 256), dtype="float32",
               additional_config={"dapd": {"block_length": CANVAS, "cache_mode": "none"}})


def interpolate(points: list[dict], nfe: float, key: str = "accuracy") -> float | None:
    """A policy's accuracy at ``nfe`` on its (NFE, accuracy) curve, linear between sweep points.

    Past the curve's most expensive point the policy is taken at that point (spending more forwards
    than its slowest setting is not an option it has); below its cheapest point: None.
    """
    pts = sorted((p["nfe"], p[key] if key != "cities" else p["per_task"]["cities"]) for p in points)
    if not pts or nfe < pts[0][0]:
        return None
    return float(np.interp(nfe, [p[0] for p in pts], [p[1] for p in pts]))


def headline(results: list[dict]) -> dict[str, Any]:
    """DAPD's cheapest point matching one-token-per-step accuracy, and the baselines at its NFE."""
    by = lambda name: [r for r in results if r["policy"] == name]  # noqa: E731
    full = next((r for r in by("low_confidence") if r["steps"] == CANVAS), None)
    if full is None or not by("dapd"):
        return {}
    ok = [r for r in by("dapd") if r["accuracy"] >= full["accuracy"] - 0.01]
    best = min(ok or by("dapd"), key=lambda r: (r["nfe"], -r["accuracy"]))
    out = {"low_confidence_full": {"accuracy": full["accuracy"], "nfe": full["nfe"],
                                   "cities": full["per_task"].get("cities")},
           "dapd": {"setting": best["setting"], "accuracy": best["accuracy"], "nfe": best["nfe"],
                    "cities": best["per_task"].get("cities"), "nfe_ratio": best["nfe"] / full["nfe"],
                    "matches_full_accuracy": bool(ok)}}
    for name in ("threshold", "low_confidence", "dawn", "eb", "factor"):
        out[f"{name}_at_dapd_nfe"] = {"accuracy": interpolate(by(name), best["nfe"]),
                                      "cities": interpolate(by(name), best["nfe"], "cities")}
    return out


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for name in SWEEPS:
        pts = sorted((r for r in results if r["policy"] == name), key=lambda r: r["nfe"])
        if not pts:
            continue
        style = dict(marker="o", lw=2.5 if name in ("dapd", "dawn") else 1.2, label=name)
        axes[0].plot([p["nfe"] for p in pts], [p["accuracy"] for p in pts], **style)
        axes[1].plot([p["nfe"] for p in pts], [p["per_task"]["cities"] for p in pts], **style)
        axes[2].plot([p["tokens_per_forward"] for p in pts], [p["accuracy"] for p in pts], **style)
    for ax, xl, yl in ((axes[0], "mean NFE (forwards per answer)", "exact-match accuracy, all tasks"),
                       (axes[1], "mean NFE", "exact-match accuracy, cities (coupled pairs)"),
                       (axes[2], "canvas tokens per forward", "exact-match accuracy, all tasks")):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from tqdm.auto import tqdm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 items per task, a few points per policy")
    ap.add_argument("--items", type=int, default=None, help="test items per task (default 200, quick 32)")
    ap.add_argument("--policies", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    ap.add_argument("--backend", choices=("engine", "reference"), default="engine")
    ap.add_argument("--model", default=CHECKPOINT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "tmp" / "accuracy_vs_steps",
                    help="output prefix (default: the gitignored scratch folder; benchmarks/results/accuracy_vs_steps refreshes the committed result)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.items or (32 if args.quick else 200)
    model, vocab = load_model(args.model), Vocab.build()
    llm = start_engine(args.model, len(TASKS) * n) if args.backend == "engine" else None
    items = {task: held_out(task, n) for task in TASKS}
    layers = tuple(range(-min(4, len(model.layers)), 0))  # DAWN's last-4 default, capped by depth
    plan = [(p, *point) for p in args.policies for i, point in enumerate(SWEEPS[p])
            if not args.quick or i in QUICK[p]]
    results = []
    start = time.time()
    for policy, label, params, steps in tqdm(plan, desc="policy sweep", unit="point"):
        lay = layers if policy == "dawn" else None
        r = run_point(model, llm, vocab, items, policy, params, steps, lay)
        results.append({"policy": policy, "setting": label, "params": params, "steps": steps or CANVAS, **r})
    head = headline(results)
    meta = {"backend": args.backend, "model": os.path.relpath(args.model), "items_per_task": n,
            "tasks": list(TASKS), "canvas": CANVAS, "block_length": CANVAS, "temperature": 0.0,
            "threads": args.threads, "quick": args.quick, "seconds": round(time.time() - start, 1),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
            "load_average": os.getloadavg(), "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"config": meta, "headline": head, "results": results},
                                                        indent=1))
    plot(results, args.out.with_suffix(".png"),
         f"Demo model, {n} test items x {len(TASKS)} tasks, canvas {CANVAS}, backend: {args.backend} (exact mode)")
    print_table(results, head)


def print_table(results: list[dict], head: dict[str, Any]) -> None:
    print(f"\n{'policy':15s} {'setting':22s} {'acc':>6s} " + " ".join(f"{t:>7s}" for t in TASKS)
          + f" {'NFE':>6s} {'tok/fwd':>7s}")
    for r in results:
        print(f"{r['policy']:15s} {r['setting']:22s} {r['accuracy']:6.3f} "
              + " ".join(f"{r['per_task'][t]:7.3f}" for t in TASKS)
              + f" {r['nfe']:6.2f} {r['tokens_per_forward']:7.2f}")
    if head:
        d, f = head["dapd"], head["low_confidence_full"]
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"\nheadline: dapd ({d['setting']}) {d['accuracy']:.3f} at NFE {d['nfe']:.2f} "
              f"({d['nfe_ratio']:.2f}x of low_confidence's {f['nfe']:.0f}, which scores {f['accuracy']:.3f}); "
              f"at that NFE threshold {fmt(head['threshold_at_dapd_nfe']['accuracy'])}, "
              f"low_confidence {fmt(head['low_confidence_at_dapd_nfe']['accuracy'])}, "
              f"dawn {fmt(head['dawn_at_dapd_nfe']['accuracy'])}")


if __name__ == "__main__":
    main()
