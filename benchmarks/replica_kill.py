"""Replica fail-over benchmark (issue 26): two engine replicas behind one endpoint, one engine killed.

Starts the README's replica command (``python -m vllm_dapd.distributed.serve DEMO --replicas 2 --
--plugin dapd ...``, a local loopback Ray cluster) and, against its endpoint:

1. **warm-up**: 20 sequential completions; which replica served each;
2. **steady burst**: 200 concurrent greedy completions (40-token canvas, 40 steps), no fault: the
   split between the replicas and the answers of a run without a kill;
3. **kill burst**: the same 200 again, and one replica's engine processes (vLLM's EngineCore under
   its ``vllm-dapd serve``) SIGKILLed 1 s in: HTTP statuses (500s counted separately), how many
   failed over (``x-vllm-dapd-retried``), answers compared with the run without the kill; then
   requests keep coming until the killed replica serves again (its engine restarted in place):
   the recovery time;
4. **vllm bench serve during a kill**: vLLM's own client at a fixed request rate (``--save-detailed``)
   while one engine is SIGKILLed ``--bench-kill-at`` s after the client's first request; the per-request start times, latencies
   and errors give the timeline plot (completions per second, failures, latency) with the kill
   and the engine's return marked.

Writes ``replica_kill.json`` and ``replica_kill.png`` to the scratch folder
``benchmarks/results/tmp/`` (``--out benchmarks/results/replica_kill`` refreshes the committed
result). The launcher (and with it Ray and every engine) is always stopped.

    python benchmarks/replica_kill.py            # ~12 minutes on 2 shared cores under load
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from vllm_dapd.distributed.processes import descendants, engine_servers
from vllm_dapd.distributed.serve import REPLICA_HEADER, RETRIED_HEADER, free_port

RESULTS = Path(__file__).resolve().parent / "results"
VENV_BIN = Path(sys.executable).parent


def kill_engine(log_dir: str, replica: str) -> tuple[float, int]:
    """SIGKILL the engine processes under ``replica``'s server (the server then exits by itself)."""
    pid, port = engine_servers(log_dir)[replica]
    victims = descendants(pid)
    at = time.perf_counter()
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return at, port


def wait_engine_back(log_dir: str, replica: str, old_port: int, timeout: float) -> float | None:
    """perf_counter time at which ``replica``'s restarted engine server first answered ``/health``."""
    import urllib.request

    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        now = engine_servers(log_dir).get(replica)
        if now is not None and now[1] != old_port:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{now[1]}/health", timeout=2):
                    return time.perf_counter()
            except OSError:
                pass
        time.sleep(0.5)
    return None


def post(client, base: str, body: dict) -> dict:
    t0 = time.perf_counter()
    try:
        r = client.post(base + "/v1/completions", json=body)
        out = {"status": r.status_code, "replica": r.headers.get(REPLICA_HEADER),
               "retried": r.headers.get(RETRIED_HEADER)}
        out["tokens"] = r.json()["choices"][0].get("token_ids") if r.status_code == 200 else None
        out["error"] = None if r.status_code == 200 else r.text[:300]
    except Exception as exc:  # noqa: BLE001 - a transport failure is a result here
        out = {"status": None, "replica": None, "retried": None, "tokens": None, "error": repr(exc)[:300]}
    out.update(start=t0, end=time.perf_counter())
    return out


def burst(client, base: str, bodies: list[dict], kill=None) -> tuple[list[dict], dict | None]:
    killed = {}
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(post, client, base, b) for b in bodies]
        if kill is not None:
            time.sleep(1.0)
            killed = kill()
        results = [f.result() for f in futures]
    return results, killed or None


def split(results: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        if r["status"] == 200:
            out[r["replica"]] = out.get(r["replica"], 0) + 1
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    b = result["bench"]
    t0 = min(b["start_times"])
    starts = np.array(b["start_times"]) - t0
    ends = starts + np.array(b["latencies"])
    ok = np.array([not e for e in b["errors"]])
    kill, back = b["killed_at"] - t0, (b["engine_back_at"] - t0) if b["engine_back_at"] else None
    span = int(np.ceil(ends.max())) + 1
    bins = np.arange(0, span + 1)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    a1.hist(ends[ok], bins=bins, color="tab:green", alpha=0.8, label="completed (by end time)")
    if (~ok).any():
        a1.hist(ends[~ok], bins=bins, color="tab:red", alpha=0.9, label="failed")
    a1.set_ylabel("requests / s")
    a2.scatter(starts[ok], np.array(b["latencies"])[ok], s=6, color="tab:blue", label="latency (by start time)")
    if (~ok).any():
        a2.scatter(starts[~ok], np.array(b["latencies"])[~ok], s=14, color="tab:red", marker="x", label="failed")
    a2.set_ylabel("end-to-end latency (s)")
    a2.set_xlabel("seconds since the first request")
    for ax in (a1, a2):
        ax.axvline(kill, color="black", ls="--", label="engine SIGKILLed")
        if back is not None:
            ax.axvline(back, color="tab:purple", ls=":", label="restarted engine ready")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    cfg = result["config"]
    fig.suptitle(f"vllm bench serve at {cfg['bench_rate']:g} req/s against 2 replicas, one engine killed "
                 f"({sum(ok)}/{len(ok)} ok)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--canvas", type=int, default=40, help="max_tokens = block_length = steps")
    ap.add_argument("--bench-rate", type=float, default=4.0)
    ap.add_argument("--bench-prompts", type=int, default=960, help="at --bench-rate: long enough to see the restart")
    ap.add_argument("--bench-kill-at", type=float, default=10.0)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=RESULTS / "tmp" / "replica_kill",
                    help="output prefix (default: the gitignored scratch folder)")
    args = ap.parse_args()

    import httpx

    from vllm_dapd.demo import CHECKPOINT
    from vllm_dapd.demo.tasks import TASKS, held_out

    model = CHECKPOINT
    log_dir = tempfile.mkdtemp(prefix="dapd_replica_kill_")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    serve_args = ["--plugin", "dapd", "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "64"]
    cmd = [sys.executable, "-m", "vllm_dapd.distributed.serve", model, "--replicas", "2", "--port", str(port),
           "--log-dir", log_dir, "--", *serve_args]
    per_task = -(-args.requests // len(TASKS))
    prompts = [it.prompt for t in TASKS for it in held_out(t, per_task)][:args.requests]
    xargs = {"block_length": args.canvas, "steps": args.canvas}

    def body(prompt: str) -> dict:
        return {"model": model, "prompt": prompt, "max_tokens": args.canvas, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "vllm_xargs": xargs}

    launcher_log = open(os.path.join(log_dir, "launcher.log"), "w")
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=launcher_log, stderr=subprocess.STDOUT, start_new_session=True)
    result: dict = {}
    try:
        client = httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0),
                              limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        end = time.perf_counter() + args.startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"launcher exited with {proc.returncode}; see {log_dir}/launcher.log")
            try:
                if client.get(base + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() > end:
                raise TimeoutError("endpoint not ready")
            time.sleep(2)
        startup_s = time.perf_counter() - t_start
        print(f"endpoint ready after {startup_s:.0f} s", flush=True)

        warm = [post(client, base, body(p)) for p in prompts[:20]]
        print("warm-up split", split(warm), flush=True)
        steady, _ = burst(client, base, [body(p) for p in prompts])
        print("steady split", split(steady), flush=True)
        reference = [r["tokens"] for r in steady]

        victim = sorted(engine_servers(log_dir))[0]
        info: dict = {}

        def kill() -> dict:
            info["killed_at"], info["old_port"] = kill_engine(log_dir, victim)
            return info

        killed, _ = burst(client, base, [body(p) for p in prompts], kill=kill)
        # keep asking (2 at a time) until the victim serves again
        later, served_again = [], None
        while served_again is None and time.perf_counter() - info["killed_at"] < 300:
            pair, _ = burst(client, base, [body(p) for p in prompts[:2]])
            later += pair
            hit = [r for r in pair if r["status"] == 200 and r["replica"] == victim]
            if hit:
                served_again = min(r["end"] for r in hit) - info["killed_at"]
        statuses: dict[str, int] = {}
        for r in killed + later:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        kill_summary = {
            "victim": victim, "statuses": statuses,
            "http_500": sum(r["status"] == 500 for r in killed + later),
            "failed": sum(r["status"] != 200 for r in killed),
            "failed_later": sum(r["status"] != 200 for r in later),
            "failed_over": sum(r["retried"] == victim for r in killed),
            "answered_by_victim_before_kill_or_retried_elsewhere": split(killed),
            "identical_to_run_without_kill": sum(r["tokens"] == ref for r, ref in zip(killed, reference)),
            "burst_s": max(r["end"] for r in killed) - min(r["start"] for r in killed),
            "later_requests": len(later), "victim_serving_again_s": served_again,
            "errors": sorted({r["error"] for r in killed + later if r["error"]})[:5],
        }
        print("kill burst", json.dumps(kill_summary, indent=1), flush=True)

        # vllm bench serve at a fixed rate while one engine is killed
        data = Path(log_dir) / "prompts.json"
        bench_prompts = (prompts * (-(-args.bench_prompts // len(prompts))))[:args.bench_prompts]
        data.write_text(json.dumps([{"id": str(i), "conversations": [{"from": "human", "value": p},
                                                                     {"from": "gpt", "value": "x"}]}
                                    for i, p in enumerate(bench_prompts)]))
        victim2 = sorted(engine_servers(log_dir))[1]
        bench_cmd = [str(VENV_BIN / "vllm"), "bench", "serve", "--backend", "openai", "--endpoint", "/v1/completions",
                     "--base-url", base, "--model", model, "--tokenizer", model, "--dataset-name", "sharegpt",
                     "--dataset-path", str(data), "--sharegpt-output-len", str(args.canvas),
                     "--num-prompts", str(args.bench_prompts), "--request-rate", str(args.bench_rate),
                     "--ignore-eos", "--temperature", "0", "--seed", "0", "--disable-shuffle",
                     "--extra-body", json.dumps({"vllm_xargs": xargs}), "--save-result", "--save-detailed",
                     "--result-dir", log_dir, "--result-filename", "bench.json", "--disable-tqdm"]
        bench_info: dict = {}

        def posts(replica: str) -> int:  # completions the replica's engine server has logged
            port = engine_servers(log_dir)[replica][1]
            text = Path(log_dir, f"vllm-dapd-replica-{replica}-{port}.log").read_text(errors="replace")
            return text.count("POST /v1/completions")

        def kill_during_bench() -> None:
            # the client takes a while to start (imports, tokenizer): count from its first request
            before = posts(victim2)
            while posts(victim2) == before and run_state.get("rc") is None:
                time.sleep(0.2)
            time.sleep(args.bench_kill_at)
            bench_info["killed_at"], old = kill_engine(log_dir, victim2)
            bench_info["engine_back_at"] = wait_engine_back(log_dir, victim2, old, 300)

        run_state: dict = {}
        killer = threading.Thread(target=kill_during_bench)
        bench_t0 = time.perf_counter()
        killer.start()
        run = subprocess.run(bench_cmd, env=env, capture_output=True, text=True, timeout=1200)
        run_state["rc"] = run.returncode
        killer.join()
        if run.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed (rc {run.returncode}):\n{run.stderr[-3000:]}")
        raw = json.loads((Path(log_dir) / "bench.json").read_text())
        if min(raw["start_times"]) < bench_t0 - 5:  # a different clock: shift to ours
            raise RuntimeError("vllm bench serve start_times are not on this process's perf_counter clock")
        bench = {"start_times": raw["start_times"], "latencies": raw["latencies"], "errors": raw["errors"],
                 "killed_at": bench_info["killed_at"], "engine_back_at": bench_info.get("engine_back_at"),
                 "completed": raw.get("completed"), "failed": raw.get("failed"),
                 "request_throughput": raw.get("request_throughput"), "duration_s": raw.get("duration"),
                 "engine_back_after_kill_s": (bench_info["engine_back_at"] - bench_info["killed_at"])
                 if bench_info.get("engine_back_at") else None,
                 "error_messages": sorted({e for e in raw["errors"] if e})[:5]}
        print("bench", {k: v for k, v in bench.items() if not isinstance(v, list)}, flush=True)
        result = {
            "config": {"model": os.path.relpath(model, Path(__file__).resolve().parents[1]), "replicas": 2,
                       "requests": args.requests, "canvas": args.canvas, "vllm_xargs": xargs,
                       "serve_args": serve_args, "env": {"VLLM_CPU_OMP_THREADS_BIND": "nobind"},
                       "bench_rate": args.bench_rate, "bench_prompts": args.bench_prompts,
                       "bench_kill_at_s": args.bench_kill_at, "startup_s": startup_s,
                       "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                       "load_average_after": os.getloadavg()},
            "warmup_split": split(warm), "steady_split": split(steady),
            "steady_failed": sum(r["status"] != 200 for r in steady),
            "steady_burst_s": max(r["end"] for r in steady) - min(r["start"] for r in steady),
            "kill": kill_summary, "bench": bench, "seconds": time.perf_counter() - t_start,
        }
    finally:
        try:  # the launcher stops Serve, Ray and every engine on SIGTERM
            proc.terminate()
            proc.wait(120)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher_log.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and .png (logs: {log_dir})")


if __name__ == "__main__":
    main()
