"""Acknowledging alerts (``POST /v1/alerts/{event_id}/ack``) through the real server and a real Redis,
on alerts raised by real calls: who and when are kept once, every supervisor's feed hears of it, and
no other tenant can see or touch it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from streamer.auth import Role
from streamer.stream_client import CallAudio, StreamOptions, stream_call
from tests.server_fixtures import RunningServer
from tests.test_gateway import ENROL, speech

TENANT = "ack-tenant"


@pytest.fixture(scope="module")
def keys(vpmon_server: RunningServer, telephone_devset: Path) -> dict[str, str]:
    admin = vpmon_server.key(TENANT)
    paths = sorted((telephone_devset / "wav" / "tuxpaint_ca").glob("*.wav"))[:ENROL]
    files = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
    with vpmon_server.client(admin) as client:
        created = client.post(
            "/v1/voiceprints", data={"speaker_id": "agent-ca", "site": "lisbon"}, files=files
        )
        assert created.status_code == 201, created.text
    create = vpmon_server.keys.create
    return {
        "admin": admin,
        "alice": create(TENANT, Role.MONITOR, "alice").token,
        "bob": create(TENANT, Role.MONITOR, "bob").token,
        "read": create(TENANT, Role.READ, "reader").token,
        "enrol": create(TENANT, Role.ENROL, "enroller").token,
        "intruder": create("ack-other", Role.MONITOR, "intruder").token,
    }


def run_call(server: RunningServer, key: str, call_id: str, audio: np.ndarray, agent_id: str) -> None:
    options = StreamOptions("native", server.url, key=key, agent_id=agent_id, call_id=call_id, speed=0)
    asyncio.run(stream_call(CallAudio.from_samples(audio, 8000), options))


@pytest.fixture(scope="module")
def takeover_alert(vpmon_server: RunningServer, keys: dict[str, str], telephone_devset: Path) -> dict:
    """A takeover on a real call: the alert as GET /v1/alerts lists it."""
    genuine = speech(telephone_devset, "tuxpaint_ca", ENROL, 10)
    impostor = speech(telephone_devset, "tuxpaint_ro", 0, 6)
    run_call(vpmon_server, keys["alice"], "ack-takeover", np.concatenate([genuine, impostor]), "agent-ca")
    return alert_of(vpmon_server, keys["alice"], "ack-takeover", "alert")


def notice_alert(server: RunningServer, key: str, call_id: str, telephone_devset: Path) -> dict:
    """A notice on a real call (the agent has no voiceprint): cheap, for tests that need a fresh one."""
    run_call(server, key, call_id, speech(telephone_devset, "tuxpaint_es", 0, 1), "nobody-enrolled")
    return alert_of(server, key, call_id, "notice")


def alert_of(server: RunningServer, key: str, call_id: str, kind: str) -> dict:
    with server.client(key) as client:
        listed = client.get("/v1/alerts").json()
    found = [a for a in listed if a["data"]["call_id"] == call_id and a["type"] == kind]
    assert len(found) == 1, listed
    return found[0]


def feed_events(response: httpx.Response) -> Iterator[dict]:
    """The events of an SSE response, as they come: {"id", "event", "data"}."""
    event: dict = {}
    for line in response.iter_lines():
        if line.startswith(("id:", "event:", "data:")):
            name, _, value = line.partition(": ")
            event[name.rstrip(":")] = value
        elif not line and "data" in event:
            yield {**event, "data": json.loads(event["data"])}
            event = {}


def replay(server: RunningServer, key: str, after: str = "0-0") -> list[dict]:
    """Every retained event of the alert feed after ``after``, then stop at the first quiet second."""
    found = []
    with (
        server.client(key) as client,
        client.stream(
            "GET", "/v1/alerts/stream", headers={"Last-Event-ID": after}, timeout=httpx.Timeout(5.0, read=1.0)
        ) as response,
        contextlib.suppress(httpx.ReadTimeout),  # the replay is over: the feed then waits for news
    ):
        for event in feed_events(response):
            found.append(event)
    return found


def test_the_first_acknowledgement_stands(
    vpmon_server: RunningServer, keys: dict, takeover_alert: dict
) -> None:
    event_id = takeover_alert["id"]
    assert takeover_alert["acknowledged"] is None
    with vpmon_server.client(keys["alice"]) as alice, vpmon_server.client(keys["bob"]) as bob:
        first = alice.post(f"/v1/alerts/{event_id}/ack")
        assert first.status_code == 200, first.text
        ack = first.json()
        alice_id = keys["alice"].split("_")[1]
        assert ack["event_id"] == event_id
        assert ack["acknowledged_by"] == {"key_id": alice_id, "name": "alice"}
        assert ack["acknowledged_at"].endswith("+00:00")

        # Idempotent: again, or by someone else, changes nothing and announces nothing.
        assert alice.post(f"/v1/alerts/{event_id}/ack").json() == ack
        assert bob.post(f"/v1/alerts/{event_id}/ack").json() == ack

        listed = bob.get("/v1/alerts").json()
    assert [a["acknowledged"] for a in listed if a["id"] == event_id] == [ack]
    assert all(a["type"] in ("alert", "notice") for a in listed)  # ack entries are not alerts

    acks = [e for e in replay(vpmon_server, keys["bob"]) if e["event"] == "ack"]
    assert [(e["data"], e["id"] > event_id) for e in acks] == [(ack, True)]


def test_another_supervisor_hears_the_acknowledgement_live(
    vpmon_server: RunningServer, keys: dict, telephone_devset: Path
) -> None:
    notice = notice_alert(vpmon_server, keys["alice"], "ack-live-notice", telephone_devset)
    with (
        vpmon_server.client(keys["bob"]) as bob,
        bob.stream(
            "GET",
            "/v1/alerts/stream",
            headers={"Last-Event-ID": notice["id"]},
            timeout=httpx.Timeout(5.0, read=30.0),
        ) as feed,
    ):
        events = feed_events(feed)
        with vpmon_server.client(keys["alice"]) as alice:
            ack = alice.post(f"/v1/alerts/{notice['id']}/ack").json()
        heard = next(e for e in events if e["event"] == "ack")
    assert heard["data"] == ack and ack["acknowledged_by"]["name"] == "alice"


def test_acknowledging_needs_a_monitor_key(
    vpmon_server: RunningServer, keys: dict, takeover_alert: dict
) -> None:
    path = f"/v1/alerts/{takeover_alert['id']}/ack"
    for token in (None, "vpk_nonexistent00_" + "x" * 43):
        response = vpmon_server.client(token).post(path)
        assert response.status_code == 401 and "Bearer" in response.headers["www-authenticate"]
    for role in ("read", "enrol"):
        response = vpmon_server.client(keys[role]).post(path)
        assert response.status_code == 403, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
    revoked = vpmon_server.keys.create(TENANT, Role.MONITOR, "revoked")
    vpmon_server.keys.revoke(TENANT, revoked.key.key_id)
    assert vpmon_server.client(revoked.token).post(path).status_code == 401
    assert vpmon_server.client(keys["admin"]).post(path).status_code == 200  # admin may do everything


def test_unknown_and_malformed_ids(vpmon_server: RunningServer, keys: dict, takeover_alert: dict) -> None:
    with vpmon_server.client(keys["alice"]) as alice:
        alice.post(f"/v1/alerts/{takeover_alert['id']}/ack").raise_for_status()
        ack_entry = next(e for e in replay(vpmon_server, keys["alice"]) if e["event"] == "ack")
        for unknown in ("1-0", ack_entry["id"]):  # an acknowledgement is no alert to acknowledge
            response = alice.post(f"/v1/alerts/{unknown}/ack")
            assert response.status_code == 404, response.text
            assert response.json()["type"] == "urn:vpmon:problem:not-found"
        # 20 digits: past Redis' 64-bit stream ids, which Redis itself would refuse (a 500 before).
        for malformed in ("abc", "12", "1-2-3", "ack-takeover:1", f"{10**19}-0"):
            assert alice.post(f"/v1/alerts/{malformed}/ack").status_code == 422, malformed
        assert alice.get("/v1/alerts/stream", headers={"Last-Event-ID": f"0-{10**19}"}).status_code == 422


def test_other_tenants_cannot_see_or_acknowledge(
    vpmon_server: RunningServer, keys: dict, takeover_alert: dict, telephone_devset: Path
) -> None:
    theirs = notice_alert(vpmon_server, keys["alice"], "ack-private-notice", telephone_devset)
    with vpmon_server.client(keys["intruder"]) as intruder:
        for event_id in (takeover_alert["id"], theirs["id"]):
            assert intruder.post(f"/v1/alerts/{event_id}/ack").status_code == 404
        assert intruder.get("/v1/alerts").json() == []
    assert replay(vpmon_server, keys["intruder"]) == []
    assert alert_of(vpmon_server, keys["alice"], "ack-private-notice", "notice")["acknowledged"] is None


def test_a_quiet_feed_stays_open(vpmon_server: RunningServer, keys: dict) -> None:
    """No news for longer than the Redis client's socket timeout (5 s): the feed sends keep-alives and
    stays open (its blocking read once timed out there and broke the response)."""
    lines = []
    with (
        vpmon_server.client(keys["intruder"]) as client,  # a tenant with no alerts: nothing but keep-alives
        client.stream("GET", "/v1/alerts/stream", timeout=httpx.Timeout(5.0, read=10.0)) as feed,
    ):
        deadline = time.monotonic() + 7.0
        for line in feed.iter_lines():
            lines.append(line)
            if time.monotonic() > deadline:
                break
    assert lines[0] == "retry: 2000" and lines.count(": keep-alive") >= 1, lines
