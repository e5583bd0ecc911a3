"""The embedding pool: micro-batches of one network length, the shedding policy (pure), and the pool on
the real CAM++ model — the same embeddings as one by one, back to every call in order, and a saturated
pool that sheds only the windows of calls verified with confidence, within its bound, counted."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from streamer.embedding import EmbeddingPool, NaiveEmbedding, embedding_service, may_shed
from streamer.embedding_queue import EmbeddingQueue, Shed, ShedPolicy
from streamer.session import CallSession, CallState
from streamer.settings import Settings
from verifier.calibration import packaged_calibration
from verifier.decision import State, WindowVerdict
from verifier.embedder import Embedder
from verifier.errors import AudioError
from verifier.models.registry import CAMPPLUS
from verifier.pipeline import load_speech


# --- the queue, without threads or asyncio ----------------------------------------------------------
def test_a_batch_is_the_oldest_window_and_others_of_its_length() -> None:
    queue: EmbeddingQueue[str] = EmbeddingQueue()
    for name, key in (("a1", 30), ("b1", 20), ("a2", 30), ("c1", 10), ("a3", 30), ("b2", 20)):
        assert queue.add(name, key, sheddable=False, sequence=0, now=0.0) == []
    assert queue.batch_ready(3) and not queue.batch_ready(4)  # three of the oldest's length
    assert queue.take_batch(2, now=0.1) == (["a1", "a2"], [])
    assert queue.take_batch(8, now=0.1) == (["b1", "b2"], [])  # now the oldest is b1
    assert queue.take_batch(8, now=0.1) == (["c1"], [])
    assert queue.take_batch(8, now=0.1) == (["a3"], [])
    assert len(queue) == 0 and queue.take_batch(8, now=0.2) == ([], [])


def test_nothing_is_shed_while_the_queue_keeps_up() -> None:
    queue: EmbeddingQueue[int] = EmbeddingQueue(ShedPolicy(capacity=8, thin_after_s=1.0, thin_every=3))
    for i in range(8):
        assert queue.add(i, 30, sheddable=True, sequence=i, now=0.5) == []
    assert len(queue) == 8


def test_when_behind_confident_calls_keep_one_window_in_k_and_others_all() -> None:
    queue: EmbeddingQueue[str] = EmbeddingQueue(ShedPolicy(capacity=100, thin_after_s=1.0, thin_every=3))
    queue.add("first", 30, sheddable=False, sequence=0, now=0.0)
    now = 1.5  # the oldest window has waited 1.5 s: saturated
    thinned = []
    for i in range(9):
        thinned += queue.add(f"verified-{i}", 30, sheddable=True, sequence=i, now=now)
        assert queue.add(f"suspect-{i}", 30, sheddable=False, sequence=i, now=now) == []
    assert [name for name, _ in thinned] == [f"verified-{i}" for i in range(9) if i % 3]
    assert {why for _, why in thinned} == {Shed.THINNED}
    assert len(queue) == 1 + 3 + 9


def test_a_full_queue_drops_confident_windows_first_then_overflows() -> None:
    queue: EmbeddingQueue[str] = EmbeddingQueue(ShedPolicy(capacity=3, thin_after_s=10.0, stale_after_s=10.0))
    for name, sheddable in (("s1", False), ("v1", True), ("s2", False)):
        queue.add(name, 30, sheddable=sheddable, sequence=0, now=0.0)
    assert queue.add("s3", 30, sheddable=False, sequence=0, now=0.0) == [("v1", Shed.DROPPED)]
    # Full of windows that must not be shed: a confident call's new window gives way…
    assert queue.add("v2", 30, sheddable=True, sequence=0, now=0.0) == [("v2", Shed.DROPPED)]
    # …and another call's window pushes out the oldest, counted as an overflow.
    assert queue.add("s4", 30, sheddable=False, sequence=0, now=0.0) == [("s1", Shed.OVERFLOW)]
    assert queue.take_batch(8, now=0.0) == (["s2", "s3", "s4"], [])


def test_stale_windows_of_confident_calls_are_dropped_when_a_batch_is_taken() -> None:
    queue: EmbeddingQueue[str] = EmbeddingQueue(ShedPolicy(capacity=10, thin_after_s=1.0, stale_after_s=3.0))
    queue.add("v-old", 30, sheddable=True, sequence=0, now=0.0)
    queue.add("s-old", 30, sheddable=False, sequence=0, now=0.0)
    queue.add("v-new", 30, sheddable=True, sequence=0, now=2.5)
    assert queue.take_batch(8, now=3.0) == (["s-old", "v-new"], [("v-old", Shed.DROPPED)])


def test_the_queue_stays_bounded_and_loses_nothing_unaccounted() -> None:
    policy = ShedPolicy(capacity=16, thin_after_s=0.05, thin_every=3, stale_after_s=0.1)
    queue: EmbeddingQueue[tuple[int, bool]] = EmbeddingQueue(policy)
    rng = random.Random(8)
    now, added, embedded, shed = 0.0, 0, [], []
    for step in range(5000):
        now += 0.01
        for _ in range(rng.randint(0, 4)):  # arrivals faster than the consumer below
            sheddable = rng.random() < 0.6
            shed += queue.add(
                (step, sheddable), rng.choice((10, 20, 30)), sheddable=sheddable, sequence=step, now=now
            )
            added += 1
            assert len(queue) <= policy.capacity
        if step % 3 == 0:  # the consumer: 4 windows per 3 steps, arrivals 2 per step
            batch, dropped = queue.take_batch(4, now)
            embedded += batch
            shed += dropped
    assert added == len(embedded) + len(shed) + len(queue)
    assert {why for _, why in shed} >= {Shed.THINNED, Shed.DROPPED}
    # Windows of calls that must not be shed go only when the queue is full of them.
    assert all(sheddable for (_, sheddable), why in shed if why is not Shed.OVERFLOW)


def test_may_shed_only_a_call_verified_with_confidence() -> None:
    calibration = packaged_calibration(CAMPPLUS.id)
    assert calibration is not None
    session = CallSession("t", "c", "native", CAMPPLUS.id, calibration)

    def verdict(state: State, llr: float, impostor: float) -> WindowVerdict:
        return WindowVerdict(state, 0.7, llr, 0.5, 9.0, 0.0, 9.0, 0.7, llr, impostor, "m")

    assert not may_shed(session)  # no verdict yet
    session.state, session.last_verdict = CallState.VERIFIED, verdict(State.VERIFIED, 8.0, 0.0)
    assert may_shed(session)
    session.last_verdict = verdict(State.VERIFIED, 1.5, 0.0)  # verified, but close to the threshold
    assert not may_shed(session)
    session.last_verdict = verdict(State.VERIFIED, 8.0, 0.5)  # some impostor evidence
    assert not may_shed(session)
    session.state, session.last_verdict = CallState.SUSPECT, verdict(State.SUSPECT, 8.0, 0.0)
    assert not may_shed(session)
    session.state = CallState.WARMING_UP
    assert not may_shed(session)


# --- the pool on the real model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def windows(telephone_devset: Path) -> list[np.ndarray]:
    """Real speech cut into windows of many lengths (0.5–3.2 s, some equal so they share batches)."""
    rng = random.Random(3)
    cut: list[np.ndarray] = []
    for path in sorted((telephone_devset / "wav").glob("*/0[1-3].wav")):
        speech = load_speech(path)
        start = 0
        while len(cut) < 60:
            length = rng.choice((8000, 12345, 16000, 24000, 24000, 48000, 48000, 51200))
            if start + length > len(speech):
                break
            cut.append(speech[start : start + length])
            start += length
    assert len(cut) == 60
    return cut


@pytest.fixture(scope="module")
def one_by_one(campplus: Embedder, windows: list[np.ndarray]) -> list[np.ndarray]:
    return [campplus.embed_batch([w])[0] for w in windows]


def shed_count(outcome: str) -> float:
    value = REGISTRY.get_sample_value("vpmon_embedding_shed_windows_total", {"outcome": outcome})
    return value or 0.0


def test_the_pool_gives_every_call_its_own_embeddings_in_order(
    campplus: Embedder, windows: list[np.ndarray], one_by_one: list[np.ndarray]
) -> None:
    calls = 9
    mine = [list(range(len(windows)))[c::calls] for c in range(calls)]

    async def run() -> list[list[np.ndarray | None]]:
        pool = EmbeddingPool(campplus, workers=2, max_batch=8, max_wait_s=0.002)

        async def call(indices: list[int]) -> list[np.ndarray | None]:
            results = []
            tasks = []
            for n, i in enumerate(indices):  # a call's windows arrive one after another…
                tasks.append(asyncio.create_task(pool.embed(windows[i], 0.0, sequence=n)))
                await asyncio.sleep(0)
            for task in tasks:  # …and its verdict loop awaits them in order
                results.append(await task)
            return results

        try:
            return await asyncio.gather(*(call(indices) for indices in mine))
        finally:
            await pool.close()

    results = asyncio.run(run())
    for indices, got in zip(mine, results, strict=True):
        assert len(got) == len(indices)
        for i, embedding in zip(indices, got, strict=True):
            assert embedding is not None
            np.testing.assert_allclose(embedding, one_by_one[i], atol=1e-5)


def test_a_saturated_pool_sheds_only_confident_calls_within_its_bound(
    campplus: Embedder, windows: list[np.ndarray], one_by_one: list[np.ndarray]
) -> None:
    # One worker and a queue of 4, with every window queued at once: the model is the slow consumer.
    # thin_after_s=0: the pool counts as behind whenever a window waits.
    policy = ShedPolicy(capacity=4, thin_after_s=0.0, thin_every=2, stale_after_s=3600.0)
    verified = list(range(0, 24, 2))  # a call verified with confidence
    suspect = list(range(1, 7, 2))  # a call under suspicion: every window must be embedded
    before = {why.value: shed_count(why.value) for why in Shed}

    async def run() -> tuple[list[np.ndarray | None], list[np.ndarray | None], int]:
        pool = EmbeddingPool(campplus, workers=1, max_batch=2, policy=policy)
        tasks = {}
        deepest = 0
        for n, i in enumerate(verified):
            tasks[i] = asyncio.create_task(pool.embed(windows[i], 0.0, sheddable=True, sequence=n))
            if n < len(suspect):
                j = suspect[n]
                tasks[j] = asyncio.create_task(pool.embed(windows[j], 0.0, sheddable=False, sequence=n))
            await asyncio.sleep(0)  # the windows join the queue
            deepest = max(deepest, len(pool.queue))
        try:
            return [await tasks[i] for i in verified], [await tasks[j] for j in suspect], deepest
        finally:
            await pool.close()

    verified_results, suspect_results, deepest = asyncio.run(run())
    assert deepest <= policy.capacity
    for j, embedding in zip(suspect, suspect_results, strict=True):
        assert embedding is not None
        np.testing.assert_allclose(embedding, one_by_one[j], atol=1e-5)
    shed = [i for i, e in zip(verified, verified_results, strict=True) if e is None]
    assert shed, "the saturated pool should have shed some of the verified call's windows"
    for i, embedding in zip(verified, verified_results, strict=True):
        if embedding is not None:
            np.testing.assert_allclose(embedding, one_by_one[i], atol=1e-5)
    counted = {why.value: shed_count(why.value) - before[why.value] for why in Shed}
    assert counted["overflow"] == 0
    assert counted["thinned"] > 0
    assert counted["thinned"] + counted["dropped"] == len(shed)


def test_a_window_too_short_fails_alone(campplus: Embedder, windows: list[np.ndarray]) -> None:
    async def run() -> list[object]:
        pool = EmbeddingPool(campplus, workers=1, max_batch=8, max_wait_s=0.05)
        tasks = [asyncio.create_task(pool.embed(w, 0.0)) for w in (windows[0][:16000], windows[1][:4000])]
        try:
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await pool.close()

    good, bad = asyncio.run(run())
    assert isinstance(good, np.ndarray) and isinstance(bad, AudioError)


def test_the_naive_mode_is_a_setting(monkeypatch: pytest.MonkeyPatch, campplus: Embedder) -> None:
    monkeypatch.setenv("VPMON_EMBEDDING_MODE", "naive")
    assert isinstance(embedding_service(campplus, Settings()), NaiveEmbedding)
    monkeypatch.setenv("VPMON_EMBEDDING_MODE", "pool")
    monkeypatch.setenv("VPMON_EMBEDDING_THREADS", str(Settings().embed_threads))  # no second session
    assert isinstance(embedding_service(campplus, Settings()), EmbeddingPool)
