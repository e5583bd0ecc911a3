"""Scores centred on the tenant's other voiceprints, through a real server (``vpmon serve``), a real Redis
and real speech: from sixteen other voiceprints on, 1:1 verification and live calls score centred cosines
with the centred calibration; below that, raw cosines as before. An enrolment or a deletion takes effect
at once in the server that made it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from streamer.auth import Role
from tests.server_fixtures import RunningServer
from tests.test_gateway import ENROL, alerts_for, native_call, speech
from verifier.score_norm import MIN_OTHER_VOICEPRINTS

TENANT = "centring"
AGENT_SPEAKER = "tuxpaint_ca"
IMPOSTOR_SPEAKER = "tuxpaint_ro"  # one of the agent's colleagues, enrolled too
# Every other dev speaker that enrolment accepts (codec2_vk5qi has too little speech): 16 colleagues.
COLLEAGUES = [
    "tuxpaint_fr",
    "tuxpaint_ru",
    "tuxpaint_bg",
    "tuxpaint_es",
    "tuxpaint_be",
    "tuxpaint_el",
    "tuxpaint_da",
    "tuxpaint_en",
    "tuxpaint_ro",
    "fillets_cs_small",
    "fillets_nl_small",
    "fillets_nl_big",
    "codec2_ve9qrp",
    "librivox_ss01",
    "warzone_narrator",
    "fillets_cs_big",
]


def utterances(devset: Path, speaker: str) -> list[Path]:
    return sorted((devset / "wav" / speaker).glob("*.wav"))


def enrol(client: httpx.Client, devset: Path, speaker_id: str, speaker: str) -> None:
    """Enrol from the speaker's first utterances; a recording enrolment refuses (too little speech in
    it) is replaced by the next one, as an operator would."""
    pool = utterances(devset, speaker)
    chosen, spare = pool[:ENROL], pool[ENROL:]
    while True:
        files = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in chosen]
        response = client.post("/v1/voiceprints", data={"speaker_id": speaker_id}, files=files)
        refused = response.json().get("recording") if response.status_code == 422 else None
        if refused is None or not spare:
            break
        chosen = [p for p in chosen if p.name != refused] + [spare.pop(0)]
    assert response.status_code == 201, response.text


def verify(client: httpx.Client, path: Path) -> dict:
    files = [("file", (path.name, path.read_bytes(), "audio/wav"))]
    response = client.post("/v1/verify", data={"speaker_id": "agent-ca"}, files=files)
    assert response.status_code == 200, response.text
    return response.json()["verdict"]


@pytest.fixture(scope="module")
def keys(vpmon_server: RunningServer, telephone_devset: Path) -> dict[str, str]:
    """The agent and 15 colleagues enrolled: one colleague short of centring."""
    admin = vpmon_server.key(TENANT)
    with vpmon_server.client(admin) as client:
        enrol(client, telephone_devset, "agent-ca", AGENT_SPEAKER)
        for speaker in COLLEAGUES[: MIN_OTHER_VOICEPRINTS - 1]:
            enrol(client, telephone_devset, f"agent-{speaker}", speaker)
    return {"admin": admin, "monitor": vpmon_server.key(TENANT, Role.MONITOR)}


def test_verification_centres_from_sixteen_other_voiceprints(
    vpmon_server: RunningServer, keys: dict[str, str], telephone_devset: Path
) -> None:
    genuine = utterances(telephone_devset, AGENT_SPEAKER)[-1]
    impostor = utterances(telephone_devset, IMPOSTOR_SPEAKER)[-1]
    with vpmon_server.client(keys["admin"]) as client:
        raw = verify(client, genuine)
        assert raw["centred"] is False and raw["decision"] == "MATCH"

        enrol(client, telephone_devset, "agent-last", COLLEAGUES[MIN_OTHER_VOICEPRINTS - 1])
        same, other = verify(client, genuine), verify(client, impostor)
        assert same["centred"] is True and other["centred"] is True
        assert same["decision"] == "MATCH" and other["decision"] == "MISMATCH", (same, other)
        # Another space, another calibration: centring moves the score and the threshold.
        assert same["score"] != pytest.approx(raw["score"], abs=1e-3)
        assert same["threshold"] != pytest.approx(raw["threshold"], abs=1e-3)
        assert same["llr"] > 0 > other["llr"]

        # A 1:1 comparison of two recordings has no tenant voiceprint: raw cosines.
        pair = [
            ("first", (genuine.name, genuine.read_bytes())),
            ("second", (impostor.name, impostor.read_bytes())),
        ]
        assert client.post("/v1/compare", files=pair).json()["verdict"]["centred"] is False

        assert client.delete("/v1/voiceprints/agent-last").status_code == 204
        assert verify(client, genuine)["centred"] is False
        enrol(client, telephone_devset, "agent-last", COLLEAGUES[MIN_OTHER_VOICEPRINTS - 1])


def test_a_live_call_is_scored_centred_and_a_takeover_alerts_once(
    vpmon_server: RunningServer, keys: dict[str, str], telephone_devset: Path
) -> None:
    with vpmon_server.client(keys["admin"]) as client:
        assert client.get("/v1/voiceprints").json()["total"] == MIN_OTHER_VOICEPRINTS + 1
    genuine = speech(telephone_devset, AGENT_SPEAKER, ENROL, 10)
    impostor = speech(telephone_devset, IMPOSTOR_SPEAKER, 0, 6)
    frames, close = asyncio.run(
        native_call(vpmon_server, keys["monitor"], "centred-takeover", np.concatenate([genuine, impostor]))
    )
    assert close is not None and close.code == 1000, close
    verdicts = [f for f in frames if f["type"] == "verdict"]
    assert verdicts and all(v["centred"] is True for v in verdicts)
    states = [v["state"] for v in verdicts]
    assert "verified" in states and states[-1] == "mismatch", states
    assert [f["kind"] for f in frames if f["type"] == "alert"] == ["takeover"]
    feed = alerts_for(vpmon_server, keys["monitor"], "centred-takeover")
    assert [(a["event"], a["kind"]) for a in feed] == [("alert", "takeover")]
