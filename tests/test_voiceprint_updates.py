"""Voiceprint updates from verified calls through a real server, a real Redis and real speech: off by
default; once a tenant turns them on, a long confidently verified call updates its agent's voiceprint
(once, by a bounded amount) and a takeover call does not."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server_fixtures import RunningServer
from tests.test_gateway import ENROL, native_call, speech
from verifier.adaptation import DEFAULT_UPDATE_POLICY

AGENT_SPEAKER = "tuxpaint_ca"
IMPOSTOR_SPEAKER = "tuxpaint_ro"


def enrol(client: httpx.Client, devset: Path, speaker_id: str, speaker: str) -> None:
    paths = sorted((devset / "wav" / speaker).glob("*.wav"))[:ENROL]
    files = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
    response = client.post("/v1/voiceprints", data={"speaker_id": speaker_id}, files=files)
    assert response.status_code == 201, response.text


def voiceprint(client: httpx.Client) -> dict:
    response = client.get("/v1/voiceprints/agent-ca", params={"include_embedding": "true"})
    assert response.status_code == 200, response.text
    return response.json()


def call_and_wait(server: RunningServer, key: str, call_id: str, audio: np.ndarray) -> list[dict]:
    """Stream a call; then wait until the server has ended it (the update happens as it ends)."""
    frames, close = asyncio.run(native_call(server, key, call_id, audio))
    assert close is not None and close.code == 1000, close
    with server.client(key) as client:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            calls = {c["call_id"]: c for c in client.get("/v1/calls").json()}
            if calls.get(call_id, {}).get("state") == "ended":
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"{call_id} never ended")
    time.sleep(0.5)  # the update follows the call's end in the same task
    return frames


def test_verified_calls_update_the_voiceprint_only_when_the_tenant_opted_in(
    vpmon_server: RunningServer, telephone_devset: Path
) -> None:
    long_genuine = speech(telephone_devset, AGENT_SPEAKER, 0, 10)  # ≈ 45 s of the agent
    for tenant, opted_in in (("adapting-off", False), ("adapting-on", True)):
        admin = vpmon_server.key(tenant)
        with vpmon_server.client(admin) as client:
            settings = client.get("/v1/tenant").json()
            assert settings["voiceprint_updates"] is False  # off by default
            enrol(client, telephone_devset, "agent-ca", AGENT_SPEAKER)
            if opted_in:
                changed = client.patch("/v1/tenant", json={"voiceprint_updates": True})
                assert changed.status_code == 200 and changed.json()["voiceprint_updates"] is True
            before = voiceprint(client)
        assert before["updates"] == 0 and before["updated_from_calls_seconds"] == 0

        frames = call_and_wait(vpmon_server, admin, f"{tenant}-genuine", long_genuine)
        assert [f["state"] for f in frames if f["type"] == "verdict"][-1] == "verified"
        with vpmon_server.client(admin) as client:
            after = voiceprint(client)
        if not opted_in:
            assert after == before
            continue
        assert after["updates"] == 1
        # The call counts with its verified speech, at most as much as the enrolment's own (so calls never
        # outweigh the enrolment); this enrolment holds less speech than the call.
        share = DEFAULT_UPDATE_POLICY.max_adapted_share
        cap = before["net_speech_seconds"] * share / (1 - share)
        assert after["updated_from_calls_seconds"] == pytest.approx(cap, abs=0.01)
        moved = float(np.dot(before["embedding"], after["embedding"]))
        assert 0.9 < moved < 0.99999, moved  # towards the agent's calls, not away from the agent
        assert after["enrolled_at"] == before["enrolled_at"]

        # A takeover call (the agent, then someone else) never updates the voiceprint.
        takeover = np.concatenate(
            [speech(telephone_devset, AGENT_SPEAKER, 0, 6), speech(telephone_devset, IMPOSTOR_SPEAKER, 0, 6)]
        )
        frames = call_and_wait(vpmon_server, admin, f"{tenant}-takeover", takeover)
        assert [f["kind"] for f in frames if f["type"] == "alert"] == ["takeover"]
        with vpmon_server.client(admin) as client:
            assert voiceprint(client) == after
            metrics = client.get("/metrics").text
        assert 'vpmon_voiceprint_updates_total{outcome="updated"} 1.0' in metrics
        assert 'vpmon_voiceprint_updates_total{outcome="not_eligible"} 1.0' in metrics
