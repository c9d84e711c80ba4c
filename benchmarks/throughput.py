"""Decoding throughput on the demo model: the vLLM engine vs plain-PyTorch loops, with an AR yardstick.

In one run, on the same model (the embedded demo checkpoint) and the same held-out prompts:

- ``engine``: ``vllm.LLM`` with the dapd plugin at batch 1, 8, 32, 64, cache modes ``prefix`` and
  ``dual``, policies ``low_confidence`` (one token per step), ``dapd`` and ``threshold``
  (parallel). One engine serves every configuration: policy, steps and cache mode are per-request
  ``extra_args``. A "batch" is a ``generate`` call of that many requests.
- ``reference``: ``vllm_dapd.decoding.denoise`` at batch 1, full recompute each step, LLaDA
  ``generate`` semantics (greedy ``low_confidence``).
- ``dual_loop``: a small Fast-dLLM-style dual-cache loop at batch 1 written here (a full forward
  at each block's first step caches every position's K/V; the block's other steps feed only the
  block over the cached prefix and suffix), greedy ``low_confidence``.
- ``ar_llama``: stock vLLM (plugins off, in a subprocess) serving a random ``LlamaForCausalLM``
  of the demo model's size and vocabulary, greedy AR decoding of the same number of tokens.

Tokens/s counts generated tokens (the whole canvas, ``ignore_eos``), NFE is forwards per request
(engine: ``vllm_dapd.cost``, from vLLM's per-request record). Writes ``throughput.json`` and
``.png`` to the scratch folder ``benchmarks/results/tmp/`` (``--out benchmarks/results/throughput``
refreshes the committed result) and prints a table.

    python benchmarks/throughput.py --quick     # < 3 minutes
    python benchmarks/throughput.py             # full

Larger models (25M / 60M parameters, where compute dominates): ``benchmarks/scale.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (1, 8, 32, 64)
CACHE_MODES = ("prefix", "dual")
# (label, policy, extra params); steps = canvas (one token per step for low_confidence).
# Settings that keep full accuracy on the demo model (benchmarks/results/accuracy_vs_steps.json).
POLICIES = (
    ("low_confidence", "low_confidence", {}),
    ("dapd", "dapd", {"variant": "tuned", "edge_threshold": 4.0}),
    ("threshold", "threshold", {"threshold": 0.5}),
)


def load_items(n_per_task: int) -> list:
    from vllm_dapd.demo.tasks import TASKS, held_out

    items = []
    for task in TASKS:
        items += held_out(task, n_per_task)
    return items


def score(vocab, items, token_lists) -> float:
    from vllm_dapd.demo.evaluate import decode_answer
    from vllm_dapd.demo.tasks import is_correct

    ok = [is_correct(it, decode_answer(vocab, toks)) for it, toks in zip(items, token_lists)]
    return sum(ok) / max(len(ok), 1)


# ------------------------------------------------------------------------------------------- loops

def run_reference(model, vocab, items, canvas: int) -> dict:
    from vllm_dapd.decoding.generate import denoise

    ids = torch.tensor([vocab.prompt_ids(items[0].prompt)], dtype=torch.long)
    denoise(model, ids, gen_length=canvas, block_length=canvas, steps=canvas, policy="low_confidence")  # warm-up
    outs, nfes = [], []
    t0 = time.perf_counter()
    for it in items:
        ids = torch.tensor([vocab.prompt_ids(it.prompt)], dtype=torch.long)
        res = denoise(model, ids, gen_length=canvas, block_length=canvas, steps=canvas,
                      policy="low_confidence", temperature=0.0, seed=0)
        outs.append(res.tokens[0].tolist())
        nfes.append(int(res.nfe[0]))
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": canvas * len(items), "tokens_per_s": canvas * len(items) / dt,
            "nfe": sum(nfes) / len(nfes), "accuracy": score(vocab, items, outs), "ms_per_forward": 1e3 * dt / sum(nfes)}


@torch.no_grad()
def dual_cache_generate(model, prompt: list[int], gen: int, block: int, steps: int) -> tuple[list[int], int]:
    """Fast-dLLM dual cache, batch 1, greedy low_confidence (LLaDA layout: logits not shifted).

    Each block: one full forward refreshes every position's K/V; the block's remaining steps feed
    only the block's tokens, attending to the cached prefix (before the block) and suffix (after it).
    """
    from vllm_dapd.decoding import get_policy
    from vllm_dapd.decoding.policy import DenoiseState

    policy = get_policy("low_confidence")
    mask, P = int(model.mask_token_id), len(prompt)
    x = torch.cat((torch.tensor(prompt), torch.full((gen,), mask)))[None]
    spb, nfe = steps // (gen // block), 0
    pos = torch.arange(gen)
    for blk in range(gen // block):
        bs, be = P + blk * block, P + (blk + 1) * block
        in_block = (pos >= blk * block) & (pos < (blk + 1) * block)
        past = None
        for i in range(spb):
            canvas = x[:, P:]
            masked = (canvas == mask) & in_block
            if not masked.any():
                break
            if past is None:  # block start: full forward, cache prefix + suffix K/V
                out = model(x, use_cache=True)
                past = [(torch.cat((k[:, :, :bs], k[:, :, be:]), 2), torch.cat((v[:, :, :bs], v[:, :, be:]), 2))
                        for k, v in out.past_key_values]
                logits = out.logits[:, P:]
            else:  # block only, over the cached prefix and suffix
                out = model(x[:, bs:be], positions=torch.arange(bs, be)[None], past_key_values=past)
                logits = torch.zeros(1, gen, out.logits.shape[-1])
                logits[:, bs - P:be - P] = out.logits
            nfe += 1
            state = DenoiseState(logits=logits, tokens=canvas.clone(), masked=masked, decoded=canvas != mask,
                                 step=torch.tensor([i]), steps=torch.tensor([spb]),
                                 temperature=torch.tensor([0.0]), seed=torch.tensor([0]), nfe=torch.tensor([nfe]))
            res = policy.step(state, {})
            x[:, P:] = torch.where(res.commit & masked, res.tokens, canvas)
    return x[0, P:].tolist(), nfe


def run_dual_loop(model, vocab, items, canvas: int, block: int) -> dict:
    dual_cache_generate(model, vocab.prompt_ids(items[0].prompt), canvas, block, canvas)  # warm-up
    outs, nfes = [], []
    t0 = time.perf_counter()
    for it in items:
        toks, nfe = dual_cache_generate(model, vocab.prompt_ids(it.prompt), canvas, block, canvas)
        outs.append(toks)
        nfes.append(nfe)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": canvas * len(items), "tokens_per_s": canvas * len(items) / dt,
            "nfe": sum(nfes) / len(nfes), "accuracy": score(vocab, items, outs), "ms_per_forward": 1e3 * dt / sum(nfes)}


# ------------------------------------------------------------------------------------------ engine

def make_llm(path: str, max_num_seqs: int, canvas: int):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    return LLM(model=path, max_model_len=128, max_num_seqs=max_num_seqs, dtype="float32", seed=0,
               additional_config={"dapd": {"block_length": canvas, "cache_mode": "prefix"}})


def run_engine(llm, vocab, items, canvas: int, batch: int, policy: str, params: dict, cache_mode: str) -> dict:
    from vllm import SamplingParams

    from vllm_dapd import cost

    extra = {"policy": policy, "block_length": canvas, "steps": canvas, "cache_mode": cache_mode, **params}
    sp = SamplingParams(max_tokens=canvas, temperature=0.0, seed=0, ignore_eos=True, extra_args=extra)
    prompts = [{"prompt_token_ids": vocab.prompt_ids(it.prompt)} for it in items]
    llm.generate(prompts[:batch], sp, use_tqdm=False)  # warm-up at this batch size
    outs, nfes, tokens = [], [], 0
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch):
        for o in llm.generate(prompts[s:s + batch], sp, use_tqdm=False):
            toks = list(o.outputs[0].token_ids)
            outs.append(toks)
            tokens += len(toks)
            c = cost(o.outputs[0])
            nfes.append(float(c.nfe) if c is not None else float("nan"))
    dt = time.perf_counter() - t0
    n_calls = -(-len(prompts) // batch)
    # engine steps ~ generate calls x mean NFE (a batch runs until its slowest request is done)
    return {"seconds": dt, "tokens": tokens, "tokens_per_s": tokens / dt, "nfe": sum(nfes) / len(nfes),
            "accuracy": score(vocab, items, outs), "ms_per_step_approx": 1e3 * dt / (n_calls * sum(nfes) / len(nfes))}


# --------------------------------------------------------------------------------- AR yardstick

def make_llama(path: Path, demo: str) -> int:
    """A random LlamaForCausalLM sized like the demo model, with the demo tokenizer; returns #params."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = json.loads(Path(demo, "config.json").read_text())
    cfg = LlamaConfig(vocab_size=d["vocab_size"], hidden_size=d["d_model"], intermediate_size=d["mlp_hidden_size"],
                      num_hidden_layers=d["n_layers"], num_attention_heads=d["n_heads"],
                      num_key_value_heads=d["n_kv_heads"], max_position_embeddings=256,
                      rms_norm_eps=d["rms_norm_eps"], rope_theta=d["rope_theta"], tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=d["eos_token_id"], pad_token_id=d["pad_token_id"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(path, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(demo, f), path / f)
    return sum(p.numel() for p in model.parameters())


def llama_worker(path: str, n_items: int, batches: list[int], canvas: int) -> None:
    """Subprocess body: stock vLLM (no plugins) decodes the same prompts autoregressively."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm_dapd.demo.vocab import Vocab

    vocab = Vocab.build()
    items = load_items(n_items)
    llm = LLM(model=path, max_model_len=128, max_num_seqs=max(batches), dtype="float32", seed=0)
    sp = SamplingParams(max_tokens=canvas, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": vocab.prompt_ids(it.prompt)} for it in items]
    rows = []
    for b in batches:
        llm.generate(prompts[:b], sp, use_tqdm=False)
        tokens, t0 = 0, time.perf_counter()
        for s in range(0, len(prompts), b):
            tokens += sum(len(o.outputs[0].token_ids) for o in llm.generate(prompts[s:s + b], sp, use_tqdm=False))
        dt = time.perf_counter() - t0
        rows.append({"batch": b, "seconds": dt, "tokens": tokens, "tokens_per_s": tokens / dt, "nfe": float(canvas)})
    print("LLAMA_RESULT " + json.dumps(rows), flush=True)


def run_llama(n_items: int, batches: list[int], canvas: int, demo: str) -> tuple[list[dict], int]:
    with tempfile.TemporaryDirectory(prefix="ar_llama_") as tmp:
        n_params = make_llama(Path(tmp), demo)
        env = dict(os.environ, VLLM_PLUGINS="dapd_none_stock_vllm")  # no plugin matches: stock vLLM
        cmd = [sys.executable, __file__, "--llama-worker", tmp, "--items", str(n_items),
               "--batches", *map(str, batches), "--canvas", str(canvas)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        for line in proc.stdout.splitlines():
            if line.startswith("LLAMA_RESULT "):
                return json.loads(line[len("LLAMA_RESULT "):]), n_params
        raise RuntimeError(f"AR Llama worker failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


# --------------------------------------------------------------------------------------- report

def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for mode, ls in (("prefix", "-"), ("dual", "--")):
        for (label, _, _), color in zip(POLICIES, ("tab:blue", "tab:orange", "tab:green")):
            pts = sorted((r["batch"], r["tokens_per_s"]) for r in res["engine"]
                         if r["cache_mode"] == mode and r["policy"] == label)
            if pts:
                ax.plot(*zip(*pts), ls, marker="o" if mode == "prefix" else "x", color=color,
                        label=f"engine {label} ({mode})")
    if res.get("ar_llama"):
        pts = sorted((r["batch"], r["tokens_per_s"]) for r in res["ar_llama"])
        ax.plot(*zip(*pts), ":", marker="s", color="k", label="engine AR Llama (stock vLLM)")
    for key, color, label in (("reference", "tab:red", "reference loop (full recompute, B=1)"),
                              ("dual_loop", "tab:purple", "dual-cache loop (B=1)")):
        ax.axhline(res[key]["tokens_per_s"], color=color, ls="-.", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (requests per generate call)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"Demo model throughput on CPU ({os.cpu_count()} cores), canvas {res['config']['canvas']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer items, runs in under 3 minutes")
    ap.add_argument("--items", type=int, default=None, help="held-out items per task")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--canvas", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for the PyTorch loops (1: a 0.9M-param model gains nothing from more, "
                         "and 2 spinning OpenMP threads on a shared 2-core machine run ~25x slower)")
    ap.add_argument("--no-llama", action="store_true", help="skip the AR Llama yardstick")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "tmp" / "throughput",
                    help="output prefix (default: the gitignored scratch folder; benchmarks/results/throughput refreshes the committed result)")
    ap.add_argument("--llama-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    from vllm_dapd.demo.tasks import CANVAS

    canvas = args.canvas or CANVAS
    batches = args.batches or list(BATCHES)
    if args.llama_worker:
        llama_worker(args.llama_worker, args.items, batches, canvas)
        return
    from vllm_dapd.demo import CHECKPOINT
    from vllm_dapd.demo.vocab import Vocab
    from vllm_dapd.models.loading import load_model

    torch.set_num_threads(args.threads)
    model_path = args.model or CHECKPOINT
    n_items = args.items or (10 if args.quick else 64)
    items = load_items(n_items)
    vocab = Vocab.build()
    model = load_model(model_path).eval()

    from tqdm.auto import tqdm

    grid = [(b, mode, p) for mode in CACHE_MODES for p in POLICIES for b in batches]
    bar = tqdm(total=3 + len(grid) + (0 if args.no_llama else 1), desc="throughput", unit="cfg")
    t_start = time.perf_counter()
    with torch.no_grad():
        bar.set_postfix_str("reference loop")
        reference = run_reference(model, vocab, items, canvas)
        bar.update(1)
        bar.set_postfix_str("dual-cache loop")
        dual_loop = run_dual_loop(model, vocab, items, canvas, canvas)
        bar.update(1)
    bar.set_postfix_str("engine start")
    t0 = time.perf_counter()
    llm = make_llm(model_path, max(batches), canvas)
    engine_start_s = time.perf_counter() - t0
    bar.update(1)
    engine = []
    for b, mode, (label, pol, params) in grid:
        bar.set_postfix_str(f"{label} {mode} B={b}")
        r = run_engine(llm, vocab, items, canvas, b, pol, params, mode)
        engine.append({"policy": label, "params": params, "cache_mode": mode, "batch": b, **r})
        bar.update(1)
    del llm
    ar, n_llama = None, None
    if not args.no_llama:
        import gc

        gc.collect()
        bar.set_postfix_str("AR Llama")
        ar, n_llama = run_llama(n_items, batches, canvas, model_path)
        bar.update(1)
    bar.close()

    # headline: engine at batch 32 (or the largest batch <= 32), low_confidence, same accuracy as the loop
    b32 = max([b for b in batches if b <= 32] or batches)
    ref_tps, dual_tps, ref_acc = reference["tokens_per_s"], dual_loop["tokens_per_s"], reference["accuracy"]
    head: dict[str, Any] = {"batch": b32, "reference_tokens_per_s": ref_tps, "dual_loop_tokens_per_s": dual_tps,
                            "reference_accuracy": ref_acc}
    for r in engine:
        if r["batch"] == b32:
            key = f"{r['policy']}_{r['cache_mode']}"
            head[key] = {"tokens_per_s": r["tokens_per_s"], "accuracy": r["accuracy"], "nfe": r["nfe"],
                         "vs_reference": r["tokens_per_s"] / ref_tps, "vs_dual_loop": r["tokens_per_s"] / dual_tps}
    equal = [r for r in engine if r["batch"] == b32 and r["accuracy"] >= ref_acc - 1e-9]
    best = max(equal, key=lambda r: r["tokens_per_s"]) if equal else None
    head["best_at_equal_accuracy"] = None if best is None else {
        "policy": best["policy"], "cache_mode": best["cache_mode"], "tokens_per_s": best["tokens_per_s"],
        "accuracy": best["accuracy"], "vs_reference": best["tokens_per_s"] / ref_tps,
        "vs_dual_loop": best["tokens_per_s"] / dual_tps}
    lc = [r for r in equal if r["policy"] == "low_confidence"]
    lc_best = max(lc, key=lambda r: r["tokens_per_s"]) if lc else None
    targets = {
        "engine_b32_vs_reference_20x": {
            "any_policy_at_equal_accuracy": bool(best and best["tokens_per_s"] >= 20 * ref_tps),
            "low_confidence_same_nfe": bool(lc_best and lc_best["tokens_per_s"] >= 20 * ref_tps),
            "measured_best": None if best is None else best["tokens_per_s"] / ref_tps,
            "measured_low_confidence": None if lc_best is None else lc_best["tokens_per_s"] / ref_tps},
        "engine_b32_vs_dual_loop_3x": {
            "any_policy_at_equal_accuracy": bool(best and best["tokens_per_s"] >= 3 * dual_tps),
            "low_confidence_same_nfe": bool(lc_best and lc_best["tokens_per_s"] >= 3 * dual_tps),
            "measured_best": None if best is None else best["tokens_per_s"] / dual_tps,
            "measured_low_confidence": None if lc_best is None else lc_best["tokens_per_s"] / dual_tps},
    }
    if ar:
        head["ar_llama_b32_tokens_per_s"] = next((r["tokens_per_s"] for r in ar if r["batch"] == b32), None)

    config = {
        "model": os.path.relpath(model_path, Path(__file__).resolve().parents[1]), "quick": args.quick,
        "items_per_task": n_items, "n_prompts": len(items), "canvas": canvas, "block_length": canvas,
        "steps": canvas, "batches": batches, "cache_modes": list(CACHE_MODES),
        "policies": {label: {"policy": p, **params} for label, p, params in POLICIES},
        "temperature": 0.0, "engine_start_s": engine_start_s, "ar_llama_params": n_llama,
        "dllm_params": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "seconds": time.perf_counter() - t_start,
        "load_average_after": os.getloadavg(),
    }
    targets["what_limits_it"] = (
        f"The demo model has {config['dllm_params'] / 1e6:.2f}M parameters and a {canvas}-token canvas: one "
        f"batch-1 forward of the reference loop costs {reference['ms_per_forward']:.2f} ms, almost all Python and "
        "op-dispatch overhead, so batching has little compute to amortize and the engine's fixed per-step cost "
        "(scheduler, IPC to the worker, paged-KV bookkeeping) is of the same order as the loop's whole forward. "
        "With one block over the canvas the dual cache has no suffix to reuse, only a ~15-token prompt to "
        f"skip, so the dual-cache loop gains little over full recompute ({dual_tps / ref_tps:.2f}x here). "
        "Parallel policies (dapd: fewer NFE) "
        "multiply the batching gain. Measured on 2 CPU cores shared with other jobs (see load_average_after).")
    result = {"config": config, "headline": head, "targets": targets, "reference": reference,
              "dual_loop": dual_loop, "engine": engine, "ar_llama": ar}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))

    print(f"\n{len(items)} prompts, canvas {canvas}, block {canvas}, steps {canvas}, greedy")
    print(f"{'variant':<38}{'batch':>6}{'tok/s':>10}{'NFE':>7}{'acc':>7}{'x ref':>8}{'x dual':>8}")

    def row(name, b, r):
        acc = f"{r['accuracy']:.3f}" if "accuracy" in r else "-"
        print(f"{name:<38}{b:>6}{r['tokens_per_s']:>10.1f}{r['nfe']:>7.2f}{acc:>7}"
              f"{r['tokens_per_s'] / ref_tps:>8.2f}{r['tokens_per_s'] / dual_tps:>8.2f}")

    row("reference loop (full recompute)", 1, reference)
    row("dual-cache loop (Fast-dLLM style)", 1, dual_loop)
    for r in engine:
        row(f"engine {r['policy']} [{r['cache_mode']}]", r["batch"], r)
    for r in ar or []:
        row("engine AR Llama (stock vLLM)", r["batch"], r)
    t = targets
    print(f"target engine B{b32} >= 20x reference at equal accuracy: "
          f"{'MET' if t['engine_b32_vs_reference_20x']['any_policy_at_equal_accuracy'] else 'MISSED'} "
          f"(best {t['engine_b32_vs_reference_20x']['measured_best'] or 0:.1f}x, "
          f"low_confidence {t['engine_b32_vs_reference_20x']['measured_low_confidence'] or 0:.1f}x)")
    print(f"target engine B{b32} >= 3x dual-cache loop at equal accuracy: "
          f"{'MET' if t['engine_b32_vs_dual_loop_3x']['any_policy_at_equal_accuracy'] else 'MISSED'} "
          f"(best {t['engine_b32_vs_dual_loop_3x']['measured_best'] or 0:.1f}x, "
          f"low_confidence {t['engine_b32_vs_dual_loop_3x']['measured_low_confidence'] or 0:.1f}x)")
    print(f"wrote {args.out.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
