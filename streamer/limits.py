"""Per-key limits, sans-I/O: a token bucket per API key for its request rate, and a count of its live calls.

Both count what one gateway process sees. Behind N gateways a key may make up to N times the rate and
hold up to N times the calls (as many as the load balancer spreads its traffic over), and so it may on
one machine running ``vpmon serve --workers N`` (each worker is a gateway; the kernel spreads the
connections): the limits keep one runaway or hostile client from taking a gateway's event loop, CPU and
memory from the others; they are not a global quota, which would need a shared counter in Redis on every
request (and a way to give back the slots of a worker that died).

Nothing here reads a clock or does I/O: the clock is injected (``time.monotonic`` by default), and the
asyncio layer decides how to refuse (HTTP 429 in streamer/api.py and streamer/whip.py, the call
protocol's own refusal in streamer/gateway.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]

_SWEEP_MIN = 1024  # buckets held before the first sweep of idle ones


class TokenBucket:
    """Holds up to ``burst`` tokens, refilled at ``rate`` per second; each request takes one."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> float:
        """0.0 if a token was taken; else the seconds until one will be there (and none is taken, so
        refused requests cost the client nothing: retrying after that long succeeds)."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst

    def _refill(self, now: float) -> None:
        # A clock read that goes backwards (another thread's earlier read) adds nothing and takes nothing.
        if now > self.updated:
            self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
            self.updated = now


class RateLimiter:
    """A token bucket per key, made at the key's first request.

    A bucket that has filled up again is the same as a new one, so sweeps forget those: memory follows
    the keys active lately, not every key ever seen. A sweep runs when the table has doubled since the
    last one, so its cost per request stays constant.
    """

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        if not (math.isfinite(rate) and rate > 0) or burst < 1:
            raise ValueError(f"a rate limit needs rate > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._sweep_at = _SWEEP_MIN

    def check(self, key: str) -> float:
        """0.0: let the request through (it took a token); else refuse it, retry after that many seconds."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._sweep(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)

    def _sweep(self, now: float) -> None:
        self._buckets = {key: b for key, b in self._buckets.items() if not b.full(now)}
        self._sweep_at = max(_SWEEP_MIN, 2 * len(self._buckets))


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1 (0 would invite a busy loop)."""
    return str(max(1, math.ceil(seconds)))


class CallLimiter:
    """At most ``limit`` live calls at once per key.

    ``acquire`` gives a ``CallSlot``, or None when the key holds ``limit`` already (refuse the call). The
    holder must release its slot however the call ends: ``release`` may be called on every exit path
    (it counts once), and a slot is a context manager. Keys with no live call take no memory.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a call limit needs limit >= 1, got {limit}")
        self.limit = limit
        self._active: dict[str, int] = {}

    def acquire(self, key: str) -> CallSlot | None:
        active = self._active.get(key, 0)
        if active >= self.limit:
            return None
        self._active[key] = active + 1
        return CallSlot(self, key)

    def active(self, key: str) -> int:
        return self._active.get(key, 0)

    def __len__(self) -> int:
        """Keys with at least one live call."""
        return len(self._active)

    def _release(self, key: str) -> None:
        remaining = self._active[key] - 1
        if remaining:
            self._active[key] = remaining
        else:
            del self._active[key]


class CallSlot:
    """One live call of a key, counted until ``release``."""

    __slots__ = ("key", "limiter", "released")

    def __init__(self, limiter: CallLimiter, key: str) -> None:
        self.limiter = limiter
        self.key = key
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limiter._release(self.key)

    def __enter__(self) -> CallSlot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class KeyLimits:
    """A gateway's per-key limits (``VPMON_KEY_*`` settings): HTTP requests, and live calls."""

    requests: RateLimiter
    calls: CallLimiter

    @classmethod
    def create(
        cls, requests_per_second: float, request_burst: int, max_calls: int, clock: Clock = time.monotonic
    ) -> KeyLimits:
        return cls(RateLimiter(requests_per_second, request_burst, clock), CallLimiter(max_calls))
