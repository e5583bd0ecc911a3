"""Speech windows from live calls → embeddings, batched across calls, off the event loop.

A call awaits ``embed`` for each window. The window joins the gateway's one bounded queue
(``streamer/embedding_queue.py``: micro-batches of one network length, and what to shed under load); a
collector takes a batch as soon as a worker thread is free — after at most ``max_wait_s`` for windows of
other calls to join it — and runs it with ``Embedder.embed_batch`` in that thread. onnxruntime releases
the GIL, so N workers use N cores while the event loop only moves windows and results. Each window's
result resolves its own future; the gateway's verdict loop awaits them in call order.

``NaiveEmbedding`` (VPMON_EMBEDDING_MODE=naive) is the baseline the load benchmark compares against: one
unbatched ``embed_batch`` per window, run on the event loop itself, blocking it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from streamer import metrics
from streamer.embedding_queue import EmbeddingQueue, Shed, ShedPolicy
from streamer.session import CallSession, CallState
from streamer.settings import Settings
from verifier.decision import DecisionPolicy, WindowVerdict
from verifier.embedder import Embedder
from verifier.errors import VpmonError
from verifier.models.provision import ensure_model

# Evidence this far above the match LLR, with no impostor evidence at all, lets a call spare windows under
# load; below it (or warming up, suspect, in mismatch) every window of the call is embedded.
CONFIDENT_LLR_MARGIN = 2.0


def may_shed(session: CallSession) -> bool:
    """Whether the call's next windows may be thinned or dropped when the model is behind."""
    verdict = session.last_verdict
    impostor_evidence = 0.0 if verdict is None else verdict.impostor_evidence
    return verified_with_confidence(
        session.state is CallState.VERIFIED, verdict, impostor_evidence, session.policy
    )


def verified_with_confidence(
    verified: bool, verdict: WindowVerdict | None, impostor_evidence: float, policy: DecisionPolicy
) -> bool:
    """A verified call whose last verdict's evidence is ``CONFIDENT_LLR_MARGIN`` above the match LLR, with
    no impostor evidence at all (``may_shed``; ``benchmarks/levers.py`` measures cadence levers by it)."""
    return (
        verified
        and verdict is not None
        and verdict.llr >= policy.match_llr + CONFIDENT_LLR_MARGIN
        and impostor_evidence == 0.0
    )


@dataclass(frozen=True, eq=False)
class _Window:
    samples: np.ndarray
    ended_at: float
    result: asyncio.Future[np.ndarray | None]


class EmbeddingPool:
    def __init__(
        self,
        embedder: Embedder,
        *,
        workers: int = 2,
        max_batch: int = 16,
        max_wait_s: float = 0.005,
        policy: ShedPolicy | None = None,
    ) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue: EmbeddingQueue[_Window] = EmbeddingQueue(policy)
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="vpmon-embedding")
        self._free_workers = asyncio.Semaphore(workers)
        self._arrived = asyncio.Event()
        self._collector: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        metrics.EMBEDDING_QUEUE.set_function(lambda: len(self.queue))

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    async def embed(
        self, samples: np.ndarray, ended_at: float, *, sheddable: bool = False, sequence: int = 0
    ) -> np.ndarray | None:
        """One window of 16 kHz float samples → its L2-normalised embedding, or None if it was shed under
        load (counted in vpmon_embedding_shed_windows_total). ``ended_at``: when the window ended
        (``time.monotonic()``); ``sheddable`` (``may_shed``) and ``sequence`` (the window's number in
        its call) are for the shedding policy."""
        if self._collector is None:
            self._collector = asyncio.create_task(self._collect())
        window = _Window(samples, ended_at, asyncio.get_running_loop().create_future())
        key = self.embedder.batch_key(len(samples))
        now = time.monotonic()
        self._resolve_shed(self.queue.add(window, key, sheddable=sheddable, sequence=sequence, now=now))
        self._arrived.set()
        return await window.result

    async def close(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        for task in list(self._running):
            with contextlib.suppress(Exception):
                await task
        self._threads.shutdown(wait=False, cancel_futures=True)

    # --- the collector ----------------------------------------------------------------------------
    async def _collect(self) -> None:
        while True:
            await self._free_workers.acquire()  # batches form only when a worker can run them at once
            batch = await self._next_batch()
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[_Window]:
        while True:
            while not self.queue:
                self._arrived.clear()
                await self._arrived.wait()
            # A fresh window waits a few ms for windows of other calls to join it; a backlog goes at once
            # (a free worker must not idle while windows wait).
            wait = self.max_wait_s - self.queue.queue_delay(time.monotonic())
            if wait > 0 and not self.queue.batch_ready(self.max_batch):
                await asyncio.sleep(wait)
            batch, shed = self.queue.take_batch(self.max_batch, time.monotonic())
            self._resolve_shed(shed)
            waited_for = [w for w in batch if not w.result.done()]  # an ended call stops waiting
            if waited_for:
                return waited_for

    async def _run(self, batch: list[_Window]) -> None:
        try:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._threads, self._embed, batch)
            for window, result in zip(batch, results, strict=True):
                if window.result.done():
                    continue
                if isinstance(result, BaseException):
                    window.result.set_exception(result)
                else:
                    window.result.set_result(result)
        except Exception as exc:  # the model failed on the whole batch: every caller hears of it
            for window in batch:
                if not window.result.done():
                    window.result.set_exception(exc)
        finally:
            self._free_workers.release()

    def _embed(self, batch: list[_Window]) -> list[np.ndarray | VpmonError]:
        """In a worker thread."""
        started = time.monotonic()
        for window in batch:
            metrics.EMBEDDING_QUEUE_DELAY.observe(started - window.ended_at)
        metrics.EMBEDDING_BATCH.observe(len(batch))
        try:
            results: list[np.ndarray | VpmonError] = list(
                self.embedder.embed_batch([w.samples for w in batch])
            )
        except VpmonError:  # one bad window (too short) must not fail other calls' windows
            results = [self._embed_one(w.samples) for w in batch]
        metrics.EMBEDDING.observe(time.monotonic() - started)
        return results

    def _embed_one(self, samples: np.ndarray) -> np.ndarray | VpmonError:
        try:
            return self.embedder.embed_batch([samples])[0]
        except VpmonError as exc:
            return exc

    def _resolve_shed(self, shed: list[tuple[_Window, Shed]]) -> None:
        for window, why in shed:
            metrics.EMBEDDING_SHED.labels(why.value).inc()
            if not window.result.done():
                window.result.set_result(None)


class NaiveEmbedding:
    """The load benchmark's baseline: each window embedded alone, on the event loop (blocking it, on
    purpose: that is what the pool is measured against). Never sheds."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    async def embed(
        self, samples: np.ndarray, ended_at: float, *, sheddable: bool = False, sequence: int = 0
    ) -> np.ndarray | None:
        started = time.monotonic()
        metrics.EMBEDDING_QUEUE_DELAY.observe(started - ended_at)
        metrics.EMBEDDING_BATCH.observe(1)
        embedding = self.embedder.embed_batch([samples])[0]
        metrics.EMBEDDING.observe(time.monotonic() - started)
        return embedding

    async def close(self) -> None:
        pass


EmbeddingService = EmbeddingPool | NaiveEmbedding


def embedding_service(embedder: Embedder, settings: Settings) -> EmbeddingService:
    """The live calls' embedder, as VPMON_EMBEDDING_MODE and the VPMON_EMBEDDING_* settings say."""
    if settings.embedding_mode == "naive":
        return NaiveEmbedding(embedder)
    if settings.embedding_threads != settings.embed_threads:
        # Uploads use their own thread count; the pool's workers each run one batch on this many threads
        # (two workers of one thread each embedded the most on 2 cores: benchmarks/pool_speed.py).
        embedder = Embedder(embedder.spec, ensure_model(embedder.spec), threads=settings.embedding_threads)
    policy = ShedPolicy(capacity=settings.embedding_queue_windows)
    return EmbeddingPool(
        embedder,
        workers=settings.embedding_workers,
        max_batch=settings.embedding_max_batch,
        max_wait_s=settings.embedding_max_wait_ms / 1000,
        policy=policy,
    )
