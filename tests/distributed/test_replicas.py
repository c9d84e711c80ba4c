"""Two engine replicas behind one OpenAI endpoint (Ray Serve, ``vllm_dapd.distributed.serve``).

One local Ray cluster (loopback, 2 CPUs, no dashboard) and one Serve app for the module; the
replicas are real ``vllm-dapd serve`` engines on a tiny LLaDA. Covers: 50 concurrent requests with
per-request decoding settings (``vllm_xargs``) spread over both replicas, each equal token for token
to the reference loop; a 400 from the plugin's validator through the endpoint; a replica killed
mid-stream ends that stream promptly while the other keeps serving; no engine process outlives
the cluster.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import signal
import time
import uuid

import pytest
import torch

from vllm_dapd.decoding import denoise
from vllm_dapd.models.loading import load_model
from vllm_dapd.models.tiny import make_tiny_llada

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from vllm_dapd.distributed.serve import REPLICA_HEADER, ReplicaConfig, deployment, free_port, start_local_ray  # noqa: E402

APP = "vllm_dapd_test"
BLOCK = 8
TIMEOUT = httpx.Timeout(120.0, connect=10.0)


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries ``VLLM_DAPD_TEST_TAG=tag`` (supervisor, server, engine)."""
    needle = f"VLLM_DAPD_TEST_TAG={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    model = make_tiny_llada(str(root / "llada"))
    tag = uuid.uuid4().hex
    start_local_ray(address="local", num_cpus=2, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
        config = ReplicaConfig(
            model=model, log_dir=str(root), startup_timeout_s=300,
            serve_args=("--max-model-len", "2048", "--dtype", "float32", "--max-num-seqs", "32",
                        "--additional-config", json.dumps({"dapd": {"block_length": BLOCK}})),
            env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_DAPD_TEST_TAG": tag})
        serve.run(deployment(config, replicas=2, num_cpus=0.5, health_check_period_s=2), name=APP, route_prefix="/")
        yield {"base": f"http://127.0.0.1:{port}", "model": model, "root": root}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            deadline = time.time() + 60
            while tagged_pids(tag) and time.time() < deadline:
                time.sleep(1)
            left = tagged_pids(tag)
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert not left, f"engine processes outlived the cluster: {left}"


def reference(model, prompt: list[int], n: int, extra: dict) -> list[int]:
    block = extra.get("block_length", BLOCK)
    gen = -(-n // block) * block
    out = denoise(model, torch.tensor([prompt]), gen_length=gen, block_length=block,
                  steps=extra.get("steps", block) * (gen // block), policy=extra.get("policy", "low_confidence"))
    return out.tokens[0].tolist()[:n]


def complete(base: str, model: str, prompt: list[int], n: int, extra: dict) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "vllm_xargs": extra}
    return httpx.post(base + "/v1/completions", json=body, timeout=TIMEOUT)


def test_two_replicas_serve_50_concurrent_requests_with_per_request_settings(endpoint):
    base, model = endpoint["base"], endpoint["model"]
    settings = [{"policy": "low_confidence", "steps": 4}, {"policy": "dapd", "steps": 4},
                {"policy": "threshold", "steps": 2, "block_length": 4}, {"policy": "dawn", "steps": 8}, {}]
    # 10 distinct requests, each sent 5 times: every copy, whichever replica serves it, must equal
    # the reference loop (10 reference runs keep the test short).
    distinct = [([3 + i, 7, 11 + i, 5], 8 + (i % 3) * 4, settings[i % len(settings)]) for i in range(10)]
    cases = [distinct[i % 10] for i in range(50)]
    with cf.ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(lambda c: complete(base, model, *c), cases))
    assert [r.status_code for r in responses] == [200] * 50, [r.text[:300] for r in responses if r.status_code != 200]
    assert len({r.headers[REPLICA_HEADER] for r in responses}) == 2, "both replicas should have served"
    plain = load_model(model)
    expected = [reference(plain, *case) for case in distinct]
    for i, r in enumerate(responses):
        assert r.json()["choices"][0]["token_ids"] == expected[i % 10], cases[i]


def test_invalid_per_request_setting_is_a_400_through_the_endpoint(endpoint):
    r = complete(endpoint["base"], endpoint["model"], [1, 2, 3], 4, {"policy": "nope"})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("policy")


def engine_server_pids(root) -> dict[str, int]:
    """Replica name -> its live ``vllm-dapd serve`` process (each replica's log file name carries its port)."""
    ports = {}
    for log in root.iterdir():
        if log.name.startswith("vllm-dapd-replica-") and log.suffix == ".log":
            replica, port = log.stem[len("vllm-dapd-replica-"):].rsplit("-", 1)
            ports[port.encode()] = replica
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"--server" in argv:
                found.update({ports[a]: int(entry) for a in argv if a in ports})
    return found


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def engines_frozen(root):
    """SIGSTOP every process under each replica's engine server (vLLM's EngineCore): the servers still
    accept requests and send their headers, but no token is computed until the block exits (SIGCONT).
    A stream can then never complete before the test breaks its replica, however fast the machine (CI
    saw a 1920-token stream finish before a kill that landed right after the headers)."""
    frozen = [p for server in engine_server_pids(root).values() for p in descendants(server)]
    assert frozen, "no engine processes to freeze"
    signal_all(frozen, signal.SIGSTOP)
    try:
        yield
    finally:
        signal_all(frozen, signal.SIGCONT)


LONG_TOKENS = 1920


def test_killed_replica_ends_its_stream_and_the_other_keeps_serving(endpoint):
    """Both replicas' engines are frozen while the stream is opened and its replica killed."""
    base, model = endpoint["base"], endpoint["model"]
    body = {"model": model, "prompt": [5, 6, 7], "max_tokens": LONG_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "vllm_xargs": {"block_length": 4, "steps": 4}}
    chunks, done = 0, False
    start = time.time()
    with engines_frozen(endpoint["root"]):
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=httpx.Timeout(60.0)) as r:
            assert r.status_code == 200
            victim = r.headers[REPLICA_HEADER]
            names = [a for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"]]
            assert len(names) == 1, names
            ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]))
            try:
                for line in r.iter_lines():
                    if line.strip() == "data: [DONE]":
                        done = True
                    elif line.startswith("data:"):
                        chunks += 1
            except httpx.HTTPError:  # the proxy cuts the chunked body when the replica dies
                pass
    assert not done and chunks < LONG_TOKENS // 4, "the stream should not complete after its replica was killed"
    assert time.time() - start < 60, "the broken stream must end promptly"
    # The surviving replica answers everything from now on (Serve drops the dead one at once).
    with cf.ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda i: complete(base, model, [9, i + 1, 4], 8, {"steps": 2}), range(20)))
    assert [r.status_code for r in responses] == [200] * 20, [r.text[:300] for r in responses]
    assert victim not in {r.headers[REPLICA_HEADER] for r in responses}


def test_engine_crash_under_a_live_replica_ends_the_stream_with_an_error_event(endpoint):
    """Runs last: whichever replica serves the stream loses its engine server (SIGKILL) while every
    engine is frozen, so the stream cannot have completed first."""
    base, model = endpoint["base"], endpoint["model"]
    body = {"model": model, "prompt": [5, 6, 7], "max_tokens": LONG_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "vllm_xargs": {"block_length": 4, "steps": 4}}
    with engines_frozen(endpoint["root"]):
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=httpx.Timeout(60.0)) as r:
            assert r.status_code == 200
            replica = r.headers[REPLICA_HEADER]
            server = engine_server_pids(endpoint["root"])[replica]
            engine = descendants(server)
            os.kill(server, signal.SIGKILL)
            signal_all(engine, signal.SIGKILL)  # frozen and orphaned: nothing else would end them
            events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert events and "[DONE]" not in events[-1]
    error = json.loads(events[-1][len("data:"):])["error"]
    assert error["code"] == 503 and f"replica {replica}" in error["message"] and "retry" in error["message"]
