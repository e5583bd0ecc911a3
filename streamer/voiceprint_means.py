"""Each tenant's voiceprint mean, for centring scores (verifier/score_norm.py), cached per process.

The mean moves slowly — one agent more among many barely shifts it — so it is read from the store at
most every ``max_age_s`` per tenant, and at once after this process enrols or deletes in that tenant
(other processes and gateways follow within ``max_age_s``). Large tenants are sampled, to bound the
read: the first ``sample`` voiceprints in the store's order (by speaker id). A store that cannot be read
keeps the last mean it gave (or none: raw cosines, as before).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from streamer.redis_clients import REDIS_ERRORS
from streamer.store import VoiceprintStore
from verifier.score_norm import VoiceprintMean

log = logging.getLogger("vpmon.centring")

MEAN_SAMPLE = 2000  # voiceprints read for a tenant's mean


@dataclass(frozen=True)
class _Entry:
    mean: VoiceprintMean
    read_at: float


class TenantMeans:
    """Thread-safe: the service's worker threads share it."""

    def __init__(self, store: VoiceprintStore, max_age_s: float = 300.0, sample: int = MEAN_SAMPLE) -> None:
        self.store = store
        self.max_age_s = max_age_s
        self.sample = sample
        self._entries: dict[str, _Entry] = {}
        self._reading: dict[str, threading.Lock] = {}
        self._forgotten: dict[str, int] = {}  # per tenant: a read that spans a change is not kept
        self._lock = threading.Lock()

    def get(self, tenant: str, model_id: str) -> VoiceprintMean | None:
        """The tenant's voiceprints of ``model_id`` (others are another model's, and not averaged)."""
        entry = self._fresh(tenant)
        if entry is None:
            # One thread reads a tenant at a time: calls that start together wait for its result rather
            # than all reading the same voiceprints.
            with self._lock:
                reading = self._reading.setdefault(tenant, threading.Lock())
            with reading:
                entry = self._fresh(tenant) or self._read(tenant, model_id) or self._entries.get(tenant)
        if entry is None or entry.mean.model_id != model_id:
            return None
        return entry.mean

    def _fresh(self, tenant: str) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(tenant)
        if entry is None or time.monotonic() - entry.read_at >= self.max_age_s:
            return None
        return entry

    def forget(self, tenant: str) -> None:
        """This process changed the tenant's voiceprints: read them again next time."""
        with self._lock:
            self._entries.pop(tenant, None)
            self._forgotten[tenant] = self._forgotten.get(tenant, 0) + 1

    def _read(self, tenant: str, model_id: str) -> _Entry | None:
        with self._lock:
            generation = self._forgotten.get(tenant, 0)
        try:
            voiceprints = self.store.list(tenant, limit=self.sample)
        except REDIS_ERRORS as exc:
            log.warning("tenant %s: voiceprint mean not refreshed (%s); keeping the last one", tenant, exc)
            return None
        vectors = {vp.speaker_id: vp.vector for vp in voiceprints if vp.model_id == model_id}
        entry = _Entry(VoiceprintMean.of(model_id, vectors), time.monotonic())
        with self._lock:
            if self._forgotten.get(tenant, 0) == generation:
                self._entries[tenant] = entry
        return entry
