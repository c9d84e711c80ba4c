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

``--share``: the policy's share of a real engine step instead. A random LLaDA-layout model (25M
parameters, vocab 8192; ``--quick``: 1M) runs ``stepper.denoise_step`` (cache mode ``none``) at
batch 64 with prompts of 32 tokens, canvas 32 in one block and canvas 128 in blocks of 32; per
policy and step it records the model forward, the policy's ``step`` call and the whole step, and
writes ``policy_share.json`` / ``.png`` (``--out benchmarks/results/policy_share`` refreshes the
committed result). The target is policy <= 3% of a step at batch 64.

    python benchmarks/policy_overhead.py --share --quick  # ~1 minute
    python benchmarks/policy_overhead.py --share          # 25M model, several minutes on 2 cores
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


SHARE_SIZES = {"25M": dict(d_model=512, n_layers=5, n_heads=8, mlp_hidden_size=1376, vocab_rows=8192),
               "1M": dict(d_model=128, n_layers=2, n_heads=2, mlp_hidden_size=256, vocab_rows=2048)}
SHARE_POLICIES = ["low_confidence", "threshold", "eb", "dapd", "dawn"]


class _Timed:
    """The model, timing each forward (the stepper reads ``logits_shift`` and calls it)."""

    def __init__(self, model):
        self.model, self.logits_shift, self.ms = model, model.logits_shift, []

    def run(self, batch):
        t0 = time.perf_counter()
        out = self.model.run(batch)
        self.ms.append((time.perf_counter() - t0) * 1e3)
        return out


def share_rows(size: str, batch: int, layouts: list[tuple[int, int]], policies: list[str], steps: int) -> list[dict]:
    """Per (policy, canvas, block): median ms of the forward, the policy's ``step`` and the whole step
    over ``steps`` steps after a warm-up step, on a random LLaDA-layout model of ``size``."""
    import tempfile

    from vllm_dapd.engine.core import offline
    from vllm_dapd.engine.core.stepper import denoise_step
    from vllm_dapd.models.loading import load_model
    from vllm_dapd.models.tiny import make_tiny_llada

    model = _Timed(load_model(make_tiny_llada(tempfile.mkdtemp(), **SHARE_SIZES[size])))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 300, (32,), generator=g).tolist() for _ in range(batch)]
    rows = []
    for canvas, block in layouts:
        for name in policies:
            pol = get_policy(name)
            policy_ms: list[float] = []
            real_step = type(pol).step

            def timed_step(self, state, params, _real=real_step, _out=policy_ms):
                t0 = time.perf_counter()
                res = _real(self, state, params)
                _out.append((time.perf_counter() - t0) * 1e3)
                return res

            settings = {"policy": name, "block_length": block, "steps": block}
            seqs, _ = offline.sequences(model.model, [offline.Request(p, settings, canvas, seed=i)
                                                      for i, p in enumerate(prompts)], kv=None)
            type(pol).step = timed_step
            try:
                step_ms = []
                for k in range(steps + 1):
                    model.ms.clear()
                    policy_ms.clear()
                    t0 = time.perf_counter()
                    denoise_step(model, seqs, torch.device("cpu"))
                    if k:  # the first step warms up
                        step_ms.append(((time.perf_counter() - t0) * 1e3, sum(model.ms), sum(policy_ms)))
            finally:
                type(pol).step = real_step
            step, fwd, pms = (statistics.median(x) for x in zip(*step_ms))
            rows.append({"policy": name, "size": size, "batch": batch, "canvas": canvas, "block": block,
                         "step_ms": step, "forward_ms": fwd, "policy_ms": pms,
                         "policy_share": pms / step, "overhead_share": (step - fwd) / step})
            print(f"{name:<15} canvas {canvas:>4} block {block:>3}: step {step:8.1f} ms, forward {fwd:8.1f} ms, "
                  f"policy {pms:7.2f} ms ({100 * pms / step:4.1f}%), all but the forward "
                  f"{100 * (step - fwd) / step:4.1f}%", flush=True)
    return rows


def plot_share(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = list(dict.fromkeys((r["canvas"], r["block"]) for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(layouts)
    for i, (canvas, block) in enumerate(layouts):
        vals = [100 * next(r["policy_share"] for r in rows if r["policy"] == p and (r["canvas"], r["block"]) == (canvas, block))
                for p in policies]
        ax.bar([j + i * width for j in range(len(policies))], vals, width, label=f"canvas {canvas}, blocks of {block}")
    ax.axhline(3.0, color="k", ls="--", lw=1, label="target 3%")
    ax.set_xticks([j + width * (len(layouts) - 1) / 2 for j in range(len(policies))], policies)
    ax.set_ylabel("policy step, % of the engine step")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main_share(args: argparse.Namespace) -> None:
    size, batch, steps = ("1M", 8, 2) if args.quick else ("25M", 64, 3)
    layouts = [(32, 32), (128, 32)]
    rows = share_rows(size, batch, layouts, args.policies or SHARE_POLICIES, steps)
    meta = {"size": size, "batch": batch, "prompt": 32, "layouts": layouts, "steps_timed": steps,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "load_average_after": os.getloadavg()}
    out = args.out if args.out != RESULTS / "tmp" / "policy_overhead" else RESULTS / "tmp" / "policy_share"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"config": meta, "rows": rows}, indent=1))
    plot_share(rows, out.with_suffix(".png"),
               f"Policy share of an engine step: random LLaDA {size}, batch {batch}, prompt 32, fp32, "
               f"{torch.get_num_threads()} threads")
    print(f"wrote {out.with_suffix('.json')} and .png")


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
    ap.add_argument("--share", action="store_true", help="policy share of a real engine step (see above)")
    args = ap.parse_args()
    if args.share:
        return main_share(args)

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
