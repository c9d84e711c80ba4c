"""Time to first block with and without vLLM's prefix caching, for a block-causal model (LLaDA2 layout).

Makes a small random LLaDA2-layout checkpoint (block size 32; sizes in ``MODEL``) and starts
``vllm serve DIR --plugin dapd`` twice on a free loopback port: with prefix caching (on by default
for block-causal models) and with ``--no-enable-prefix-caching``. Against each, ``--rounds`` times:
a fresh shared "system prompt" of ``--shared`` random tokens, then two streamed completions that
share it and differ in a 16-token question, one after the other. The first pays the whole prefill;
the second can reuse the shared prefix's pages. Per request: time to the first streamed chunk
(the first finished block reaches the client), time to the last, the cached prompt tokens vLLM
reports (``usage.prompt_tokens_details``) and the answer, which must not depend on the cache.
Writes ``prefix_cache.json`` / ``.png`` to ``benchmarks/results/tmp/`` (``--out
benchmarks/results/prefix_cache`` refreshes the committed result). The servers are always stopped.

    python benchmarks/prefix_cache.py --quick   # ~2 minutes (mostly the two server starts)
    python benchmarks/prefix_cache.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import RESULTS, free_port, stop, vllm_exe, wait_ready  # noqa: E402

BLOCK = 32
MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=512, moe_intermediate_size=128, block_length=BLOCK)
QUESTION = 16
ANSWER = 32


def stream(base: str, name: str, prompt: list[int]) -> dict:
    body = {"model": name, "prompt": prompt, "max_tokens": ANSWER, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    start = time.perf_counter()
    first, tokens, usage = None, [], None
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            for choice in chunk.get("choices") or []:
                if choice.get("token_ids"):
                    first = first if first is not None else time.perf_counter() - start
                    tokens += choice["token_ids"]
            usage = chunk.get("usage") or usage
    details = (usage or {}).get("prompt_tokens_details") or {}
    return {"first_block_s": first, "total_s": time.perf_counter() - start, "tokens": tokens,
            "cached_tokens": details.get("cached_tokens") or 0}


def measure(model: str, caching: bool, shared: int, rounds: int, vocab: int, log_path: Path) -> list[dict]:
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    cmd = [vllm_exe(), "serve", model, "--plugin", "dapd", "--dtype", "float32", "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", str(shared + QUESTION + 2 * BLOCK + ANSWER),
           "--block-size", str(BLOCK), "--enable-prompt-tokens-details", "--disable-log-stats"]
    if not caching:
        cmd.append("--no-enable-prefix-caching")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_ready(port, proc, 600)
        base, rng = f"http://127.0.0.1:{port}", random.Random(0)  # the same prompts for both servers
        stream(base, model, [rng.randrange(vocab) for _ in range(64)])  # warm-up
        out = []
        for k in range(rounds):
            system = [rng.randrange(vocab) for _ in range(shared)]
            for order in ("first", "second"):
                question = [rng.randrange(vocab) for _ in range(QUESTION)]
                out.append({"round": k, "order": order, **stream(base, model, system + question)})
        return out
    finally:
        stop(proc)


def summarize(runs: list[dict]) -> dict:
    by = {o: [r for r in runs if r["order"] == o] for o in ("first", "second")}
    return {o: {"median_first_block_s": statistics.median(r["first_block_s"] for r in rs),
                "median_total_s": statistics.median(r["total_s"] for r in rs),
                "mean_cached_tokens": statistics.mean(r["cached_tokens"] for r in rs)} for o, rs in by.items()}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    modes = ["prefix caching on", "prefix caching off"]
    for j, order in enumerate(("first", "second")):
        ys = [1000 * result["summary"][m][order]["median_first_block_s"] for m in modes]
        bars = ax.bar([i + (j - 0.5) * 0.38 for i in range(len(modes))], ys, 0.38,
                      label=f"{order} request with the shared prompt")
        for b, m in zip(bars, modes):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(),
                    f"{result['summary'][m][order]['mean_cached_tokens']:.0f} cached", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("median time to first block (ms)")
    ax.set_title(f"LLaDA2 layout, {result['shared_tokens']}-token shared prompt, block {BLOCK}, CPU", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds, a 512-token shared prompt")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--shared", type=int, default=1536, help="tokens of the shared prompt")
    ap.add_argument("--out", type=Path, default=RESULTS / "tmp" / "prefix_cache")
    args = ap.parse_args()
    rounds, shared = (2, 512) if args.quick else (args.rounds, args.shared)
    from vllm_dapd.models.tiny import make_tiny_llada2

    (RESULTS / "tmp").mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_llada2(os.path.join(tmp, "llada2"), **MODEL)
        vocab = 300  # ordinary tokens of the tiny tokenizer (its specials come after)
        runs = {}
        for caching in (True, False):
            mode = f"prefix caching {'on' if caching else 'off'}"
            runs[mode] = measure(model, caching, shared, rounds, vocab, RESULTS / "tmp" / f"prefix_cache_{'on' if caching else 'off'}.log")
    on, off = runs["prefix caching on"], runs["prefix caching off"]
    assert [r["tokens"] for r in on] == [r["tokens"] for r in off], "prefix caching changed an answer"
    summary = {mode: summarize(rs) for mode, rs in runs.items()}
    s_on, s_off = summary["prefix caching on"], summary["prefix caching off"]
    result = {
        "model": MODEL, "shared_tokens": shared, "question_tokens": QUESTION, "answer_tokens": ANSWER,
        "rounds": rounds, "summary": summary,
        "second_vs_first_first_block_ratio": {
            m: s["second"]["median_first_block_s"] / s["first"]["median_first_block_s"] for m, s in summary.items()},
        "answers_identical_with_and_without_caching": True,
        "runs": {m: [{k: v for k, v in r.items() if k != "tokens"} for r in rs] for m, rs in runs.items()},
        "cpus": os.cpu_count(), "machine": platform.machine(), "load_average": os.getloadavg(),
        "note": "one request at a time; the two servers ran one after the other on the same prompts",
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    for mode, s in summary.items():
        print(f"{mode}: first request {1000 * s['first']['median_first_block_s']:.0f} ms to first block, "
              f"second {1000 * s['second']['median_first_block_s']:.0f} ms "
              f"({s['second']['mean_cached_tokens']:.0f} prompt tokens cached)")
    print(f"answers identical with and without caching; wrote {args.out.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
