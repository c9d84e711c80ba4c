"""Time of one policy step, per policy, versus batch size and canvas length (CPU).

Why: a policy runs once per denoising step for the whole batch, next to the model forward; its
cost must stay near-linear in ``batch x canvas`` (graph policies: at most quadratic in the canvas,
their attention input is ``[B, L, L]``). The script times every registered policy on random
logits (and a random row-stochastic attention for policies that need it), fits
``time ~ batch^a * canvas^b`` by least squares in log space, and writes
``policy_overhead.json`` and ``.png`` to the scratch folder ``benchmarks/results/tmp/``
(``--out benchmarks/results/policy_overhead`` refreshes the committed result).

    python benchmarks/policy_overhead.py --quick          # < 1 minute
    python benchmarks/policy_overhead.py                   # full grid, vocab 1024
    python benchmarks/policy_overhead.py --vocab 126464    # LLaDA's vocabulary (grid capped by memory)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from vllm_dapd.decoding import available_policies, get_policy, stack_params
from vllm_dapd.decoding.policy import DenoiseState

RESULTS = Path(__file__).resolve().parent / "results"


def make_state(B: int, L: int, V: int, needs_attention: bool, seed: int = 0) -> DenoiseState:
    g = torch.Generator().manual_seed(seed)
    masked = torch.rand(B, L, generator=g) < 0.7
    masked[:, 0] = True
    attn = None
    if needs_attention:
        attn = torch.rand(B, L, L, generator=g) ** 3
        attn = attn / attn.sum(-1, keepdim=True) * 0.8
    return DenoiseState(
        logits=torch.randn(B, L, V, generator=g) * 3,
        tokens=torch.where(masked, 0, 1),
        masked=masked,
        decoded=~masked,
        step=torch.zeros(B, dtype=torch.long),
        steps=torch.full((B,), max(L // 4, 1), dtype=torch.long),
        temperature=torch.zeros(B),
        seed=torch.arange(B, dtype=torch.long),
        nfe=torch.zeros(B, dtype=torch.long),
        attention=attn,
    )


def time_step(name: str, B: int, L: int, V: int, repeats: int) -> float:
    """Median milliseconds of one ``policy.step`` (after one warm-up call)."""
    pol = get_policy(name)
    state = make_state(B, L, V, pol.needs_attention)
    params = stack_params([pol.make_params()] * B)
    pol.step(state, params)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pol.step(state, params)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def fit_exponents(rows: list[dict]) -> dict[str, float]:
    """Least squares ``log t = c + a log B + b log L``; returns a (batch) and b (canvas).

    Fitted on the larger half of the grid (by ``B * L``): small points measure the fixed Python
    and dispatch overhead of a call, not growth.
    """
    sizes = sorted(r["batch"] * r["canvas"] for r in rows)
    rows = [r for r in rows if r["batch"] * r["canvas"] >= sizes[len(sizes) // 2]] if sizes else rows
    if len({r["batch"] for r in rows}) < 2 or len({r["canvas"] for r in rows}) < 2:
        return {"batch_exponent": float("nan"), "canvas_exponent": float("nan")}
    X = torch.tensor([[1.0, math.log(r["batch"]), math.log(r["canvas"])] for r in rows], dtype=torch.float64)
    y = torch.tensor([math.log(max(r["ms"], 1e-6)) for r in rows], dtype=torch.float64)
    coef = torch.linalg.lstsq(X, y.unsqueeze(1)).solution.flatten()
    return {"batch_exponent": float(coef[1]), "canvas_exponent": float(coef[2])}


def plot(results: list[dict], policies: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_b, ax_l) = plt.subplots(1, 2, figsize=(12, 4.5))
    Lmax = max(r["canvas"] for r in results)
    Bmax = max(r["batch"] for r in results)
    for name in policies:
        rb = sorted((r["batch"], r["ms"]) for r in results if r["policy"] == name and r["canvas"] == Lmax)
        rl = sorted((r["canvas"], r["ms"]) for r in results if r["policy"] == name and r["batch"] == Bmax)
        if rb:
            ax_b.plot(*zip(*rb), marker="o", label=name)
        if rl:
            ax_l.plot(*zip(*rl), marker="o", label=name)
    for ax, xl, title in ((ax_b, "batch", f"canvas = {Lmax}"), (ax_l, "canvas", f"batch = {Bmax}")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("ms per policy step")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_l.legend(fontsize=8)
    fig.suptitle(f"Policy step overhead on CPU (vocab {results[0]['vocab']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small grid, runs in under a minute")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (126464 = LLaDA, 152064 = Dream)")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--canvases", type=int, nargs="+", default=None)
    ap.add_argument("--policies", nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = stable timings)")
    ap.add_argument("--max-logits-gib", type=float, default=1.0, help="skip points whose logits exceed this")
    ap.add_argument("--out", type=Path, default=RESULTS / "tmp" / "policy_overhead",
                    help="output prefix (default: the gitignored scratch folder; benchmarks/results/policy_overhead refreshes the committed result)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    batches = args.batches or ([1, 4, 16, 64] if args.quick else [1, 4, 16, 64, 256])
    canvases = args.canvases or ([8, 32, 128, 256] if args.quick else [8, 32, 64, 128, 256])
    vocab = args.vocab or (256 if args.quick else 1024)
    repeats = args.repeats or (3 if args.quick else 5)
    policies = args.policies or available_policies()
    grid = [(p, B, L) for p in policies for B in batches for L in canvases]
    skipped = [(p, B, L) for p, B, L in grid if B * L * vocab * 4 / 2**30 > args.max_logits_gib]
    grid = [g for g in grid if g not in skipped]

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    it = tqdm(grid, desc="policy steps", unit="pt") if tqdm else grid
    results = []
    for name, B, L in it:
        ms = time_step(name, B, L, vocab, repeats)
        results.append({"policy": name, "batch": B, "canvas": L, "vocab": vocab, "ms": ms})

    fits = {p: fit_exponents([r for r in results if r["policy"] == p]) for p in policies}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "vocab": vocab, "batches": batches, "canvases": canvases, "repeats": repeats, "threads": args.threads,
        "torch": torch.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "skipped_for_memory": [list(s) for s in skipped],
        "load_average_after": os.getloadavg(),  # timings from a shared machine are only as good as this
    }
    args.out.with_suffix(".json").write_text(json.dumps({"config": meta, "results": results, "fits": fits}, indent=1))
    plot(results, policies, args.out.with_suffix(".png"))

    Bs, Bl = min(batches), max(batches)
    Ls, Ll = min(canvases), max(canvases)
    print(f"\nvocab {vocab}, {args.threads} thread(s); time ~ batch^a * canvas^b (fit on the larger half)")
    print(f"{'policy':<15}{f'ms B{Bs} L{Ls}':>14}{f'ms B{Bl} L{Ll}':>16}{'a (batch)':>11}{'b (canvas)':>12}")
    for p in policies:
        ms = {(r["batch"], r["canvas"]): r["ms"] for r in results if r["policy"] == p}
        lo, hi = ms.get((Bs, Ls), float("nan")), ms.get((Bl, Ll), float("nan"))
        f = fits[p]
        print(f"{p:<15}{lo:>14.3f}{hi:>16.2f}{f['batch_exponent']:>11.2f}{f['canvas_exponent']:>12.2f}")
    if skipped:
        print(f"skipped {len(skipped)} points over --max-logits-gib {args.max_logits_gib}")
    print(f"wrote {args.out.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
