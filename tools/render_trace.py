"""Render a decoding trace as a picture: forwards (rows) x answer positions (columns).

A cell is coloured once its position is committed, with the colour of the forward that committed
it, so the picture shows the canvas filling up; the token is written where it was committed.
The trace is the ``dapd.trace`` field of a choice served with ``vllm_xargs={"trace": 1}``
(``vllm_dapd/engine/vllm/cost.py``): ``[[forward, [positions...]], ...]``.

    # from a saved response (completion or chat; tokens from logprobs.tokens if present)
    python tools/render_trace.py response.json -o trace.png
    # or ask a running server (`vllm serve ... --plugin dapd`)
    python tools/render_trace.py --url http://127.0.0.1:8000 --prompt "Hello" --max-tokens 32 -o trace.png
    # the same through the chat template (--chat), with a policy
    python tools/render_trace.py --url http://127.0.0.1:8000 --chat --prompt "sort 5 9 2 7" --xargs '{"policy": "dapd"}'
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any, Sequence


def commit_forward(trace: list[list[Any]]) -> dict[int, int]:
    """position -> the forward that committed it (the last, if one was committed twice)."""
    return {p: forward for forward, positions in trace for p in positions}


def render(trace: list[list[Any]], out: str | Path, tokens: Sequence[str] | None = None,
           title: str | None = None) -> Path:
    """Write the picture of ``trace`` to ``out`` (PNG); ``tokens[i]`` is written at position i;
    ``title`` (e.g. the prompt) goes before the counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    at = commit_forward(trace)
    forwards = max((f for f, _ in trace), default=0)
    width = max(at, default=-1) + 1
    grid = np.full((forwards, width), np.nan)
    for p, f in at.items():
        grid[f - 1:, p] = f  # committed from forward f on
    fig, ax = plt.subplots(figsize=(min(16, 3 + 0.45 * width), min(10, 1.8 + 0.35 * forwards)), dpi=90)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")  # grey: still masked
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", vmin=1, vmax=max(forwards, 1),
                      interpolation="nearest", extent=(-0.5, width - 0.5, forwards + 0.5, 0.5))
    if tokens:
        for p, f in at.items():
            if p < len(tokens):
                text = tokens[p].strip() or "_"
                ax.text(p, f, text if len(text) <= 5 else text[:4] + "~", ha="center", va="center", fontsize=7,
                        color="white", clip_on=True)
    ax.set_xlabel("answer position")
    ax.set_ylabel("forward")
    counts = f"{len(at)} positions in {forwards} forwards"
    ax.set_title(f"{title}: {counts}" if title else counts, fontsize=10)
    ticks = range(1, forwards + 1) if forwards <= 20 else None
    fig.colorbar(image, ax=ax, label="committed at forward", ticks=ticks)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


def from_response(response: dict[str, Any], choice: int = 0) -> tuple[list[list[Any]], list[str] | None]:
    """The trace and (if the response has logprobs) the tokens of one choice."""
    c = response["choices"][choice]
    field = c.get("dapd") or {}
    if "trace" not in field:
        raise SystemExit('no trace in the response: ask with "vllm_xargs": {"trace": 1}')
    logprobs = c.get("logprobs") or {}
    tokens = logprobs.get("tokens")  # completions
    if tokens is None and logprobs.get("content"):
        tokens = [t["token"] for t in logprobs["content"]]  # chat
    return field["trace"], tokens


def ask(url: str, prompt: str, max_tokens: int, model: str | None, xargs: dict[str, Any],
        chat: bool = False) -> dict[str, Any]:
    """One greedy completion (or chat completion) with trace and token logprobs from a server at ``url``."""
    if model is None:
        with urllib.request.urlopen(url.rstrip("/") + "/v1/models") as r:
            model = json.load(r)["data"][0]["id"]
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "vllm_xargs": {**xargs, "trace": 1}}
    if chat:
        body.update(messages=[{"role": "user", "content": prompt}], logprobs=True)
    else:
        body.update(prompt=prompt, logprobs=0)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    request = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as r:
        return json.load(r)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("response", nargs="?", help="a saved response JSON (else --url)")
    parser.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--prompt", default="Hello")
    parser.add_argument("--chat", action="store_true", help="send --prompt as a chat message")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", help="served model name (default: the first one)")
    parser.add_argument("--xargs", default="{}", help='more vllm_xargs as JSON, e.g. \'{"steps": 8}\'')
    parser.add_argument("--choice", type=int, default=0)
    parser.add_argument("-o", "--out", default="trace.png")
    args = parser.parse_args(argv)
    if args.response:
        response = json.loads(Path(args.response).read_text())
    elif args.url:
        response = ask(args.url, args.prompt, args.max_tokens, args.model, json.loads(args.xargs), args.chat)
    else:
        parser.error("give a response JSON file or --url")
    trace, tokens = from_response(response, args.choice)
    out = render(trace, args.out, tokens, repr(args.prompt) if args.url else None)
    print(out)
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
