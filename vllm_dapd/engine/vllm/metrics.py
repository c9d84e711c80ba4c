"""Prometheus metrics for diffusion decoding: entry point ``vllm.stat_logger_plugins: dapd``.

vLLM (``vllm/v1/metrics/loggers.py``) builds one instance in the API-server process and calls
``record`` after every engine step with that step's ``SchedulerStats``. ``DiffusionScheduler``
puts its cost in ``spec_decoding_stats``: ``num_drafts`` = per-request forwards (each request in a
batched forward counts once, so the sum of per-request NFE), ``num_accepted_tokens`` = committed
tokens. Exposed on ``/metrics`` (labels ``model_name``, ``engine`` as vLLM's own):

- ``vllm_dapd:forwards_total``: per-request denoising forwards (NFE summed over requests)
- ``vllm_dapd:committed_tokens_total``: tokens committed (unmasked) by those forwards
- ``vllm_dapd:committed_tokens_per_forward``: histogram, one observation per engine step of that
  step's committed tokens / per-request forwards

Committed/forwards of the two counters is the mean tokens per forward. For engines without the
diffusion scheduler the logger registers nothing and ignores every call.

Log: vLLM's periodic stats log (``LoggingStatLogger.log``, every ``VLLM_LOG_STATS_INTERVAL`` s) would
print "SpecDecoding metrics: ... Avg Draft acceptance rate", meaningless for a canvas.
``quiet_spec_decoding_log`` (installed by ``hooks.configure_diffusion_engine``, i.e. only when a
diffusion model is served) empties that line's aggregate instead of printing it, for our engine
only; this logger's ``log`` (called on the same tick) prints instead, when the interval had forwards
and vLLM's own stats log runs (not with ``--disable-log-stats``, which a stat-logger plugin would
otherwise not silence):

    Diffusion decoding: 41.2 forwards/s, 3.75 committed tokens/forward, 154.5 committed tokens/s (412 forwards, 1545 tokens in 10.0 s)

(forwards counted per request, as ``vllm_dapd:forwards_total``).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import prometheus_client
from vllm.logger import init_logger
from vllm.v1.metrics.loggers import AggregateStatLoggerBase

from .names import SCHEDULER_CLS

logger = init_logger("vllm.dapd.metrics")  # under "vllm", so vLLM's log config shows it
LOG_PREFIX = "Diffusion decoding:"
_vllm_logs_stats = False  # set when vLLM builds its stats log for a diffusion engine in this process
_BUCKETS = [1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128]


def _is_diffusion_engine(vllm_config: Any) -> bool:
    cls = getattr(vllm_config.scheduler_config, "scheduler_cls", None)
    name = cls if isinstance(cls, str) else f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', '')}"
    return name == SCHEDULER_CLS


def _fresh(metric_cls: type, name: str, documentation: str, labelnames: list[str], **kwargs: Any):
    # A second engine in the same process (tests, restarts) re-creates the metric.
    for collector in list(prometheus_client.REGISTRY._collector_to_names):
        if getattr(collector, "_name", None) == name:
            prometheus_client.REGISTRY.unregister(collector)
    return metric_cls(name=name, documentation=documentation, labelnames=labelnames, **kwargs)


class DiffusionStatLogger(AggregateStatLoggerBase):
    def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
        self.enabled = _is_diffusion_engine(vllm_config)
        if not self.enabled:
            return
        engine_indexes = engine_indexes or [0]
        labelnames = ["model_name", "engine"]
        model_name = vllm_config.model_config.served_model_name
        forwards = _fresh(prometheus_client.Counter, "vllm_dapd:forwards",
                          "Denoising forwards summed over requests (per-request NFE).", labelnames)
        committed = _fresh(prometheus_client.Counter, "vllm_dapd:committed_tokens",
                           "Tokens committed by denoising forwards.", labelnames)
        per_forward = _fresh(prometheus_client.Histogram, "vllm_dapd:committed_tokens_per_forward",
                             "Per engine step: committed tokens / per-request forwards.", labelnames,
                             buckets=_BUCKETS)
        self._forwards = {i: forwards.labels(model_name, str(i)) for i in engine_indexes}
        self._committed = {i: committed.labels(model_name, str(i)) for i in engine_indexes}
        self._per_forward = {i: per_forward.labels(model_name, str(i)) for i in engine_indexes}
        self._interval_start, self._interval_forwards, self._interval_committed = time.monotonic(), 0, 0

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        if not self.enabled or scheduler_stats is None:
            return
        stats = scheduler_stats.spec_decoding_stats
        if stats is None or not stats.num_drafts or engine_idx not in self._forwards:
            return
        self._forwards[engine_idx].inc(stats.num_drafts)
        self._committed[engine_idx].inc(stats.num_accepted_tokens)
        self._per_forward[engine_idx].observe(stats.num_accepted_tokens / stats.num_drafts)
        self._interval_forwards += stats.num_drafts
        self._interval_committed += stats.num_accepted_tokens

    def log(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        elapsed, forwards, committed = now - self._interval_start, self._interval_forwards, self._interval_committed
        self._interval_start, self._interval_forwards, self._interval_committed = now, 0, 0
        if forwards and elapsed > 0 and _vllm_logs_stats:
            logger.info("%s %.1f forwards/s, %.2f committed tokens/forward, %.1f committed tokens/s "
                        "(%d forwards, %d tokens in %.1f s)", LOG_PREFIX, forwards / elapsed, committed / forwards,
                        committed / elapsed, forwards, committed, elapsed)

    def log_engine_initialized(self) -> None:
        pass


def quiet_spec_decoding_log() -> None:
    """Under the diffusion engine, vLLM's stats log drops its spec-decoding line (idempotent)."""
    from vllm.v1.metrics.loggers import LoggingStatLogger

    if getattr(LoggingStatLogger, "_dapd_quiet", False):
        return
    original = LoggingStatLogger.__init__

    @functools.wraps(original)
    def __init__(self, vllm_config, *args: Any, **kwargs: Any) -> None:
        original(self, vllm_config, *args, **kwargs)
        if _is_diffusion_engine(vllm_config):
            global _vllm_logs_stats
            _vllm_logs_stats = True
            spec = self.spec_decoding_logging
            spec.log = lambda *a, **k: spec.reset()  # forget the interval's stats, print nothing

    LoggingStatLogger.__init__ = __init__
    LoggingStatLogger._dapd_quiet = True
