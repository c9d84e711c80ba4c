"""Fast checks of the replica app (no cluster, no engine): configuration, the endpoint's failover
with a fake engine deployment, the router's ranking."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from vllm_dapd.distributed import routing  # noqa: E402
from vllm_dapd.distributed.serve import (  # noqa: E402
    MAX_TRIES, REPLICA_HEADER, RETRIED_HEADER, Endpoint, ReplicaConfig, app_builder, deployment)


@pytest.mark.parametrize("kwargs,field", [
    ({"model": ""}, "model"),
    ({"model": "m", "serve_args": ("--port", "1")}, "serve_args"),
    ({"model": "m", "serve_args": ("--host", "0.0.0.0")}, "serve_args"),
    ({"model": "m", "startup_timeout_s": 0}, "startup_timeout_s"),
    ({"model": "m", "request_timeout_s": -1}, "request_timeout_s"),
])
def test_replica_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        ReplicaConfig(**kwargs)


def test_app_builder_parses_serve_run_arguments():
    app = app_builder({"model": "/m", "replicas": "3", "num_gpus": "2", "serve_args": "--plugin dapd -tp 2"})
    endpoint = app._bound_deployment
    assert endpoint.num_replicas == 1
    engines = endpoint.init_args[0]._bound_deployment
    assert engines.num_replicas == 3
    assert engines.ray_actor_options["num_gpus"] == 2.0
    assert engines.init_args[0].serve_args == ("--plugin", "dapd", "-tp", "2")
    assert engines._deployment_config.request_router_config.request_router_class.endswith("EngineRouter")
    with pytest.raises(ValueError, match="^replica:"):
        app_builder({"model": "/m", "replica": "2"})
    with pytest.raises(ValueError, match="^replicas"):
        deployment(ReplicaConfig(model="/m"), replicas=0)


class FakeStream:
    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


class FakeEngines:
    """A DeploymentHandle stand-in: ``remote`` returns the next scripted answer."""

    def __init__(self, answers):
        self.answers, self.payloads, self.streams = list(answers), [], []

    def options(self, **kwargs):
        assert kwargs == {"method_name": "relay", "stream": True}
        return self

    def remote(self, payload):
        self.payloads.append(payload)
        self.streams.append(FakeStream(self.answers.pop(0)))
        return self.streams[-1]


class FakeRequest:
    method = "POST"
    url = SimpleNamespace(path="/v1/completions", query="")
    headers = {"content-type": "application/json", "host": "x"}

    async def body(self):
        return b'{"prompt": [1], "seed": 3}'


def dead(replica):
    return {"dead": True, "replica": replica, "message": f"vllm-dapd replica {replica}: engine server died"}


def ok(replica, body=None):
    head = {"status": 200, "replica": replica, "headers": [("content-type", "application/json"),
                                                           (REPLICA_HEADER, replica)]}
    return {**head, "body": body} if body is not None else head


async def drain(response):
    return b"".join([chunk async for chunk in response.body_iterator])


def test_endpoint_retries_a_dead_answer_once_on_another_replica_with_the_same_body():
    routing._suspects.clear()
    engines = FakeEngines([[dead("a")], [ok("b", b'{"x": 1}')]])
    response = asyncio.run(Endpoint(engines)(FakeRequest()))
    assert response.status_code == 200 and response.body == b'{"x": 1}'
    assert response.headers[REPLICA_HEADER] == "b" and response.headers[RETRIED_HEADER] == "a"
    assert engines.payloads[0] == engines.payloads[1] and engines.payloads[0]["body"] == b'{"prompt": [1], "seed": 3}'
    assert "host" not in dict(engines.payloads[0]["headers"])
    assert engines.streams[0].cancelled and "a" in routing._suspects


def test_endpoint_tries_again_when_the_retry_met_the_same_dead_replica():
    engines = FakeEngines([[dead("a")], [dead("a")], [ok("b", b"{}")]])
    response = asyncio.run(Endpoint(engines)(FakeRequest()))
    assert response.status_code == 200 and response.headers[RETRIED_HEADER] == "a" and len(engines.payloads) == 3
    engines = FakeEngines([[dead("a")]] * 5)
    response = asyncio.run(Endpoint(engines)(FakeRequest()))
    assert response.status_code == 503 and len(engines.payloads) == MAX_TRIES


def test_endpoint_retries_a_replica_process_that_died_before_answering():
    engines = FakeEngines([[RuntimeError("ActorDiedError")], [ok("b", b"{}")]])
    response = asyncio.run(Endpoint(engines)(FakeRequest()))
    assert response.status_code == 200 and response.headers[RETRIED_HEADER] == "replica-process-died"


def test_endpoint_gives_a_503_naming_both_replicas_when_the_retry_fails_too():
    engines = FakeEngines([[dead("a")], [dead("b")], [ok("c", b"{}")]])
    response = asyncio.run(Endpoint(engines)(FakeRequest()))
    assert response.status_code == 503 and len(engines.payloads) == 2
    message = response.body.decode()
    assert "replica a" in message and "replica b" in message and "retry" in message


def test_endpoint_ends_a_stream_whose_replica_died_with_an_error_event():
    engines = FakeEngines([[ok("a"), b"data: 1\n\n", RuntimeError("ActorDiedError")]])
    response = asyncio.run(Endpoint(engines)(FakeRequest()))
    body = asyncio.run(drain(response)).decode()
    events = [e for e in body.split("\n\n") if e]
    assert events[0] == "data: 1" and '"code": 503' in events[1] and "replica a" in events[1]
    assert RETRIED_HEADER not in response.headers


def replica(name, ready=None):
    stats = {} if ready is None else {"ready": ready}
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=name), routing_stats=stats)


def make_router():
    router = object.__new__(routing.EngineRouter)  # choosing needs no Serve state
    router.initialize_state()
    return router


def pending(request_id, future=None):
    return SimpleNamespace(metadata=SimpleNamespace(internal_request_id=request_id), future=future)


def choose(router, replicas, request_id=None, future=None):
    ranks = asyncio.run(router.choose_replicas(replicas, pending(request_id, future) if request_id else None))
    assert len(ranks) == 1 and len(ranks[0]) == 1
    return ranks[0][0].replica_id.unique_id


def test_router_alternates_between_idle_replicas_and_prefers_the_less_loaded():
    routing._suspects.clear()
    router, replicas = make_router(), [replica("a"), replica("b")]
    firsts = [choose(router, replicas) for _ in range(10)]  # nothing counted: ties rotate
    assert firsts.count("a") == 5 and firsts.count("b") == 5
    burst = [choose(router, replicas, f"r{i}") for i in range(50)]  # each counted when chosen
    assert burst.count("a") == 25
    for i in range(50):
        if burst[i] == "b":
            router.on_request_completed(replicas[1].replica_id, f"r{i}")
    assert all(choose(router, replicas) == "b" for _ in range(4))
    # A request chosen for "b" but routed to "a" counts on "a" only.
    assert choose(router, replicas, "x") == "b"
    router.on_request_routed(pending("x"), replicas[0].replica_id, None)
    assert router._counts() == {"a": 26}


class FakeFuture:
    def __init__(self):
        self.was_cancelled = False

    def cancelled(self):
        return self.was_cancelled


def test_router_counts_never_leak_a_finished_or_cancelled_request():
    """Serve may report a short request's completion before the routing acknowledgement (both are
    scheduled on its event loop); a request whose routing was cancelled is never reported. Either
    once left a phantom request on a replica for good: with two phantoms on "b", pairs of requests
    all went to "a" (a CI run saw one replica serve nothing for 180 s)."""
    routing._suspects.clear()
    router, replicas = make_router(), [replica("a"), replica("b")]
    for i in range(2):
        chosen = choose(router, replicas, f"fast{i}")
        router.on_request_completed(SimpleNamespace(unique_id=chosen), f"fast{i}")  # completion first
        router.on_request_routed(pending(f"fast{i}"), SimpleNamespace(unique_id=chosen), None)
    future = FakeFuture()
    choose(router, replicas, "gone", future)
    assert sum(router._counts().values()) == 1
    future.was_cancelled = True  # the client went away while the request was being routed
    assert router._counts() == {}
    pairs = [(choose(router, replicas, f"p{i}"), choose(router, replicas, f"q{i}")) for i in range(3)]
    assert all(set(pair) == {"a", "b"} for pair in pairs), pairs  # two requests in flight: one each


def test_router_leaves_out_a_replica_that_answered_dead_or_is_not_ready():
    routing._suspects.clear()
    router = make_router()
    routing.suspect("a")
    assert all(choose(router, [replica("a"), replica("b")]) == "b" for _ in range(4))
    assert all(choose(router, [replica("c", ready=False), replica("d", ready=True)]) == "d" for _ in range(4))
    assert {choose(router, [replica("a"), replica("c", ready=False)]) for _ in range(4)} == {"a", "c"}  # all suspect
    routing._suspects["a"] = time.monotonic() - routing.SUSPECT_S - 1  # suspicion expires: tried again
    assert {choose(router, [replica("a"), replica("b")]) for _ in range(4)} == {"a", "b"}


SHIPPED_CHECK = """
import asyncio, pickle, sys
from types import SimpleNamespace
shipped = pickle.loads(open(sys.argv[1], "rb").read())  # as a Serve handle loads it: another process
from vllm_dapd.distributed import routing
assert shipped is not routing.EngineRouter
routing.suspect("a")  # what the Endpoint does on a "dead" answer
router = object.__new__(shipped)
router.initialize_state()
replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=n), routing_stats={}) for n in "ab"]
chosen = {asyncio.run(router.choose_replicas(replicas))[0][0].replica_id.unique_id for _ in range(4)}
print(sorted(chosen))
"""


def test_router_as_serve_ships_it_sees_the_endpoints_marks(tmp_path):
    """Serve pickles a router class by value (with a copy of its module's globals) and loads it in
    the handle's process: that copy must still read the record ``routing.suspect`` writes."""
    import subprocess
    import sys

    from ray.serve.config import RequestRouterConfig

    config = RequestRouterConfig(request_router_class=routing.EngineRouter)
    (tmp_path / "router.pkl").write_bytes(config.get_serialized_request_router_cls())
    out = subprocess.run([sys.executable, "-c", SHIPPED_CHECK, str(tmp_path / "router.pkl")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['b']"
