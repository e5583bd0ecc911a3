"""The gateway's Prometheus metrics, served at ``GET /metrics`` (a monitor or admin key, as every route).

Every metric is this gateway's total over all its tenants. Labels take a few known values only —
``protocol`` (twilio, audiohook, native, whip), ``state``, ``outcome``, ``code`` — never a call, agent or
tenant id, so the number of series stays fixed however many calls pass.

metric                                       what it counts
-------------------------------------------  ----------------------------------------------------------------
vpmon_build_info{version,model}              1, with the vpmon version and the speaker model served
vpmon_calls_active{protocol}                 calls live on this gateway now
vpmon_audio_frames_received_total{protocol}  audio messages or frames received (Twilio: both tracks)
vpmon_audio_frames_late_total{protocol}      frames dropped as their place on the media clock had passed
                                             (WHIP: a late or repeated RTP packet; the others have no such)
vpmon_audio_dropped_seconds_total{protocol}  seconds of audio missing from calls: discarded by the client
                                             (AudioHook ``discarded``) or lost on the way (WHIP gaps)
vpmon_speech_windows_total{protocol}         speech windows sent to the embedder
vpmon_speech_windows_too_noisy_total{…}      speech windows not scored: too little above the line's noise
vpmon_embedding_seconds                      one embedding call (a batch), in its worker thread
vpmon_embedding_batch_windows                windows per embedding call
vpmon_embedding_queue_delay_seconds          a window's end (the VAD closed it) → its embedding starts
vpmon_embedding_queue_windows                windows waiting for the embedding pool now
vpmon_embedding_shed_windows_total{outcome}  windows not embedded as the pool was behind: thinned (a call
                                             verified with confidence skipped a window), dropped (such
                                             a call's queued window given up), overflow (the queue was
                                             full of other windows; streamer/embedding_queue.py)
vpmon_verdict_latency_seconds{protocol}      a window's end → its verdict is in Redis and sent to the peer
vpmon_verdicts_total{protocol,state}         verdicts, by the call state they decided
vpmon_alerts_total{protocol,outcome}         alerts (outcome takeover) and notices (agent_not_enrolled,
                                             model_mismatch), each written to the alert stream
vpmon_call_closes_total{protocol,code}       call connections ended, by close code: the server's, or the
                                             peer's when it closed first (WHIP: its call's close code)
vpmon_redis_errors_total                     requests and calls failed by Redis (a 503, or a 1011 close)
vpmon_redis_connects_total                   connections the gateway's asyncio Redis pool opened: it grows
                                             with load to the pool's working size, then each new one is a
                                             reconnect (Redis restarted, a dropped connection)
vpmon_whip_peer_connections                  WebRTC peer connections open now
vpmon_redis_up                               1 while the gateway writes to Redis, 0 from a failed write
                                             or probe until every spooled alert is written again
vpmon_spooled_alerts                         alerts in this gateway's local spool now, waiting for Redis
vpmon_alerts_spooled_total                   alerts and notices written to the spool (Redis was away, or
                                             older ones were waiting there)
vpmon_alerts_unspooled_total                 spooled alerts written to Redis (this gateway's, and those of
                                             a stopped gateway's spool it adopted)
vpmon_verdicts_dropped_total                 verdict stream entries (verdicts, call starts and ends) not
                                             written as Redis was away (the peer got its verdicts)
vpmon_call_states_coalesced_total            call states not written as Redis was away and a newer one of
                                             the same call came (the newest is written when Redis returns)
vpmon_asyncio_tasks                          asyncio tasks alive on the event loop, read at each scrape (a
                                             gateway with no call should always come back to one number:
                                             benchmarks/soak.py checks it)

``*_total`` are counters; ``vpmon_calls_active``, ``vpmon_embedding_queue_windows``,
``vpmon_whip_peer_connections``, ``vpmon_redis_up``, ``vpmon_spooled_alerts`` and ``vpmon_asyncio_tasks``
are gauges; the
``*_seconds`` without ``_total`` and ``vpmon_embedding_batch_windows`` are histograms (``_bucket``,
``_sum``, ``_count``), ``vpmon_build_info`` an info metric (a gauge of 1 with the info as labels).

Plus prometheus-client's own ``process_*`` and ``python_*`` metrics. The instrumentation is one line at
each point where the thing happens (streamer/gateway.py, streamer/embedding.py, …); verifier/ knows
nothing of it.

**Several worker processes** (``vpmon serve --workers N``, streamer/workers.py): a scrape reaches any one
of them, so every one answers with the machine's totals, through prometheus-client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, set by the parent for its workers): each process writes its values to
files there and ``/metrics`` merges them. Counters and histograms are summed over every worker that ran
since the server started (a restarted worker's counts stay); the gauges are summed over the live workers
(``vpmon_calls_active``, …, ``vpmon_asyncio_tasks``), except ``vpmon_redis_up``, the smallest (0 when any
worker cannot write), and ``vpmon_build_info``. Gauges read from a function at each scrape are written
by each worker every ``SAMPLE_S`` instead (``keep_sampled_gauges``): a scrape cannot call another
process' functions. There are no ``process_*`` and ``python_*`` metrics then: they would be the one
worker's that answered.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import Gauge as _PlainGauge
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger("vpmon.metrics")

# prometheus-client decides this when it is imported: its values live in files shared by the workers.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
SAMPLE_S = 1.0  # multiprocess mode: how often each worker writes its function gauges
_sampled: dict[_PlainGauge, Callable[[], float]] = {}


class Gauge(_PlainGauge):
    """A gauge whose ``set_function`` also works with several workers: in a single process the function
    is called at each scrape, as prometheus-client does; in multiprocess mode ``keep_sampled_gauges``
    writes its value every ``SAMPLE_S``. Summed over the live workers unless told otherwise."""

    def __init__(self, *args: Any, multiprocess_mode: str = "livesum", **kwargs: Any) -> None:
        super().__init__(*args, multiprocess_mode=multiprocess_mode, **kwargs)  # type: ignore[arg-type]

    def set_function(self, f: Callable[[], float]) -> None:
        if MULTIPROCESS:
            _sampled[self] = f
        else:
            super().set_function(f)


class BuildInfo(Gauge):
    """An info metric as a gauge of 1 with the info as labels: prometheus-client's ``Info`` has no
    multiprocess mode, a gauge has, and the text format is the same (``vpmon_build_info{…} 1.0``)."""

    def info(self, labels: dict[str, str]) -> None:
        self.labels(**labels).set(1)


async def keep_sampled_gauges() -> None:
    """Multiprocess mode: write this worker's function gauges every ``SAMPLE_S``, until cancelled (the
    server's lifespan runs it). In a single process it returns at once: the scrape calls them."""
    if not MULTIPROCESS:
        return
    while True:
        for gauge, read in list(_sampled.items()):
            try:
                gauge.set(read())
            except Exception:  # a gauge that cannot be read now must not stop the others
                log.exception("reading the gauge %s failed", gauge._name)
        await asyncio.sleep(SAMPLE_S)


# No ``*_created`` series: Prometheus does not use them here, and they would double the series count.
disable_created_metrics()

PROTOCOLS = ("twilio", "audiohook", "native", "whip")
VERDICT_STATES = ("agent_unknown", "warming_up", "verified", "suspect", "mismatch")
ALERT_OUTCOMES = ("takeover", "agent_not_enrolled", "model_mismatch")
SHED_OUTCOMES = ("thinned", "dropped", "overflow")  # streamer/embedding_queue.py's Shed
# Close codes the adapters use (streamer/protocols/events.py, streamer/gateway.py); a peer's other codes
# are counted as "other", so a peer cannot make new series.
CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1005, 1006, 1008, 1009, 1011, 1012, 1013, 4001, 4004, 4009})

BUILD = BuildInfo(
    "vpmon_build_info",
    "The vpmon version and the speaker model this gateway serves.",
    ["version", "model"],
    multiprocess_mode="livemax",
)
CALLS_ACTIVE = Gauge("vpmon_calls_active", "Calls live on this gateway.", ["protocol"])
FRAMES_RECEIVED = Counter(
    "vpmon_audio_frames_received_total", "Audio messages or frames received.", ["protocol"]
)
FRAMES_LATE = Counter(
    "vpmon_audio_frames_late_total",
    "Audio frames dropped: their place on the media clock had passed.",
    ["protocol"],
)
AUDIO_DROPPED = Counter(
    "vpmon_audio_dropped_seconds_total",
    "Seconds of audio missing: discarded by the client or lost on the way.",
    ["protocol"],
)
WINDOWS = Counter("vpmon_speech_windows_total", "Speech windows sent to the embedder.", ["protocol"])
WINDOWS_TOO_NOISY = Counter(
    "vpmon_speech_windows_too_noisy_total",
    "Speech windows not scored: too little above the line's noise floor.",
    ["protocol"],
)
EMBEDDING = Histogram(
    "vpmon_embedding_seconds",
    "Time of one embedding call (a batch of windows) in its worker thread.",
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
EMBEDDING_BATCH = Histogram(
    "vpmon_embedding_batch_windows", "Windows per embedding call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
EMBEDDING_QUEUE_DELAY = Histogram(
    "vpmon_embedding_queue_delay_seconds",
    "From a window's end (the VAD closed it) to the start of its embedding.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
EMBEDDING_QUEUE = Gauge("vpmon_embedding_queue_windows", "Windows waiting for the embedding pool.")
EMBEDDING_SHED = Counter(
    "vpmon_embedding_shed_windows_total",
    "Windows not embedded as the embedding pool was behind, by what happened to them.",
    ["outcome"],
)
VERDICT_LATENCY = Histogram(
    "vpmon_verdict_latency_seconds",
    "From a window's end to its verdict, written to Redis and sent to the peer.",
    ["protocol"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
VOICEPRINT_UPDATES = Counter(
    "vpmon_voiceprint_updates_total",
    "Ended calls of tenants with voiceprint updates on, by what they did to the agent's voiceprint.",
    ["outcome"],  # updated | not_eligible | refused (changed meanwhile, or full) | redis_unavailable
)
VERDICTS = Counter("vpmon_verdicts_total", "Verdicts, by the call state they decided.", ["protocol", "state"])
ALERTS = Counter(
    "vpmon_alerts_total", "Alerts and notices written to the alert stream.", ["protocol", "outcome"]
)
CALL_CLOSES = Counter(
    "vpmon_call_closes_total", "Call connections ended, by websocket close code.", ["protocol", "code"]
)
REDIS_ERRORS = Counter("vpmon_redis_errors_total", "Requests and calls failed by Redis (503, close 1011).")
REDIS_CONNECTS = Counter("vpmon_redis_connects_total", "Connections opened by the gateway's Redis pool.")
WHIP_PEER_CONNECTIONS = Gauge("vpmon_whip_peer_connections", "WebRTC peer connections open.")
# Redis outages (streamer/spool.py).
REDIS_UP = Gauge(
    "vpmon_redis_up",
    "1 while the gateway writes to Redis; 0 while alerts wait in its spool.",
    multiprocess_mode="livemin",  # with several workers: 0 when any of them cannot write
)
if MULTIPROCESS:
    # A worker still loading its model must not pull the machine's value to 0: it counts as up until
    # its lifespan writes its own value (keep_sampled_gauges, from before it serves).
    REDIS_UP.set(1)
SPOOLED_ALERTS = Gauge("vpmon_spooled_alerts", "Alerts in the local spool, waiting for Redis.")
ALERTS_SPOOLED = Counter("vpmon_alerts_spooled_total", "Alerts and notices written to the local spool.")
ALERTS_UNSPOOLED = Counter("vpmon_alerts_unspooled_total", "Spooled alerts and notices written to Redis.")
VERDICTS_DROPPED = Counter(
    "vpmon_verdicts_dropped_total", "Verdict stream entries not written: Redis was unreachable."
)
CALL_STATES_COALESCED = Counter(
    "vpmon_call_states_coalesced_total",
    "Call states not written as Redis was unreachable and a newer one of the same call came.",
)

# Every protocol's series exist from the start, at 0: rates and "no audio" alerts see a flat line
# instead of nothing.
for _protocol in PROTOCOLS:
    for _metric in (CALLS_ACTIVE, FRAMES_RECEIVED, FRAMES_LATE, AUDIO_DROPPED, WINDOWS, WINDOWS_TOO_NOISY):
        _metric.labels(_protocol)
    VERDICT_LATENCY.labels(_protocol)
    for _state in VERDICT_STATES:
        VERDICTS.labels(_protocol, _state)
    for _outcome in ALERT_OUTCOMES:
        ALERTS.labels(_protocol, _outcome)
for _outcome in SHED_OUTCOMES:
    EMBEDDING_SHED.labels(_outcome)


def close_code(code: int | None) -> str:
    """The ``code`` label: a code vpmon knows, else "other"; None (no code given) is 1005 (RFC 6455)."""
    code = 1005 if code is None else code
    return str(code) if code in CLOSE_CODES else "other"


async def redis_connected(connection: Any) -> None:
    """redis-py's ``redis_connect_func`` hook: it replaces the connection's own handshake, so that runs
    first; then the connection counts."""
    await connection.on_connect()
    REDIS_CONNECTS.inc()


def exposition() -> tuple[bytes, str]:
    """The text format Prometheus scrapes, and its content type; with several workers, their totals."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def _asyncio_tasks() -> float:
    """Tasks on the running loop: /metrics is an async route, so the scrape reads this on the loop."""
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # read outside the event loop (e.g. a test's own registry dump)
        return float("nan")


ASYNCIO_TASKS = Gauge("vpmon_asyncio_tasks", "asyncio tasks alive on the gateway's event loop.")
ASYNCIO_TASKS.set_function(_asyncio_tasks)
