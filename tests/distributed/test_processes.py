"""``vllm_dapd.distributed.processes``: a replica's engine server is found by the port in its log name,
and the processes under it by the /proc tree (what the fault tests freeze and kill)."""

from __future__ import annotations

import subprocess
import sys
import time

from vllm_dapd.distributed.processes import descendants, engine_servers, log_name


def test_engine_server_found_by_its_log_port_and_its_children_by_the_proc_tree(tmp_path):
    # A stand-in "server": its argv carries --server and --port like ``vllm serve`` run by a replica;
    # it starts one child, which starts another.
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "\"import subprocess, sys, time; subprocess.Popen(['sleep', '30']); time.sleep(30)\"]); time.sleep(30)")
    server = subprocess.Popen([sys.executable, "-c", code, "--server", "--port", "40123"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "--server", "--port", "40999"])
    try:
        (tmp_path / log_name("abc", 40123)).write_text("")
        (tmp_path / log_name("gone", 40124)).write_text("")  # an earlier engine of a restarted replica
        deadline = time.time() + 20
        while len(descendants(server.pid)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert engine_servers(tmp_path) == {"abc": (server.pid, 40123)}
        below = descendants(server.pid)
        assert len(below) == 2 and other.pid not in below and server.pid not in below
    finally:
        for p in [*descendants(server.pid), server.pid, other.pid]:
            subprocess.run(["kill", "-9", str(p)], check=False)
        server.wait()
        other.wait()
