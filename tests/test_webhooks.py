"""Webhooks: the signing and verification helper (known answers computed with openssl), the pure delivery
rules, two delivery workers sharing a real Redis, and end to end: real calls with takeovers into a real
``vpmon serve`` → signed deliveries to a real local HTTP receiver that fails some on purpose; every alert
arrives, once per webhook id, and a gateway restart mid-delivery resumes from the consumer group."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aredis
import websockets
from websockets.asyncio.client import connect

from streamer.auth import Role
from streamer.feeds import Feeds, alerts_key
from streamer.redis_server import RedisServer
from streamer.webhook_verify import (
    WebhookVerificationError,
    new_secret,
    secret_key,
    sign,
    signature_header,
    verify,
)
from streamer.webhooks import (
    Endpoint,
    FeedEntry,
    WebhookStore,
    WebhookWorker,
    build_payload,
    check_url,
    delivery_headers,
    group_name,
    outcome,
    retry_delay,
    webhook_id,
)
from streamer.webhooks_api import router as webhooks_router
from tests.server_fixtures import RunningServer, start_vpmon, stop_vpmon
from tests.test_gateway import ENROL, native_call, speech, ws_url
from tests.webhook_receiver import Receiver
from verifier.errors import InvalidValueError

# --- the signature helper -----------------------------------------------------------------------------
# The Standard Webhooks specification's vector, and one of ours; both checked with
# `openssl dgst -sha256 -mac HMAC -macopt hexkey:… -binary | base64`.
SPEC = (
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
    b'{"test": 2432232314}', "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
)  # fmt: skip
OURS = (
    "whsec_dnBtb24gdGVzdCBzZWNyZXQsIDMyIGJ5dGVzIGxvbmc=", "msg_abcdefghijkl_1700000000000-0", 1700000000,
    b'{"type":"alert.takeover","data":{"call_id":"c1"}}', "v1,fbTOs9wLtErQcABwLxQ+tMVxUSiZSOXTQAcONBIRWYY=",
)  # fmt: skip


def headers_for(webhook: str, timestamp: int, signature: str) -> dict[str, str]:
    return {"Webhook-Id": webhook, "Webhook-Timestamp": str(timestamp), "Webhook-Signature": signature}


@pytest.mark.parametrize("vector", [SPEC, OURS], ids=["spec", "ours"])
def test_known_answers(vector: tuple) -> None:
    secret, webhook, timestamp, body, expected = vector
    assert sign(secret, webhook, timestamp, body) == expected
    assert sign(secret.removeprefix("whsec_"), webhook, timestamp, body) == expected
    assert verify(secret, headers_for(webhook, timestamp, expected), body, now=timestamp) == json.loads(body)


def test_verification_refuses_what_it_must() -> None:
    secret, webhook, timestamp, body, signature = OURS
    good = headers_for(webhook, timestamp, signature)

    def refused(**changes: object) -> str:
        args = {"secret": secret, "headers": good, "body": body, "now": timestamp, **changes}
        with pytest.raises(WebhookVerificationError) as error:
            verify(**args)  # type: ignore[arg-type]
        return str(error.value)

    assert "no webhook-signature matches" in refused(secret=new_secret())
    assert "no webhook-signature matches" in refused(body=body.replace(b"c1", b"c2"))
    assert "no webhook-signature matches" in refused(headers={**good, "Webhook-Id": "msg_other"})
    assert "no webhook-signature matches" in refused(
        headers={**good, "Webhook-Timestamp": str(timestamp + 1)}
    )
    assert "tolerance" in refused(now=timestamp + 301)
    assert "tolerance" in refused(now=timestamp - 301)
    assert verify(secret, good, body, now=timestamp + 299)  # within the default 300 s
    assert "tolerance" in refused(now=timestamp + 61, tolerance=60)
    assert "missing" in refused(headers={k: v for k, v in good.items() if k != "Webhook-Signature"})
    assert "not an integer" in refused(headers={**good, "Webhook-Timestamp": "soon"})
    assert "no webhook-signature matches" in refused(
        headers={**good, "Webhook-Signature": "v1a," + signature[3:]}
    )
    with pytest.raises(ValueError, match="base64"):
        verify("whsec_not base64!", good, body, now=timestamp)


def test_rotation_sends_both_signatures_and_either_secret_verifies() -> None:
    old, new = new_secret(), new_secret()
    assert old != new and len(secret_key(old)) == 32 and old.startswith("whsec_")
    header = signature_header([new, old], "msg_x", 1700000000, b"{}")
    assert header == f"{sign(new, 'msg_x', 1700000000, b'{}')} {sign(old, 'msg_x', 1700000000, b'{}')}"
    for secret in (old, new):
        assert verify(secret, headers_for("msg_x", 1700000000, header), b"{}", now=1700000000) == {}
    with pytest.raises(WebhookVerificationError):
        verify(new_secret(), headers_for("msg_x", 1700000000, header), b"{}", now=1700000000)

    endpoint = Endpoint("e" * 12, "https://x.test/h", ("alert",), "", new, "t", old, 1000.0)
    assert endpoint.signing_secrets(999.0) == [new, old]
    assert endpoint.signing_secrets(1000.0) == [new]  # the overlap is over
    assert endpoint.public()["secret"] == f"whsec_…{new[-4:]}" and new not in json.dumps(endpoint.public())


# --- the pure delivery rules ----------------------------------------------------------------------------
def test_payload_ids_and_headers_are_stable() -> None:
    entry = FeedEntry("1700000000123-4", "alert", {"kind": "takeover", "call_id": "c1", "agent_id": "a"})
    body = build_payload("acme", entry)
    assert json.loads(body) == {
        "type": "alert.takeover", "timestamp": "2023-11-14T22:13:20.123Z", "event_id": "1700000000123-4",
        "tenant": "acme", "data": {"kind": "takeover", "call_id": "c1", "agent_id": "a"},
    }  # fmt: skip
    assert build_payload("acme", entry) == body
    assert webhook_id("abcdefghijkl", entry.id) == "msg_abcdefghijkl_1700000000123-4"
    assert "." not in webhook_id("abcdefghijkl", entry.id)  # the signed content's separator
    notice = FeedEntry("1-0", "notice", {"kind": "agent_not_enrolled"})
    assert json.loads(build_payload("acme", notice))["type"] == "notice.agent_not_enrolled"
    assert json.loads(build_payload("acme", FeedEntry("1-0", "ack", {})))["type"] == "alert.acknowledged"

    secret = new_secret()
    endpoint = Endpoint("abcdefghijkl", "https://x.test/h", ("alert",), "", secret, "t")
    headers = delivery_headers(endpoint, "msg_1", body, 1700000000.7)
    assert headers["webhook-timestamp"] == "1700000000"
    assert verify(secret, headers, body, now=1700000000)["event_id"] == entry.id


def test_retry_schedule_backs_off_with_bounded_deterministic_jitter() -> None:
    schedule = [5, 30, 120]
    delays = [retry_delay(schedule, n, "msg_a") for n in (1, 2, 3)]
    for delay, base in zip(delays, schedule, strict=True):
        assert delay is not None and 0.9 * base <= delay <= 1.1 * base
    assert delays == [retry_delay(schedule, n, "msg_a") for n in (1, 2, 3)]  # every gateway agrees
    assert len({retry_delay(schedule, 1, f"msg_{i}") for i in range(20)}) > 10  # spread between webhooks
    assert retry_delay(schedule, 4, "msg_a") is None and retry_delay(schedule, 0, "msg_a") is None


def test_outcomes_and_endpoint_checks() -> None:
    assert [outcome(s) for s in (200, 204, 299)] == ["delivered"] * 3
    assert [outcome(s) for s in (301, 400, 404, 429, 500, 503)] == ["retry"] * 6
    assert outcome(410) == "gone"
    assert check_url("https://hooks.example.com/vpmon?x=1")
    for bad in ("ftp://x/y", "hooks.example.com/x", "https:///x", "https://user:pw@x.test/", "javascript:x"):
        with pytest.raises(InvalidValueError):
            check_url(bad)


# --- two delivery workers on one real Redis ------------------------------------------------------------
def wait_for(condition: Callable[[], object], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver(first_failures=["500", "timeout", "drop"]).start()
    try:
        yield running
    finally:
        running.stop()


def assert_each_once(receiver: Receiver, path: str, expected: set[str], failed_on_purpose: int) -> None:
    """Every expected id arrived with a valid signature; an id came twice only after a failure made on
    purpose, with the same body; nothing else came."""
    requests = receiver.on(path)
    assert {r.webhook_id for r in requests} == expected
    assert all(r.verified == "ok" for r in requests), [r.verified for r in requests]
    counts = Counter(r.webhook_id for r in requests)
    failed = {r.webhook_id for r in requests if r.answer in ("500", "timeout", "drop")}
    assert len(failed) == failed_on_purpose
    assert {i: n for i, n in counts.items() if n > 1} == dict.fromkeys(failed, 2)
    for webhook in failed:
        bodies = {r.body for r in requests if r.webhook_id == webhook}
        assert len(bodies) == 1, "a redelivery carries the same payload"


def test_two_gateways_deliver_each_alert_once(redis_server: RedisServer, receiver: Receiver) -> None:
    sync = redis_server.client()
    sync.flushall()
    store = WebhookStore(sync)
    created = store.create("two", receiver.url + "/hooks")
    receiver.secrets["/hooks"] = created.secret

    async def scenario() -> list[str]:
        client = aredis.Redis.from_url(redis_server.url, protocol=2)
        workers = [
            WebhookWorker(client, name, [0.2, 0.4, 0.6], timeout_s=1.0, poll_s=0.2, refresh_s=0.2)
            for name in ("gateway-a", "gateway-b")
        ]
        tasks = [asyncio.create_task(w.run()) for w in workers]
        feeds = Feeds(client)
        ids = [
            await feeds.add_alert("two", "alert", {"kind": "takeover", "call_id": f"c{i}"}) for i in range(12)
        ]
        await feeds.acknowledge("two", ids[0], {"key_id": "k", "name": "n"})  # not wanted by this endpoint
        ids.append(await feeds.add_alert("two", "notice", {"kind": "agent_not_enrolled", "call_id": "x"}))
        expected = {webhook_id(created.endpoint.id, i) for i in ids}
        await asyncio.to_thread(
            wait_for, lambda: receiver.answered_2xx("/hooks") >= expected, "every delivery"
        )
        group = alerts_key("two"), group_name(created.endpoint.id)
        await asyncio.to_thread(
            wait_for, lambda: sync.xpending(*group)["pending"] == 0, "every entry acknowledged"
        )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        return ids

    ids = asyncio.run(scenario())
    assert_each_once(
        receiver, "/hooks", {webhook_id(created.endpoint.id, i) for i in ids}, failed_on_purpose=3
    )
    types = Counter(json.loads(r.body)["type"] for r in receiver.on("/hooks"))
    assert types["alert.acknowledged"] == 0 and types["notice.agent_not_enrolled"] >= 1


# --- end to end: real calls into a real server ------------------------------------------------------------
TIMEOUT_S = 1.5
SCHEDULE = "[0.3, 0.6, 1.0]"  # 4 attempts; each retry also waits out the timeout + 2 s (in flight)


def start_hooked_server(tmp: Path, redis_server: RedisServer) -> RunningServer:
    return start_vpmon(tmp, redis_server, webhook_retry_schedule=SCHEDULE, webhook_timeout_seconds=TIMEOUT_S)


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory, api_redis: RedisServer) -> Iterator[RunningServer]:
    server = start_hooked_server(tmp_path_factory.mktemp("hooked"), api_redis)
    try:
        yield server
    finally:
        stop_vpmon(server)


@pytest.fixture(scope="module")
def hooks_tenant(hooked: RunningServer, telephone_devset: Path) -> dict:
    admin = hooked.key("hooks")
    with hooked.client(admin) as client:
        paths = sorted((telephone_devset / "wav" / "tuxpaint_ca").glob("*.wav"))[:ENROL]
        files = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
        response = client.post("/v1/voiceprints", data={"speaker_id": "agent-ca"}, files=files)
        assert response.status_code == 201, response.text
    genuine = speech(telephone_devset, "tuxpaint_ca", ENROL, 10)
    takeover = np.concatenate([genuine, speech(telephone_devset, "tuxpaint_ro", 0, 6)])
    return {"admin": admin, "monitor": hooked.key("hooks", Role.MONITOR), "takeover": takeover}


async def not_enrolled_call(server: RunningServer, key: str, call_id: str) -> int:
    start = {"type": "start", "call_id": call_id, "agent_id": "nobody", "encoding": "pcm16",
             "sample_rate": 8000, "channels": 1}  # fmt: skip
    async with connect(
        ws_url(server, "/v1/streams/native"), additional_headers={"Authorization": f"Bearer {key}"}
    ) as ws:
        await ws.send(json.dumps(start))
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await ws.recv()
        return ws.protocol.close_rcvd.code


def test_api_manages_endpoints(hooked: RunningServer, hooks_tenant: dict) -> None:
    with hooked.client(hooks_tenant["admin"]) as admin:
        created = admin.post("/v1/webhooks", json={"url": "https://hooks.example.com/x", "events": ["alert"]})
        assert created.status_code == 201, created.text
        body = created.json()
        endpoint = body["webhook"]
        assert body["secret"].startswith("whsec_") and len(secret_key(body["secret"])) == 32
        assert created.headers["location"] == f"/v1/webhooks/{endpoint['id']}"
        assert endpoint["secret"] == f"whsec_…{body['secret'][-4:]}" and endpoint["events"] == ["alert"]
        listed = admin.get("/v1/webhooks").json()
        assert [e["id"] for e in listed] == [endpoint["id"]] and body["secret"] not in json.dumps(listed)

        rotated = admin.post(f"/v1/webhooks/{endpoint['id']}/rotate-secret").json()
        assert rotated["secret"] != body["secret"] and rotated["webhook"]["previous_secret_expires_at"]

        for bad in (
            {"url": "ftp://x/y"},
            {"url": "https://x.test", "events": ["verdict"]},
            {"url": "https://x.test", "events": []},
        ):
            assert admin.post("/v1/webhooks", json=bad).status_code == 422, bad

        other = hooked.client(hooked.key("hooks-other"))
        assert other.get(f"/v1/webhooks/{endpoint['id']}").status_code == 404
        assert other.delete(f"/v1/webhooks/{endpoint['id']}").status_code == 404
        assert other.get("/v1/webhooks").json() == []
        other.close()
        monitor = hooked.client(hooks_tenant["monitor"])
        assert monitor.get("/v1/webhooks").status_code == 403
        monitor.close()

        assert admin.delete(f"/v1/webhooks/{endpoint['id']}").status_code == 204
        assert admin.get(f"/v1/webhooks/{endpoint['id']}").status_code == 404
        assert admin.get("/v1/webhooks").json() == []

    no_key = hooked.client(None)
    for route in webhooks_router.routes:
        for method in route.methods:  # type: ignore[attr-defined]
            path = route.path.replace("{endpoint_id}", "abcdefghijkl")  # type: ignore[attr-defined]
            assert no_key.request(method, path).status_code == 401, (method, path)
    no_key.close()


def test_real_takeovers_reach_the_receiver_once_despite_failures(
    hooked: RunningServer, hooks_tenant: dict, receiver: Receiver
) -> None:
    admin = hooked.client(hooks_tenant["admin"])
    endpoints = {}
    for path, events in (("/hooks", ["alert", "notice"]), ("/always-fail", ["alert"]), ("/gone", ["alert"])):
        created = admin.post("/v1/webhooks", json={"url": receiver.url + path, "events": events}).json()
        receiver.secrets[path] = created["secret"]
        endpoints[path] = created["webhook"]["id"]

    async def calls() -> None:
        await asyncio.gather(
            *(native_call(hooked, hooks_tenant["monitor"], f"hook-takeover-{i}", hooks_tenant["takeover"])
              for i in range(3)),
            not_enrolled_call(hooked, hooks_tenant["monitor"], "hook-nobody"),
        )  # fmt: skip

    asyncio.run(calls())
    feed = admin.get("/v1/alerts").json()
    takeovers = [a["id"] for a in feed if a["type"] == "alert" and a["data"]["kind"] == "takeover"]
    assert len(takeovers) == 3 and len(feed) == 4, feed
    every_id = {a["id"] for a in feed}

    # An acknowledgement is no alert: the default endpoint never gets it.
    assert admin.post(f"/v1/alerts/{takeovers[0]}/ack").status_code == 200

    expected = {webhook_id(endpoints["/hooks"], i) for i in every_id}
    wait_for(lambda: receiver.answered_2xx("/hooks") >= expected, "every alert and notice at /hooks")
    assert_each_once(receiver, "/hooks", expected, failed_on_purpose=3)
    bodies = [json.loads(r.body) for r in receiver.on("/hooks")]
    assert {b["type"] for b in bodies} == {"alert.takeover", "notice.agent_not_enrolled"}
    assert {b["data"]["call_id"] for b in bodies} >= {f"hook-takeover-{i}" for i in range(3)} | {
        "hook-nobody"
    }
    assert all(b["tenant"] == "hooks" for b in bodies)

    # The endpoint that always fails: every takeover ends in the dead letters after 4 attempts.
    def dead_at(path: str) -> list[dict]:
        return [
            d for d in admin.get("/v1/webhooks/dead-letters").json() if d["endpoint_id"] == endpoints[path]
        ]

    wait_for(lambda: len(dead_at("/always-fail")) == len(takeovers), "the dead letters")
    letters = dead_at("/always-fail")
    assert {d["event_id"] for d in letters} == set(takeovers)
    assert all(d["attempts"] == 4 and d["last_error"] == "HTTP 500" for d in letters)
    assert all(d["payload"]["type"] == "alert.takeover" for d in letters)
    assert Counter(r.webhook_id for r in receiver.on("/always-fail")) == dict.fromkeys(
        {webhook_id(endpoints["/always-fail"], i) for i in takeovers}, 4
    )

    # 410 Gone: the endpoint is disabled after its first delivery, which is a dead letter.
    wait_for(lambda: admin.get(f"/v1/webhooks/{endpoints['/gone']}").json()["disabled_at"], "410 to disable")
    assert "410" in admin.get(f"/v1/webhooks/{endpoints['/gone']}").json()["disabled_reason"]
    gone = dead_at("/gone")
    assert len(gone) == 1 and gone[0]["attempts"] == 1 and len(receiver.on("/gone")) == 1

    # Once /hooks has consumed the acknowledgement too, nothing of it was sent.
    group = alerts_key("hooks"), group_name(endpoints["/hooks"])
    client = hooked.redis.client()
    newest = client.xrevrange(group[0], count=1)[0][0].decode()

    def consumed_all() -> bool:
        info = next(g for g in client.xinfo_groups(group[0]) if g["name"].decode() == group[1])
        return info["last-delivered-id"].decode() == newest and info["pending"] == 0

    wait_for(consumed_all, "/hooks to consume the acknowledgement")
    assert all(json.loads(r.body)["type"] != "alert.acknowledged" for r in receiver.on("/hooks"))
    for path in ("/hooks", "/always-fail"):
        assert admin.delete(f"/v1/webhooks/{endpoints[path]}").status_code == 204
    admin.close()


def test_gateway_restart_mid_delivery_resumes_from_the_group(
    tmp_path: Path, api_redis: RedisServer, hooked: RunningServer, hooks_tenant: dict, receiver: Receiver
) -> None:
    """A gateway stops while a delivery hangs at the receiver; another gateway delivers it again, with the
    same webhook id, from the consumer group's pending entries."""
    first = start_hooked_server(tmp_path, api_redis)
    second = None
    try:
        admin = first.client(hooks_tenant["admin"])
        created = admin.post("/v1/webhooks", json={"url": receiver.url + "/hang"}).json()
        receiver.secrets["/hang"] = created["secret"]
        endpoint = created["webhook"]["id"]
        # The module's server runs a worker too; stop it from taking part, so the test knows who holds what.
        stop_vpmon(hooked)

        frames, _ = asyncio.run(
            native_call(first, hooks_tenant["monitor"], "hook-restart", hooks_tenant["takeover"])
        )
        assert [f["type"] for f in frames].count("alert") == 1, frames
        wait_for(receiver.hanging.is_set, "the first attempt to reach the receiver")
        stop_vpmon(first)  # mid-delivery: the entry stays pending for the stopped gateway
        receiver.release_hang.set()
        client = api_redis.client()
        pending = client.xpending(alerts_key("hooks"), group_name(endpoint))
        assert pending["pending"] == 1

        second = start_hooked_server(tmp_path, api_redis)
        wait_for(lambda: len(receiver.on("/hang")) == 2, "the delivery to resume on the new gateway")
        requests = receiver.on("/hang")
        assert requests[0].webhook_id == requests[1].webhook_id and requests[0].body == requests[1].body
        assert all(r.verified == "ok" for r in requests)
        assert json.loads(requests[1].body)["data"]["call_id"] == "hook-restart"
        wait_for(
            lambda: client.xpending(alerts_key("hooks"), group_name(endpoint))["pending"] == 0, "the XACK"
        )
    finally:
        for server in (first, second):
            if server is not None:
                stop_vpmon(server)
