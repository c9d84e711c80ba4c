"""Engine replicas behind one OpenAI endpoint: a Ray Serve deployment around ``vllm-dapd serve``.

Why this shape (see docs/DISTRIBUTED.md for the alternatives we measured):
- vLLM's data parallelism with the Ray backend and Ray Serve LLM both place engines through Ray
  placement groups on *accelerators*; vLLM 0.32's CPU platform has no Ray device key
  (``ray_device_key = ""``), and Ray 2.60's ``ray[llm]`` pins vLLM 0.29. So each replica here runs
  the stock OpenAI server (``vllm-dapd serve MODEL ...``, our plugin loaded by vLLM's entry point)
  as a child process on a free loopback port, and forwards HTTP to it byte for byte. Everything the
  single-engine server does (``vllm_xargs`` per-request decoding settings, 400s naming the key,
  streaming as the committed prefix grows, ``n``, seeds, aborts) therefore holds through the endpoint.
- Ray Serve owns what a fleet needs: one HTTP endpoint (its proxy, then our ``Endpoint``
  deployment), routing among replicas (through our load-aware ``routing.EngineRouter``), health
  checks (``check_health`` asks the engine's ``/health``), replacing an unhealthy replica, and
  placement across nodes (``num_gpus`` per replica = its TP size; TP inside a replica is vLLM's
  ``mp`` executor on that node's GPUs).
- Faults (docs/DISTRIBUTED.md, "Faults"): a request whose engine dies before any byte of its
  answer existed (every non-streamed request: its body is read whole before it is sent on; a
  stream before its first event) is retried once on another replica by the ``Endpoint``, with the
  same body, so the same settings and seed. A stream already under way ends with an SSE ``error``
  event naming the replica. The dead replica answers ``dead`` at once while it restarts its engine
  in place, and the router (``routing.EngineRouter``) ranks it last. Every wait has a timeout.

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
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from vllm_dapd.distributed.processes import log_name

REPLICA_HEADER = "x-vllm-dapd-replica"  # the replica that answered
MAX_TRIES = 4  # sends of one request by the Endpoint (see Endpoint.__call__)
RETRIED_HEADER = "x-vllm-dapd-retried"  # on an answer that failed over: the replica that failed first
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


@dataclass
class _Engine:
    """One engine server started by a replica: its supervisor process and an HTTP client for it."""

    proc: subprocess.Popen
    base: str  # http://127.0.0.1:port
    client: Any  # httpx.AsyncClient on ``base``
    log_path: str

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def kill(self) -> None:
        """SIGKILL its process group (the supervisor leads it: ``start_new_session``)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    async def alive(self) -> bool:
        """Whether the server runs and its engine answers ``/health`` on a new connection (a server
        whose engine died stops listening; a slow answer counts as alive: an engine is never
        restarted for being busy)."""
        import httpx

        if self.exited():
            return False
        try:
            async with httpx.AsyncClient(timeout=10.0) as fresh:
                r = await fresh.get(self.base + "/health")
        except httpx.TimeoutException:
            return not self.exited()
        except httpx.HTTPError:
            return False
        return r.status_code == 200


class EngineReplica:
    """One engine server per replica, started in ``__init__`` and restarted in place when it dies.

    ``relay`` forwards one HTTP request to the engine server and streams the answer back as a
    head (a dict) followed by body chunks. A request that the engine could not answer before any
    byte of the answer existed gets the head ``{"dead": ...}`` instead, and the ``Endpoint`` retries
    it on another replica. Plain class; ``deployment()`` wraps it with ``serve.deployment``, so it is
    importable and unit-testable without a Serve controller.
    """

    def __init__(self, config: ReplicaConfig):
        self.config = config
        self.name = _replica_name()
        self.restarts = 0  # engine servers started after the first one
        self._stopping = False
        self._failure: str | None = None  # why the last restart failed (the replica is then unhealthy)
        self._starting: subprocess.Popen | None = None  # the server being started, for stop()
        self.engine: _Engine | None = self._start_engine()  # None while a new one starts
        threading.Thread(target=self._supervise, name="engine-supervisor", daemon=True).start()

    @property
    def ready(self) -> bool:
        return self.engine is not None

    # --- the engine server's life -------------------------------------------------------------

    def _start_engine(self) -> _Engine:
        """Start ``vllm-dapd serve`` on a free loopback port and wait until it answers ``/health``."""
        import httpx

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log_path = os.path.join(self.config.log_dir or tempfile.gettempdir(),
                                log_name(self.name, port))
        cmd = [sys.executable, "-m", "vllm_dapd.distributed.child", str(os.getpid()), "serve", self.config.model,
               "--host", "127.0.0.1", "--port", str(port), *self.config.serve_args]
        with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **self.config.env}, start_new_session=True)
        self._starting = proc
        timeout = httpx.Timeout(self.config.request_timeout_s, connect=10.0)
        engine = _Engine(proc, base, httpx.AsyncClient(base_url=base, timeout=timeout, limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=64)), log_path)
        try:
            self._wait_ready(proc, base, log_path)
        except BaseException:
            engine.kill()
            raise
        finally:
            self._starting = None
        return engine

    def _wait_ready(self, proc: subprocess.Popen, base: str, log_path: str) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                raise RuntimeError(f"replica {self.name}: engine server exited with code {code} during start-up; "
                                   f"log: {log_path}\n{_tail(log_path)}")
            if self._stopping:
                raise RuntimeError(f"replica {self.name}: stopped during engine start-up")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replica {self.name}: engine server not healthy after "
                                       f"{self.config.startup_timeout_s:.0f} s; log: {log_path}")
                time.sleep(0.5)

    def _supervise(self) -> None:
        """Thread: wait for the engine server to exit; unless the replica is stopping, start a new one
        at once (requests get a ``dead`` head meanwhile, so the endpoint sends them elsewhere). A
        failed restart leaves the replica unhealthy and Serve replaces it."""
        while True:
            engine = self.engine
            code = engine.proc.wait()
            self.engine = None
            if self._stopping:
                return
            print(f"vllm-dapd replica {self.name}: engine server exited with code {code}; restarting it",
                  file=sys.stderr, flush=True)
            try:
                self.engine = self._start_engine()
            except BaseException as exc:  # noqa: BLE001 - reported by check_health
                self._failure = f"{type(exc).__name__}: {exc}"
                return
            self.restarts += 1

    # --- requests -------------------------------------------------------------------------------

    def _dead_head(self, reason: str, engine: _Engine | None = None) -> dict[str, Any]:
        code = engine.proc.poll() if engine is not None else None
        state = ("is restarting" if engine is None else
                 f"exited with code {code}" if code is not None else "stopped answering")
        return {"dead": True, "replica": self.name,
                "message": f"vllm-dapd replica {self.name}: engine server {state} before answering ({reason})"}

    async def _dead(self, engine: _Engine, reason: str) -> dict[str, Any] | None:
        """``None`` if ``engine`` is alive; else end it (the supervisor thread starts a new one) and
        return the ``dead`` head."""
        if await engine.alive():
            return None
        engine.kill()
        return self._dead_head(reason, engine)

    async def relay(self, request: dict[str, Any]) -> AsyncIterator[Any]:
        """Forward ``request`` (method, path, query, headers, body) to the engine server.

        Yields a head, then body chunks. The head is ``{"dead": True, ...}`` when the engine died
        (or is restarting) before any byte of the answer existed; else ``{"status", "headers",
        "replica"}`` plus, for a non-streamed answer, the whole ``"body"`` (read before the head is
        sent, so a non-streamed request can always be retried). A stream's head waits for its first
        event; if the engine dies after it, the stream ends with an SSE ``error`` event naming the
        replica (code 503).
        """
        import httpx

        engine = self.engine
        if engine is None:
            yield self._dead_head("restarting")
            return
        upstream = engine.client.build_request(request["method"], request["path"], params=request["query"],
                                               headers=request["headers"], content=request["body"])
        try:
            response = await engine.client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            yield await self._failed_before_answer(engine, exc)
            return
        try:
            headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _SKIP_HEADERS]
            headers.append((REPLICA_HEADER, self.name))
            head = {"status": response.status_code, "headers": headers, "replica": self.name}
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                try:
                    body = await response.aread()
                except httpx.HTTPError as exc:
                    yield await self._failed_before_answer(engine, exc)
                    return
                # vLLM answers 500 to the requests in flight when its engine dies
                dead = response.status_code >= 500 and await self._dead(engine, f"HTTP {response.status_code}")
                yield dead or {**head, "body": body}
                return
            events = _sse_events(response.aiter_raw())
            try:
                first = await anext(events, b"")
            except httpx.HTTPError as exc:
                yield await self._failed_before_answer(engine, exc)
                return
            dead = _is_error_event(first) and await self._dead(engine, "an error event before the first token")
            if dead:
                yield dead
                return
            yield head
            yield first
            try:
                async for event in events:
                    if _is_error_event(event) and not await engine.alive():
                        raise httpx.RemoteProtocolError("the engine reported an error and stopped answering")
                    yield event
            except httpx.HTTPError as exc:  # the engine died mid-stream: say so, then end the stream
                await self._dead(engine, "mid-stream")
                message = (f"vllm-dapd replica {self.name}: engine server stopped during the request "
                           f"({type(exc).__name__}: {exc}); the stream was not completed, retry it")
                yield sse_error(message)
        finally:
            await response.aclose()

    async def _failed_before_answer(self, engine: _Engine, exc: Exception) -> dict[str, Any]:
        dead = await self._dead(engine, f"{type(exc).__name__}: {exc}")
        if dead:
            return dead
        # The engine is up but this request failed (e.g. it timed out): not a fault to fail over.
        message = (f"vllm-dapd replica {self.name}: the engine server did not answer the request "
                   f"({type(exc).__name__}: {exc})")
        return {"status": 503, "replica": self.name, "headers": [("content-type", "application/json"),
                                                                 (REPLICA_HEADER, self.name)],
                "body": json.dumps(_error(503, message, "ServiceUnavailableError")).encode()}

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it.

        A replica whose engine is being restarted in place is healthy (it answers ``dead`` to
        requests meanwhile); one whose restart failed is not."""
        if self._failure is not None:
            raise RuntimeError(f"replica {self.name}: engine server restart failed: {self._failure}")
        engine = self.engine
        if engine is None or engine.exited():
            return  # being restarted
        r = await engine.client.get("/health", timeout=10.0)
        if r.status_code != 200:
            raise RuntimeError(f"replica {self.name}: engine /health returned {r.status_code}")

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve polls this (``request_routing_stats_period_s``); the router leaves out replicas that
        are not ready."""
        return {"ready": self.ready, "restarts": self.restarts}

    def stop(self, grace_s: float = 40.0) -> None:
        """SIGTERM the supervisor (``child.py``: it stops the server and its engine processes);
        SIGKILL the whole process group if that takes longer than ``grace_s``."""
        self._stopping = True
        engine = getattr(self, "engine", None)
        starting = getattr(self, "_starting", None)
        for proc in [p for p in (engine.proc if engine else None, starting) if p is not None]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(10)

    def __del__(self) -> None:  # Serve calls it on graceful replica shutdown
        self.stop()


def sse_error(message: str, status: int = 503) -> bytes:
    return f"data: {json.dumps(_error(status, message, 'ServiceUnavailableError'))}\n\n".encode()


def _is_error_event(event: bytes) -> bool:
    return event.lstrip().startswith(b'data: {"error"')


async def _sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Regroup a byte stream into whole SSE events (each ending with a blank line)."""
    buf = b""
    async for chunk in chunks:
        buf += chunk
        *events, buf = buf.split(b"\n\n")
        for event in events:
            yield event + b"\n\n"
    if buf:
        yield buf


class Endpoint:
    """The HTTP ingress: sends each request to an engine replica (``EngineReplica.relay``) and
    retries it once on another replica when the first one answers ``dead`` (its engine died or is
    restarting before any byte of the answer existed) or its replica process died before answering."""

    def __init__(self, engines: Any):
        self.engines = engines.options(method_name="relay", stream=True)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, Response, StreamingResponse

        from vllm_dapd.distributed.routing import suspect

        payload = {"method": request.method, "path": request.url.path, "query": str(request.url.query),
                   "headers": [(k, v) for k, v in request.headers.items() if k.lower() not in _SKIP_HEADERS],
                   "body": await request.body()}
        failures, failed = [], []  # messages; replica ids (for the RETRIED_HEADER)
        # The first try and a retry on another replica; a "dead" answer runs nothing, so one more
        # try is allowed while only one replica has answered "dead" (a retry routed while the
        # router did not know yet).
        while len(failures) < MAX_TRIES and len(set(failed)) < 2:
            stream = self.engines.remote(payload)
            try:
                head = await anext(stream)
            except Exception as exc:  # noqa: BLE001 - the replica process died before answering
                failures.append(f"a replica process died before answering ({type(exc).__name__})")
                failed.append("replica-process-died")
                continue
            if head.get("dead"):
                suspect(head["replica"])
                failures.append(head["message"])
                failed.append(head["replica"])
                stream.cancel()
                continue
            headers = dict(head["headers"])
            if failed:
                headers[RETRIED_HEADER] = failed[0]
            if "body" in head:
                return Response(head["body"], status_code=head["status"], headers=headers)
            return StreamingResponse(_rest(stream, head["replica"]), status_code=head["status"], headers=headers)
        message = "no replica could answer: " + "; ".join(failures) + "; retry the request"
        return JSONResponse(_error(503, message, "ServiceUnavailableError"), status_code=503)


async def _rest(stream: Any, replica: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    except Exception as exc:  # noqa: BLE001 - the replica process died mid-stream
        yield sse_error(f"vllm-dapd replica {replica}: the replica process died during the request "
                        f"({type(exc).__name__}); the stream was not completed, retry it")
    finally:
        stream.cancel()


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
    """The bound Serve application: an ``Endpoint`` (the HTTP ingress, one small replica) in front of
    ``replicas`` copies of ``EngineReplica(config)``, routed by ``routing.EngineRouter``.

    ``num_gpus``: GPUs each engine replica reserves (its tensor-parallel size on GPU machines; Ray
    sets ``CUDA_VISIBLE_DEVICES`` for the replica and the engine server inherits it). ``num_cpus`` is
    only Ray's bookkeeping: the engine's own threads are vLLM's (``VLLM_CPU_OMP_THREADS_BIND``).
    ``max_ongoing_requests`` is high because one engine batches many requests per step.
    """
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from vllm_dapd.distributed.routing import EngineRouter

    if replicas < 1:
        raise ValueError(f"replicas: must be >= 1, got {replicas}")
    engines = serve.deployment(
        EngineReplica, name="vllm_dapd_engine", num_replicas=replicas, max_ongoing_requests=max_ongoing_requests,
        health_check_period_s=health_check_period_s, health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=45.0,
        request_router_config=RequestRouterConfig(request_router_class=EngineRouter,
                                                  request_routing_stats_period_s=2.0),
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus})
    endpoint = serve.deployment(Endpoint, name="vllm_dapd_endpoint", num_replicas=1,
                                max_ongoing_requests=max_ongoing_requests * replicas,
                                ray_actor_options={"num_cpus": 0})
    return endpoint.bind(engines.bind(config))


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
    p.add_argument("--log-dir", default=None, help="where each replica writes its engine server's log "
                                                   "(default: the system temp dir)")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    if args.address is None:  # a local cluster on loopback, nothing exposed beyond this machine
        start_local_ray()
    else:
        ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    config = ReplicaConfig(model=args.model, serve_args=tuple(serve_args), log_dir=args.log_dir)
    app = deployment(config, replicas=args.replicas,
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
