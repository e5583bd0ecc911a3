"""Voiceprints in Redis: one ``VoiceprintStore`` interface, two backends.

- ``VectorSetStore`` (the default): Redis 8 vector sets, built into Redis 8 under AGPLv3. One vector set
  per tenant, ``vp:{tenant}``; element = speaker id; the other fields are JSON attributes on the element,
  which ``VSIM ... FILTER`` reads for the site and tag filters. The ``{tenant}`` hash tag keeps all of a
  tenant's keys in one Redis Cluster slot, so each tenant's writes are single-slot transactions.
- ``SearchIndexStore``: the query engine (``FT.*``; Redis Stack, or Redis 8 with RediSearch, which is
  RSALv2/SSPLv1 only). One HASH per voiceprint, ``vpdoc:{tenant}:<speaker id>``, in one HNSW COSINE
  index per embedding size shared by all tenants; every query is filtered by the tenant's TAG.

Both keep, per tenant, the model id and embedding size its voiceprints were made with (a small hash),
and refuse to store or search with another model: scores across models mean nothing. To change a
tenant's model, re-embed its voiceprints (``vpmon reembed``) or ``delete_tenant`` first.

Scores are cosine similarities in [-1, 1] for both backends. Measured through this module on 10 000
random 192-d voiceprints of realistic geometry (one per speaker, a shared mean direction so unrelated
speakers score ≈ 0.16, queries at cosine ≈ 0.78 to their speaker), 300 queries, recall@10 against exact
numpy search, p50 from Python over loopback on 2 cores, redis 8.2.3 / RediSearch 2.10.5; memory is the
server's used_memory per voiceprint, index sets included:

    vector sets  NOQUANT  EF 100: recall 0.982, 0.80 ms; EF 200: 0.995, 0.88 ms; scores exact; 2.2 KB
                 Q8       EF 100: recall 0.959, 0.84 ms; EF 200: 0.970, 0.79 ms; scores off ≤ 0.006; 1.7 KB
                 BIN      EF 200: recall 0.12; scores off by up to 0.7: unusable for voiceprints; 1.5 KB
                 a 25 % site filter, EF 200: NOQUANT recall 1.000, 2.0 ms; Q8 0.980, 1.9 ms
                 put_many: 2300/s (NOQUANT; 830/s at 100k voiceprints)
    query engine tenant-filtered KNN (every query here): recall 1.000, 1.1 ms at EF_RUNTIME 10 or 100 (at
                 this size the engine scans the tenant's documents exactly); plain HNSW without a filter:
                 EF_RUNTIME 10 recall 0.725, 0.13 ms; EF_RUNTIME 100: 0.989, 0.25 ms; 3.4 KB;
                 put_many 5800/s

At 100 000 voiceprints per tenant (``benchmarks/search.py``, real dev-set CAM++ embeddings perturbed to
the real cosine statistics, 500 queries) the graphs need more effort for the same recall@10:

    vector sets  NOQUANT  EF 200: 0.923, 2.2 ms; EF 400: 0.973, 3.3 ms; EF 800: 0.992, 5.0 ms; 2.0 KiB
                 Q8       EF 800: 0.976 (it levels off there), 4.7 ms; 1.4 KiB
                 a 10 % site filter: recall 0.986, 14.6 ms whatever the EF
    query engine EF_RUNTIME 100: 0.819, 0.6 ms; 400: 0.973, 1.4 ms; 800: 0.993, 2.0 ms; 3.2 KiB

So the defaults are NOQUANT (exact scores matter: they are compared with a calibrated threshold, and 1:1
verification reads the stored vector back), EF 200 for tenants up to ``LARGE_TENANT`` voiceprints and
800 above (VCARD is read in the same round trip anyway), and EF_RUNTIME 800 for the query engine (below
about 10 000 documents it scans exactly, and the setting costs nothing).

The client must be a ``redis.Redis`` speaking RESP2 with bytes replies (``connect(url)`` makes one):
redis-py 8 defaults to RESP3, whose replies to VSIM and FT.SEARCH have other shapes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import redis
import redis.cluster
from redis.commands.helpers import get_protocol_version

from streamer.redis_clients import REDIS_ERRORS
from verifier.errors import InvalidValueError, ModelMismatchError, StoreError

Backend = Literal["auto", "vset", "ft"]
Quantization = Literal["NOQUANT", "Q8", "BIN"]

# Tenant ids go into key names and hash tags: a small alphabet with no glob, tag or separator characters.
TENANT_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SPEAKER_RE = re.compile(r"[A-Za-z0-9_.@:+-]{1,128}")
MODEL_RE = re.compile(r"[A-Za-z0-9_.@:/+-]{1,128}")
# Sites and tags are matched inside VSIM FILTER strings (redis 8.2 has no escapes in them, so no quotes
# or backslashes) and FT TAG queries (no separator comma; no leading/trailing space, which TAG trims).
# Letters of any script are fine: a site may well be "小区".
LABEL_RE = re.compile(r"[\w.:/@+-](?:[\w .:/@+-]{0,62}[\w.:/@+-])?")

DEFAULT_VSET_EF = 200
LARGE_TENANT = 20_000  # voiceprints; above it, vector-set searches use at least LARGE_TENANT_EF
LARGE_TENANT_EF = 800
DEFAULT_FT_EF_RUNTIME = 800
DEFAULT_INDEX = "vpmon_voiceprints"
# A filtered vector-set search that at most this share of the tenant can pass scans exactly (see
# VectorSetStore); above it, the HNSW graph walk with the filter is faster.
EXACT_FILTER_SHARE = 0.05
_BATCH = 256  # voiceprints per transaction in put_many


@dataclass(frozen=True)
class Voiceprint:
    """A speaker's voiceprint and what we know about it.

    ``vector`` is stored as read-only, L2-normalised float32 (any finite non-zero vector is accepted
    and normalised). It takes no part in ``==``: compare vectors with ``np.allclose``.
    """

    tenant: str
    speaker_id: str
    vector: np.ndarray = field(compare=False, repr=False)
    model_id: str
    site: str | None = None
    display_name: str = ""
    tags: tuple[str, ...] = ()
    enrolled_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    net_speech_seconds: float = 0.0
    quality: Mapping[str, float] = field(default_factory=dict)
    audio_retained: bool = False
    # Verified calls averaged in since enrolment (verifier/adaptation.py; the tenant's opt-in).
    updates: int = 0
    updated_from_calls_seconds: float = 0.0

    def __post_init__(self) -> None:
        check_tenant(self.tenant)
        check_speaker(self.speaker_id)
        check_model(self.model_id)
        if self.site is not None:
            check_label("site", self.site)
        for tag in self.tags:
            check_label("tag", tag)
        object.__setattr__(self, "tags", tuple(self.tags))
        object.__setattr__(self, "vector", normalised(self.vector))
        object.__setattr__(self, "quality", {str(k): float(v) for k, v in self.quality.items()})


@dataclass(frozen=True)
class SearchHit:
    """One result of a 1:N search. ``score`` is the cosine similarity in [-1, 1]."""

    speaker_id: str
    score: float
    site: str | None
    display_name: str
    model_id: str
    tags: tuple[str, ...] = ()


@runtime_checkable
class VoiceprintStore(Protocol):
    """Where voiceprints live. Every method is scoped to one tenant; none ever crosses tenants."""

    backend: str

    def put(self, vp: Voiceprint) -> None:
        """Insert, or replace the voiceprint with the same tenant and speaker id."""

    def put_many(self, vps: Iterable[Voiceprint]) -> int:
        """``put`` for many voiceprints in batched transactions; returns how many were written."""

    def put_if_unchanged(self, old: Voiceprint, new: Voiceprint) -> bool:
        """Replace ``old`` by ``new`` only if the stored voiceprint is still ``old`` (the same enrolment
        and number of updates), in one transaction: a re-enrolment or deletion in between wins."""

    def get(self, tenant: str, speaker_id: str) -> Voiceprint | None: ...

    def delete(self, tenant: str, speaker_id: str) -> bool:
        """True if it existed."""

    def list(
        self, tenant: str, site: str | None = None, offset: int = 0, limit: int = 100
    ) -> list[Voiceprint]:
        """Voiceprints (with vectors) ordered by speaker id, optionally of one site, one page at a time."""

    def count(self, tenant: str, site: str | None = None) -> int: ...

    def search(
        self,
        tenant: str,
        vector: np.ndarray,
        *,
        model_id: str,
        k: int = 10,
        site: str | None = None,
        tags: Sequence[str] = (),
    ) -> list[SearchHit]:
        """The ``k`` nearest voiceprints, best first, among those of ``site`` carrying every tag in
        ``tags``. [] for an empty tenant; ``StoreError`` if the tenant's voiceprints were made by a
        model other than ``model_id``."""

    def delete_tenant(self, tenant: str) -> int:
        """Delete every voiceprint of a tenant; returns how many there were."""

    def ready(self) -> bool:
        """False while Redis loads its data, or the query engine re-indexes after a restart: searches
        then would miss voiceprints (for ``/readyz``)."""


# --- opening a store ---------------------------------------------------------------------------------
def connect(url: str, timeout: float = 5.0) -> redis.Redis:
    """A client for the store: RESP2, bytes replies (vectors are binary)."""
    return redis.Redis.from_url(
        url, protocol=2, decode_responses=False, socket_timeout=timeout, socket_connect_timeout=timeout
    )


def available_backends(client: redis.Redis) -> set[str]:
    """Which backends this server supports, found by calling a harmless command of each. In a Redis
    Cluster only vector sets count: FT.* there needs a coordinator module vpmon does not support."""
    found = set()
    probes = [("vset", ("VCARD", "vp:{vpmon-probe}"))]
    if not isinstance(client, redis.cluster.RedisCluster):
        probes.append(("ft", ("FT._LIST",)))
    for backend, command in probes:
        try:
            client.execute_command(*command)
        except redis.ResponseError as exc:
            if "unknown command" in str(exc).lower():
                continue
            raise
        found.add(backend)
    return found


def open_store(
    client: redis.Redis,
    backend: Backend = "auto",
    *,
    quantization: Quantization = "NOQUANT",
    ef: int | None = None,
    filter_ef: int | None = None,
    large_tenant_ef: int = LARGE_TENANT_EF,
    index_name: str = DEFAULT_INDEX,
) -> VoiceprintStore:
    """The store on this server. ``auto`` picks vector sets whenever the server has them (Redis ≥ 8),
    else the query engine (Redis Stack 7.x). ``ef`` is VSIM's EF or FT's EF_RUNTIME (search effort)."""
    if get_protocol_version(client) not in (2, "2"):
        raise StoreError(
            "the voiceprint store needs a RESP2 client: use streamer.store.connect(url), "
            "or redis.Redis(..., protocol=2)"
        )
    try:
        available = available_backends(client)
    except REDIS_ERRORS as exc:
        raise StoreError(f"cannot reach Redis to open the voiceprint store: {exc}") from exc
    if backend == "auto":
        backend = "vset" if "vset" in available else "ft"
    if backend not in ("vset", "ft"):
        raise StoreError(f"unknown store backend {backend!r}: use auto, vset or ft")
    if backend == "ft" and isinstance(client, redis.cluster.RedisCluster):
        raise StoreError(
            "the query-engine backend (ft) does not work on a Redis Cluster: one index across shards "
            "needs the commercial coordinator. Use vector sets (VPMON_STORE_BACKEND=vset, Redis 8), "
            "whose one key per tenant lives on one shard"
        )
    if backend not in available:
        need = "Redis 8 or later (vector sets)" if backend == "vset" else "the query engine (FT.*)"
        raise StoreError(
            f"this Redis server has no {backend} backend: it needs {need}. "
            f"It offers: {', '.join(sorted(available)) or 'neither'}"
        )
    if backend == "vset":
        return VectorSetStore(
            client,
            quantization=quantization,
            ef=ef or DEFAULT_VSET_EF,
            filter_ef=filter_ef,
            large_tenant_ef=large_tenant_ef,
        )
    return SearchIndexStore(client, ef_runtime=ef or DEFAULT_FT_EF_RUNTIME, index_name=index_name)


# --- validation and shared encoding ------------------------------------------------------------------
def check_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
        raise InvalidValueError(f"invalid tenant id {tenant!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    return tenant


def check_speaker(speaker_id: str) -> str:
    if not isinstance(speaker_id, str) or not SPEAKER_RE.fullmatch(speaker_id):
        raise InvalidValueError(f"invalid speaker id {speaker_id!r}: use 1-128 of A-Z a-z 0-9 _ . @ : + -")
    return speaker_id


def check_model(model_id: str) -> str:
    if not isinstance(model_id, str) or not MODEL_RE.fullmatch(model_id):
        raise InvalidValueError(f"invalid model id {model_id!r}: use 1-128 of A-Z a-z 0-9 _ . @ : / + -")
    return model_id


def check_label(kind: str, value: str) -> str:
    if not isinstance(value, str) or not LABEL_RE.fullmatch(value):
        raise InvalidValueError(
            f"invalid {kind} {value!r}: use 1-64 letters, digits, spaces (not at the ends) and _ . : / @ + -"
        )
    return value


def normalised(vector: Any) -> np.ndarray:
    """A read-only, contiguous, unit-length float32 copy; refuses empty, non-finite or zero vectors."""
    array = np.array(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(array)) if array.size else 0.0
    if not np.all(np.isfinite(array)) or not math.isfinite(norm) or norm == 0.0:
        raise InvalidValueError("a voiceprint vector must be a non-empty, finite, non-zero array of floats")
    array = np.ascontiguousarray(array / norm, dtype=np.float32)
    array.flags.writeable = False
    return array


def _attributes(vp: Voiceprint) -> dict[str, Any]:
    """Everything but the vector, as stored next to it (vector-set attributes, FT ``attrs`` field)."""
    return {
        "speaker_id": vp.speaker_id,
        "site": vp.site,
        "display_name": vp.display_name,
        "model_id": vp.model_id,
        "tags": list(vp.tags),
        "enrolled_at": vp.enrolled_at,
        "net_speech_seconds": vp.net_speech_seconds,
        "quality": dict(vp.quality),
        "audio_retained": vp.audio_retained,
        "updates": vp.updates,
        "updated_from_calls_seconds": vp.updated_from_calls_seconds,
    }


def _voiceprint(tenant: str, vector: np.ndarray, attrs: Mapping[str, Any]) -> Voiceprint:
    return Voiceprint(
        tenant=tenant,
        speaker_id=attrs["speaker_id"],
        vector=vector,
        model_id=attrs["model_id"],
        site=attrs.get("site"),
        display_name=attrs.get("display_name", ""),
        tags=tuple(attrs.get("tags", ())),
        enrolled_at=attrs.get("enrolled_at", ""),
        net_speech_seconds=float(attrs.get("net_speech_seconds", 0.0)),
        quality=attrs.get("quality", {}),
        audio_retained=bool(attrs.get("audio_retained", False)),
        updates=int(attrs.get("updates", 0)),
        updated_from_calls_seconds=float(attrs.get("updated_from_calls_seconds", 0.0)),
    )


def _same_version(stored_attrs: bytes | str | None, vp: Voiceprint) -> bool:
    """Whether stored attributes are those of ``vp``'s enrolment after as many updates."""
    if stored_attrs is None:
        return False
    attrs = json.loads(stored_attrs)
    return attrs.get("enrolled_at") == vp.enrolled_at and int(attrs.get("updates", 0)) == vp.updates


def _hit(attrs: Mapping[str, Any], score: float) -> SearchHit:
    return SearchHit(
        speaker_id=attrs["speaker_id"],
        score=score,
        site=attrs.get("site"),
        display_name=attrs.get("display_name", ""),
        model_id=attrs["model_id"],
        tags=tuple(attrs.get("tags", ())),
    )


MAX_PAGE_OFFSET = 1_000_000_000  # far past any tenant's size; Redis refuses offsets past 64 bits


def _check_page(offset: int, limit: int) -> None:
    if not 0 <= offset <= MAX_PAGE_OFFSET or limit < 1:
        raise InvalidValueError(
            f"invalid page offset={offset} limit={limit}: 0 ≤ offset ≤ {MAX_PAGE_OFFSET} and limit ≥ 1"
        )


def _check_k(k: int) -> None:
    if not 1 <= k <= 1000:
        raise InvalidValueError(f"invalid k={k}: ask for 1 to 1000 nearest voiceprints")


def _batches(items: Iterable[Voiceprint], size: int) -> Iterator[list[Voiceprint]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


class _TenantModel:
    """The per-tenant record of the model (id, embedding size) all its voiceprints were made with."""

    def __init__(self, key_prefix: str) -> None:
        self.key_prefix = key_prefix

    def key(self, tenant: str) -> str:
        return f"{self.key_prefix}:{{{tenant}}}"

    def read(self, pipe: redis.client.Pipeline | redis.Redis, tenant: str) -> tuple[str, int] | None:
        model, dim = pipe.hmget(self.key(tenant), ["model_id", "dim"])
        return None if model is None else (model.decode(), int(dim))

    @staticmethod
    def check(tenant: str, stored: tuple[str, int] | None, model_id: str, dim: int) -> None:
        if stored is None:
            return
        if stored[0] != model_id:
            raise ModelMismatchError(
                f"tenant {tenant!r} holds voiceprints of model {stored[0]!r}, not {model_id!r}: "
                f"scores across models mean nothing. Use model {stored[0]!r}, or re-embed the tenant "
                "(vpmon reembed) first"
            )
        if stored[1] != dim:
            raise ModelMismatchError(
                f"tenant {tenant!r} holds {stored[1]}-d voiceprints of model {model_id!r}, "
                f"this vector has {dim} dimensions: check the model spec"
            )


def _write_in_batches(vps: Iterable[Voiceprint], write: Callable[[str, list[Voiceprint]], object]) -> int:
    """put_many for both backends: one transaction per tenant and ``_BATCH`` voiceprints."""
    groups: dict[str, list[Voiceprint]] = {}
    for vp in vps:
        groups.setdefault(vp.tenant, []).append(vp)
    for tenant, group in groups.items():
        for batch in _batches(group, _BATCH):
            write(tenant, batch)
    return sum(len(group) for group in groups.values())


def _one_model(tenant: str, batch: Sequence[Voiceprint]) -> tuple[str, int]:
    """The (model id, size) every voiceprint of a batch shares; a tenant holds one model at a time."""
    models = {(vp.model_id, vp.vector.size) for vp in batch}
    if len(models) > 1:
        raise StoreError(
            f"voiceprints of several models for tenant {tenant!r} in one write: {sorted(models)}; "
            "a tenant holds voiceprints of one model at a time"
        )
    return models.pop()


# --- vector sets --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _VsetKeys:
    """A tenant's keys; the ``{tenant}`` hash tag puts them all in one cluster slot."""

    vset: str  # the vector set: element = speaker id, attributes = JSON
    ids: str  # sorted set of speaker ids: list() in id order (vector sets have no ordered range)
    sites: str  # sorted set of "<site>\0<speaker id>": list/count by site, filter selectivity
    tags: str  # sorted set of "<tag>\0<speaker id>": filter selectivity
    meta: str  # the tenant's model record

    @classmethod
    def of(cls, tenant: str) -> _VsetKeys:
        tag = f"{{{check_tenant(tenant)}}}"
        return cls(f"vp:{tag}", f"vpids:{tag}", f"vpsites:{tag}", f"vptags:{tag}", f"vpmeta:{tag}")


class VectorSetStore:
    """Redis 8 vector sets, one per tenant (keys: ``_VsetKeys``).

    Filtered searches pick their strategy from the size of the smallest site or tag group asked for
    (kept in sorted sets): when at most ``EXACT_FILTER_SHARE`` of the tenant can match, VSIM scans the
    set exactly (``TRUTH``), otherwise it walks the HNSW graph with the FILTER. Measured on 100k
    voiceprints: a 1 % site took 16.6 ms at recall 0.97 through the graph vs 7.5 ms exact by scan; a
    0.01 % site (10 voiceprints) returned 1 of 10 through the graph (6.8 of 10 with FILTER-EF 10 000, in
    76 ms) vs all 10 by scan in 7.4 ms; a 25 % site took 5.2 ms through the graph (recall 0.99) vs
    14.5 ms by scan.
    """

    backend = "vset"

    def __init__(
        self,
        client: redis.Redis,
        *,
        quantization: Quantization = "NOQUANT",
        ef: int = DEFAULT_VSET_EF,
        filter_ef: int | None = None,
        large_tenant_ef: int = LARGE_TENANT_EF,
    ) -> None:
        if quantization not in ("NOQUANT", "Q8", "BIN"):
            raise StoreError(f"unknown quantization {quantization!r}: use NOQUANT, Q8 or BIN")
        if ef < 1 or (filter_ef is not None and filter_ef < 1):
            raise StoreError(f"invalid search effort ef={ef} filter_ef={filter_ef}: both must be ≥ 1")
        self.client = client
        self.quantization = quantization
        self.ef = ef
        self.large_tenant_ef = large_tenant_ef  # the least EF for tenants over LARGE_TENANT voiceprints
        # Graph walks with a FILTER visit at most COUNT × 100 nodes unless told otherwise.
        self.filter_ef = filter_ef
        self.models = _TenantModel("vpmeta")

    def put(self, vp: Voiceprint) -> None:
        self.put_many([vp])

    def put_many(self, vps: Iterable[Voiceprint]) -> int:
        return _write_in_batches(vps, self._put_batch)

    def put_if_unchanged(self, old: Voiceprint, new: Voiceprint) -> bool:
        return self._put_batch(new.tenant, [new], unchanged=old)

    def _put_batch(self, tenant: str, batch: list[Voiceprint], unchanged: Voiceprint | None = None) -> bool:
        keys = _VsetKeys.of(tenant)
        model_id, dim = _one_model(tenant, batch)
        written = True

        def write(pipe: redis.client.Pipeline) -> None:
            nonlocal written
            # Watched: the model record, and each speaker's old attributes (to drop old index entries).
            self.models.check(tenant, self.models.read(pipe, tenant), model_id, dim)
            old_attrs = [pipe.execute_command("VGETATTR", keys.vset, vp.speaker_id) for vp in batch]
            written = unchanged is None or _same_version(old_attrs[0], unchanged)
            if not written:
                return
            pipe.multi()
            pipe.hset(keys.meta, mapping={"model_id": model_id, "dim": dim})
            for vp, old in zip(batch, old_attrs, strict=True):
                if old is not None:
                    self._unindex(pipe, keys, vp.speaker_id, json.loads(old))
                # Replace = VREM + VADD: redis 8.2.3 applies a VADD that updates an existing element
                # but neither writes it to the AOF nor replicates it, so a restart would bring back
                # the old voiceprint (caught by tests/test_redis_server.py). VREM and a fresh VADD are
                # both propagated, and MULTI keeps the element from being missing in between.
                pipe.execute_command("VREM", keys.vset, vp.speaker_id)
                pipe.execute_command(
                    "VADD", keys.vset, "FP32", vp.vector.tobytes(), vp.speaker_id, self.quantization,
                    "SETATTR", json.dumps(_attributes(vp), ensure_ascii=False),
                )  # fmt: skip
                pipe.zadd(keys.ids, {vp.speaker_id: 0})
                pipe.zadd(keys.sites, {_label_member(vp.site or "", vp.speaker_id): 0})
                if vp.tags:
                    pipe.zadd(keys.tags, {_label_member(tag, vp.speaker_id): 0 for tag in vp.tags})

        self._transaction(write, keys.vset, keys.meta)
        return written

    def get(self, tenant: str, speaker_id: str) -> Voiceprint | None:
        keys = _VsetKeys.of(tenant)
        found = self._fetch(tenant, keys, [check_speaker(speaker_id)])
        return found[0] if found else None

    def delete(self, tenant: str, speaker_id: str) -> bool:
        keys = _VsetKeys.of(tenant)
        check_speaker(speaker_id)
        deleted = False

        def remove(pipe: redis.client.Pipeline) -> None:
            nonlocal deleted
            old = pipe.execute_command("VGETATTR", keys.vset, speaker_id)
            deleted = old is not None or bool(pipe.execute_command("VISMEMBER", keys.vset, speaker_id))
            if not deleted:
                return
            last = int(pipe.execute_command("VCARD", keys.vset)) == 1
            pipe.multi()
            pipe.execute_command("VREM", keys.vset, speaker_id)
            pipe.zrem(keys.ids, speaker_id)
            if old is not None:
                self._unindex(pipe, keys, speaker_id, json.loads(old))
            if last:
                pipe.delete(keys.meta, keys.ids, keys.sites, keys.tags)  # may take another model now

        self._transaction(remove, keys.vset, keys.meta)
        return deleted

    def list(
        self, tenant: str, site: str | None = None, offset: int = 0, limit: int = 100
    ) -> list[Voiceprint]:
        keys = _VsetKeys.of(tenant)
        _check_page(offset, limit)
        if site is None:
            speakers = [s.decode() for s in self.client.zrange(keys.ids, offset, offset + limit - 1)]
        else:
            low, high = _label_range(check_label("site", site))
            members = self.client.zrangebylex(keys.sites, low, high, start=offset, num=limit)
            speakers = [m.decode().partition("\0")[2] for m in members]
        return self._fetch(tenant, keys, speakers)

    def count(self, tenant: str, site: str | None = None) -> int:
        keys = _VsetKeys.of(tenant)
        if site is None:
            return int(self.client.execute_command("VCARD", keys.vset))
        return int(self.client.zlexcount(keys.sites, *_label_range(check_label("site", site))))

    def search(
        self,
        tenant: str,
        vector: np.ndarray,
        *,
        model_id: str,
        k: int = 10,
        site: str | None = None,
        tags: Sequence[str] = (),
    ) -> list[SearchHit]:
        keys = _VsetKeys.of(tenant)
        query = normalised(vector)
        _check_k(k)
        check_model(model_id)
        groups = [(keys.sites, check_label("site", site))] if site is not None else []
        groups += [(keys.tags, check_label("tag", tag)) for tag in tags]
        # First round trip: the model record, the tenant's size and the size of each filter group.
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(keys.meta, ["model_id", "dim"])
        pipe.execute_command("VCARD", keys.vset)
        for key, label in groups:
            pipe.zlexcount(key, *_label_range(label))
        (model, dim), total, *sizes = pipe.execute()
        if model is None:
            return []  # nothing enrolled for this tenant
        self.models.check(tenant, (model.decode(), int(dim)), model_id, query.size)
        if groups and min(sizes) == 0:
            return []  # some site or tag asked for has nobody
        args: list[Any] = ["VSIM", keys.vset, "FP32", query.tobytes(), "WITHSCORES", "WITHATTRIBS"]
        ef = max(self.ef, k, self.large_tenant_ef if int(total) > LARGE_TENANT else 0)
        args += ["COUNT", k, "EF", ef]
        if groups:
            conditions = [f'.site == "{site}"'] if site is not None else []
            conditions += [f'"{tag}" in .tags' for tag in tags]  # labels hold no quotes (LABEL_RE)
            args += ["FILTER", " and ".join(conditions)]
            if min(sizes) <= EXACT_FILTER_SHARE * int(total):
                args.append("TRUTH")  # few can match: an exact scan beats a long graph walk
            elif self.filter_ef is not None:
                args += ["FILTER-EF", self.filter_ef]
        try:
            reply = self.client.execute_command(*args)
        except redis.ResponseError as exc:
            raise StoreError(f"vector search failed for tenant {tenant!r}: {exc}") from exc
        hits = []
        for i in range(0, len(reply), 3):
            # VSIM scores are (1 + cosine) / 2 in [0, 1]: back to the cosine every threshold is set in.
            score = 2.0 * float(reply[i + 1]) - 1.0
            hits.append(_hit(json.loads(reply[i + 2]), score))
        return hits

    def delete_tenant(self, tenant: str) -> int:
        keys = _VsetKeys.of(tenant)
        pipe = self.client.pipeline(transaction=True)
        pipe.execute_command("VCARD", keys.vset)
        pipe.delete(keys.vset, keys.ids, keys.sites, keys.tags, keys.meta)
        count, _ = pipe.execute()
        return int(count)

    def ready(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.BusyLoadingError:
            return False

    @staticmethod
    def _unindex(
        pipe: redis.client.Pipeline, keys: _VsetKeys, speaker_id: str, old: Mapping[str, Any]
    ) -> None:
        pipe.zrem(keys.sites, _label_member(old.get("site") or "", speaker_id))
        for tag in old.get("tags", ()):
            pipe.zrem(keys.tags, _label_member(tag, speaker_id))

    def _fetch(self, tenant: str, keys: _VsetKeys, speakers: Sequence[str]) -> list[Voiceprint]:
        pipe = self.client.pipeline(transaction=False)
        for speaker in speakers:
            pipe.execute_command("VEMB", keys.vset, speaker)
            pipe.execute_command("VGETATTR", keys.vset, speaker)
        replies = pipe.execute()
        found = []
        for vector, attrs in zip(replies[0::2], replies[1::2], strict=True):
            if vector is None or attrs is None:
                continue  # deleted between listing and fetching
            # VEMB gives the stored vector (de-quantised if Q8/BIN) as decimal strings of doubles.
            found.append(_voiceprint(tenant, np.array(vector, dtype=np.float64), json.loads(attrs)))
        return found

    def _transaction(self, func: Any, *watch: str) -> None:
        try:
            self.client.transaction(func, *watch)
        except redis.ResponseError as exc:
            raise StoreError(f"Redis refused the voiceprint write: {exc}") from exc


def _label_member(label: str, speaker_id: str) -> str:
    # NUL occurs in no label or speaker id: it separates them, and sorts one label's entries together.
    return f"{label}\0{speaker_id}"


def _label_range(label: str) -> tuple[str, str]:
    """ZRANGEBYLEX bounds of every member of one label."""
    return f"[{label}\0", f"({label}\x01"


# --- the query engine ---------------------------------------------------------------------------------
# Non-word characters get a backslash; letters of any script pass as they are. Our ids and labels only
# allow ASCII non-word characters, so a backslash never lands in front of part of a UTF-8 sequence.
_TAG_SPECIAL = re.compile(r"\W")


def escape_tag(value: str) -> str:
    """A value for a TAG query, ``@field:{value}``, with punctuation and spaces backslash-escaped."""
    return _TAG_SPECIAL.sub(lambda m: "\\" + m.group(0), value)


class SearchIndexStore:
    """The query engine: HASH ``vpdoc:{t}:<speaker id>`` with TAG fields tenant, speaker_id (sortable),
    site, tags and model_id, a NUMERIC dim, the JSON ``attrs`` and the FLOAT32 ``vec``; one HNSW COSINE
    index per embedding size (``<index_name>_<dim>``, filtered on ``@dim``) for all tenants; the model
    record in ``vpdocmeta:{t}``."""

    backend = "ft"

    def __init__(
        self,
        client: redis.Redis,
        *,
        ef_runtime: int = DEFAULT_FT_EF_RUNTIME,
        index_name: str = DEFAULT_INDEX,
    ) -> None:
        if ef_runtime < 1:
            raise StoreError(f"invalid EF_RUNTIME {ef_runtime}: it must be ≥ 1")
        self.client = client
        self.ef_runtime = ef_runtime  # the engine's own default of 10 gave recall 0.35 at 100k (measured)
        self.index_name = index_name
        self.models = _TenantModel("vpdocmeta")
        self._indexes: set[int] = set()

    @staticmethod
    def _doc(tenant: str, speaker_id: str) -> str:
        return f"vpdoc:{{{check_tenant(tenant)}}}:{check_speaker(speaker_id)}"

    def _index(self, dim: int) -> str:
        return f"{self.index_name}_{dim}"

    def _ensure_index(self, dim: int) -> None:
        if dim in self._indexes:
            return
        schema = [
            "tenant", "TAG", "CASESENSITIVE",
            "speaker_id", "TAG", "CASESENSITIVE", "SORTABLE",
            "site", "TAG", "CASESENSITIVE",
            "tags", "TAG", "CASESENSITIVE",
            "model_id", "TAG", "CASESENSITIVE",
            "dim", "NUMERIC",
            "vec", "VECTOR", "HNSW", 6, "TYPE", "FLOAT32", "DIM", dim, "DISTANCE_METRIC", "COSINE",
        ]  # fmt: skip
        try:
            self.client.execute_command(
                "FT.CREATE", self._index(dim), "ON", "HASH", "PREFIX", 1, "vpdoc:",
                "FILTER", f"@dim=={dim}", "SCHEMA", *schema,
            )  # fmt: skip
        except redis.ResponseError as exc:
            if "already exists" not in str(exc).lower():
                raise StoreError(f"cannot create the search index {self._index(dim)}: {exc}") from exc
        self._indexes.add(dim)

    def put(self, vp: Voiceprint) -> None:
        self.put_many([vp])

    def put_many(self, vps: Iterable[Voiceprint]) -> int:
        return _write_in_batches(vps, self._put_batch)

    def put_if_unchanged(self, old: Voiceprint, new: Voiceprint) -> bool:
        return self._put_batch(new.tenant, [new], unchanged=old)

    def _put_batch(self, tenant: str, batch: list[Voiceprint], unchanged: Voiceprint | None = None) -> bool:
        meta = self.models.key(tenant)
        model_id, dim = _one_model(tenant, batch)
        self._ensure_index(dim)
        written = True
        watched = [meta] if unchanged is None else [meta, self._doc(tenant, unchanged.speaker_id)]

        def write(pipe: redis.client.Pipeline) -> None:
            nonlocal written
            self.models.check(tenant, self.models.read(pipe, tenant), model_id, dim)
            if unchanged is not None:
                written = _same_version(pipe.hget(watched[1], "attrs"), unchanged)
                if not written:
                    return
            pipe.multi()
            pipe.hset(meta, mapping={"model_id": model_id, "dim": dim})
            for vp in batch:
                doc = self._doc(tenant, vp.speaker_id)
                pipe.delete(doc)  # a replaced voiceprint must not keep fields it no longer has
                fields = {
                    "tenant": tenant,
                    "speaker_id": vp.speaker_id,
                    "tags": ",".join(vp.tags),
                    "model_id": vp.model_id,
                    "dim": dim,
                    "attrs": json.dumps(_attributes(vp), ensure_ascii=False),
                    "vec": vp.vector.tobytes(),
                }
                if vp.site is not None:
                    fields["site"] = vp.site
                pipe.hset(doc, mapping=fields)

        try:
            self.client.transaction(write, *watched)
        except redis.ResponseError as exc:
            raise StoreError(f"Redis refused the voiceprint write: {exc}") from exc
        return written

    def get(self, tenant: str, speaker_id: str) -> Voiceprint | None:
        fields = self.client.hmget(self._doc(tenant, speaker_id), ["attrs", "vec"])
        if fields[0] is None:
            return None
        return _voiceprint(tenant, np.frombuffer(fields[1], dtype=np.float32), json.loads(fields[0]))

    def delete(self, tenant: str, speaker_id: str) -> bool:
        doc, meta = self._doc(tenant, speaker_id), self.models.key(tenant)
        deleted = False

        def remove(pipe: redis.client.Pipeline) -> None:
            nonlocal deleted
            deleted = bool(pipe.exists(doc))
            if not deleted:
                return
            model = self.models.read(pipe, tenant)
            last = model is not None and self._total(pipe, model[1], self._filter(tenant, None, ())) == 1
            pipe.multi()
            pipe.delete(doc)
            if last:
                pipe.delete(meta)  # an empty tenant may take another model

        # Watching the document serialises deletes of the same speaker; the meta key, the model change.
        self.client.transaction(remove, doc, meta)
        return deleted

    def list(
        self, tenant: str, site: str | None = None, offset: int = 0, limit: int = 100
    ) -> list[Voiceprint]:
        _check_page(offset, limit)
        where = self._filter(tenant, site, ())
        model = self.models.read(self.client, tenant)
        if model is None:
            return []
        reply = self.client.execute_command(
            "FT.SEARCH", self._index(model[1]), where,
            "SORTBY", "speaker_id", "ASC", "RETURN", 2, "attrs", "vec",
            "LIMIT", offset, limit, "DIALECT", 2,
        )  # fmt: skip
        found = []
        for fields in reply[2::2]:
            values = dict(zip(fields[0::2], fields[1::2], strict=True))
            vector = np.frombuffer(values[b"vec"], dtype=np.float32)
            found.append(_voiceprint(tenant, vector, json.loads(values[b"attrs"])))
        return found

    def count(self, tenant: str, site: str | None = None) -> int:
        where = self._filter(tenant, site, ())
        model = self.models.read(self.client, tenant)
        return 0 if model is None else self._total(self.client, model[1], where)

    def _total(self, client: Any, dim: int, where: str) -> int:
        reply = client.execute_command("FT.SEARCH", self._index(dim), where, "LIMIT", 0, 0, "DIALECT", 2)
        return int(reply[0])

    def search(
        self,
        tenant: str,
        vector: np.ndarray,
        *,
        model_id: str,
        k: int = 10,
        site: str | None = None,
        tags: Sequence[str] = (),
    ) -> list[SearchHit]:
        query = normalised(vector)
        _check_k(k)
        check_model(model_id)
        where = self._filter(tenant, site, tags)
        stored = self.models.read(self.client, tenant)
        if stored is None:
            return []
        self.models.check(tenant, stored, model_id, query.size)
        knn = f"({where})=>[KNN {k} @vec $vector EF_RUNTIME $ef AS distance]"
        try:
            reply = self.client.execute_command(
                "FT.SEARCH", self._index(query.size), knn,
                "PARAMS", 4, "vector", query.tobytes(), "ef", max(self.ef_runtime, k),
                "SORTBY", "distance", "ASC", "RETURN", 2, "distance", "attrs",
                "LIMIT", 0, k, "DIALECT", 2,
            )  # fmt: skip
        except redis.ResponseError as exc:
            raise StoreError(f"vector search failed for tenant {tenant!r}: {exc}") from exc
        hits = []
        for fields in reply[2::2]:
            values = dict(zip(fields[0::2], fields[1::2], strict=True))
            # COSINE in the query engine is a distance, 1 - cosine.
            hits.append(_hit(json.loads(values[b"attrs"]), 1.0 - float(values[b"distance"])))
        return hits

    def delete_tenant(self, tenant: str) -> int:
        meta = self.models.key(check_tenant(tenant))
        model = self.models.read(self.client, tenant)
        deleted = 0
        while model is not None:
            reply = self.client.execute_command(
                "FT.SEARCH", self._index(model[1]), self._filter(tenant, None, ()),
                "NOCONTENT", "LIMIT", 0, 1000, "DIALECT", 2,
            )  # fmt: skip
            if not reply[1:]:
                break
            deleted += self.client.delete(*reply[1:])
        self.client.delete(meta)
        return deleted

    def ready(self) -> bool:
        try:
            indexes = [name.decode() for name in self.client.execute_command("FT._LIST")]
            for name in indexes:
                if name.startswith(f"{self.index_name}_"):
                    info = self.client.execute_command("FT.INFO", name)
                    if int(dict(zip(info[0::2], info[1::2], strict=True))[b"indexing"]):
                        return False
        except redis.BusyLoadingError:
            return False
        return True

    @staticmethod
    def _filter(tenant: str, site: str | None, tags: Sequence[str]) -> str:
        parts = [f"@tenant:{{{escape_tag(check_tenant(tenant))}}}"]
        if site is not None:
            parts.append(f"@site:{{{escape_tag(check_label('site', site))}}}")
        parts += [f"@tags:{{{escape_tag(check_label('tag', tag))}}}" for tag in tags]
        return " ".join(parts)
