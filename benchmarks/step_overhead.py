"""Peak CPU memory and time of the engine's denoising step around the model (``stepper.denoise_step``).

Why: the step gathers each sequence's canvas logits for its policy, builds the small per-row
tensors and copies the commits back to the host. At LLaDA-8B's vocabulary (126,464) a [B, L, V]
staging copy of the logits costs as much memory as the model's own logits, so the step's overhead
is measured here apart from any real model: a stub returns a fresh copy of fixed random logits in
the forward's layout (``vllm_dapd/models/transformer.py``: ``[B, R, V]`` for the ``logits_rows`` the step asks for;
older steppers asked for ``[B, T - logits_start, V]``). Cases: one block over the canvas, and
blocks of ``--block`` (since issue 13 the model computes, and the policies read, only the active
block's rows).

Memory: the highest running sum of the bytes each operator allocates net of what it frees
(``torch.profiler`` with ``profile_memory``), over one step; it includes the stub's logits. Time:
median milliseconds of a step over one block's steps. ``--baseline REV`` loads ``stepper.py`` from
a git revision too and measures both side by side in the same process. Prints a table and writes
``step_overhead.json`` and ``.png`` to the scratch folder ``benchmarks/results/tmp/``
(``--out benchmarks/results/step_overhead`` refreshes the committed result).

    python benchmarks/step_overhead.py --quick --baseline e366611
    python benchmarks/step_overhead.py --vocab 126464 --batch 32 --canvas 256
"""

from __future__ import annotations

import argparse
import json
import os
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

from vllm_dapd.engine.core import offline, stepper
from vllm_dapd.engine.core.sequence import Sequence

ROOT = Path(__file__).resolve().parent.parent


class StubModel:
    """A LLaDA-layout model (no logit shift) whose logits are a fresh copy of fixed random rows."""

    logits_shift = 0

    def __init__(self, vocab: int, max_len: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mask_token_id = vocab - 1
        self.rows = torch.randn(max_len, vocab, generator=g)

    def __call__(self, ids, logits_start=0, logits_rows=None, **_):  # the baseline passes logits_start
        B, T = ids.shape
        if logits_rows is not None:  # only the rows the policies read (a gather: a fresh tensor)
            logits = self.rows[logits_rows]
        else:
            logits = self.rows[logits_start:T].expand(B, -1, -1).clone()
        return SimpleNamespace(logits=logits, attention=None, past_key_values=None)

    def run(self, batch):  # the current stepper passes one ``StepBatch``
        return self(batch.input_ids, logits_rows=batch.logits_rows)


def _load_module(rev: str, name: str, replace: tuple[str, str] | None = None) -> ModuleType | None:
    """The engine's core module NAME as of git revision ``rev`` (``vllm_dapd/engine/core/NAME.py``, or
    ``vllm_dapd/engine/NAME.py`` before the core/vllm split) as ``NAME_baseline`` next to today's core
    modules, which its relative imports then reach (None if absent)."""
    for where in ("vllm_dapd/engine/core", "vllm_dapd/engine"):
        shown = subprocess.run(["git", "show", f"{rev}:{where}/{name}.py"], cwd=ROOT, capture_output=True, text=True)
        if not shown.returncode:
            break
    else:
        return None
    src = shown.stdout if replace is None else shown.stdout.replace(*replace)
    path = Path(tempfile.mkdtemp()) / f"{name}_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"vllm_dapd.engine.core.{name}_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_baseline(rev: str) -> ModuleType:
    """``vllm_dapd/engine/core/stepper.py`` as of git revision ``rev`` (with that revision's ``layout.py``),
    importable next to the current one."""
    layout = _load_module(rev, "layout")
    return _load_module(rev, "stepper", ("from .layout import", "from .layout_baseline import") if layout else None)


def make_batch(model: StubModel, B: int, L: int, block: int, policies: list[str]) -> list[Sequence]:
    """``B`` sequences of canvas ``L`` with prompts of 8..15 tokens (padded batch), policies in turn."""
    requests = [offline.Request(list(range(1, 9 + i % 8)), {"policy": policies[i % len(policies)], "block_length": block,
                                                            "steps": block // 2}, L, seed=i) for i in range(B)]
    return offline.sequences(model, requests, kv=None)[0]


def peak_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = top = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += e.self_cpu_memory_usage
        top = max(top, running)
    return top


def measure(module: ModuleType, model: StubModel, B: int, L: int, block: int, policies: list[str]) -> dict:
    cpu = torch.device("cpu")
    seqs = make_batch(model, B, L, block, policies)
    module.denoise_step(model, seqs, cpu)  # warm-up
    peak = peak_bytes(lambda: module.denoise_step(model, seqs, cpu))
    times = []
    for _ in range(block // 2 - 2):  # the rest of the first block
        t0 = time.perf_counter()
        module.denoise_step(model, seqs, cpu)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"peak_mib": peak / 2**20, "ms": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="vocab 4096, canvas 64, batch 32")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--canvas", type=int, default=64)
    ap.add_argument("--block", type=int, default=16, help="block length of the multi-block cases")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", help="git revision whose stepper.py is measured too")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tmp" / "step_overhead",
                    help="output prefix (default: the gitignored scratch folder)")
    args = ap.parse_args()
    if args.quick:
        args.vocab, args.canvas, args.batch = 4096, 64, 32
    torch.manual_seed(0)
    variants = {"current": stepper}
    if args.baseline:
        variants = {f"baseline {args.baseline}": load_baseline(args.baseline), **variants}
    model = StubModel(args.vocab, 16 + args.canvas)
    # (policies, block length): one block over the canvas, then blocks of --block (the policies read
    # only the active block's rows since issue 13).
    cases = {"one policy": (["low_confidence"], args.canvas),
             "two policies interleaved": (["low_confidence", "threshold"], args.canvas),
             f"one policy, blocks of {args.block}": (["low_confidence"], args.block),
             f"two policies, blocks of {args.block}": (["low_confidence", "threshold"], args.block)}
    logits_mib = args.batch * args.canvas * args.vocab * 4 / 2**20
    print(f"batch {args.batch}, canvas {args.canvas}, vocab {args.vocab}, float32; "
          f"the forward's canvas logits alone: {logits_mib:.0f} MiB")
    print(f"{'case':<26} {'variant':<22} {'repeat':>6} {'peak MiB':>9} {'ms/step':>8}")
    rows = []
    for case, (policies, block) in cases.items():
        for r in range(args.repeats):
            for name, module in variants.items():
                m = measure(module, model, args.batch, args.canvas, block, policies)
                rows.append({"case": case, "variant": name, "repeat": r, **m})
                print(f"{case:<26} {name:<22} {r:>6} {m['peak_mib']:>9.0f} {m['ms']:>8.1f}", flush=True)
    config = {"batch": args.batch, "canvas": args.canvas, "block": args.block, "vocab": args.vocab, "dtype": "float32",
              "logits_mib": logits_mib, "baseline": args.baseline, "cpu_count": os.cpu_count(),
              "load_average_after": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    plot(rows, config, args.out.with_suffix(".png"))


def plot(rows: list[dict], config: dict, path: Path) -> None:
    """Peak MiB and median ms per step, per case and variant (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["case"], r["variant"]) for r in rows))
    labels = [f"{c}\n{v}".replace(" interleaved", "\ninterleaved") for c, v in keys]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, field, name in ((axes[0], "peak_mib", "peak MiB per step"), (axes[1], "ms", "ms per step (median)")):
        values = [statistics.median(r[field] for r in rows if (r["case"], r["variant"]) == k) for k in keys]
        ax.bar(range(len(keys)), values, color=["C0" if "baseline" in v else "C1" for _, v in keys])
        ax.set_xticks(range(len(keys)), labels, fontsize=7)
        ax.set_title(name)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Denoising step around a stub model: batch {config['batch']}, canvas {config['canvas']}, "
                 f"vocab {config['vocab']} (logits {config['logits_mib']:.0f} MiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
