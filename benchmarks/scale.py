"""Throughput at model sizes where compute dominates (CPU), honestly compared with AR decoding.

For each size (random checkpoints in the real LLaDA layout, ``vllm_dapd/models/tiny.py``; one
block over a 32-token canvas; random prompts of 16-32 tokens), in one run, each number the median
of ``--repeats``:

Each engine worker also loads the plain PyTorch model and, per batch and repeat, times the bare
forward, the two policies and one engine call back to back, so the ratios compare numbers taken
under the same load (medians of the per-repeat ratios).

- ``step_vs_forward``: the engine's step time (``vllm.LLM`` + the dapd plugin, prefix cache,
  greedy ``low_confidence`` at ``--parallel-steps`` steps, i.e. canvas / steps tokens a step; wall
  time of a ``generate`` call / its NFE) over the bare forward time
  of the same batch shape: ``vllm_dapd``'s plain PyTorch model (``load_model``) on the full
  ``[B, prompt + canvas]`` input, no cache. The engine's prefix cache feeds only the canvas rows
  after the first step, so a ratio below 1 is possible.
- ``policy_share``: one policy call on a ``[B, canvas, vocab]`` ``DenoiseState`` (random logits,
  and a random attention for ``dapd``; ``benchmarks/policy_overhead.py``) over the bare forward.
- ``memory``: the largest intermediate of one step beyond weights and KV, computed analytically
  (fp32): logits ``B x T x vocab``, the MLP's gate and up ``2 x B x T x mlp``, attention scores
  ``B x heads x T x T`` (an upper bound: SDPA may not materialise them), and the policy's
  softmax over ``B x canvas x vocab``. Not measured: ``tracemalloc`` does not see torch tensors.
- ``tokens_per_s``: the engine with one token per step (``low_confidence``, steps = canvas) and a
  parallel setting (``low_confidence``, a fixed canvas / ``--parallel-steps`` tokens a step; a
  ``threshold`` policy is not used: on random weights its confidence rarely reaches 0.9, so it
  would degenerate to about one token a step), vs stock vLLM (plugins off, a subprocess) decoding the
  same number of tokens autoregressively with a random ``LlamaForCausalLM`` of the same size and
  vocabulary (``benchmarks/throughput.py``'s ``ar_llama`` yardstick).

Engines run in subprocesses (one per size and kind) so each starts clean. Writes JSON + PNG to
``benchmarks/results/tmp/throughput_scale`` unless ``--out`` is given.

    python benchmarks/scale.py --quick        # one tiny size, ~3 minutes
    python benchmarks/scale.py --out benchmarks/results/throughput_scale
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from policy_overhead import time_step  # noqa: E402
from throughput import make_llama, make_llm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# name -> make_tiny_llada arguments; ~25M and ~60M parameters with vocab 8192, untied head
SIZES = {
    "25M": dict(d_model=512, n_layers=5, n_heads=8, mlp_hidden_size=1376, vocab_rows=8192),
    "60M": dict(d_model=768, n_layers=7, n_heads=12, mlp_hidden_size=2048, vocab_rows=8192),
}
# vLLM's CPU attention needs head_dim >= 32 (16 fails: "Unsupported CPU attention configuration")
QUICK_SIZES = {"1M": dict(d_model=128, n_layers=2, n_heads=2, mlp_hidden_size=256, vocab_rows=2048)}
WHY_AR_WINS = (
    "AR decoding commits one token per forward, and each forward feeds one new row per sequence "
    "over a KV cache of length n: O(1) rows of GEMM per token. A diffusion step re-reads the whole "
    "canvas: B x canvas rows per forward (prefix cache: the prompt is cached, the canvas is not, "
    "because every canvas position can still change). At one token per step, diffusion therefore does "
    "about canvas-times more GEMM work per committed token than AR; only committing many tokens per "
    "forward (parallel policies) closes the gap. On a 2-core CPU the GEMMs are the bottleneck, and "
    "there is no idle compute for the extra canvas rows to hide in, unlike a memory-bound GPU decode.")


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def make_prompts(n: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    """Random prompts of 16-32 tokens drawn from ids [low, high) (regular tokenizer ids)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(16, 33, (n,), generator=g)
    return [torch.randint(low, high, (int(L),), generator=g).tolist() for L in lens]


def memory_mib(cfg: dict, B: int, T: int, canvas: int) -> dict:
    """Largest fp32 intermediates of one step, analytically (MiB); see the module docstring."""
    mib = 4 / 2**20
    parts = {"logits": B * T * cfg["vocab_rows"] * mib, "mlp_gate_up": 2 * B * T * cfg["mlp_hidden_size"] * mib,
             "attention_scores": B * cfg["n_heads"] * T * T * mib,
             "policy_softmax": B * canvas * cfg["vocab_rows"] * mib}
    return {"parts_mib": parts, "largest": max(parts, key=parts.get), "largest_mib": max(parts.values())}


# ------------------------------------------------------------------------------------- workers

def timed_generate(llm, prompts: list[list[int]], sp, batch: int, repeats: int) -> dict:
    """Median wall time of ``generate`` on the first ``batch`` prompts (warm the engine up first)."""
    from vllm_dapd import cost

    batch_prompts = [{"prompt_token_ids": p} for p in prompts[:batch]]
    times, nfe, tokens = [], float("nan"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = llm.generate(batch_prompts, sp, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        costs = [cost(o.outputs[0]) for o in outs]
        if all(c is not None for c in costs):
            nfe = max(float(c.nfe) for c in costs)  # a batch runs until its slowest request is done
    s = median(times)
    return {"batch": batch, "seconds": s, "seconds_all": times, "tokens": tokens, "tokens_per_s": tokens / s,
            "nfe": nfe, "ms_per_step": 1e3 * s / nfe if nfe == nfe else None}


def engine_worker(args) -> None:
    """Subprocess body: the dapd engine, and the bare forward and policies between its calls."""
    from vllm import SamplingParams

    from vllm_dapd.models.loading import load_model

    job = json.loads(Path(args.job).read_text())
    canvas, prompts = job["canvas"], job["prompts"]
    llm = make_llm(args.engine_worker, max(job["batches"] + job["tps_batches"]), canvas)

    def sp(policy, steps, params):
        extra = {"policy": policy, "block_length": canvas, "steps": steps, "cache_mode": "prefix", **params}
        return SamplingParams(max_tokens=canvas, temperature=0.0, seed=0, ignore_eos=True, detokenize=False,
                              extra_args=extra)

    parallel, one = sp("low_confidence", job["parallel_steps"], {}), sp("low_confidence", canvas, {})
    llm.generate([{"prompt_token_ids": prompts[0]}], parallel, use_tqdm=False)  # warm-up
    model = load_model(args.engine_worker).eval()
    torch.set_num_threads(job["threads"])
    out = {"parallel": [], "step": []}
    for b in job["batches"]:  # interleaved: forward, policies, engine, repeated; medians of each
        reps = []
        for _ in range(job["repeats"]):
            fwd = bare_forward_ms(model, prompts, b, canvas, 1)
            pol = {p: time_step(p, b, canvas, job["vocab_rows"], 1) for p in ("low_confidence", "dapd")}
            reps.append((fwd, pol, timed_generate(llm, prompts, parallel, b, 1)))
        eng = reps[0][2] | {"seconds_all": [r[2]["seconds"] for r in reps]}
        eng["seconds"] = median(eng["seconds_all"])
        eng["tokens_per_s"], eng["ms_per_step"] = eng["tokens"] / eng["seconds"], 1e3 * eng["seconds"] / eng["nfe"]
        out["parallel"].append(eng)
        out["step"].append({
            "bare_forward_ms": median([r[0] for r in reps]), "bare_forward_ms_all": [r[0] for r in reps],
            "policy_ms": {p: median([r[1][p] for r in reps]) for p in reps[0][1]},
            "engine_step_over_bare_forward": median([1e3 * r[2]["seconds"] / r[2]["nfe"] / r[0] for r in reps]),
            "policy_share": {p: median([r[1][p] / r[0] for r in reps]) for p in reps[0][1]}})
    out["one_per_step"] = [timed_generate(llm, prompts, one, b, job["repeats"]) for b in job["tps_batches"]]
    print("ENGINE_RESULT " + json.dumps(out), flush=True)


def ar_worker(args) -> None:
    """Subprocess body: stock vLLM (no plugins), greedy AR. Prints AR_RESULT json."""
    from vllm import LLM, SamplingParams

    job = json.loads(Path(args.job).read_text())
    llm = LLM(model=args.ar_worker, max_model_len=128, max_num_seqs=max(job["batches"]), dtype="float32", seed=0)
    sp = SamplingParams(max_tokens=job["canvas"], temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": job["prompts"][0]}], sp, use_tqdm=False)  # warm-up
    rows = [timed_generate(llm, job["prompts"], sp, b, job["repeats"]) for b in job["batches"]]
    for r in rows:
        r["nfe"], r["ms_per_step"] = float(job["canvas"]), 1e3 * r["seconds"] / job["canvas"]
    print("AR_RESULT " + json.dumps(rows), flush=True)


def run_worker(flag: str, path: str, job: dict, tag: str, env: dict | None = None) -> object:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    try:
        cmd = [sys.executable, __file__, flag, path, "--job", f.name]
        proc = subprocess.run(cmd, env=env or dict(os.environ), capture_output=True, text=True, timeout=3600)
    finally:
        os.unlink(f.name)
    for line in proc.stdout.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "rror" in ln or "ERROR" in ln]
    raise RuntimeError(f"{flag} failed (rc {proc.returncode}):\n" + "\n".join(errors[-20:]) + proc.stderr[-3000:])


# ---------------------------------------------------------------------------------- in-process

@torch.no_grad()
def bare_forward_ms(model, prompts: list[list[int]], B: int, canvas: int, repeats: int) -> float:
    """Median ms of ``model(x)`` on ``[B, P + canvas]`` (P = the longest of the first B prompts)."""
    P = max(len(p) for p in prompts[:B])
    x = torch.full((B, P + canvas), int(model.mask_token_id), dtype=torch.long)
    for i, p in enumerate(prompts[:B]):
        x[i, P - len(p):P] = torch.tensor(p)
    model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(1e3 * (time.perf_counter() - t0))
    return median(times)


def measure_size(name: str, cfg: dict, args, prompts: list[list[int]], root: Path) -> dict:
    from vllm_dapd.models.loading import load_model
    from vllm_dapd.models.tiny import make_tiny_llada

    path = make_tiny_llada(str(root / f"llada_{name}"), **cfg)
    model = load_model(path).eval()
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    job = {"canvas": args.canvas, "prompts": prompts, "batches": args.batches, "tps_batches": args.tps_batches,
           "parallel_steps": args.parallel_steps, "repeats": args.repeats, "threads": args.threads,
           "vocab_rows": cfg["vocab_rows"]}
    eng = run_worker("--engine-worker", path, job, "ENGINE_RESULT")
    rows = []
    for B, e, st in zip(args.batches, eng["parallel"], eng["step"]):
        T = max(len(p) for p in prompts[:B]) + args.canvas
        rows.append({"batch": B, "tokens_per_forward_input": B * T, **st, "engine_ms_per_step": e["ms_per_step"],
                     "memory": memory_mib(cfg, B, T, args.canvas)})
    ar = None
    if not args.no_ar:
        with tempfile.TemporaryDirectory(prefix="ar_llama_") as tmp:
            n_ar = make_llama(Path(tmp), path)
            env = dict(os.environ, VLLM_PLUGINS="dapd_none_stock_vllm")  # no plugin matches: stock vLLM
            ar = run_worker("--ar-worker", tmp, job, "AR_RESULT", env)
    tps = []
    one = {r["batch"]: r for r in eng["one_per_step"]}
    for i, b in enumerate(args.batches):
        row = {"batch": b, "engine_one_per_step": one.get(b), "engine_parallel": eng["parallel"][i]}
        if ar:
            row["ar_llama"] = ar[i]
            for k in ("engine_one_per_step", "engine_parallel"):
                if row[k]:
                    row[f"{k}_over_ar"] = row[k]["tokens_per_s"] / ar[i]["tokens_per_s"]
        tps.append(row)
    return {"size": name, "config": cfg, "params": params, "ar_llama_params": n_ar if ar else None,
            "step": rows, "tokens_per_s": tps}


# -------------------------------------------------------------------------------------- report

def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s, color in zip(res["sizes"], ("tab:blue", "tab:orange", "tab:green")):
        b = [r["batch"] for r in s["step"]]
        ax1.plot(b, [r["engine_step_over_bare_forward"] for r in s["step"]], "-o", color=color,
                 label=f"{s['size']}: engine step / bare forward")
        ax1.plot(b, [r["policy_share"]["dapd"] for r in s["step"]], "--x", color=color, label=f"{s['size']}: dapd / forward")
        ax1.plot(b, [r["policy_share"]["low_confidence"] for r in s["step"]], ":+", color=color,
                 label=f"{s['size']}: low_confidence / forward")
        tb = [r["batch"] for r in s["tokens_per_s"]]
        one = [(r["batch"], r["engine_one_per_step"]["tokens_per_s"]) for r in s["tokens_per_s"] if r["engine_one_per_step"]]
        if one:
            ax2.plot(*zip(*one), "-o", color=color, label=f"{s['size']}: engine, 1 token/step")
        k = res["config"]["canvas"] // res["config"]["parallel_steps"]
        ax2.plot(tb, [r["engine_parallel"]["tokens_per_s"] for r in s["tokens_per_s"]], "--x", color=color,
                 label=f"{s['size']}: engine, {k} tokens/step")
        if all("ar_llama" in r for r in s["tokens_per_s"]):
            ax2.plot(tb, [r["ar_llama"]["tokens_per_s"] for r in s["tokens_per_s"]], ":s", color=color,
                     label=f"{s['size']}: AR Llama (stock vLLM)")
    ax1.set(xscale="log", yscale="log", xlabel="batch", ylabel="ratio", title="time ratios (median)")
    ax2.set(xscale="log", yscale="log", xlabel="batch", ylabel="generated tokens / s",
            title=f"canvas {res['config']['canvas']}, one block")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"Scale on CPU ({os.cpu_count()} cores, shared; load {res['config']['load_average_after'][0]:.1f})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: a smoke test")
    ap.add_argument("--sizes", nargs="+", default=None, help=f"subset of {list(SIZES)}")
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="batches of the ratios and of the parallel and AR tokens/s")
    ap.add_argument("--tps-batches", type=int, nargs="+", default=None,
                    help="batches (subset of --batches) of the one-token-per-step runs (canvas steps: slow)")
    ap.add_argument("--canvas", type=int, default=32)
    ap.add_argument("--parallel-steps", type=int, default=8,
                    help="steps of the parallel runs (low_confidence, canvas/steps tokens a step)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the bare forward and policy (1: 2 spinning OpenMP threads next to "
                         "the engine's worker on a shared 2-core machine measured 10-20x slower)")
    ap.add_argument("--no-ar", action="store_true", help="skip the AR Llama yardstick")
    ap.add_argument("--out", type=Path, default=RESULTS / "tmp" / "throughput_scale")
    ap.add_argument("--engine-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ar-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.engine_worker:
        return engine_worker(args)
    if args.ar_worker:
        return ar_worker(args)

    table = QUICK_SIZES if args.quick else SIZES
    sizes = {k: table[k] for k in (args.sizes or table)}
    args.batches = args.batches or ([1, 4] if args.quick else [1, 8, 32])
    args.tps_batches = args.tps_batches or ([4] if args.quick else [1, 8])
    args.repeats = args.repeats or (1 if args.quick else 3)
    prompts = make_prompts(max(args.batches), 0, 250)  # the tiny tokenizer has ~300 ids
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="scale_") as tmp:
        for name, cfg in sizes.items():
            print(f"size {name} ...", flush=True)
            results.append(measure_size(name, cfg, args, prompts, Path(tmp)))
    config = {"quick": args.quick, "canvas": args.canvas, "block_length": args.canvas, "batches": args.batches,
              "tps_batches": args.tps_batches, "parallel_steps": args.parallel_steps, "repeats": args.repeats,
              "statistic": "median", "prompt_lengths": [len(p) for p in prompts], "parallel_policy": "low_confidence, canvas / parallel_steps tokens a step",
              "bare_forward": "vllm_dapd plain PyTorch model (load_model), full [B, P + canvas] input, no cache, "
                              "timed in the engine worker between its generate calls",
              "memory_method": "analytic fp32 sizes of the largest intermediates (see the module docstring)",
              "bare_forward_threads": args.threads, "torch": torch.__version__,
              "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "seconds": time.perf_counter() - t0,
              "load_average_before": load_before, "load_average_after": os.getloadavg()}
    res = {"config": config, "sizes": results, "why_ar_wins_on_cpu": WHY_AR_WINS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    plot(res, args.out.with_suffix(".png"))

    print(f"\n{'size':<6}{'B':>4}{'fwd ms':>9}{'step/fwd':>10}{'lc/fwd':>8}{'dapd/fwd':>10}{'peak MiB':>10}")
    for s in results:
        for r in s["step"]:
            print(f"{s['size']:<6}{r['batch']:>4}{r['bare_forward_ms']:>9.1f}{r['engine_step_over_bare_forward']:>10.2f}"
                  f"{r['policy_share']['low_confidence']:>8.3f}{r['policy_share']['dapd']:>10.3f}"
                  f"{r['memory']['largest_mib']:>10.1f}")
    print(f"\n{'size':<6}{'B':>4}{'1/step tok/s':>14}{'parallel tok/s':>16}{'AR tok/s':>10}")
    for s in results:
        for r in s["tokens_per_s"]:
            ar = r.get("ar_llama", {}).get("tokens_per_s", float("nan"))
            one = r["engine_one_per_step"]["tokens_per_s"] if r["engine_one_per_step"] else float("nan")
            print(f"{s['size']:<6}{r['batch']:>4}{one:>14.1f}{r['engine_parallel']['tokens_per_s']:>16.1f}{ar:>10.1f}")
    print(f"wrote {args.out.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
