"""The launcher's local Ray cluster listens on loopback only (docs/DISTRIBUTED.md promises it)."""

from __future__ import annotations

import ipaddress

import pytest

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")


def test_every_ray_server_listens_on_loopback_only():
    from vllm_dapd.distributed.serve import start_local_ray

    if ray.is_initialized():
        pytest.skip("a Ray cluster is already connected in this process")
    start_local_ray(num_cpus=1)
    try:
        # A worker process too, so a worker's own gRPC server is among the sockets checked.
        assert ray.get(ray.remote(lambda: 1).remote()) == 1
        listening = []
        for proc in [psutil.Process()] + psutil.Process().children(recursive=True):
            try:
                conns = proc.net_connections(kind="inet")
            except psutil.Error:
                continue
            listening += [(proc.name(), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
        names = {name for name, _, _ in listening}
        assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), listening
        exposed = [(n, ip, port) for n, ip, port in listening
                   if not ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback]
        assert not exposed, f"listening beyond loopback: {exposed}"
    finally:
        ray.shutdown()
