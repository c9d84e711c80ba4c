"""How the endpoint picks an engine replica: a Ray Serve request router (imports Ray).

Ray Serve's default router (power of two choices on cached queue lengths) sent all of a burst to
one replica when the other's queue length was not cached yet, and it favours a replica whose
engine died: failing every request at once, it looks idle. This one leaves out replicas that
answered ``dead`` in the last ``SUSPECT_S`` seconds or report not ready (unless all do) and picks,
among the others, the one with the fewest requests this router has in flight there (ties rotate).
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

# Replica ids that answered "dead" recently, as seen by the Endpoint in this process (the router
# that serves its handle runs in the same process). After SUSPECT_S one request tries them again.
SUSPECT_S = 3.0
_suspects: dict[str, float] = {}


def suspect(replica: str) -> None:
    """Rank ``replica`` (a Serve replica id) last for the next ``SUSPECT_S`` seconds."""
    _suspects[replica] = time.monotonic()


class EngineRouter(RequestRouter):
    """No ``FIFOMixin``: with it, the replica chosen for one request may go to an older pending one
    (a retry could then get a replica chosen before the first try's replica answered ``dead``);
    without it each request gets the replica chosen for it."""

    def initialize_state(self, **kwargs: Any) -> None:
        # internal request id -> (replica id, the pending request's future): requests sent, or being
        # sent, to that replica by this router. Serve reports completion once per dispatched request;
        # a request whose routing was cancelled before dispatch is never reported and is dropped when
        # its future says so (a leaked entry would make its replica look busy for good).
        self._inflight: dict[str, tuple[str, Any]] = {}
        self._turn = 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """One replica, the least loaded (ties rotate). One only: with more ranks Serve would take
        the next one whenever a queue-length probe is slow (busy CPUs); with one it retries."""
        # The live module's record: Serve pickles a router class *by value*, so this class's own
        # globals are a copy made when the app was deployed, not what ``suspect()`` writes to.
        from vllm_dapd.distributed import routing

        suspects = routing._suspects
        now = time.monotonic()
        replicas = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        n = len(replicas)
        if n == 0:
            return []
        self._turn += 1

        def suspect_(r: RunningReplica) -> bool:
            recent = now - suspects.get(r.replica_id.unique_id, -1e9) < SUSPECT_S
            return recent or (r.routing_stats or {}).get("ready") is False

        counts = self._counts()

        def load(i: int) -> tuple[int, int]:
            return counts.get(replicas[i].replica_id.unique_id, 0), (i - self._turn) % n

        # Suspects are left out unless every replica is one (then a try costs a fast "dead" answer).
        live = [i for i in range(n) if not suspect_(replicas[i])] or list(range(n))
        best = replicas[min(live, key=load)]
        if pending_request is not None:  # counted at once, so concurrent routing tasks see it
            self._inflight[pending_request.metadata.internal_request_id] = (
                best.replica_id.unique_id, getattr(pending_request, "future", None))
        return [[best]]

    def _counts(self) -> dict[str, int]:
        """Replica id -> requests in flight there (entries of requests cancelled before dispatch dropped)."""
        for request in [r for r, (_, future) in self._inflight.items() if future is not None and future.cancelled()]:
            del self._inflight[request]
        counts: dict[str, int] = {}
        for replica, _ in self._inflight.values():
            counts[replica] = counts.get(replica, 0) + 1
        return counts

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """Moves a request still in flight to the replica it went to. Serve may report a short request's
        completion *before* this (the done callback and the routing acknowledgement race on its event
        loop): a request no longer in flight is not counted again."""
        request = pending_request.metadata.internal_request_id
        if request in self._inflight:
            self._inflight[request] = (replica_id.unique_id, self._inflight[request][1])

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._inflight.pop(internal_request_id, None)
