"""Secrets never reach the server's log, at debug level (where the websocket layer prints every request
line and header) as at info: a real server, a real Redis behind a password, real clients doing what
carries a secret — keys in headers and in query strings, wrong keys, key creation and revocation,
webhook secrets and their signed deliveries, the Twilio auth token and the AudioHook client secret, calls
on every protocol — then every secret is looked for in the log file."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect

from streamer.logs import scrub
from streamer.protocols.twilio import twilio_signature
from streamer.redis_server import RedisServer
from streamer.stream_client import CallAudio, StreamOptions, stream_call
from tests.server_fixtures import RunningServer, start_vpmon, stop_vpmon
from tests.test_gateway import ENROL, speech
from tests.test_protocol_whip import CHROME_OFFER
from tests.webhook_receiver import Receiver

TENANT = "secrets"


def test_scrub_masks_every_secret_shape() -> None:
    key = "vpk_abcdefghij12_" + "S" * 43
    lines = {
        f"Authorization: Bearer {key}": "Authorization: ***",
        "< x-api-key: whatever-it-is": "< x-api-key: ***",
        "< X-Twilio-Signature: c2lnbmF0dXJl": "< X-Twilio-Signature: ***",
        f'127.0.0.1:1 - "GET /v1/x?call_id=c1&api_key={key} HTTP/1.1" 200': (
            '127.0.0.1:1 - "GET /v1/x?call_id=***&api_key=*** HTTP/1.1" 200'
        ),
        f"token {key} in a message": "token vpk_abcdefghij12_*** in a message",
        "secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw= rotated": "secret whsec_*** rotated",
        "redis://:p4ssw0rd@127.0.0.1:6390/0 down": "redis://:***@127.0.0.1:6390/0 down",
        "rediss://user:p4ss@host/0": "rediss://user:***@host/0",
        "sent with Bearer not-even-a-key": "sent with Bearer ***",
    }
    for line, masked in lines.items():
        assert scrub(line) == masked
    assert scrub("call started: 3 windows, agent agent-ca") == "call started: 3 windows, agent agent-ca"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    running = Receiver().start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def debug_server(tmp_path_factory: pytest.TempPathFactory, api_redis: RedisServer) -> Iterator[RunningServer]:
    server = start_vpmon(tmp_path_factory.mktemp("secrets"), api_redis, log_level="debug")
    try:
        yield server
    finally:
        stop_vpmon(server)


def ws_url(server: RunningServer, path: str) -> str:
    return server.url.replace("http://", "ws://") + path


def wait_for(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"waited 60 s for {what}"
        time.sleep(0.2)


def test_no_secret_reaches_the_log(
    debug_server: RunningServer, receiver: Receiver, telephone_devset: Path
) -> None:
    server = debug_server
    found: dict[str, str] = {"redis password": server.redis.password}
    admin = found["admin key"] = server.key(TENANT)
    wrong_id = "vpk_" + "q" * 12 + "_" + secrets.token_urlsafe(32)  # well formed, unknown
    not_a_key = found["not a key"] = "typo-" + secrets.token_urlsafe(24)
    found["unknown key"] = wrong_id
    twilio_token = found["twilio token"] = secrets.token_hex(16)
    audiohook_secret = found["audiohook secret"] = base64.b64encode(secrets.token_bytes(32)).decode()
    audio = speech(telephone_devset, "tuxpaint_ca", ENROL, 8)

    with server.client(admin) as client:
        # Enrolment, with the key in the query string too (as a careless integrator might send it).
        paths = sorted((telephone_devset / "wav" / "tuxpaint_ca").glob("*.wav"))[:ENROL]
        files = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
        response = client.post(
            f"/v1/voiceprints?api_key={admin}", data={"speaker_id": "agent-ca"}, files=files
        )
        assert response.status_code == 201, response.text

        # Keys: created (the token is in the response body), used, revoked, used again.
        made = client.post("/v1/keys", json={"role": "monitor", "name": "made"}).json()
        monitor = found["created key"] = made["token"]
        doomed = client.post("/v1/keys", json={"role": "read"}).json()
        found["revoked key"] = doomed["token"]
        with server.client(doomed["token"]) as reader:
            assert reader.get("/v1/voiceprints").status_code == 200
            assert client.delete(f"/v1/keys/{doomed['key']['key_id']}").status_code == 200
            assert reader.get("/v1/voiceprints").status_code == 401
        for token in (wrong_id, not_a_key):
            with server.client(token) as stranger:
                assert stranger.get(f"/v1/voiceprints?key={quote(token)}").status_code == 401
        assert httpx.get(f"{server.url}/v1/voiceprints?access_token={admin}").status_code == 401

        # Webhooks: the secret is shown on creation and on rotation; deliveries are signed with both.
        hook = client.post("/v1/webhooks", json={"url": receiver.url + "/hooks", "events": ["notice"]}).json()
        found["webhook secret"] = hook["secret"]
        rotated = client.post(f"/v1/webhooks/{hook['webhook']['id']}/rotate-secret").json()
        found["rotated webhook secret"] = receiver.secrets["/hooks"] = rotated["secret"]

        # Tenant secrets go in through PATCH /v1/tenant.
        settings = {"twilio_auth_token": twilio_token, "audiohook_client_secret": audiohook_secret}
        assert client.patch("/v1/tenant", json=settings).status_code == 200

    async def calls() -> None:
        # Native: the key in the header (and the query string); a notice (unknown agent) for the webhook.
        native = ws_url(server, f"/v1/streams/native?api_key={monitor}")
        async with connect(native, additional_headers={"Authorization": f"Bearer {monitor}"}) as ws:
            start = {"type": "start", "call_id": "secret-call", "agent_id": "nobody", "encoding": "pcm16",
                     "sample_rate": 8000, "channels": 1}  # fmt: skip
            await ws.send(json.dumps(start))
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await ws.recv()
        for token in (wrong_id, not_a_key, None):  # the key only in the query string is no key: 401
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            with pytest.raises(websockets.InvalidStatus):
                await connect(
                    ws_url(server, f"/v1/streams/native?token={monitor}"), additional_headers=headers
                )
        # The native call through the stream client, to the end, with a verdict.
        options = StreamOptions("native", server.url, key=monitor, agent_id="agent-ca", speed=0)
        assert (await stream_call(CallAudio.from_samples(audio, 8000), options)).ok

        # Twilio: signed with the tenant's auth token (a key in its query string, signed as well), and not.
        twilio = ws_url(server, f"/v1/streams/twilio/{TENANT}?key={monitor}")
        options = StreamOptions("twilio", twilio, tenant=TENANT, twilio_auth_token=twilio_token, speed=0,
                                agent_id="agent-ca")  # fmt: skip
        assert (await stream_call(CallAudio.from_samples(audio[: 8000 * 3], 8000), options)).ok
        with pytest.raises(websockets.InvalidStatus):
            signature = twilio_signature(secrets.token_hex(16), twilio)
            await connect(twilio, additional_headers={"X-Twilio-Signature": signature})

        # AudioHook: X-API-KEY with a signature made with the client secret; a wrong key.
        for key, ok in ((monitor, True), (wrong_id, False)):
            options = StreamOptions(
                "audiohook", server.url, key=key, audiohook_client_secret=audiohook_secret, speed=0
            )
            assert (await stream_call(CallAudio.from_samples(audio[: 8000 * 3], 8000), options)).ok is ok

    asyncio.run(calls())

    # WHIP: the key in the header and the query string.
    with server.client(monitor) as client:
        response = client.post(
            f"/v1/whip?call_id=secret-whip&access_token={monitor}", content=CHROME_OFFER,
            headers={"Content-Type": "application/sdp"},
        )  # fmt: skip
        assert response.status_code == 201, response.text
        assert client.delete(response.headers["location"]).status_code == 200

    # The notice reached the webhook, signed (the receiver checks the signature with the new secret).
    wait_for(lambda: any(r.verified == "ok" for r in receiver.on("/hooks")), "a signed webhook delivery")

    stop_vpmon(server)  # everything it logged is in the file now
    log = server.log.read_text()
    lines = log.splitlines()
    assert all(json.loads(line) for line in lines)  # one JSON object per line, nothing printed around them
    levels = {json.loads(line)["level"] for line in lines}
    assert "debug" in levels, levels  # the websocket layer's request lines and headers were logged ...
    assert "< Authorization: ***" in log or "< authorization: ***" in log  # ... and masked
    for what, secret in found.items():
        assert secret not in log, f"the {what} is in the server log"
        # Also no large piece of it (a secret cut in two by an escape or a mask would still leak).
        # The secret part of "vpk_<id>_<secret>" and "whsec_<secret>" (which may itself hold "_").
        tail = secret.split("_", 2)[2] if secret.startswith("vpk_") else secret.removeprefix("whsec_")
        assert tail[-16:] not in log, f"part of the {what} is in the server log"
    assert len(lines) > 20
