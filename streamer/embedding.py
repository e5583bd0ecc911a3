"""Speech windows from live calls → embeddings, off the event loop.

``EmbeddingService.embed`` is what a call awaits for each window. Today each window runs as one
``embed_batch`` call in a worker thread (onnxruntime releases the GIL), at most ``workers`` at a time;
the batching pool across calls (issue "Throughput") replaces the inside without changing this interface.
"""

from __future__ import annotations

import time

import anyio
import anyio.to_thread
import numpy as np

from streamer import metrics
from verifier.embedder import Embedder


class EmbeddingService:
    def __init__(self, embedder: Embedder, workers: int = 2) -> None:
        self.embedder = embedder
        self._limiter = anyio.CapacityLimiter(workers)

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    async def embed(self, samples: np.ndarray, ended_at: float) -> np.ndarray:
        """One window of 16 kHz float samples → its L2-normalised embedding. ``ended_at``: when the
        window ended (``time.monotonic()``), for the queue delay metric."""
        batch = await anyio.to_thread.run_sync(self._embed_batch, [samples], ended_at, limiter=self._limiter)
        return batch[0]

    def _embed_batch(self, windows: list[np.ndarray], ended_at: float) -> np.ndarray:
        started = time.monotonic()  # in the worker thread: the wait for a free worker is queue delay
        metrics.EMBEDDING_QUEUE_DELAY.observe(started - ended_at)
        metrics.EMBEDDING_BATCH.observe(len(windows))
        batch = self.embedder.embed_batch(windows)
        metrics.EMBEDDING.observe(time.monotonic() - started)
        return batch
