"""The embedding pool's queue, without I/O: windows waiting for the model, micro-batches of one network
length, and what to shed when the model cannot keep up. ``streamer/embedding.py`` is the asyncio side.

Backpressure is a policy, never unbounded memory or a blocked caller. From the moment the oldest queued
window has waited ``thin_after_s`` (the model is behind), the calls that may spare windows — verified with
evidence well above the match threshold and no impostor evidence (``sheddable``, decided by the caller from
the call's last verdict) — keep only one window in ``thin_every``: their verification cadence lengthens.
If the queue still fills, such a call's windows are dropped, the oldest first (and any that waited
``stale_after_s``: a late verdict on a confident call is worth little). Windows of calls warming up,
suspect or in mismatch are never thinned or dropped while another window can go instead; only a queue
full of them (``capacity``: the hard bound) loses its oldest, counted as an overflow.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

T = TypeVar("T")


class Shed(StrEnum):
    """Why a window was not embedded (the ``outcome`` label of vpmon_embedding_shed_windows_total)."""

    THINNED = "thinned"  # a confident call's window not queued: its cadence lengthened under load
    DROPPED = "dropped"  # a confident call's queued window given up: stale, or room for another call's
    OVERFLOW = "overflow"  # the queue was full of windows that must not be shed: the oldest went


@dataclass(frozen=True)
class ShedPolicy:
    capacity: int = 256  # windows queued at most (3 s windows: 192 kB each, 49 MB in all)
    thin_after_s: float = 1.0  # the oldest window's wait from which confident calls are thinned
    thin_every: int = 3  # a thinned call keeps one window in this many
    stale_after_s: float = 3.0  # a confident call's window that waited this long is dropped

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.thin_every < 1:
            raise ValueError("capacity ≥ 1 and thin_every ≥ 1 are needed")
        if not 0 <= self.thin_after_s <= self.stale_after_s:
            raise ValueError("0 ≤ thin_after_s ≤ stale_after_s is needed")


@dataclass(frozen=True, eq=False)  # compared by identity: items hold numpy arrays
class Queued(Generic[T]):
    item: T
    key: int  # windows of equal keys run in one onnxruntime call (Embedder.batch_key)
    queued_at: float
    sheddable: bool


class EmbeddingQueue(Generic[T]):
    """Windows in arrival order; ``add`` and ``take_batch`` return what they shed, for the caller to
    resolve and count."""

    def __init__(self, policy: ShedPolicy | None = None) -> None:
        self.policy = policy or ShedPolicy()
        self._entries: deque[Queued[T]] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def queue_delay(self, now: float) -> float:
        """How long the oldest window has waited (0 when the queue is empty)."""
        return now - self._entries[0].queued_at if self._entries else 0.0

    def saturated(self, now: float) -> bool:
        return bool(self._entries) and self.queue_delay(now) >= self.policy.thin_after_s

    def add(self, item: T, key: int, *, sheddable: bool, sequence: int, now: float) -> list[tuple[T, Shed]]:
        """Queue a window (``sequence``: its number within its call, for thinning one in k)."""
        if sheddable and self.saturated(now) and sequence % self.policy.thin_every != 0:
            return [(item, Shed.THINNED)]
        shed: list[tuple[T, Shed]] = []
        if len(self._entries) >= self.policy.capacity:
            victim = next((e for e in self._entries if e.sheddable), None)
            if victim is not None:
                self._entries.remove(victim)
                shed.append((victim.item, Shed.DROPPED))
            elif sheddable:  # only windows that must not be shed are queued: this one gives way
                return [(item, Shed.DROPPED)]
            else:
                shed.append((self._entries.popleft().item, Shed.OVERFLOW))
        self._entries.append(Queued(item, key, now, sheddable))
        return shed

    def batch_ready(self, max_batch: int) -> bool:
        """A full batch of the oldest window's length is waiting: no reason to wait for more."""
        if not self._entries:
            return False
        key = self._entries[0].key
        return sum(1 for e in self._entries if e.key == key) >= max_batch

    def take_batch(self, max_batch: int, now: float) -> tuple[list[T], list[tuple[T, Shed]]]:
        """The oldest window and up to ``max_batch - 1`` more of its length, oldest first; and the stale
        windows of confident calls, dropped on the way."""
        stale = [e for e in self._entries if e.sheddable and now - e.queued_at >= self.policy.stale_after_s]
        shed = [(e.item, Shed.DROPPED) for e in stale]
        remaining = [e for e in self._entries if e not in stale] if stale else list(self._entries)
        if not remaining:
            self._entries.clear()
            return [], shed
        key = remaining[0].key
        batch: list[Queued[T]] = []
        rest: deque[Queued[T]] = deque()
        for entry in remaining:
            if entry.key == key and len(batch) < max_batch:
                batch.append(entry)
            else:
                rest.append(entry)
        self._entries = rest
        return [e.item for e in batch], shed
