"""Which processes serve each replica: the engine servers' log names and the /proc tree under them.

A replica runs its engine as ``vllm-dapd serve`` on a loopback port and logs it to
``vllm-dapd-replica-{replica}-{port}.log``; the port ties a live server process to its replica. Fault
tests and ``benchmarks/replica_kill.py`` use these to find (and kill or freeze) one replica's engine.
Linux only (reads /proc).
"""

from __future__ import annotations

import os
from pathlib import Path

LOG_PREFIX = "vllm-dapd-replica-"


def log_name(replica: str, port: int) -> str:
    return f"{LOG_PREFIX}{replica}-{port}.log"


def engine_servers(log_dir: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Replica name -> (pid, port) of its live engine server."""
    ports = {}
    for path in Path(log_dir).glob(f"{LOG_PREFIX}*.log"):
        replica, port = path.stem[len(LOG_PREFIX):].rsplit("-", 1)
        ports[port] = replica
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if "--server" in argv and "--port" in argv:
                port = argv[argv.index("--port") + 1]
                if port in ports:
                    found[ports[port]] = (int(entry), int(port))
    return found


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first, then theirs)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out
