"""What a canvas chunk costs, and when text arrives: streamed requests with and without
``vllm_xargs={"stream_canvas": 1}``.

Starts ``vllm serve --plugin dapd --dtype float32`` (the demo model) on a free loopback port and
sends the same streamed chat requests (held-out demo items, temperature 0) alternately as ordinary
streams and as canvas streams, one at a time. Three shapes: the demo's own (10-token answer, one
block, policy ``dapd``), the same with ``low_confidence`` one token per forward (10 forwards), and
a long canvas (``max_tokens`` 64, one block of 64, ``low_confidence`` one token per forward,
``ignore_eos``: 64 forwards, 64 chunks). Per shape: median wall time of a whole response, chunks,
bytes, the cost of one canvas chunk = extra time / extra chunks and bytes / canvas chunk, and when
``delta.content`` arrives (text is sent as soon as it is a committed prefix of the answer, inside
the one block): chunks with content and the time to the first one as a fraction of the whole
response (median over requests). Writes ``canvas_stream.json`` / ``.png`` to ``benchmarks/results/tmp/``
(``--out benchmarks/results/canvas_stream`` refreshes the committed result). The server is always
stopped.

    python benchmarks/canvas_stream.py --quick   # ~1.5 minutes (mostly the server start)
    python benchmarks/canvas_stream.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import RESULTS, free_port, vllm_exe, wait_ready  # noqa: E402

SHAPES = {
    "demo answer (10 tokens, dapd)": {"max_tokens": 10, "vllm_xargs": {"policy": "dapd"}},
    "demo answer (10 tokens, 1 per forward)": {
        "max_tokens": 10, "vllm_xargs": {"policy": "low_confidence", "block_length": 10, "steps": 10}},
    "long canvas (64 tokens, 1 per forward)": {
        "max_tokens": 64, "ignore_eos": True,
        "vllm_xargs": {"policy": "low_confidence", "block_length": 64, "steps": 64}},
}


def one(base: str, prompt: str, shape: dict, canvas: bool) -> dict:
    xargs = {**shape["vllm_xargs"], **({"stream_canvas": 1} if canvas else {})}
    body = {"model": "dapd-demo", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "stream": True, **{k: v for k, v in shape.items() if k != "vllm_xargs"}, "vllm_xargs": xargs}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    start = time.perf_counter()
    raw, lines, first_content = b"", [], None
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:  # SSE lines, as they arrive
            raw += line
            if line.startswith(b"data: {"):
                lines.append(line.decode().strip())
                if first_content is None and '"content":"' in lines[-1] and '"content":""' not in lines[-1]:
                    first_content = time.perf_counter() - start
    seconds = time.perf_counter() - start
    chunks = [json.loads(line[len("data: "):]) for line in lines]
    contents = [(ch.get("delta") or {}).get("content") or "" for c in chunks for ch in c["choices"]]
    canvas_chunks = sum(1 for c in chunks for ch in c["choices"] if "canvas" in (ch.get("dapd") or {}))
    canvas_bytes = sum(len(line) for line in lines if '"canvas"' in line)
    nfe = next(ch["dapd"]["nfe"] for c in chunks for ch in c["choices"] if "nfe" in (ch.get("dapd") or {}))
    assert first_content is not None or not "".join(contents), "content found only when parsed"
    return {"seconds": seconds, "chunks": len(chunks), "bytes": len(raw), "canvas_chunks": canvas_chunks,
            "canvas_bytes": canvas_bytes, "nfe": nfe, "text": "".join(contents),
            "content_chunks": sum(1 for piece in contents if piece),
            "first_content_fraction": (first_content if first_content is not None else seconds) / seconds}


def measure(base: str, prompts: list[str], repeats: int) -> dict:
    out = {}
    for name, shape in SHAPES.items():
        runs = {False: [], True: []}
        for _ in range(repeats):
            for prompt in prompts:
                for canvas in (False, True):  # alternate, so load drifts hit both alike
                    runs[canvas].append(one(base, prompt, shape, canvas))
        plain, canv = runs[False], runs[True]
        assert [r["text"] for r in plain] == [r["text"] for r in canv], "stream_canvas changed an answer"
        t_plain = statistics.median(r["seconds"] for r in plain)
        t_canvas = statistics.median(r["seconds"] for r in canv)
        extra_chunks = statistics.mean(r["chunks"] for r in canv) - statistics.mean(r["chunks"] for r in plain)
        out[name] = {
            "requests_per_mode": len(plain), "nfe": statistics.mean(r["nfe"] for r in canv),
            "median_seconds_plain": t_plain, "median_seconds_canvas": t_canvas,
            "chunks_plain": statistics.mean(r["chunks"] for r in plain),
            "chunks_canvas": statistics.mean(r["chunks"] for r in canv),
            "canvas_chunks": statistics.mean(r["canvas_chunks"] for r in canv),
            "bytes_plain": statistics.mean(r["bytes"] for r in plain),
            "bytes_canvas": statistics.mean(r["bytes"] for r in canv),
            "bytes_per_canvas_chunk": sum(r["canvas_bytes"] for r in canv) / max(1, sum(r["canvas_chunks"] for r in canv)),
            "ms_per_extra_chunk": 1000 * (t_canvas - t_plain) / extra_chunks if extra_chunks > 0 else None,
            "content_chunks_plain": statistics.mean(r["content_chunks"] for r in plain),
            "content_chunks_canvas": statistics.mean(r["content_chunks"] for r in canv),
            "first_content_fraction_plain": statistics.median(r["first_content_fraction"] for r in plain),
            "first_content_fraction_canvas": statistics.median(r["first_content_fraction"] for r in canv),
        }
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["shapes"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    xs = range(len(names))
    plain = [1000 * result["shapes"][n]["median_seconds_plain"] for n in names]
    canv = [1000 * result["shapes"][n]["median_seconds_canvas"] for n in names]
    ax.bar([x - 0.2 for x in xs], plain, 0.4, label="ordinary stream")
    ax.bar([x + 0.2 for x in xs], canv, 0.4, label="stream_canvas (one chunk per forward)")
    for x, n in zip(xs, names):
        s = result["shapes"][n]
        ax.text(x + 0.2, canv[x], f"{s['canvas_chunks']:.0f} chunks\n{s['bytes_per_canvas_chunk']:.0f} B each",
                ha="center", va="bottom", fontsize=8)
    labels = [n.replace(" (", "\n(") for n in names]
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("median time per request (ms)")
    ax.set_title("Canvas streaming cost, demo model, CPU", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylim(0, max(plain + canv) * 1.35)
    first = [result["shapes"][n]["first_content_fraction_plain"] for n in names]
    ax2.barh(list(xs), first, 0.5, color="tab:green")
    for x, n in zip(xs, names):
        s = result["shapes"][n]
        ax2.text(first[x], x, f" {s['content_chunks_plain']:.1f} content chunks", va="center", fontsize=8)
    ax2.set_yticks(list(xs), labels, fontsize=7)
    ax2.set_xlim(0, 1.45)
    ax2.set_xlabel("first delta.content / whole response (median)", fontsize=8)
    ax2.set_title("When text arrives (ordinary stream)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 prompts, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "tmp" / "canvas_stream")
    args = ap.parse_args()
    from vllm_dapd.demo.tasks import TASKS, held_out

    prompts = [it.prompt for task in TASKS for it in held_out(task, 1 if args.quick else 2)][: 4 if args.quick else 16]
    repeats = 1 if args.quick else args.repeats
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tmp").mkdir(parents=True, exist_ok=True)
    log = open(RESULTS / "tmp" / "canvas_stream_server.log", "w")
    proc = subprocess.Popen([vllm_exe(), "serve", "--plugin", "dapd", "--dtype", "float32", "--host", "127.0.0.1",
                             "--port", str(port), "--disable-log-stats"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(port, proc, 600)
        base = f"http://127.0.0.1:{port}"
        one(base, prompts[0], SHAPES[next(iter(SHAPES))], True)  # warm-up
        shapes = measure(base, prompts, repeats)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    result = {"shapes": shapes, "prompts": len(prompts), "repeats": repeats, "cpus": os.cpu_count(),
              "machine": platform.machine(), "note": "one request at a time; wall time from request to [DONE]"}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    for name, s in shapes.items():
        extra = "n/a" if s["ms_per_extra_chunk"] is None else f"{s['ms_per_extra_chunk']:.2f} ms"
        print(f"{name}: plain {1000 * s['median_seconds_plain']:.1f} ms, canvas {1000 * s['median_seconds_canvas']:.1f} ms "
              f"({s['canvas_chunks']:.0f} canvas chunks, {s['bytes_per_canvas_chunk']:.0f} B each, {extra} per extra chunk); "
              f"first content at {s['first_content_fraction_plain']:.2f} of the response, "
              f"{s['content_chunks_plain']:.1f} content chunks")
    print(f"wrote {args.out.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
