"""Scoring cost of one echo + logprobs request on the demo model: forwards and seconds per request.

The request: the demo chat prompt of a held-out item plus its answer canvas (prompt ~27 tokens),
scored as ``/v1/completions`` with ``echo: true, logprobs: 1`` would score it, through the runner's
own code (``vllm_dapd.engine.core.scoring.prompt_logprobs``, no server: this measures the scoring, not
HTTP). Three ways, all with the same 32 Monte Carlo samples (``likelihood.draws``):

- ``per_position``: the default, an ELBO per prompt position (the sum over any suffix is that
  suffix's ELBO, so the server need not know where the continuation starts); each distinct row of a
  request runs once, packed into forwards of at most ``chunk_tokens`` tokens;
- ``score_start``: the client names where the continuation starts (``vllm_xargs``
  ``score_start``): one ELBO per request;
- ``reference_loop``: a batch-of-samples loop in the style of ML-GSAI/LLaDA
  ``get_log_likelihood`` (a forward per batch of ``batch`` samples, one split per call), run for
  the continuation only: what a client that knows the split gets from the reference code.

With ``--serve N`` it also starts ``vllm serve`` of the demo model (loopback, a free port) and sends
the same requests as token ids to ``/v1/completions`` with ``echo: true, logprobs: 1, max_tokens: 1``
(what lm-evaluation-harness' ``local-completions`` sends), one at a time, N per way (``serve_per_position``,
``serve_score_start``), after one warm-up: the median and every latency, HTTP and engine included.

    python benchmarks/scoring.py --quick      # 3 requests each
    python benchmarks/scoring.py              # 16 requests each
    python benchmarks/scoring.py --serve 5    # and 5 requests each through vllm serve
Writes ``benchmarks/results/tmp/scoring.json`` and ``.png`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from vllm_dapd.decoding.likelihood import ScoreSettings, draws, split_masks
from vllm_dapd.demo import CHECKPOINT
from vllm_dapd.demo.tasks import TASKS, held_out
from vllm_dapd.demo.vocab import Vocab
from vllm_dapd.engine.core import scoring
from vllm_dapd.engine.core.sequence import Sequence
from vllm_dapd.engine.core.settings import DecodeSettings
from vllm_dapd.models.loading import load_model

RESULTS = Path(__file__).resolve().parent / "results"


class Counted:
    """The model, counting forwards."""

    def __init__(self, model):
        self.model, self.forwards = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        self.forwards += 1
        return self.model(*args, **kwargs)


def reference_loop(model, tokens: torch.Tensor, start: int, samples: int, batch: int, seed: int) -> float:
    """ELBO of ``tokens[start:]`` given ``tokens[:start]``: ``samples`` draws, ``batch`` per forward."""
    settings = ScoreSettings(samples=samples)
    v, u = draws(samples, tokens.shape[0], seed)
    masks, weights = split_masks(v, u, start, settings)
    total = 0.0
    for a in range(0, samples, batch):
        m = masks[a:a + batch]
        x = torch.where(m, int(model.mask_token_id), tokens.expand(m.shape))
        with torch.inference_mode():
            lp = torch.log_softmax(model(x).logits.float(), dim=-1)
        token_lp = lp.gather(-1, tokens.expand(m.shape)[..., None])[..., 0].double()
        total += float(((token_lp * m).sum(1) * weights[a:a + batch]).sum())
    return total / samples


def measure(fn, model: Counted, requests: list) -> dict:
    model.forwards = 0
    t0 = time.perf_counter()
    for r in requests:
        fn(r)
    seconds = time.perf_counter() - t0
    return {"requests": len(requests), "seconds_per_request": seconds / len(requests),
            "requests_per_s": len(requests) / seconds, "forwards_per_request": model.forwards / len(requests)}


def serve_latencies(requests: list, samples: int, n: int) -> dict:
    """Median and every latency of echo + logprobs requests through ``vllm serve`` of the demo model."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve import free_port, stop, vllm_exe, wait_ready

    port = free_port()
    cmd = [vllm_exe(), "serve", CHECKPOINT, "--plugin", "dapd", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "128"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def ask(prompt: list[int], **xargs) -> float:
        body = {"model": CHECKPOINT, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0,
                "seed": 1234, "vllm_xargs": {"score_samples": samples, **xargs}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
        seconds = time.perf_counter() - t0
        assert len(out["choices"][0]["logprobs"]["token_logprobs"]) == len(prompt) + 1, out
        return seconds

    try:
        wait_ready(port, proc, 300)
        ask(requests[0][0] + requests[0][1])  # warm-up
        result = {}
        for way, xargs in (("serve_per_position", lambda p, a: {}), ("serve_score_start", lambda p, a: {"score_start": len(p)})):
            seconds = [ask(p + a, **xargs(p, a)) for p, a in (requests * n)[:n]]
            result[way] = {"requests": n, "median_seconds": statistics.median(seconds), "seconds": seconds}
        return result
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=None, help="requests per way (default 16; --quick 3)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16, help="reference loop: samples per forward")
    ap.add_argument("--serve", type=int, default=0, metavar="N", help="also N requests per way through vllm serve")
    ap.add_argument("--out", type=Path, default=RESULTS / "tmp" / "scoring")
    args = ap.parse_args()
    n = args.requests or (3 if args.quick else 16)
    torch.manual_seed(0)
    model, vocab = Counted(load_model(CHECKPOINT)), Vocab.build()
    items = [it for task in TASKS for it in held_out(task, n)][:n]
    requests = [(vocab.prompt_ids(it.prompt), vocab.answer_ids(it.answer)) for it in items]

    def served(prompt, answer, **options):
        s = Sequence("r", prompt + answer, 1, DecodeSettings(), None, model.mask_token_id, 0.0, 0,
                     num_prompt_logprobs=1, score=scoring.ScoreOptions(samples=args.samples, **options))
        return scoring.prompt_logprobs(model, [s], torch.device("cpu"))["r"]

    ways = {
        "per_position": lambda r: served(*r),
        "score_start": lambda r: served(*r, start=len(r[0])),
        "reference_loop": lambda r: reference_loop(model, torch.tensor(r[0] + r[1]), len(r[0]), args.samples,
                                                   args.batch, 0),
    }
    for fn in ways.values():  # warm-up
        fn(requests[0])
    result = {"model": "demo checkpoint (0.9M parameters)", "samples": args.samples, "reference_batch": args.batch,
              "prompt_tokens": sum(len(p) + len(a) for p, a in requests) / n,
              "note": "function-level (runner scoring code, no HTTP); shared 2-core CPU, timings are load-dependent",
              "target_seconds_per_request": 0.5}
    result["load_average_before"] = os.getloadavg()
    result.update({name: measure(fn, model, requests) for name, fn in ways.items()})
    if args.serve:
        result.update(serve_latencies(requests, args.samples, args.serve))
    result["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
    names = list(ways)
    served = [k for k in ("serve_per_position", "serve_score_start") if k in result]
    a1.bar(names + served, [result[k]["seconds_per_request"] for k in names]
           + [result[k]["median_seconds"] for k in served])
    a1.axhline(0.5, color="r", ls="--", lw=1, label="target 0.5 s")
    a1.set_ylabel("seconds / request")
    a1.legend(fontsize=7)
    a2.bar(names, [result[k]["forwards_per_request"] for k in names])
    a2.set_ylabel("forwards / request")
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"echo+logprobs scoring, demo model, {args.samples} samples")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
