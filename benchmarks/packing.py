"""Step time with and without packing the padded batch's real rows for the GEMMs (``real_rows``).

Why: a step feeds every scheduled request in one left-padded ``[B, T]`` batch, T = the longest fed
span. Without packing, every request pays T rows of projections and MLP: a request feeding its
512-token prompt makes the 31 others, feeding 64-row canvases, cost 512 rows each. With packing the
GEMMs run on the N real rows only (attention still runs padded). Both variants run the same
``stepper.denoise_step`` on a random LLaDA-layout model (25M parameters; ``--quick``: 1M), side by
side in one process, repeated; the padded variant is the same model with ``real_rows`` dropped.

Scenarios (prefix cache, low_confidence, blocks of 32 over a canvas of 64, fp32):
- ``join``: 31 requests at a block step (each feeds its canvas: 64 rows) and one request joining with
  its 512-token prompt (feeds 576 rows);
- ``mixed prompts``: 32 requests at their first step with prompts of 16-256 tokens (mode ``none``).

Writes ``packing.json`` / ``.png`` to the scratch folder ``benchmarks/results/tmp/``
(``--out benchmarks/results/packing`` refreshes the committed result).

    python benchmarks/packing.py --quick   # ~1 minute
    python benchmarks/packing.py           # ~5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vllm_dapd.engine.core import offline
from vllm_dapd.engine.core.kv import PagedKV
from vllm_dapd.engine.core.layout import Feed
from vllm_dapd.engine.core.sequence import Sequence
from vllm_dapd.engine.core.stepper import denoise_step
from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_llada

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {"25M": dict(d_model=512, n_layers=5, n_heads=8, mlp_hidden_size=1376, vocab_rows=8192),
         "1M": dict(d_model=128, n_layers=2, n_heads=2, mlp_hidden_size=256, vocab_rows=2048)}
PAGE = 16


class Padded:
    """The model without packing: ``real_rows`` dropped, so every GEMM runs on all B x T rows."""

    def __init__(self, model):
        self.model, self.logits_shift = model, model.logits_shift

    def run(self, batch):
        return self.model.run(dataclasses.replace(batch, real_rows=None))


def batch(model, scenario: str, n: int, long_prompt: int, canvas: int, kv: PagedKV) -> list[Sequence]:
    """Sequences ready for the measured step (the ``join`` ones already past their prompt step)."""
    g = torch.Generator().manual_seed(0)
    mode = "prefix" if scenario == "join" else "none"
    settings = {"block_length": 32, "steps": 32, "cache_mode": mode}
    if scenario == "join":
        lengths = [24] * (n - 1) + [long_prompt]
    else:
        lengths = torch.randint(16, 257, (n,), generator=g).tolist()
    requests = [offline.Request(torch.randint(10, 300, (P,), generator=g).tolist(), settings, canvas, seed=i)
                for i, P in enumerate(lengths)]
    seqs, _ = offline.sequences(model, requests, kv=None)
    next_page = 0
    for s in seqs:  # contiguous pages in ``kv``
        pages = -(-s.end // PAGE)
        s.block_ids, next_page = list(range(next_page, next_page + pages)), next_page + pages
    if scenario == "join":  # everyone but the last has cached its prompt: it now feeds its canvas
        denoise_step(model, seqs[:-1], torch.device("cpu"), kv)
    return seqs


def fed_rows(seqs: list[Sequence]) -> tuple[int, int]:
    """(real rows, padded rows B x T) of the next step."""
    spans = [(f.first, f.end) for f in (Feed.of(s, 0, 0) for s in seqs)]
    real = sum(e - a for a, e in spans)
    return real, len(seqs) * max(e - a for a, e in spans)


def measure(model, scenario: str, args, repeats: int) -> list[dict]:
    rows = []
    spec = model.spec
    for r in range(repeats):
        for variant, m in (("padded", Padded(model)), ("packed", model)):
            kv = PagedKV(spec.n_layers, 4096, PAGE, spec.n_kv_heads, spec.head_dim, torch.float32, "cpu")
            seqs = batch(model, scenario, args.batch, args.long_prompt, args.canvas, kv)
            real, padded = fed_rows(seqs)
            t0 = time.perf_counter()
            denoise_step(m, seqs, torch.device("cpu"), kv)
            ms = (time.perf_counter() - t0) * 1e3
            rows.append({"scenario": scenario, "variant": variant, "repeat": r, "ms": ms,
                         "real_rows": real, "padded_rows": padded})
            print(f"{scenario:<14} {variant:<7} repeat {r}: {ms:9.1f} ms  (real rows {real}, padded {padded})",
                  flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1M model, batch 8, prompt 128")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "tmp" / "packing",
                    help="output prefix (default: the gitignored scratch folder)")
    args = ap.parse_args()
    size = "1M" if args.quick else "25M"
    args.batch, args.long_prompt, args.canvas = (8, 128, 64) if args.quick else (32, 512, 64)
    model = load_model(make_tiny_llada(tempfile.mkdtemp(), **SIZES[size]))
    rows = []
    with torch.inference_mode():
        for scenario in ("join", "mixed prompts"):
            rows += measure(model, scenario, args, args.repeats)
    config = {"size": size, "batch": args.batch, "long_prompt": args.long_prompt, "canvas": args.canvas,
              "block": 32, "dtype": "float32", "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "load_average_after": os.getloadavg()}
    summary = {}
    for scenario in ("join", "mixed prompts"):
        ms = {v: statistics.median(r["ms"] for r in rows if r["scenario"] == scenario and r["variant"] == v)
              for v in ("padded", "packed")}
        one = next(r for r in rows if r["scenario"] == scenario)
        summary[scenario] = {**{f"{v}_ms": t for v, t in ms.items()}, "speedup": ms["padded"] / ms["packed"],
                             "row_ratio": one["padded_rows"] / one["real_rows"]}
        print(f"{scenario}: padded {ms['padded']:.0f} ms, packed {ms['packed']:.0f} ms "
              f"({summary[scenario]['speedup']:.2f}x; padded/real rows {summary[scenario]['row_ratio']:.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"config": config, "summary": summary, "rows": rows},
                                                        indent=1))
    plot(summary, config, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and .png")


def plot(summary: dict, config: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(summary)
    for i, variant in enumerate(("padded", "packed")):
        ax.bar([j + 0.4 * i for j in range(len(names))], [summary[n][f"{variant}_ms"] for n in names], 0.4,
               label=variant)
    ax.set_xticks([j + 0.2 for j in range(len(names))],
                  [f"{n}\n(padded/real rows {summary[n]['row_ratio']:.1f})" for n in names])
    ax.set_ylabel("ms per step (median)")
    ax.set_title(f"Packed GEMMs: random LLaDA {config['size']}, batch {config['batch']}, fp32", fontsize=9)
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
