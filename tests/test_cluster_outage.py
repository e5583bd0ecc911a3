"""A Redis Cluster master lost mid-call loses nothing: a real ``vpmon serve`` in cluster mode against its
own three-master cluster (tests/cluster_fixtures.py), the master holding one tenant's keys SIGKILLed while
live calls of two tenants run, then restarted on its port with its data dir (so its ``nodes.conf``).

The cluster has no replicas, so nothing takes over the dead master's slots: commands on them fail at
once (connection refused), and once the other masters have marked it failed (``cluster-node-timeout``)
the cluster stops serving every slot (``cluster-require-full-coverage``, on by default): the other
tenant's commands fail too (CLUSTERDOWN). The gateway goes through this as through a single Redis's
outage (tests/test_redis_outage.py): the calls keep being verified with the voiceprints they hold, both
tenants' alerts are spooled, ``/readyz`` says 503, a new call is refused with 503, and the API answers
nothing else in the 5xx range. When the master is back: each tenant's alerts reach its SSE feed
(reconnecting with ``Last-Event-ID``) and its webhook receiver exactly once, ``/readyz`` is 200 again,
the spool is empty, and the gateway log holds no traceback.

A second test kills every master, which redis-py's cluster client reports with an exception of its own
(not a ``RedisError``), and checks the same of one tenant's calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import websockets
from redis.crc import key_slot
from websockets.asyncio.client import connect

from streamer.auth import Role
from streamer.feeds import alerts_key
from streamer.redis_cluster import LocalCluster
from tests.cluster_fixtures import start_cluster
from tests.server_fixtures import RunningServer, start_vpmon, stop_vpmon
from tests.test_gateway import ENROL, speech, ws_url
from tests.test_redis_outage import (
    TENANT,
    NativeCall,
    TwilioCall,
    assert_webhooks_once,
    await_for,
    follow_alerts,
    prepare_tenant,
    readiness,
    scrape,
    spooled_entries,
    verdict_states,
)
from tests.webhook_receiver import Receiver

NODE_TIMEOUT_MS = 3000  # the dead master is failed by the others this long after it stops answering
# The API's answers during the outage may be these and nothing else (503: Redis cannot serve the request).
ALLOWED_STATUSES = {200, 503}
OUTAGE_BEGINS = "Redis cannot take writes"  # the one error the gateway logs for an outage (streamer/spool.py)
# uvicorn's websockets-sansio protocol logs this at error level after every websocket upgrade refused with
# an HTTP response (it never marks that handshake complete): here, the new calls refused with 503.
UVICORN_AFTER_A_REFUSAL = "ASGI callable returned without completing handshake."


class Timeline:
    """What happened when, in seconds from the SIGKILL; printed with the test's output."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.events: list[tuple[float, str]] = []

    def mark(self, what: str) -> None:
        self.events.append((time.monotonic() - self.start, what))
        print(f"[cluster outage] {self.events[-1][0]:+7.2f} s  {what}", flush=True)


def master_of(cluster: LocalCluster, tenant: str) -> int:
    """The index of the node that serves the tenant's hash tag, as the cluster itself says."""
    client = cluster.nodes[0].client()
    try:
        slot = int(client.execute_command("CLUSTER", "KEYSLOT", alerts_key(tenant)))
        assert slot == key_slot(f"{{{tenant}}}".encode())
        for shard in client.execute_command("CLUSTER", "SLOTS"):
            low, high, (_host, port, *_rest) = shard[0], shard[1], shard[2]
            if low <= slot <= high:
                return cluster.ports.index(int(port))
    finally:
        client.close()
    raise AssertionError(f"no master serves slot {slot}")


def other_master_tenant(cluster: LocalCluster, avoid: int) -> str:
    return next(name for i in range(1000) if master_of(cluster, name := f"tenant-{i}") != avoid)


def cluster_state(cluster: LocalCluster, node: int) -> str:
    client = cluster.nodes[node].client(timeout=2.0)
    try:
        info = client.execute_command("CLUSTER", "INFO").decode()
    finally:
        client.close()
    return next(
        line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("cluster_state")
    )


def keys_in_tenant_slot(cluster: LocalCluster, node: int, tenant: str) -> int:
    client = cluster.nodes[node].client()
    try:
        return int(client.execute_command("CLUSTER", "COUNTKEYSINSLOT", key_slot(f"{{{tenant}}}".encode())))
    finally:
        client.close()


def prepare_other_tenant(
    server: RunningServer, tenant: str, devset: Path, receiver: Receiver
) -> dict[str, str]:
    """As ``prepare_tenant`` (same agent, same speaker) for a second tenant, with its own webhook receiver."""
    admin = server.key(tenant)
    with server.client(admin) as client:
        paths = sorted((devset / "wav" / "tuxpaint_ca").glob("*.wav"))[:ENROL]
        files = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
        response = client.post("/v1/voiceprints", data={"speaker_id": "agent-ca"}, files=files)
        assert response.status_code == 201, response.text
        created = client.post("/v1/webhooks", json={"url": receiver.url + "/hooks"}).json()
    receiver.secrets["/hooks"] = created["secret"]
    return {"admin": admin, "monitor": server.key(tenant, Role.MONITOR), "endpoint": created["webhook"]["id"]}


def api_statuses(server: RunningServer, keys: dict[str, str]) -> dict[str, tuple[int, float]]:
    """What a supervisor's dashboard and a probe ask while the cluster is down: each route's status, and
    how long the answer took (for the report, not asserted)."""
    answers = {}
    with server.client(keys["monitor"]) as client:
        for path in ("/readyz", "/metrics", "/v1/calls", "/v1/alerts"):
            started = time.monotonic()
            status = client.get(path).status_code
            answers[path] = (status, round(time.monotonic() - started, 2))
    return answers


def statuses_of(answers: dict[str, tuple[int, float]]) -> set[int]:
    return {status for status, _ in answers.values()}


def unexpected_log_lines(log: Path) -> list[str]:
    """Gateway log lines that tell of a failure the outage should not cause: a traceback (a crashed
    request or task), any error besides the one the spool logs as the outage begins."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            found.append(line)  # not the gateway's structured log: e.g. a traceback printed by Python
            continue
        message = record.get("message", "")
        expected = (record.get("logger") == "vpmon.spool" and message.startswith(OUTAGE_BEGINS)) or (
            record.get("logger") == "uvicorn.error" and message == UVICORN_AFTER_A_REFUSAL
        )
        if "exception" in record or (record.get("level") in ("error", "critical") and not expected):
            found.append(line)
    return found


def start_gateway(tmp_path: Path, cluster: LocalCluster, spool_dir: Path) -> RunningServer:
    return start_vpmon(
        tmp_path,
        cluster,  # type: ignore[arg-type]
        redis_cluster=True,
        spool_dir=spool_dir,
        webhook_timeout_seconds=5,
        # While the cluster is down each request takes seconds (redis-py retries every command with
        # backoff before it gives up), and the calls are not fed meanwhile: not an idle timeout's business.
        ws_idle_seconds=180,
    )


def voices_of(devset: Path) -> dict[str, np.ndarray]:
    return {
        "genuine": speech(devset, "tuxpaint_ca", ENROL, 10),
        "impostor": speech(devset, "tuxpaint_ro", 0, 6),
    }


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """Each test its own cluster: they kill its nodes."""
    running = start_cluster(tmp_path / "cluster", node_timeout_ms=NODE_TIMEOUT_MS)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def receivers() -> Iterator[dict[str, Receiver]]:
    running = {"a": Receiver().start(), "b": Receiver().start()}
    try:
        yield running
    finally:
        for receiver in running.values():
            receiver.stop()


def test_a_dead_cluster_master_loses_no_alert(
    tmp_path: Path, cluster: LocalCluster, receivers: dict[str, Receiver], telephone_devset: Path
) -> None:
    spool_dir = tmp_path / "spool"
    gateway = start_gateway(tmp_path, cluster, spool_dir)
    try:
        victim = master_of(cluster, TENANT)  # tenant A is test_redis_outage's, for its Twilio helpers
        tenant_b = other_master_tenant(cluster, victim)
        keys = {
            "a": prepare_tenant(gateway, telephone_devset, receivers["a"]),
            "b": prepare_other_tenant(gateway, tenant_b, telephone_devset, receivers["b"]),
        }
        # Each tenant's keys on its own master: only A's is killed.
        survivor = master_of(cluster, tenant_b)
        assert survivor != victim
        assert (
            keys_in_tenant_slot(cluster, victim, TENANT) > 0
            and keys_in_tenant_slot(cluster, survivor, tenant_b) > 0
        )
        voices = voices_of(telephone_devset)
        asyncio.run(
            outage_scenario(
                gateway, cluster, victim, spool_dir, receivers, {"a": TENANT, "b": tenant_b}, keys, voices
            )
        )
        assert unexpected_log_lines(gateway.log) == []
    except BaseException:
        print(gateway.log_tail())
        raise
    finally:
        stop_vpmon(gateway)


async def outage_scenario(
    gateway: RunningServer, cluster: LocalCluster, victim: int, spool_dir: Path,
    receivers: dict[str, Receiver], tenants: dict[str, str], keys: dict[str, dict[str, str]],
    voices: dict[str, np.ndarray],
) -> None:  # fmt: skip
    genuine, impostor = voices["genuine"], voices["impostor"]
    half = len(genuine) // 2
    monitor_a, monitor_b = keys["a"]["monitor"], keys["b"]["monitor"]
    feeds: dict[str, list[dict]] = {"a": [], "b": []}
    followers = [
        asyncio.create_task(follow_alerts(gateway, keys[t]["monitor"], feeds[t])) for t in ("a", "b")
    ]
    takeover_a = NativeCall(gateway, monitor_a, "a-native-takeover")
    honest_a = NativeCall(gateway, monitor_a, "a-native-genuine")
    twilio_a = TwilioCall(gateway, "CA-cluster-takeover", genuine, impostor)
    takeover_b = NativeCall(gateway, monitor_b, "b-native-takeover")
    honest_b = NativeCall(gateway, monitor_b, "b-native-genuine")
    natives = [takeover_a, honest_a, takeover_b, honest_b]

    # Before the outage: every call verified.
    for call in (takeover_a, takeover_b):
        await call.open()
        await call.send(genuine)
    for call in (honest_a, honest_b):
        await call.open()
        await call.send(genuine[:half])
    await twilio_a.open_and_send_first()
    states: dict[str, list[str]] = {}

    def calls_verified() -> bool:
        states.update({c.call_id: [v["state"] for v in c.of_type("verdict")] for c in natives})
        states["CA-cluster-takeover"] = verdict_states(gateway, monitor_a, "CA-cluster-takeover")
        return all("verified" in seen for seen in states.values())

    await await_for(calls_verified, lambda: f"every call to be verified before the outage: {states}")
    before = scrape(gateway, monitor_a)
    assert before["vpmon_redis_up"] == 1 and before["vpmon_spooled_alerts"] == 0
    assert readiness(gateway, monitor_b).status_code == 200

    # The outage: tenant A's master SIGKILLed; A's calls go on at once.
    timeline = Timeline()
    cluster.nodes[victim].kill()
    timeline.mark(
        f"SIGKILL master {victim} (port {cluster.ports[victim]}), which holds tenant {tenants['a']!r}"
    )
    seen_at_kill = {call.call_id: len(call.frames) for call in natives}
    await takeover_a.send(impostor)
    await honest_a.send(genuine[half:])
    await twilio_a.send_rest()
    await await_for(lambda: takeover_a.of_type("alert"), "tenant A's takeover alert, pushed")
    timeline.mark("tenant A's native takeover alert pushed to its peer")

    def spooled(count: int) -> Callable[[], bool]:
        return lambda: scrape(gateway, monitor_a)["vpmon_spooled_alerts"] == count

    await await_for(spooled(2), "tenant A's two alerts spooled (its native and Twilio takeovers)")
    timeline.mark("tenant A's two alerts spooled")

    # Then the others fail the dead master, and the cluster stops serving every slot.
    survivor = next(i for i in range(len(cluster.nodes)) if i != victim)
    await await_for(lambda: cluster_state(cluster, survivor) == "fail", "the cluster to fail its dead master")
    timeline.mark("cluster_state:fail on the surviving masters (CLUSTERDOWN for every slot)")
    statuses = await asyncio.to_thread(api_statuses, gateway, keys["b"])
    timeline.mark(f"tenant B's API during CLUSTERDOWN (status, seconds): {statuses}")
    assert statuses_of(statuses) <= ALLOWED_STATUSES and statuses["/readyz"][0] == 503, statuses

    # Tenant B's calls, whose master is alive, go on too: its takeover alerts while the cluster is down.
    await takeover_b.send(impostor)
    await honest_b.send(genuine[half:])
    await await_for(lambda: takeover_b.of_type("alert"), "tenant B's takeover alert, pushed")
    timeline.mark("tenant B's native takeover alert pushed to its peer")

    await await_for(spooled(3), "tenant B's alert spooled behind A's")
    timeline.mark("tenant B's alert spooled")
    # Slow answers while the cluster is down: asked from threads, so the calls' readers keep reading.
    during = await asyncio.to_thread(scrape, gateway, monitor_a)
    assert during["vpmon_redis_up"] == 0
    for tenant in ("a", "b"):
        ready = await asyncio.to_thread(readiness, gateway, keys[tenant]["monitor"])
        assert ready.status_code == 503, ready.text
        assert ready.json()["alerts_spooled"] == 3, ready.text

    # Every native call kept being verified on its websocket; the honest ones raised nothing.
    def verified_since_the_kill() -> bool:
        return all(call.of_type("verdict", seen_at_kill[call.call_id]) for call in natives)

    await await_for(verified_since_the_kill, "verdicts on every native call during the outage")
    for call in (honest_a, honest_b):
        assert "mismatch" not in {v["state"] for v in call.of_type("verdict")} and not call.of_type("alert")
    for call in (takeover_a, takeover_b):
        assert "mismatch" in {v["state"] for v in call.of_type("verdict", seen_at_kill[call.call_id])}
        assert [a["kind"] for a in call.of_type("alert")] == ["takeover"]

    # On disk, in the order raised: A's two, then B's.
    spooled = spooled_entries(spool_dir, cluster)  # type: ignore[arg-type]
    assert [(e["tenant"], e["data"]["call_id"]) for e in spooled[2:]] == [(tenants["b"], "b-native-takeover")]
    assert sorted((e["tenant"], e["data"]["call_id"]) for e in spooled[:2]) == [
        (tenants["a"], "CA-cluster-takeover"), (tenants["a"], "a-native-takeover")
    ]  # fmt: skip
    expected = {t: [e["data"]["alert_id"] for e in spooled if e["tenant"] == tenants[t]] for t in ("a", "b")}
    assert takeover_a.of_type("alert")[0]["alert_id"] in expected["a"]
    assert takeover_b.of_type("alert")[0]["alert_id"] in expected["b"]

    # A new call, of either tenant, cannot start while the cluster is down: a clear 503.
    for monitor in (monitor_a, monitor_b):
        with pytest.raises(websockets.InvalidStatus) as refused:
            await connect(
                ws_url(gateway, "/v1/streams/native"),
                additional_headers={"Authorization": f"Bearer {monitor}"},
            )
        assert refused.value.response.status_code == 503
    timeline.mark("new calls refused with 503")

    # Two calls end during the outage; the others go on across the master's return.
    assert await honest_a.stop() == 1000
    assert await honest_b.stop() == 1000

    # The master returns, on its port with its data dir: it rejoins, the spool drains, in order, once.
    await asyncio.to_thread(cluster.nodes[victim].start)
    timeline.mark(f"master {victim} restarted (same port, same nodes.conf)")
    await await_for(lambda: all(cluster_state(cluster, i) == "ok" for i in range(3)), "cluster_state:ok")
    timeline.mark("cluster_state:ok on every master")
    await await_for(lambda: readiness(gateway, monitor_a).status_code == 200, "/readyz to be 200 again")
    timeline.mark("/readyz 200 again")
    for tenant in ("a", "b"):
        assert readiness(gateway, keys[tenant]["monitor"]).json()["alerts_spooled"] == 0
    assert await takeover_a.stop() == 1000
    assert await takeover_b.stop() == 1000
    assert await twilio_a.stop() == 1000
    after = scrape(gateway, monitor_a)
    assert after["vpmon_redis_up"] == 1 and after["vpmon_spooled_alerts"] == 0
    assert after["vpmon_alerts_unspooled_total"] - before["vpmon_alerts_unspooled_total"] == 3
    assert spooled_entries(spool_dir, cluster) == []  # type: ignore[arg-type]

    def on_the_feeds() -> bool:
        return all(set(expected[t]) <= {a["alert_id"] for a in feeds[t]} for t in ("a", "b"))

    await await_for(on_the_feeds, "every alert on both tenants' SSE feeds")
    timeline.mark("every alert on both tenants' SSE feeds")
    for follower in followers:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    for tenant in ("a", "b"):
        alerts = [a for a in feeds[tenant] if a["event"] == "alert"]
        assert [a["alert_id"] for a in alerts] == expected[tenant]  # once each, in the order raised

    with gateway.client(monitor_a) as client:
        calls = {c["call_id"]: c for c in client.get("/v1/calls").json()}
    assert calls["a-native-genuine"]["state"] == "ended" and calls["a-native-takeover"]["alerts"] == 1
    for tenant in ("a", "b"):
        await asyncio.to_thread(
            assert_webhooks_once, cluster, receivers[tenant], keys[tenant]["endpoint"], set(expected[tenant]),
            tenants[tenant],
        )  # fmt: skip
    timeline.mark("every alert delivered once to each tenant's webhook receiver")


# --- every master down -------------------------------------------------------------------------------
def test_the_whole_cluster_down_loses_no_alert(
    tmp_path: Path, cluster: LocalCluster, receivers: dict[str, Receiver], telephone_devset: Path
) -> None:
    """When no node answers, redis-py's cluster client raises its own ``RedisClusterException`` (not a
    ``RedisError``) from every command: the gateway rides it out as any outage."""
    spool_dir = tmp_path / "spool"
    gateway = start_gateway(tmp_path, cluster, spool_dir)
    try:
        keys = prepare_tenant(gateway, telephone_devset, receivers["a"])
        asyncio.run(
            whole_cluster_down(gateway, cluster, spool_dir, receivers["a"], keys, voices_of(telephone_devset))
        )
        assert unexpected_log_lines(gateway.log) == []
    except BaseException:
        print(gateway.log_tail())
        raise
    finally:
        stop_vpmon(gateway)


async def whole_cluster_down(
    gateway: RunningServer, cluster: LocalCluster, spool_dir: Path, receiver: Receiver,
    keys: dict[str, str], voices: dict[str, np.ndarray],
) -> None:  # fmt: skip
    genuine, impostor = voices["genuine"], voices["impostor"]
    half = len(genuine) // 2
    monitor = keys["monitor"]
    feed: list[dict] = []
    follower = asyncio.create_task(follow_alerts(gateway, monitor, feed))
    takeover = NativeCall(gateway, monitor, "whole-takeover")
    honest = NativeCall(gateway, monitor, "whole-genuine")
    await takeover.open()
    await takeover.send(genuine)
    await honest.open()
    await honest.send(genuine[:half])

    def verified() -> bool:
        return all(any(v["state"] == "verified" for v in c.of_type("verdict")) for c in (takeover, honest))

    await await_for(verified, "both calls to be verified before the outage")
    before = scrape(gateway, monitor)

    timeline = Timeline()
    for node in cluster.nodes:
        node.kill()
    timeline.mark("SIGKILL every master")
    seen_at_kill = {call.call_id: len(call.frames) for call in (takeover, honest)}
    await takeover.send(impostor)
    await honest.send(genuine[half:])
    await await_for(lambda: takeover.of_type("alert"), "the takeover's alert, pushed")
    timeline.mark("takeover alert pushed to its peer")
    await await_for(
        lambda: all(c.of_type("verdict", seen_at_kill[c.call_id]) for c in (takeover, honest)),
        "verdicts on both calls during the outage",
    )
    during = await asyncio.to_thread(scrape, gateway, monitor)
    assert during["vpmon_redis_up"] == 0 and during["vpmon_spooled_alerts"] == 1
    ready = await asyncio.to_thread(readiness, gateway, monitor)
    assert ready.status_code == 503 and "Redis cannot be reached" in ready.json()["detail"], ready.text
    assert ready.json()["alerts_spooled"] == 1
    statuses = await asyncio.to_thread(api_statuses, gateway, keys)
    timeline.mark(f"API with no node answering (status, seconds): {statuses}")
    assert statuses_of(statuses) <= ALLOWED_STATUSES, statuses
    assert not honest.of_type("alert") and [a["kind"] for a in takeover.of_type("alert")] == ["takeover"]
    spooled = spooled_entries(spool_dir, cluster)  # type: ignore[arg-type]
    assert [e["data"]["alert_id"] for e in spooled] == [takeover.of_type("alert")[0]["alert_id"]]
    with pytest.raises(websockets.InvalidStatus) as refused:
        await connect(
            ws_url(gateway, "/v1/streams/native"), additional_headers={"Authorization": f"Bearer {monitor}"}
        )
    assert refused.value.response.status_code == 503
    assert await honest.stop() == 1000

    for node in cluster.nodes:
        await asyncio.to_thread(node.start)
    timeline.mark("every master restarted (same ports, same nodes.conf)")
    await await_for(lambda: all(cluster_state(cluster, i) == "ok" for i in range(3)), "cluster_state:ok")
    timeline.mark("cluster_state:ok on every master")
    await await_for(lambda: readiness(gateway, monitor).status_code == 200, "/readyz to be 200 again")
    timeline.mark("/readyz 200 again")
    assert await takeover.stop() == 1000
    after = scrape(gateway, monitor)
    assert after["vpmon_spooled_alerts"] == 0 and spooled_entries(spool_dir, cluster) == []  # type: ignore[arg-type]
    assert after["vpmon_alerts_unspooled_total"] - before["vpmon_alerts_unspooled_total"] == 1

    expected = [e["data"]["alert_id"] for e in spooled]
    await await_for(lambda: set(expected) <= {a["alert_id"] for a in feed}, "the SSE feed to get the alert")
    follower.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await follower
    assert [a["alert_id"] for a in feed if a["event"] == "alert"] == expected
    with gateway.client(monitor) as client:
        calls = {c["call_id"]: c for c in client.get("/v1/calls").json()}
    assert calls["whole-genuine"]["state"] == "ended" and calls["whole-takeover"]["alerts"] == 1
    await asyncio.to_thread(assert_webhooks_once, cluster, receiver, keys["endpoint"], set(expected))
    timeline.mark("the alert delivered once to the webhook receiver")
