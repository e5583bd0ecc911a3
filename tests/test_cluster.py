"""Scale-out on Redis Cluster: two real ``vpmon serve`` gateways against a real three-master Redis Cluster
(tests/cluster_fixtures.py), real websocket calls on real speech.

Three tenants whose hash tags land on three different masters (checked on the servers: CLUSTER KEYSLOT,
and each master's key count in the tenant's slot). Agents are enrolled through gateway A; a genuine call
(its agent bound through gateway A's API while it streams on gateway B: cross-gateway pub/sub) and a
takeover call stream on gateway B. Then: the genuine call is verified without an alert; the takeover
raises exactly one alert, which gateway A's SSE feed shows and a real webhook receiver gets exactly once;
gateway A lists the call live on B; 1:1 verify and 1:N search answer the same on both gateways; another
tenant's key sees none of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from redis.crc import key_slot
from websockets.asyncio.client import connect

from streamer.auth import Role
from streamer.feeds import alerts_key
from streamer.redis_cluster import LocalCluster, slot_ranges
from streamer.store import open_store
from tests.server_fixtures import RunningServer, start_vpmon, stop_vpmon
from tests.test_gateway import ENROL, alerts_for, native_call, speech, ws_url
from tests.test_redis_outage import NativeCall, assert_webhooks_once, follow_alerts
from tests.webhook_receiver import Receiver
from verifier.errors import StoreError

DEADLINE_S = 90.0  # generous: waiting for conditions, never a timing assertion
AGENTS = {  # tenant role → (agent id, dev-set speaker)
    "main": [("agent-ca", "tuxpaint_ca"), ("agent-es", "tuxpaint_es")],
    "second": [("agent-fr", "tuxpaint_fr")],
    "third": [("agent-nl", "fillets_nl_big")],
}


def tenant_per_master() -> dict[str, str]:
    """A tenant name for each role whose hash tag falls in another master's slot range (the cluster
    fixture gives master i the i-th of three even ranges)."""
    ranges = slot_ranges(3)
    chosen: dict[int, str] = {}
    candidate = 0
    while len(chosen) < len(ranges):
        name = f"tenant-{candidate}"
        slot = key_slot(f"{{{name}}}".encode())
        master = next(i for i, (low, high) in enumerate(ranges) if low <= slot <= high)
        chosen.setdefault(master, name)
        candidate += 1
    return dict(zip(AGENTS, chosen.values(), strict=True))


@dataclass
class Deployment:
    cluster: LocalCluster
    a: RunningServer
    b: RunningServer
    tenants: dict[str, str]  # role → tenant id
    keys: dict[str, dict[str, str]]  # role → {"admin": …, "monitor": …}
    receiver: Receiver
    endpoint: str


def enrol(server: RunningServer, key: str, devset: Path, agent: str, speaker: str) -> None:
    with server.client(key) as client:
        paths = sorted((devset / "wav" / speaker).glob("*.wav"))[:ENROL]
        files = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
        response = client.post("/v1/voiceprints", data={"speaker_id": agent}, files=files)
        assert response.status_code == 201, response.text


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, redis_cluster: LocalCluster, telephone_devset: Path
) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("scale-out")

    def gateway(name: str) -> RunningServer:
        (tmp / name).mkdir()
        return start_vpmon(
            tmp / name, redis_cluster, redis_cluster=True,  # type: ignore[arg-type]
            spool_dir=tmp / name / "spool", webhook_timeout_seconds=5,
        )  # fmt: skip

    with ThreadPoolExecutor(2) as starting:  # both load the model at once
        a, b = starting.map(gateway, ["a", "b"])
    receiver = Receiver().start()
    try:
        tenants = tenant_per_master()
        keys = {role: {"admin": a.key(t), "monitor": a.key(t, Role.MONITOR)} for role, t in tenants.items()}
        for role, agents in AGENTS.items():
            for agent, speaker in agents:
                enrol(a, keys[role]["admin"], telephone_devset, agent, speaker)
        with a.client(keys["main"]["admin"]) as client:
            created = client.post("/v1/webhooks", json={"url": receiver.url + "/hooks"})
            assert created.status_code == 201, created.text
        receiver.secrets["/hooks"] = created.json()["secret"]
        yield Deployment(redis_cluster, a, b, tenants, keys, receiver, created.json()["webhook"]["id"])
    except BaseException:
        print("gateway A:\n" + a.log_tail() + "\ngateway B:\n" + b.log_tail())
        raise
    finally:
        receiver.stop()
        stop_vpmon(a)
        stop_vpmon(b)


def test_tenants_live_on_different_masters(deployment: Deployment) -> None:
    """Each tenant's voiceprints are on one master, and the three tenants on three masters."""
    owners = {}
    for role, tenant in deployment.tenants.items():
        holders = []
        for node in deployment.cluster.nodes:
            client = node.client()
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", f"vp:{{{tenant}}}"))
            assert slot == int(client.execute_command("CLUSTER", "KEYSLOT", alerts_key(tenant)))
            if int(client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)):
                holders.append(node.port)
            client.close()
        assert len(holders) == 1, (role, tenant, holders)
        owners[role] = holders[0]
    assert len(set(owners.values())) == 3, owners


def test_the_query_engine_backend_is_refused_on_a_cluster(redis_cluster: LocalCluster) -> None:
    client = redis_cluster.client()
    try:
        with pytest.raises(StoreError, match="does not work on a Redis Cluster"):
            open_store(client, "ft")
        assert open_store(client).backend == "vset"
    finally:
        client.close()


class UnboundCall(NativeCall):
    """A native call that starts without an agent: one is bound through the API while it streams."""

    async def open(self) -> None:
        self.ws = await connect(
            ws_url(self.server, "/v1/streams/native"),
            additional_headers={"Authorization": f"Bearer {self.key}"},
        )
        start = {"type": "start", "call_id": self.call_id, "encoding": "pcm16", "sample_rate": 8000,
                 "channels": 1}  # fmt: skip
        await self.ws.send(json.dumps(start))
        self.reader = asyncio.create_task(self._read())


async def calls_on_b(deployment: Deployment, voices: dict[str, np.ndarray]) -> dict:
    """On gateway B: a genuine call whose agent gateway A binds mid-call, and a takeover call, at once;
    gateway A's alert feed followed all the while. Returns what each side saw."""
    a, b, monitor = deployment.a, deployment.b, deployment.keys["main"]["monitor"]
    feed: list[dict] = []
    follower = asyncio.create_task(follow_alerts(a, monitor, feed))
    genuine = UnboundCall(b, monitor, "cluster-genuine")
    half = len(voices["genuine"]) // 2
    auth = {"Authorization": f"Bearer {monitor}"}
    async with httpx.AsyncClient(base_url=a.url, headers=auth, timeout=30.0) as http_a:
        await genuine.open()
        await genuine.send(voices["genuine"][:half])
        takeover = asyncio.create_task(native_call(b, monitor, "cluster-takeover", voices["takeover"]))
        # Gateway A lists the call B holds, then binds its agent: B hears it through Redis pub/sub.
        listed: list[dict] = []
        deadline = time.monotonic() + DEADLINE_S
        while not any(c["call_id"] == "cluster-genuine" for c in listed) and time.monotonic() < deadline:
            listed = (await http_a.get("/v1/calls")).json()
            await asyncio.sleep(0.2)
        bound = (await http_a.put("/v1/calls/cluster-genuine/agent", json={"agent_id": "agent-ca"})).json()
        await genuine.send(voices["genuine"][half:])
        close = await genuine.stop()
        takeover_frames, takeover_close = await takeover
        after = (await http_a.get("/v1/calls")).json()
    deadline = time.monotonic() + DEADLINE_S
    while not any(e.get("call_id") == "cluster-takeover" for e in feed) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    await asyncio.sleep(2.0)  # room for a second alert that must not come
    follower.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await follower
    return {
        "listed": listed, "bound": bound, "genuine": genuine.frames, "genuine_close": close,
        "takeover": takeover_frames, "takeover_close": takeover_close, "after": after, "feed": feed,
    }  # fmt: skip


@pytest.fixture(scope="module")
def seen(deployment: Deployment, telephone_devset: Path) -> dict:
    genuine = speech(telephone_devset, "tuxpaint_ca", ENROL, 9)
    impostor = speech(telephone_devset, "tuxpaint_ro", 0, 5)
    voices = {"genuine": genuine, "takeover": np.concatenate([genuine, impostor])}
    return asyncio.run(calls_on_b(deployment, voices))


def test_a_lists_and_binds_a_call_streaming_on_b(seen: dict) -> None:
    live = next(c for c in seen["listed"] if c["call_id"] == "cluster-genuine")
    assert live["state"] != "ended" and live["agent_id"] is None
    assert seen["bound"]["live"] is True  # found live on the other gateway
    states = [f["state"] for f in seen["genuine"] if f["type"] == "verdict"]
    verdicts = [f for f in seen["genuine"] if f["type"] == "verdict"]
    agents = {f["agent_id"] for f in verdicts if f["state"] != "agent_unknown"}
    assert states[0] == "agent_unknown" and states[-1] == "verified" and agents == {"agent-ca"}, states
    assert seen["genuine_close"] == 1000
    ended = {c["call_id"]: c for c in seen["after"]}
    assert ended["cluster-genuine"]["state"] == "ended" and ended["cluster-genuine"]["agent_id"] == "agent-ca"


def test_genuine_is_verified_and_the_takeover_alerts_once_on_both_gateways(
    deployment: Deployment, seen: dict
) -> None:
    assert [f for f in seen["genuine"] if f["type"] == "alert"] == []
    pushed = [f for f in seen["takeover"] if f["type"] == "alert"]
    assert len(pushed) == 1 and pushed[0]["kind"] == "takeover" and pushed[0]["agent_id"] == "agent-ca"
    assert seen["takeover_close"] is not None and seen["takeover_close"].code == 1000
    # Gateway A's live feed (followed while B wrote) and its replay, and B's replay: the one alert.
    live_on_a = [(e["event"], e["call_id"]) for e in seen["feed"] if e["event"] != "ack"]
    assert live_on_a == [("alert", "cluster-takeover")], seen["feed"]
    monitor = deployment.keys["main"]["monitor"]
    for gateway in (deployment.a, deployment.b):
        assert alerts_for(gateway, monitor, "cluster-genuine") == []
        replay = alerts_for(gateway, monitor, "cluster-takeover")
        assert [(e["event"], e["kind"], e["alert_id"]) for e in replay] == [
            ("alert", "takeover", pushed[0]["alert_id"])
        ]


def test_the_webhook_gets_the_alert_exactly_once(deployment: Deployment, seen: dict) -> None:
    """Both gateways run a delivery worker on the same consumer group: one delivery in all."""
    expected = {next(f for f in seen["takeover"] if f["type"] == "alert")["alert_id"]}
    assert_webhooks_once(
        deployment.cluster, deployment.receiver, deployment.endpoint, expected, deployment.tenants["main"]
    )


def upload(path: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (path.name, path.read_bytes(), "audio/wav"))]


def test_verify_and_search_on_both_gateways(deployment: Deployment, telephone_devset: Path) -> None:
    unseen_ca = sorted((telephone_devset / "wav" / "tuxpaint_ca").glob("*.wav"))[-1]
    unseen_es = sorted((telephone_devset / "wav" / "tuxpaint_es").glob("*.wav"))[-1]
    admin = deployment.keys["main"]["admin"]
    for gateway in (deployment.a, deployment.b):
        with gateway.client(admin) as client:
            same = client.post("/v1/verify", data={"speaker_id": "agent-ca"}, files=upload(unseen_ca))
            assert same.status_code == 200 and same.json()["verdict"]["decision"] == "MATCH", same.text
            other = client.post("/v1/verify", data={"speaker_id": "agent-ca"}, files=upload(unseen_es))
            assert other.json()["verdict"]["decision"] == "MISMATCH", other.text
            hits = client.post("/v1/search", files=upload(unseen_es), data={"top_k": "5"}).json()["hits"]
            assert [h["speaker_id"] for h in hits] == ["agent-es", "agent-ca"]  # the tenant's two, no more
            assert hits[0]["above_threshold"] and not hits[1]["above_threshold"]


def test_other_tenants_see_nothing_of_it(deployment: Deployment, telephone_devset: Path, seen: dict) -> None:
    unseen_ca = sorted((telephone_devset / "wav" / "tuxpaint_ca").glob("*.wav"))[-1]
    for role in ("second", "third"):
        own = [agent for agent, _ in AGENTS[role]]
        for gateway in (deployment.a, deployment.b):
            with gateway.client(deployment.keys[role]["admin"]) as client:
                listed = client.get("/v1/voiceprints").json()["voiceprints"]
                assert [vp["speaker_id"] for vp in listed] == own
                assert client.get("/v1/voiceprints/agent-ca").status_code == 404
                verify = client.post("/v1/verify", data={"speaker_id": "agent-ca"}, files=upload(unseen_ca))
                assert verify.status_code == 404, verify.text
                hits = client.post("/v1/search", files=upload(unseen_ca), data={"top_k": "5"}).json()["hits"]
                assert [h["speaker_id"] for h in hits] == own
                assert client.get("/v1/alerts").json() == []
                assert client.get("/v1/calls").json() == []
                assert client.get("/v1/webhooks").json() == []
            assert alerts_for(gateway, deployment.keys[role]["monitor"], "cluster-takeover") == []
