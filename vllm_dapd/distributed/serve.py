"""Engine replicas behind one OpenAI endpoint: a Ray Serve deployment around ``vllm-dapd serve``.

Why this shape (see docs/DISTRIBUTED.md for the alternatives we measured):
- vLLM's data parallelism with the Ray backend and Ray Serve LLM both place engines through Ray
  placement groups on *accelerators*; vLLM 0.32's CPU platform has no Ray device key
  (``ray_device_key = ""``), and Ray 2.60's ``ray[llm]`` pins vLLM 0.29. So each replica here runs
  the stock OpenAI server (``vllm-dapd serve MODEL ...``, our plugin loaded by vLLM's entry point)
  as a child process on a free loopback port, and forwards HTTP to it byte for byte. Everything the
  single-engine server does (``vllm_xargs`` per-request decoding settings, 400s naming the key,
  streaming one chunk per block, ``n``, seeds, aborts) therefore holds through the endpoint.
- Ray Serve owns what a fleet needs: one HTTP endpoint (its proxy), load-aware routing among
  replicas, health checks (``check_health`` asks the engine's ``/health``), replacing a dead or
  unhealthy replica, and placement across nodes (``num_gpus`` per replica = its TP size; TP inside a
  replica is vLLM's ``mp`` executor on that node's GPUs).
- Faults: the engine dying under a request -> ``503`` with a message naming the replica (or, for a
  stream already under way, a final SSE ``error`` event); the replica process itself killed ->
  Serve's proxy fails the requests it had in flight with a 5xx and routes new ones to the live
  replicas while the controller starts a replacement. Every wait has a timeout.

Run: ``python -m vllm_dapd.distributed.serve MODEL --replicas 2 --port 8000 -- --plugin dapd`` or
``serve run vllm_dapd.distributed.serve:app_builder model=MODEL replicas=2``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

REPLICA_HEADER = "x-vllm-dapd-replica"
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones httpx/uvicorn (re)write themselves.
_SKIP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer",
                 "upgrade", "proxy-authorization", "proxy-authenticate", "content-encoding", "date", "server"}


@dataclass(frozen=True)
class ReplicaConfig:
    """What every replica runs: ``vllm-dapd serve model *serve_args`` with ``env`` added."""

    model: str
    serve_args: tuple[str, ...] = ()  # e.g. ("--plugin", "dapd", "--tensor-parallel-size", "2")
    env: dict[str, str] = field(default_factory=dict)  # e.g. {"VLLM_CPU_KVCACHE_SPACE": "1"}
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 600.0  # one upstream request, end to end
    log_dir: str | None = None  # engine server logs (default: the system temp dir)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: required")
        for flag in ("--host", "--port"):
            if flag in self.serve_args:
                raise ValueError(f"serve_args: {flag} is chosen by the replica (loopback, a free port)")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s: must be > 0, got {self.startup_timeout_s}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s: must be > 0, got {self.request_timeout_s}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": status}}


class EngineReplica:
    """One engine server per replica, started in ``__init__``, proxied in ``__call__``.

    Plain class; ``deployment()`` wraps it with ``serve.deployment``, so it is importable and
    unit-testable without a Serve controller.
    """

    def __init__(self, config: ReplicaConfig):
        import httpx

        self.config = config
        self.name = _replica_name()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(config.log_dir or tempfile.gettempdir(),
                                     f"vllm-dapd-replica-{self.name}-{self.port}.log")
        cmd = [sys.executable, "-m", "vllm_dapd.distributed.child", str(os.getpid()), "serve", config.model,
               "--host", "127.0.0.1", "--port", str(self.port), *config.serve_args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **config.env}, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        timeout = httpx.Timeout(config.request_timeout_s, connect=10.0)
        self.client = httpx.AsyncClient(base_url=self.base, timeout=timeout,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"replica {self.name}: engine server exited with code {code} during start-up; "
                                   f"log: {self.log_path}\n{_tail(self.log_path)}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replica {self.name}: engine server not healthy after "
                                       f"{self.config.startup_timeout_s:.0f} s; log: {self.log_path}")
                time.sleep(0.5)

    async def __call__(self, request: Any) -> Any:
        """Forward one HTTP request to the engine server; stream the answer back unchanged."""
        import httpx
        from starlette.responses import JSONResponse, StreamingResponse

        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP_HEADERS}
        upstream = self.client.build_request(request.method, request.url.path, params=request.query_params,
                                             headers=headers, content=await request.body())
        try:
            response = await self.client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            return JSONResponse(_error(503, self._failure(exc), "ServiceUnavailableError"), status_code=503,
                                headers={REPLICA_HEADER: self.name})

        async def body():
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            except httpx.HTTPError as exc:  # the engine died mid-answer: say so, then end the stream
                if response.headers.get("content-type", "").startswith("text/event-stream"):
                    yield f"data: {json.dumps(_error(503, self._failure(exc), 'ServiceUnavailableError'))}\n\n".encode()
                else:
                    raise
            finally:
                await response.aclose()

        out_headers = {k: v for k, v in response.headers.items() if k.lower() not in _SKIP_HEADERS}
        out_headers[REPLICA_HEADER] = self.name
        return StreamingResponse(body(), status_code=response.status_code, headers=out_headers)

    def _failure(self, exc: Exception) -> str:
        code = self.proc.poll()
        state = f"exited with code {code}" if code is not None else "did not answer"
        return (f"vllm-dapd replica {self.name}: engine server {state} during the request "
                f"({type(exc).__name__}: {exc}); the request was not completed, retry it")

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        code = self.proc.poll()
        if code is not None:
            raise RuntimeError(f"replica {self.name}: engine server exited with code {code}")
        r = await self.client.get("/health", timeout=10.0)
        if r.status_code != 200:
            raise RuntimeError(f"replica {self.name}: engine /health returned {r.status_code}")

    def stop(self, grace_s: float = 40.0) -> None:
        """SIGTERM the supervisor (``child.py``: it stops the server and its engine processes);
        SIGKILL the whole process group if that takes longer than ``grace_s``."""
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def __del__(self) -> None:  # Serve calls it on graceful replica shutdown
        self.stop()


def _replica_name() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (unit use)
        return f"local-{os.getpid()}"


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def deployment(config: ReplicaConfig, replicas: int = 2, num_cpus: float = 0.5, num_gpus: float = 0.0,
               max_ongoing_requests: int = 256, health_check_period_s: float = 5.0) -> Any:
    """The bound Serve application: ``replicas`` copies of ``EngineReplica(config)``.

    ``num_gpus``: GPUs each replica reserves (its tensor-parallel size on GPU machines; Ray sets
    ``CUDA_VISIBLE_DEVICES`` for the replica and the engine server inherits it). ``num_cpus`` is
    only Ray's bookkeeping: the engine's own threads are vLLM's (``VLLM_CPU_OMP_THREADS_BIND``).
    ``max_ongoing_requests`` is high because one engine batches many requests per step.
    """
    from ray import serve

    if replicas < 1:
        raise ValueError(f"replicas: must be >= 1, got {replicas}")
    dep = serve.deployment(
        EngineReplica, name="vllm_dapd_engine", num_replicas=replicas, max_ongoing_requests=max_ongoing_requests,
        health_check_period_s=health_check_period_s, health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=45.0,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus})
    return dep.bind(config)


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run vllm_dapd.distributed.serve:app_builder model=M replicas=2 serve_args='--plugin dapd'``."""
    known = {"model", "replicas", "serve_args", "num_gpus", "num_cpus"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown argument (known: {', '.join(sorted(known))})")
    config = ReplicaConfig(model=args["model"], serve_args=tuple(shlex.split(args.get("serve_args", ""))))
    return deployment(config, replicas=int(args.get("replicas", 2)), num_cpus=float(args.get("num_cpus", 0.5)),
                      num_gpus=float(args.get("num_gpus", 0)))


def start_local_ray(**kwargs: Any) -> Any:
    """A local Ray cluster whose every server (GCS, raylet, object manager, agents, workers) listens
    on 127.0.0.1 only.

    ``ray.init(_node_ip_address="127.0.0.1")`` is not enough on Linux: Ray 2.60 replaces a loopback
    node address by the machine's reachable one (``services.resolve_ip_for_localhost``) and its
    servers then bind all interfaces. It keeps loopback where clusters are disabled
    (``get_node_ip_address``: ``ENABLE_RAY_CLUSTER`` false, env ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
    read by this process and inherited by every process Ray starts). Then the node address is
    127.0.0.1, and GCS/raylet/agents bind it alone.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # if ray was imported before the variable was set
    return ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)


def main(argv: list[str] | None = None) -> None:
    """``python -m vllm_dapd.distributed.serve MODEL [--replicas N] [--port P] [-- vllm-dapd serve options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, serve_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m vllm_dapd.distributed.serve", description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (= its tensor-parallel size)")
    p.add_argument("--num-cpus", type=float, default=0.5, help="Ray CPUs reserved per replica")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    if args.address is None:  # a local cluster on loopback, nothing exposed beyond this machine
        start_local_ray()
    else:
        ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = deployment(ReplicaConfig(model=args.model, serve_args=tuple(serve_args)), replicas=args.replicas,
                     num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    serve.run(app, name="vllm_dapd", route_prefix="/")
    print(f"vllm-dapd: {args.replicas} replicas of {args.model} at http://{args.host}:{args.port}/v1", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()

if __name__ == "__main__":
    main()
