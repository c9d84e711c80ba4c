"""Step time of the two attention paths: portable (gather + PyTorch SDPA) vs vLLM's CPU paged kernel.

The portable path (``engine/core/kv.py``) gathers every sequence's cached prefix from the pages into one
padded ``[B, Hkv, P, D]`` tensor per layer, P = the longest prefix, and attends the left-padded
batch with SDPA. The kernel path (``engine/vllm/kernel_kv.py``, ``--attention-backend CPU_ATTN``) writes
the fed rows' KV into the pages and runs ``cpu_attention_with_kv_cache`` over packed queries and
block tables: no gather, no padding. Both run the same ``stepper.denoise_step`` on the same random
LLaDA-layout model (25M parameters, head size 64; ``--quick``: 1M, head size 32), side by side in
one process, on copies of the same batch state, repeated; the pages of both paths hold the same KV.

Scenarios (batch 32, low_confidence, canvas 64 in blocks of 32, measured at a block step after
the prompt step):
- ``prefix, equal prompts``: every prompt 512 tokens, cache mode ``prefix`` (feeds the 64-token canvas);
- ``prefix, mixed prompts``: prompts of 32-512 tokens (the portable path pads every prefix to the longest);
- ``dual, equal prompts``: prompts of 512, cache mode ``dual`` (feeds the 32-token block over prefix + suffix).
Each for fp32 and bf16, with 8 KV heads (MHA) and 2 (4x grouped-query attention).

Batch invariance (greedy, bf16, vLLM's CPU default dtype; a random 1M LLaDA with head size 32): 64
requests with prompts of 8-200 tokens in mixed cache modes, 32-token answers, each run alone and all
together on each path; counts the requests whose answer changes with the batch.

Writes ``attention_paths.json`` / ``.png`` to the scratch folder ``benchmarks/results/tmp/``
(``--out benchmarks/results/attention_paths`` refreshes the committed result).

    python benchmarks/attention_paths.py --quick   # ~1 minute
    python benchmarks/attention_paths.py           # ~15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vllm_dapd.engine.core import offline
from vllm_dapd.engine.vllm.kernel_kv import KernelKV
from vllm_dapd.engine.core.kv import PagedKV
from vllm_dapd.engine.core.stepper import denoise_step
from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_llada

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {"25M": dict(d_model=512, n_layers=5, n_heads=8, mlp_hidden_size=1376, vocab_rows=8192),
         "1M": dict(d_model=128, n_layers=2, n_heads=4, mlp_hidden_size=256, vocab_rows=2048)}
SCENARIOS = {"prefix, equal prompts": ("prefix", "same"), "prefix, mixed prompts": ("prefix", "mixed"),
             "dual, equal prompts": ("dual", "same")}
PAGE = 128  # vLLM's CPU default
CPU = torch.device("cpu")


def ready_batch(model, mode: str, prompts: str, n: int, prompt: int, canvas: int, dtype: torch.dtype):
    """Sequences past their prompt step, and the two paths' pages holding the same cached KV."""
    g = torch.Generator().manual_seed(0)
    settings = {"block_length": 32, "steps": 32, "cache_mode": mode}
    lengths = [prompt] * n if prompts == "same" else torch.randint(32, prompt + 1, (n,), generator=g).tolist()
    requests = [offline.Request(torch.randint(10, 300, (P,), generator=g).tolist(), settings, canvas, seed=i)
                for i, P in enumerate(lengths)]
    seqs, _ = offline.sequences(model, requests, kv=None)
    next_page = 0
    for s in seqs:  # contiguous pages, the same in both paths' pools
        pages = -(-s.end // PAGE)
        s.block_ids, next_page = list(range(next_page, next_page + pages)), next_page + pages
    spec = model.spec
    shape = (spec.n_layers, next_page, PAGE, spec.n_kv_heads, spec.head_dim, dtype, CPU)
    plain, kernel = PagedKV(*shape), KernelKV(*shape)
    denoise_step(model, seqs, CPU, plain)  # the prompt step: caches each prompt (and dual: the suffix)
    for s in seqs:
        total = torch.arange(len(s.prompt) + s.gen_length)
        kernel.scatter(s.block_ids, total, plain.gather_at(s.block_ids, total))
    return seqs, plain, kernel


def measure(model, name: str, dtype: torch.dtype, args) -> list[dict]:
    mode, prompts = SCENARIOS[name]
    seqs, plain, kernel = ready_batch(model, mode, prompts, args.batch, args.prompt, args.canvas, dtype)
    spec, elt = model.spec, torch.finfo(dtype).bits // 8
    longest = max(len(s.prompt) for s in seqs)
    extra = 0 if mode == "prefix" else args.canvas - 32  # dual: the cached suffix is read too
    gathered = spec.n_layers * 2 * len(seqs) * spec.n_kv_heads * (longest + extra) * spec.head_dim * elt
    rows = []
    for r in range(args.repeats):
        for path, kv in (("portable", plain), ("kernel", kernel)):
            batch = copy.deepcopy(seqs)  # a step changes its sequences; the pages it may rewrite stay equal
            t0 = time.perf_counter()
            denoise_step(model, batch, CPU, kv)
            ms = (time.perf_counter() - t0) * 1e3
            rows.append({"scenario": name, "dtype": str(dtype).removeprefix("torch."), "kv_heads": spec.n_kv_heads,
                         "path": path, "repeat": r, "ms": ms, "portable_gather_mib": gathered / 2**20})
            print(f"{name:<22} {rows[-1]['dtype']:<8} kv heads {spec.n_kv_heads}  {path:<8} repeat {r}: "
                  f"{ms:8.1f} ms", flush=True)
    return rows


def invariance(n: int) -> dict:
    """Greedy bf16 answers alone vs in one batch of ``n``, per path: how many requests change."""
    model = load_model(make_tiny_llada(tempfile.mkdtemp(), **SIZES["1M"]), dtype=torch.bfloat16)
    spec, g = model.spec, torch.Generator().manual_seed(1)
    modes = ("none", "prefix", "dual")
    cases = [(torch.randint(10, 300, (int(torch.randint(8, 201, (1,), generator=g)),), generator=g).tolist(),
              modes[i % 3]) for i in range(n)]
    out = {}
    for name in ("portable", "kernel"):
        answers = {}
        for run in ([[i] for i in range(n)], [list(range(n))]):  # alone, then together
            for idx in run:
                pages = (KernelKV if name == "kernel" else PagedKV)(spec.n_layers, 8 * n, 64, spec.n_kv_heads,
                                                                    spec.head_dim, torch.bfloat16, CPU)
                requests = [offline.Request(cases[i][0], {"block_length": 8, "steps": 8, "cache_mode": cases[i][1]},
                                            32, seed=i) for i in idx]
                for i, result in zip(idx, offline.run(model, requests, kv=pages)):
                    answers.setdefault(i, []).append(result.tokens)
        changed = sum(a != b for a, b in answers.values())
        out[name] = {"requests": n, "changed": changed}
        print(f"batch invariance, {name}: {changed} of {n} greedy bf16 answers change with the batch", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1M model, batch 8, prompts of 128")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "tmp" / "attention_paths",
                    help="output prefix (default: the gitignored scratch folder)")
    args = ap.parse_args()
    size = "1M" if args.quick else "25M"
    args.batch, args.prompt, args.canvas = (8, 128, 64) if args.quick else (32, 512, 64)
    rows = []
    with torch.inference_mode():
        for kv_heads in (SIZES[size]["n_heads"], SIZES[size]["n_heads"] // 4):
            for dtype in (torch.float32, torch.bfloat16):
                path = make_tiny_llada(tempfile.mkdtemp(), **SIZES[size], n_kv_heads=kv_heads)
                model = load_model(path, dtype=dtype)
                for name in SCENARIOS:
                    rows += measure(model, name, dtype, args)
        inv = invariance(16 if args.quick else 64)
    config = {"size": size, "batch": args.batch, "prompt": args.prompt, "canvas": args.canvas, "block": 32,
              "page": PAGE, "head_dim": model.spec.head_dim, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_average_after": os.getloadavg()}
    summary = {}
    for key in sorted({(r["scenario"], r["dtype"], r["kv_heads"]) for r in rows}, key=str):
        ms = {p: statistics.median(r["ms"] for r in rows if (r["scenario"], r["dtype"], r["kv_heads"]) == key
                                   and r["path"] == p) for p in ("portable", "kernel")}
        label = f"{key[0]}, {key[1]}, {key[2]} kv heads"
        summary[label] = {"portable_ms": ms["portable"], "kernel_ms": ms["kernel"],
                          "speedup": ms["portable"] / ms["kernel"]}
        print(f"{label:<45} portable {ms['portable']:8.1f} ms  kernel {ms['kernel']:8.1f} ms  "
              f"({summary[label]['speedup']:.2f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"config": config, "summary": summary, "invariance": inv,
                                                         "rows": rows},
                                                        indent=1))
    plot(summary, inv, config, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and .png")


def plot(summary: dict, inv: dict, config: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    ax.barh(range(len(names)), [summary[n]["speedup"] for n in names],
            color=["tab:green" if summary[n]["speedup"] >= 1 else "tab:red" for n in names])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("portable step time / kernel step time (median; > 1: the kernel is faster)")
    ax.set_title(f"Attention paths: random LLaDA {config['size']}, batch {config['batch']}, "
                 f"prompts up to {config['prompt']}, canvas {config['canvas']}, {config['cpu_count']} CPUs", fontsize=9)
    for i, n in enumerate(names):
        ax.text(summary[n]["speedup"], i, f" {summary[n]['portable_ms']:.0f} / {summary[n]['kernel_ms']:.0f} ms",
                va="center", fontsize=7)
    ax.set_xlim(0, 1.3 * max(summary[n]["speedup"] for n in names))
    ax.grid(True, axis="x", alpha=0.3)
    bars = ax2.bar(list(inv), [inv[p]["changed"] for p in inv], color=["tab:gray", "tab:blue"])
    ax2.bar_label(bars, [f"{inv[p]['changed']} of {inv[p]['requests']}" for p in inv], fontsize=8)
    ax2.set_title("greedy bf16 answers that change\nwith the batch (random 1M model)", fontsize=9)
    ax2.set_ylim(0, 1.2 * max(1, max(inv[p]["changed"] for p in inv)))
    ax2.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
