"""Online serving benchmark: vLLM's own client (``vllm bench serve``) against ``vllm serve --plugin dapd``.

Starts ``vllm serve <demo checkpoint> --plugin dapd`` on 127.0.0.1 (a free port, loopback only),
waits until it answers, then runs ``vllm bench serve`` (backend ``openai``, ``/v1/completions``)
at a few request rates over a prompts file made from held-out demo items (the client
the prompts carry the demo tokenizer's chat template), each request decoding the demo canvas with
``policy`` (default ``dapd``) through ``vllm_xargs``. Collects the JSON each client run writes,
scores the returned texts against the items (exact match), and writes
``serve.json`` (summary + the raw client JSONs) and ``serve.png`` to the scratch folder
``benchmarks/results/tmp/`` (``--out benchmarks/results/serve`` refreshes the committed result). The server is
always stopped (``try``/``finally``).

    python benchmarks/serve.py --quick     # ~1.5 minutes
    python benchmarks/serve.py             # more prompts and rates
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VENV_BIN = Path(sys.executable).parent
PCTS = (50, 90, 99)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_exe() -> str:
    exe = VENV_BIN / "vllm"
    return str(exe) if exe.exists() else "vllm"


def wait_ready(port: int, proc: subprocess.Popen, timeout: float) -> None:
    t_end = time.time() + timeout
    while time.time() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode} before becoming ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"vllm serve not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=20)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def summarize(raw: dict, rate: float) -> dict:
    out = {"request_rate": rate, "completed": raw.get("completed"), "failed": raw.get("failed", 0),
           "duration_s": raw.get("duration"), "request_throughput": raw.get("request_throughput"),
           "output_throughput": raw.get("output_throughput"),
           "total_token_throughput": raw.get("total_token_throughput")}
    for m in ("ttft", "tpot", "itl", "e2el"):
        out[f"mean_{m}_ms"] = raw.get(f"mean_{m}_ms")
        for p in PCTS:
            out[f"p{p}_{m}_ms"] = raw.get(f"p{p}_{m}_ms")
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(rows)))
    labels = ["inf" if r["request_rate"] == float("inf") else f"{r['request_rate']:g}" for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    a1.plot(xs, [r["output_throughput"] for r in rows], marker="o", label="output tok/s")
    a1.plot(xs, [r["request_throughput"] for r in rows], marker="s", label="req/s")
    a1.set_ylabel("throughput")
    a1.set_yscale("log")
    for m, mk in (("ttft", "o"), ("tpot", "s"), ("e2el", "^")):
        a2.plot(xs, [r[f"p50_{m}_ms"] for r in rows], marker=mk, label=f"{m.upper()} p50")
        a2.plot(xs, [r[f"p99_{m}_ms"] for r in rows], marker=mk, ls="--", label=f"{m.upper()} p99")
    a2.set_ylabel("ms")
    a2.set_yscale("log")
    for ax in (a1, a2):
        ax.set_xticks(xs, labels)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few prompts, two rates")
    ap.add_argument("--rates", type=float, nargs="+", default=None, help="request rates (inf = all at once)")
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--policy", default="dapd")
    ap.add_argument("--policy-args", default='{"variant": "tuned", "edge_threshold": 4.0}', help="JSON policy parameters")
    ap.add_argument("--cache-mode", default="prefix", choices=["none", "prefix", "dual"])
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--out", type=Path, default=RESULTS / "tmp" / "serve",
                    help="output prefix (default: the gitignored scratch folder; benchmarks/results/serve refreshes the committed result)")
    args = ap.parse_args()

    from tqdm.auto import tqdm

    from vllm_dapd.demo import CHECKPOINT
    from vllm_dapd.demo.tasks import CANVAS, TASKS, held_out, is_correct

    model = args.model or CHECKPOINT
    rates = args.rates or ([8.0, float("inf")] if args.quick else [4.0, 16.0, 64.0, float("inf")])
    n = args.num_prompts or (36 if args.quick else 192)
    per_task = -(-n // len(TASKS))
    items = [it for t in TASKS for it in held_out(t, per_task)]
    # interleave tasks so any prefix of the file mixes them
    items = [items[t * per_task + i] for i in range(per_task) for t in range(len(TASKS))][:n]
    xargs = {"policy": args.policy, "block_length": CANVAS, "steps": CANVAS, **json.loads(args.policy_args)}

    work = Path(tempfile.mkdtemp(prefix="dapd_serve_"))
    # ShareGPT layout (the ``custom`` jsonl loader needs pandas, not a vLLM dependency); the client
    # sends the first turn as is, so it carries the demo tokenizer's chat template already applied
    from transformers import PreTrainedTokenizerFast  # not Auto*: the config's auto_map would ask about remote code

    tok = PreTrainedTokenizerFast.from_pretrained(model)
    templated = [tok.apply_chat_template([{"role": "user", "content": it.prompt}], tokenize=False,
                                         add_generation_prompt=True) for it in items]
    data = work / "prompts.json"
    data.write_text(json.dumps([{"id": str(i), "conversations": [{"from": "human", "value": p},
                                                                 {"from": "gpt", "value": it.answer}]}
                                for i, (p, it) in enumerate(zip(templated, items))]))
    port = free_port()
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    server_cmd = [vllm_exe(), "serve", model, "--plugin", "dapd", "--host", "127.0.0.1", "--port", str(port),
                  "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", str(args.max_num_seqs),
                  "--additional-config", json.dumps({"dapd": {"block_length": CANVAS, "steps": CANVAS,
                                                              "cache_mode": args.cache_mode}})]
    log = open(work / "server.log", "w")
    bar = tqdm(total=1 + len(rates), desc="serve", unit="step")
    rows, raws = [], []
    t_start = time.perf_counter()
    proc = subprocess.Popen(server_cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        bar.set_postfix_str("server start")
        t0 = time.perf_counter()
        wait_ready(port, proc, args.startup_timeout)
        startup_s = time.perf_counter() - t0
        bar.update(1)
        for rate in rates:
            bar.set_postfix_str(f"rate {rate:g}")
            fname = f"rate_{rate:g}.json"
            cmd = [vllm_exe(), "bench", "serve", "--backend", "openai", "--endpoint", "/v1/completions",
                   "--base-url", f"http://127.0.0.1:{port}", "--model", model, "--tokenizer", model,
                   "--dataset-name", "sharegpt", "--dataset-path", str(data), "--sharegpt-output-len", str(CANVAS),
                   "--num-prompts", str(n), "--request-rate", "inf" if rate == float("inf") else str(rate),
                   "--ignore-eos", "--temperature", "0", "--seed", "0", "--disable-shuffle",
                   "--extra-body", json.dumps({"vllm_xargs": xargs}),
                   "--percentile-metrics", "ttft,tpot,itl,e2el",
                   "--metric-percentiles", ",".join(map(str, PCTS)),
                   "--save-result", "--save-detailed", "--result-dir", str(work), "--result-filename", fname,
                   "--disable-tqdm"]
            client = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if client.returncode != 0:
                raise RuntimeError(f"vllm bench serve failed (rc {client.returncode}):\n{client.stderr[-3000:]}")
            raw = json.loads((work / fname).read_text())
            row = summarize(raw, rate)
            texts = raw.get("generated_texts") or []
            # score: the detailed result keeps outputs in dataset order (--disable-shuffle)
            if texts and len(texts) == n:
                correct = [is_correct(it, txt) for it, txt in zip(items, texts)]
                row["accuracy"] = sum(correct) / len(correct)
            else:
                row["accuracy"] = None
            rows.append(row)
            raws.append({k: v for k, v in raw.items() if not isinstance(v, list)})
            bar.update(1)
    finally:
        stop(proc)
        log.close()
        bar.close()

    cfg = {"model": os.path.relpath(model, Path(__file__).resolve().parents[1]), "quick": args.quick,
           "num_prompts": n, "rates": ["inf" if r == float("inf") else r for r in rates], "output_len": CANVAS,
           "policy": xargs, "cache_mode": args.cache_mode, "max_num_seqs": args.max_num_seqs,
           "backend": "openai", "endpoint": "/v1/completions", "dataset": "sharegpt-format file of held-out demo items (chat template applied)",
           "server_startup_s": startup_s, "port": port, "seconds": time.perf_counter() - t_start,
           "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "load_average_after": os.getloadavg(),
           "server_cmd": " ".join(server_cmd[1:3]) + " --plugin dapd ...",
           "note": "one block = the whole 10-token answer, streamed as one chunk: TTFT ~ E2E latency, TPOT/ITL ~ 0"}
    shutil.rmtree(work, ignore_errors=True)  # kept on failure (server.log)
    for r in rows:
        if r["request_rate"] == float("inf"):
            r["request_rate"] = "inf"
    result = {"config": cfg, "summary": rows, "raw": raws}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot([dict(r, request_rate=float(r["request_rate"])) for r in rows], args.out.with_suffix(".png"),
         f"vllm bench serve vs vllm serve --plugin dapd (demo model, {args.policy}, {args.cache_mode} cache)")

    print(f"\n{n} prompts, {CANVAS} output tokens each, policy {xargs}, cache {args.cache_mode}")
    print(f"{'rate':>6}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}"
          f"{'TPOT p99':>10}{'E2E p50':>10}{'acc':>7}")
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"{str(r['request_rate']):>6}{r['request_throughput']:>8.2f}{r['output_throughput']:>11.1f}"
              f"{r['p50_ttft_ms']:>10.1f}{r['p99_ttft_ms']:>10.1f}{r['p50_tpot_ms']:>10.2f}{r['p99_tpot_ms']:>10.2f}"
              f"{r['p50_e2el_ms']:>10.1f}{acc:>7}")
    print(f"wrote {args.out.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
