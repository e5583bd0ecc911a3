"""Every route refuses a request without a valid key of the right role and tenant, and no key shows or
touches another tenant's data: the real server (``vpmon serve``), a real Redis, real HTTP and websocket
clients, and real data in the tenant under attack.

**Which routes**: those of the app itself (``create_app``'s route table, the code the server runs: HTTP
routes, websocket routes and mounts), each a test of its own, so a new route fails here until
``HTTP_ROUTES`` says how to call it and which permission it needs, or ``PUBLIC`` says why it is open;
``/openapi.json`` from the running server must document the same HTTP routes.

**The data**: tenant ``rt-owner`` has a voiceprint enrolled from dev-set speech (with a display name,
site and tag), a takeover alert raised by a real call, a webhook, a call bound to its agent, a Twilio auth
token, and keys of every role. Tenant ``rt-intruder`` has keys of every role and nothing else.

**Each HTTP route** is called with a request that, if it were let through, would read or change the
owner's data (``real``), and must answer:

- no key, a malformed key, an unknown key, the owner's key id with a wrong secret, a revoked admin key,
  a valid admin key in another scheme (Basic): 401, a Bearer challenge and an ``unauthorized`` problem;
- each of the owner's own roles that lacks the route's permission: 403 (``forbidden``); each role that
  has it gets past authorisation (a ``harmless`` request: an unknown id or an invalid body, and the
  status that says the route ran);
- the intruder's admin key: 404 (or 403) for the owner's resources; for lists, search, the SSE feeds
  and ``/metrics``, 200 with nothing of the owner; what it creates lands in its own tenant;
- afterwards the owner's resource is still there, unchanged (``survives``).

No response to anyone but the owner holds any of the owner's identifying strings (tenant, agent,
display name, site, tag, key ids, webhook id and URL, alert id, call id) that the request did not carry.

**Websockets**, with the refusal each protocol documents: the native protocol refuses the upgrade
(401); Twilio's needs ``X-Twilio-Signature`` made with the tenant's auth token (403 otherwise, also after
the token is replaced); AudioHook refuses missing headers (400) and a bad ``X-API-KEY`` with a
``disconnect`` (reason ``unauthorized``) after ``open``. In-band tenant claims that contradict the
credential close the call (1008); another tenant's agents and bindings are not found or applied.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from fastapi.routing import APIRoute
from starlette.routing import Mount, WebSocketRoute
from websockets.asyncio.client import connect
from websockets.protocol import State

from streamer.app import create_app
from streamer.auth import ROLE_PERMISSIONS, Permission, Role
from streamer.protocols.twilio import twilio_signature
from streamer.settings import Settings
from streamer.stream_client import CallAudio, StreamOptions, stream_call
from tests.server_fixtures import RunningServer
from tests.test_gateway import ENROL, speech, twilio_messages
from tests.test_protocol_whip import CHROME_OFFER
from verifier.audio import to_pcm16

pytestmark = pytest.mark.devset

OWNER, INTRUDER = "rt-owner", "rt-intruder"
AGENT = "owner-agent"
DISPLAY_NAME, SITE, TAG = "Owner Private Name", "owner-site", "owner-tag"
WEBHOOK_URL = "http://127.0.0.1:9/owner-hook"  # the discard port: deliveries fail, on loopback only
OWNER_CALL = "owner-call-takeover"
BOUND_CALL = "7b0c5d1e-2f4a-4c3b-9d8e-5a6f7e8d9c0b"  # a UUID: AudioHook's conversationId
TWILIO_TOKEN = "owner-twilio-auth-token"
STREAM_READ_S = 1.5  # an SSE feed is read this long, then counted as answered
KEY_RE = re.compile(r"vpk_[a-z0-9]{12}_[A-Za-z0-9_-]{43}")


# --- the routes, from the app ------------------------------------------------------------------------
def _route_contexts(routes: list[Any]) -> Iterator[tuple[Any, str]]:
    """(route, full path) for every route, routers included with the app flattened."""
    try:  # newer FastAPI keeps included routers nested in the app's routes; this walks them
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: the app's routes are already flat
        yield from ((route, route.path) for route in routes)
        return
    for context in iter_route_contexts(routes):
        yield context.original_route, context.path


@dataclass(frozen=True)
class AppRoutes:
    http: dict[tuple[str, str], bool]  # (method, path) → documented in the OpenAPI schema
    websockets: frozenset[str]
    mounts: dict[str, Any]  # path → the mounted ASGI app


def app_routes() -> AppRoutes:
    """The route table of the app the server runs (nothing is started: no lifespan, no Redis)."""
    app = create_app(Settings())
    http, sockets, mounts = {}, set(), {}
    for route, path in _route_contexts(list(app.routes)):
        if isinstance(route, Mount):
            mounts[path] = route.app
        elif isinstance(route, WebSocketRoute):
            sockets.add(path)
        else:
            assert isinstance(route, APIRoute), f"{path}: a {type(route).__name__}; teach this test about it"
            for method in route.methods:
                http[(method, path)] = route.include_in_schema
    return AppRoutes(http, frozenset(sockets), mounts)


ROUTES = app_routes()


# --- requests ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Req:
    method: str
    path: str
    params: dict[str, str] | None = None
    json: Any = None
    data: dict[str, str] | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    content: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False  # an SSE feed: read for STREAM_READ_S

    def carried(self) -> str:
        """Everything this request says (but the files' bytes): a string it sent may come back."""
        names = [name for _, (name, _, _) in self.files or []]
        return repr((self.path, self.params, self.json, self.data, names, self.content, self.headers))


@dataclass(frozen=True)
class Answer:
    status: int
    headers: httpx.Headers
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def send(client: httpx.Client, request: Req) -> Answer:
    options = {
        "params": request.params, "json": request.json, "data": request.data, "files": request.files,
        "content": request.content, "headers": request.headers or None,
    }  # fmt: skip
    timeout = httpx.Timeout(30.0, read=STREAM_READ_S if request.stream else 60.0)
    options = {name: value for name, value in options.items() if value is not None}
    with client.stream(request.method, request.path, timeout=timeout, **options) as response:
        body = b""
        try:
            for chunk in response.iter_bytes():
                body += chunk
        except httpx.ReadTimeout:
            assert request.stream, f"{request.method} {request.path} did not answer"  # only a feed waits
        return Answer(response.status_code, response.headers, body.decode(errors="replace"))


# --- the world: two tenants, the owner's data --------------------------------------------------------
@dataclass
class World:
    server: RunningServer
    devset: Path
    owner: dict[str, str]  # role (and "spare", "revoked") → token
    intruder: dict[str, str]
    key_ids: dict[str, str]  # the owner's: role → key id
    webhook_id: str
    alert_id: str
    voiceprint: dict[str, Any]  # as the owner's GET returned it after enrolment, with its embedding
    _whip_location: str | None = None

    @property
    def markers(self) -> set[str]:
        """Strings that identify the owner's data: none may reach anyone else."""
        return {
            OWNER, AGENT, DISPLAY_NAME, SITE, TAG, WEBHOOK_URL, OWNER_CALL, TWILIO_TOKEN,
            self.webhook_id, self.alert_id, *self.key_ids.values(),
        }  # fmt: skip

    def client(self, token: str | None, scheme: str = "Bearer") -> httpx.Client:
        headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
        return httpx.Client(base_url=self.server.url, headers=headers)

    def audio(self, speaker: str, first: int, last: int, name: str = "files") -> list[Any]:
        paths = sorted((self.devset / "wav" / speaker).glob("*.wav"))[first:last]
        return [(name, (p.name, p.read_bytes(), "audio/wav")) for p in paths]

    def whip_location(self) -> str:
        """A live WHIP session of the owner (made on first use; the WHIP route's test ends it)."""
        if self._whip_location is None:
            with self.client(self.owner["monitor"]) as owner:
                response = owner.post(
                    "/v1/whip", params={"call_id": "owner-whip"}, content=CHROME_OFFER,
                    headers={"Content-Type": "application/sdp"},
                )  # fmt: skip
            assert response.status_code == 201, response.text
            self._whip_location = response.headers["location"]
        return self._whip_location


@pytest.fixture(scope="module")
def world(vpmon_server: RunningServer, telephone_devset: Path) -> World:
    create = vpmon_server.keys.create
    owner = {role.value: create(OWNER, role, f"owner-{role.value}") for role in Role}
    spare = create(OWNER, Role.MONITOR, "owner-spare")
    revoked = create(OWNER, Role.ADMIN, "owner-revoked")
    intruder = {role.value: create(INTRUDER, role, f"intruder-{role.value}").token for role in Role}
    world = World(
        vpmon_server, telephone_devset,
        owner={**{r: k.token for r, k in owner.items()}, "spare": spare.token, "revoked": revoked.token},
        intruder=intruder,
        key_ids={**{r: k.key.key_id for r, k in owner.items()}, "spare": spare.key.key_id,
                 "revoked": revoked.key.key_id},
        webhook_id="", alert_id="", voiceprint={},
    )  # fmt: skip
    with world.client(world.owner["admin"]) as admin:
        enrolled = admin.post(
            "/v1/voiceprints",
            data={"speaker_id": AGENT, "display_name": DISPLAY_NAME, "site": SITE, "tags": TAG},
            files=world.audio("tuxpaint_ca", 0, ENROL),
        )
        assert enrolled.status_code == 201, enrolled.text
        fetched = admin.get(f"/v1/voiceprints/{AGENT}", params={"include_embedding": "true"})
        world.voiceprint = fetched.json()
        hook = admin.post("/v1/webhooks", json={"url": WEBHOOK_URL, "description": "owner's"})
        assert hook.status_code == 201, hook.text
        world.webhook_id = hook.json()["webhook"]["id"]
        admin.patch("/v1/tenant", json={"twilio_auth_token": TWILIO_TOKEN}).raise_for_status()
        # A key in use, then revoked through the API as an administrator would: it stops at once.
        with world.client(revoked.token) as soon_revoked:
            assert soon_revoked.get("/v1/keys").status_code == 200
        assert admin.delete(f"/v1/keys/{revoked.key.key_id}").json()["revoked_at"] is not None
    with world.client(world.owner["monitor"]) as monitor:
        bound = monitor.put(f"/v1/calls/{BOUND_CALL}/agent", json={"agent_id": AGENT})
        assert bound.status_code == 200, bound.text
    # A takeover on a real call: the owner's alert.
    call = np.concatenate(
        [speech(telephone_devset, "tuxpaint_ca", ENROL, 10), speech(telephone_devset, "tuxpaint_ro", 0, 6)]
    )
    options = StreamOptions(
        "native", vpmon_server.url, key=world.owner["monitor"], agent_id=AGENT, call_id=OWNER_CALL, speed=0
    )
    result = asyncio.run(stream_call(CallAudio.from_samples(call, 8000), options))
    assert result.ok, result
    with world.client(world.owner["monitor"]) as monitor:
        alerts = [a for a in monitor.get("/v1/alerts").json() if a["data"].get("call_id") == OWNER_CALL]
    assert [a["type"] for a in alerts] == ["alert"], alerts
    world.alert_id = alerts[0]["id"]
    return world


# --- how to call each HTTP route ---------------------------------------------------------------------
Build = Callable[[World], Req]
Check = Callable[[World, Answer], None]
Undo = Callable[[World, httpx.Client, Answer], None]


@dataclass(frozen=True)
class Route:
    permission: Permission
    real: Build  # what would read or change the owner's data if it were let through
    harmless: Build  # for the roles that may: an unknown id or an invalid body
    harmless_status: int  # what the harmless request gets once past authorisation
    intruder: frozenset[int]  # what the intruder's admin key gets for ``real``
    intruder_check: Check | None = None
    undo: Undo | None = None  # what the intruder made in its own tenant, removed again
    survives: Check | None = None  # the owner's resource is still there, unchanged


def _json(status: int) -> frozenset[int]:
    return frozenset({status})


def _owner_voiceprint_unchanged(world: World, _: Answer | None = None) -> None:
    with world.client(world.owner["read"]) as reader:
        now = reader.get(f"/v1/voiceprints/{AGENT}", params={"include_embedding": "true"})
    assert now.status_code == 200, now.text
    assert now.json() == world.voiceprint


def _spare_key_works(world: World, _: Answer | None = None) -> None:
    with world.client(world.owner["spare"]) as spare:
        assert spare.get("/healthz").json()["tenant"] == OWNER


def _owner_webhook_unchanged(world: World, _: Answer | None = None) -> None:
    with world.client(world.owner["admin"]) as admin:
        hook = admin.get(f"/v1/webhooks/{world.webhook_id}")
    assert hook.status_code == 200 and hook.json()["url"] == WEBHOOK_URL, hook.text
    assert hook.json()["previous_secret_expires_at"] is None and hook.json()["disabled_at"] is None


def _owner_alert_unacknowledged(world: World, _: Answer | None = None) -> None:
    with world.client(world.owner["monitor"]) as monitor:
        listed = monitor.get("/v1/alerts").json()
    assert [a["acknowledged"] for a in listed if a["id"] == world.alert_id] == [None]


def _owner_tenant_unchanged(world: World, _: Answer | None = None) -> None:
    with world.client(world.owner["admin"]) as admin:
        settings = admin.get("/v1/tenant").json()
    assert settings["tenant"] == OWNER and settings["twilio_auth_token_set"] is True


def _own_tenant(world: World, answer: Answer) -> None:
    assert answer.json()["tenant"] == INTRUDER


def _whip_session_ends_for_its_owner(world: World, _: Answer | None = None) -> None:
    location = world.whip_location()
    with world.client(world.owner["monitor"]) as owner:
        ended = owner.delete(location)
    world._whip_location = None
    assert ended.status_code == 200 and ended.json()["tenant"] == OWNER, ended.text


SSE = {"Last-Event-ID": "0-0"}  # replay everything the tenant's feed holds

HTTP_ROUTES: dict[tuple[str, str], Route] = {
    # voiceprints
    ("POST", "/v1/voiceprints"): Route(
        Permission.WRITE_VOICEPRINTS,
        real=lambda w: Req(
            "POST", "/v1/voiceprints", data={"speaker_id": AGENT}, files=w.audio("tuxpaint_es", 0, ENROL)
        ),
        harmless=lambda w: Req("POST", "/v1/voiceprints", data={"speaker_id": "nobody"}),
        harmless_status=422,
        # The owner's speaker id is not "taken" for the intruder: its own voiceprint, in its own tenant.
        intruder=_json(201),
        intruder_check=lambda w, a: _assert(a.json()["voiceprint"]["site"] is None),
        undo=lambda w, c, a: _assert(c.delete(f"/v1/voiceprints/{AGENT}").status_code == 204),
        survives=_owner_voiceprint_unchanged,
    ),
    ("GET", "/v1/voiceprints"): Route(
        Permission.READ_VOICEPRINTS,
        real=lambda w: Req("GET", "/v1/voiceprints", params={"site": SITE}),
        harmless=lambda w: Req("GET", "/v1/voiceprints"),
        harmless_status=200,
        intruder=_json(200),
        intruder_check=lambda w, a: _assert(a.json()["total"] == 0 and a.json()["voiceprints"] == []),
    ),
    ("PUT", "/v1/voiceprints/{speaker_id}"): Route(
        Permission.WRITE_VOICEPRINTS,
        real=lambda w: Req("PUT", f"/v1/voiceprints/{AGENT}", files=w.audio("tuxpaint_es", 0, ENROL)),
        harmless=lambda w: Req("PUT", "/v1/voiceprints/nobody"),
        harmless_status=422,
        intruder=_json(200),
        intruder_check=lambda w, a: _assert(a.json()["replaced"] is False),  # it saw no voiceprint there
        undo=lambda w, c, a: _assert(c.delete(f"/v1/voiceprints/{AGENT}").status_code == 204),
        survives=_owner_voiceprint_unchanged,
    ),
    ("GET", "/v1/voiceprints/{speaker_id}"): Route(
        Permission.READ_VOICEPRINTS,
        real=lambda w: Req("GET", f"/v1/voiceprints/{AGENT}", params={"include_embedding": "true"}),
        harmless=lambda w: Req("GET", "/v1/voiceprints/nobody"),
        harmless_status=404,
        intruder=_json(404),
    ),
    ("DELETE", "/v1/voiceprints/{speaker_id}"): Route(
        Permission.WRITE_VOICEPRINTS,
        real=lambda w: Req("DELETE", f"/v1/voiceprints/{AGENT}"),
        harmless=lambda w: Req("DELETE", "/v1/voiceprints/nobody"),
        harmless_status=404,
        intruder=_json(404),
        survives=_owner_voiceprint_unchanged,
    ),
    ("POST", "/v1/voiceprints/{speaker_id}/reembed"): Route(
        Permission.ADMIN,
        real=lambda w: Req("POST", f"/v1/voiceprints/{AGENT}/reembed"),
        harmless=lambda w: Req("POST", "/v1/voiceprints/nobody/reembed"),
        harmless_status=404,
        intruder=_json(404),
        survives=_owner_voiceprint_unchanged,
    ),
    ("POST", "/v1/verify"): Route(
        Permission.READ_VOICEPRINTS,
        real=lambda w: Req(
            "POST",
            "/v1/verify",
            data={"speaker_id": AGENT},
            files=w.audio("tuxpaint_ca", ENROL, ENROL + 1, "file"),
        ),
        harmless=lambda w: Req("POST", "/v1/verify", data={"speaker_id": "nobody"}),
        harmless_status=422,
        intruder=_json(404),  # the owner's agent is not enrolled in the intruder's tenant
    ),
    ("POST", "/v1/compare"): Route(
        Permission.READ_VOICEPRINTS,
        # Two uploads, nothing stored or read: no tenant's data is involved.
        real=lambda w: Req(
            "POST",
            "/v1/compare",
            files=w.audio("tuxpaint_ca", ENROL, ENROL + 1, "first")
            + w.audio("tuxpaint_ca", ENROL + 1, ENROL + 2, "second"),
        ),
        harmless=lambda w: Req("POST", "/v1/compare"),
        harmless_status=422,
        intruder=_json(200),
    ),
    ("POST", "/v1/search"): Route(
        Permission.READ_VOICEPRINTS,
        real=lambda w: Req(
            "POST", "/v1/search", data={"top_k": "10"}, files=w.audio("tuxpaint_ca", ENROL, ENROL + 1, "file")
        ),
        harmless=lambda w: Req("POST", "/v1/search"),
        harmless_status=422,
        intruder=_json(200),
        intruder_check=lambda w, a: _assert(a.json()["hits"] == []),
    ),
    ("POST", "/v1/search/by-embedding"): Route(
        Permission.READ_VOICEPRINTS,
        real=lambda w: Req(
            "POST", "/v1/search/by-embedding", json={"embedding": w.voiceprint["embedding"], "top_k": 10}
        ),
        harmless=lambda w: Req("POST", "/v1/search/by-embedding", json={}),
        harmless_status=422,
        intruder=_json(200),
        intruder_check=lambda w, a: _assert(a.json()["hits"] == []),
    ),
    # keys and tenant settings
    ("GET", "/v1/keys"): Route(
        Permission.ADMIN,
        real=lambda w: Req("GET", "/v1/keys"),
        harmless=lambda w: Req("GET", "/v1/keys"),
        harmless_status=200,
        intruder=_json(200),
        intruder_check=lambda w, a: _assert({k["tenant"] for k in a.json()} == {INTRUDER}),
    ),
    ("POST", "/v1/keys"): Route(
        Permission.ADMIN,
        real=lambda w: Req("POST", "/v1/keys", json={"role": "admin", "name": "made-by-a-stranger"}),
        harmless=lambda w: Req("POST", "/v1/keys", json={"role": "superuser"}),
        harmless_status=422,
        intruder=_json(201),
        intruder_check=lambda w, a: _assert(a.json()["key"]["tenant"] == INTRUDER),
        undo=lambda w, c, a: _assert(c.delete(f"/v1/keys/{a.json()['key']['key_id']}").status_code == 200),
    ),
    ("DELETE", "/v1/keys/{key_id}"): Route(
        Permission.ADMIN,
        real=lambda w: Req("DELETE", f"/v1/keys/{w.key_ids['spare']}"),
        harmless=lambda w: Req("DELETE", "/v1/keys/000000000000"),
        harmless_status=404,
        intruder=_json(404),
        survives=_spare_key_works,
    ),
    ("GET", "/v1/tenant"): Route(
        Permission.ADMIN,
        real=lambda w: Req("GET", "/v1/tenant"),
        harmless=lambda w: Req("GET", "/v1/tenant"),
        harmless_status=200,
        intruder=_json(200),
        intruder_check=_own_tenant,
    ),
    ("PATCH", "/v1/tenant"): Route(
        Permission.ADMIN,
        real=lambda w: Req("PATCH", "/v1/tenant", json={"twilio_auth_token": "set-by-a-stranger"}),
        harmless=lambda w: Req("PATCH", "/v1/tenant", json={"retain_audio": "perhaps"}),
        harmless_status=422,
        intruder=_json(200),
        intruder_check=_own_tenant,
        survives=_owner_tenant_unchanged,  # and the Twilio test signs with the owner's token after this
    ),
    # health, the schema, metrics
    ("GET", "/openapi.json"): Route(
        Permission.HEALTH,
        real=lambda w: Req("GET", "/openapi.json"),
        harmless=lambda w: Req("GET", "/openapi.json"),
        harmless_status=200,
        intruder=_json(200),
    ),
    ("GET", "/healthz"): Route(
        Permission.HEALTH,
        real=lambda w: Req("GET", "/healthz"),
        harmless=lambda w: Req("GET", "/healthz"),
        harmless_status=200,
        intruder=_json(200),
        intruder_check=_own_tenant,
    ),
    ("GET", "/readyz"): Route(
        Permission.HEALTH,
        real=lambda w: Req("GET", "/readyz"),
        harmless=lambda w: Req("GET", "/readyz"),
        harmless_status=200,
        intruder=_json(200),
        intruder_check=_own_tenant,
    ),
    ("GET", "/metrics"): Route(
        Permission.MONITOR,
        real=lambda w: Req("GET", "/metrics"),
        harmless=lambda w: Req("GET", "/metrics"),
        harmless_status=200,
        # Totals over all tenants: no tenant, agent, call or key id (the markers prove it).
        intruder=_json(200),
        intruder_check=lambda w, a: _assert("vpmon_alerts_total" in a.text),
    ),
    # live calls and alerts
    ("PUT", "/v1/calls/{call_id}/agent"): Route(
        Permission.MONITOR,
        real=lambda w: Req("PUT", f"/v1/calls/{BOUND_CALL}/agent", json={"agent_id": AGENT}),
        harmless=lambda w: Req("PUT", f"/v1/calls/{BOUND_CALL}/agent", json={}),
        harmless_status=422,
        intruder=_json(404),  # the owner's agent is not enrolled in the intruder's tenant
    ),
    ("GET", "/v1/calls"): Route(
        Permission.MONITOR,
        real=lambda w: Req("GET", "/v1/calls"),
        harmless=lambda w: Req("GET", "/v1/calls"),
        harmless_status=200,
        intruder=_json(200),
    ),
    ("GET", "/v1/alerts"): Route(
        Permission.MONITOR,
        real=lambda w: Req("GET", "/v1/alerts", params={"limit": "1000"}),
        harmless=lambda w: Req("GET", "/v1/alerts"),
        harmless_status=200,
        intruder=_json(200),
    ),
    ("POST", "/v1/alerts/{event_id}/ack"): Route(
        Permission.MONITOR,
        real=lambda w: Req("POST", f"/v1/alerts/{w.alert_id}/ack"),
        harmless=lambda w: Req("POST", "/v1/alerts/1-0/ack"),
        harmless_status=404,
        intruder=_json(404),
        survives=_owner_alert_unacknowledged,
    ),
    ("GET", "/v1/alerts/stream"): Route(
        Permission.MONITOR,
        real=lambda w: Req("GET", "/v1/alerts/stream", headers=SSE, stream=True),
        harmless=lambda w: Req("GET", "/v1/alerts/stream", headers=SSE, stream=True),
        harmless_status=200,
        intruder=_json(200),
        intruder_check=lambda w, a: _assert(a.headers["content-type"].startswith("text/event-stream")),
    ),
    ("GET", "/v1/calls/stream"): Route(
        Permission.MONITOR,
        real=lambda w: Req("GET", "/v1/calls/stream", headers=SSE, stream=True),
        harmless=lambda w: Req("GET", "/v1/calls/stream", headers=SSE, stream=True),
        harmless_status=200,
        intruder=_json(200),
        intruder_check=lambda w, a: _assert(a.headers["content-type"].startswith("text/event-stream")),
    ),
    # WebRTC (WHIP)
    ("GET", "/v1/whip"): Route(
        Permission.MONITOR,
        real=lambda w: Req("GET", "/v1/whip"),
        harmless=lambda w: Req("GET", "/v1/whip"),
        harmless_status=200,
        intruder=_json(200),
        intruder_check=lambda w, a: _assert(a.json() == {"sessions": [], "peer_connections": 0}),
    ),
    ("POST", "/v1/whip"): Route(
        Permission.MONITOR,
        # A publish that names the owner's tenant and agent.
        real=lambda w: Req(
            "POST",
            "/v1/whip",
            content=CHROME_OFFER,
            headers={"Content-Type": "application/sdp", "Vpmon-Tenant": OWNER, "Vpmon-Agent-Id": AGENT},
        ),
        harmless=lambda w: Req("POST", "/v1/whip", content="v=0", headers={"Content-Type": "text/plain"}),
        harmless_status=415,
        intruder=frozenset({403}),
    ),
    ("DELETE", "/v1/whip/{session_id}"): Route(
        Permission.MONITOR,
        real=lambda w: Req("DELETE", w.whip_location()),
        harmless=lambda w: Req("DELETE", "/v1/whip/never-was"),
        harmless_status=404,
        intruder=frozenset({404}),  # as if it did not exist: a 403 would confirm the id
        survives=_whip_session_ends_for_its_owner,
    ),
    # webhooks
    ("GET", "/v1/webhooks"): Route(
        Permission.ADMIN,
        real=lambda w: Req("GET", "/v1/webhooks"),
        harmless=lambda w: Req("GET", "/v1/webhooks"),
        harmless_status=200,
        intruder=_json(200),
        intruder_check=lambda w, a: _assert(a.json() == []),
    ),
    ("POST", "/v1/webhooks"): Route(
        Permission.ADMIN,
        real=lambda w: Req("POST", "/v1/webhooks", json={"url": "http://127.0.0.1:9/made-by-a-stranger"}),
        harmless=lambda w: Req("POST", "/v1/webhooks", json={"url": "ftp://127.0.0.1/"}),
        harmless_status=422,
        intruder=_json(201),
        undo=lambda w, c, a: _assert(
            c.delete(f"/v1/webhooks/{a.json()['webhook']['id']}").status_code == 204
        ),
        survives=_owner_webhook_unchanged,
    ),
    ("GET", "/v1/webhooks/dead-letters"): Route(
        Permission.ADMIN,
        real=lambda w: Req("GET", "/v1/webhooks/dead-letters"),
        harmless=lambda w: Req("GET", "/v1/webhooks/dead-letters"),
        harmless_status=200,
        intruder=_json(200),
        intruder_check=lambda w, a: _assert(a.json() == []),
    ),
    ("GET", "/v1/webhooks/{endpoint_id}"): Route(
        Permission.ADMIN,
        real=lambda w: Req("GET", f"/v1/webhooks/{w.webhook_id}"),
        harmless=lambda w: Req("GET", "/v1/webhooks/never-was"),
        harmless_status=404,
        intruder=_json(404),
    ),
    ("DELETE", "/v1/webhooks/{endpoint_id}"): Route(
        Permission.ADMIN,
        real=lambda w: Req("DELETE", f"/v1/webhooks/{w.webhook_id}"),
        harmless=lambda w: Req("DELETE", "/v1/webhooks/never-was"),
        harmless_status=404,
        intruder=_json(404),
        survives=_owner_webhook_unchanged,
    ),
    ("POST", "/v1/webhooks/{endpoint_id}/rotate-secret"): Route(
        Permission.ADMIN,
        real=lambda w: Req("POST", f"/v1/webhooks/{w.webhook_id}/rotate-secret"),
        harmless=lambda w: Req("POST", "/v1/webhooks/never-was/rotate-secret"),
        harmless_status=404,
        intruder=_json(404),
        survives=_owner_webhook_unchanged,
    ),
    ("POST", "/v1/webhooks/{endpoint_id}/enable"): Route(
        Permission.ADMIN,
        real=lambda w: Req("POST", f"/v1/webhooks/{w.webhook_id}/enable"),
        harmless=lambda w: Req("POST", "/v1/webhooks/never-was/enable"),
        harmless_status=404,
        intruder=_json(404),
        survives=_owner_webhook_unchanged,
    ),
}

# Open to anyone, on purpose.
PUBLIC: dict[tuple[str, str], str] = {
    ("GET", "/"): "a redirect to /supervisor/: no data",
    ("MOUNT", "/supervisor"): "the supervisor page's static files (HTML, CSS, JS modules): no data; the page "
    "asks for a monitor key and sends it with every data request",
}


def _assert(condition: bool) -> None:
    assert condition


# --- checks ------------------------------------------------------------------------------------------
def assert_nothing_of_the_owner(world: World, request: Req, client: httpx.Client, answer: Answer) -> None:
    carried = request.carried() + repr(dict(client.headers))
    leaked = sorted(m for m in world.markers if m not in carried and m in answer.text)
    assert not leaked, (
        f"{request.method} {request.path} answered with the owner's {leaked}: {answer.text[:500]}"
    )


def assert_problem(answer: Answer, status: int, slug: str) -> None:
    assert answer.status == status, answer.text[:500]
    assert answer.headers["content-type"].startswith("application/problem+json"), answer.headers
    assert json.loads(answer.text)["type"] == f"urn:vpmon:problem:{slug}"


def bad_credentials(world: World) -> dict[str, tuple[str | None, str]]:
    """Name → (token, scheme): nothing that may pass."""
    admin_id = world.key_ids["admin"]
    return {
        "no key": (None, "Bearer"),
        "malformed": ("not-a-vpmon-key", "Bearer"),
        "unknown": (f"vpk_{'0' * 12}_{secrets.token_urlsafe(32)}", "Bearer"),
        "wrong secret": (f"vpk_{admin_id}_{secrets.token_urlsafe(32)}", "Bearer"),  # the owner's key id
        "revoked": (world.owner["revoked"], "Bearer"),  # an admin key, revoked through the API
        "other scheme": (world.owner["admin"], "Basic"),  # a valid admin key, not as a Bearer token
    }


def lacking(permission: Permission) -> list[Role]:
    return [role for role in Role if permission not in ROLE_PERMISSIONS[role]]


def having(permission: Permission) -> list[Role]:
    return [role for role in Role if permission in ROLE_PERMISSIONS[role]]


SEEN: dict[str, dict[str, str]] = {}  # route → what each kind of caller got, for the summary


# --- the tests ---------------------------------------------------------------------------------------
def test_the_owner_sees_its_own_data(world: World) -> None:
    """The other tests look for the owner's strings in every answer to anyone else: here, in the owner's
    own answers, they are found."""

    def found(role: str, *requests: Req) -> set[str]:
        with world.client(world.owner[role]) as owner:
            text = " ".join(send(owner, request).text for request in requests)
        return {marker for marker in world.markers if marker in text}

    assert {AGENT, DISPLAY_NAME, SITE, TAG} <= found("read", Req("GET", "/v1/voiceprints"))
    assert set(world.key_ids.values()) <= found("admin", Req("GET", "/v1/keys"))
    assert {WEBHOOK_URL, world.webhook_id} <= found("admin", Req("GET", "/v1/webhooks"))
    assert {AGENT, OWNER_CALL, world.alert_id} <= found("monitor", Req("GET", "/v1/alerts"))
    assert {AGENT, OWNER_CALL} <= found("monitor", Req("GET", "/v1/calls"))
    assert {AGENT, OWNER_CALL, world.alert_id} <= found(
        "monitor", Req("GET", "/v1/alerts/stream", headers=SSE, stream=True)
    )
    assert {AGENT, OWNER_CALL} <= found("monitor", Req("GET", "/v1/calls/stream", headers=SSE, stream=True))


def test_the_running_server_documents_the_routes_of_the_app(world: World) -> None:
    with world.client(world.owner["read"]) as reader:
        document = reader.get("/openapi.json")
    assert document.status_code == 200, document.text
    documented = {(m.upper(), p) for p, ops in document.json()["paths"].items() for m in ops}
    assert documented == {route for route, in_schema in ROUTES.http.items() if in_schema}
    assert ROUTES.websockets, "the app has no websocket route: the enumeration is broken"
    assert set(HTTP_ROUTES) <= set(ROUTES.http), "HTTP_ROUTES names routes the app no longer has"


@pytest.mark.parametrize(("method", "path"), sorted(ROUTES.http), ids=lambda v: v)
def test_http_route(world: World, method: str, path: str) -> None:
    if (method, path) in PUBLIC:  # open on purpose: anyone gets an answer, with nothing of the owner's
        request = Req(method, path)
        with world.client(None) as anyone:
            answer = send(anyone, request)
        SEEN[f"{method} {path}"] = {"no key": f"public ({answer.status})"}
        assert answer.status < 400, answer.text[:500]
        assert_nothing_of_the_owner(world, request, anyone, answer)
        return
    route = HTTP_ROUTES.get((method, path))
    assert route is not None, (
        f"{method} {path} is a new route: say in HTTP_ROUTES how to call it and which permission it needs, "
        "or in PUBLIC why anyone may"
    )
    seen = SEEN.setdefault(f"{method} {path}", {})
    real = route.real(world)

    for name, (token, scheme) in bad_credentials(world).items():
        with world.client(token, scheme) as client:
            answer = send(client, real)
        seen[name] = str(answer.status)
        assert_problem(answer, 401, "unauthorized")
        assert answer.headers["www-authenticate"].startswith("Bearer"), name
        assert_nothing_of_the_owner(world, real, client, answer)

    for role in lacking(route.permission):
        with world.client(world.owner[role.value]) as client:
            answer = send(client, real)
        seen[role.value] = str(answer.status)
        assert_problem(answer, 403, "forbidden")
        assert route.permission.value in json.loads(answer.text)["detail"]

    for role in having(route.permission):  # past authorisation: the route itself answers
        with world.client(world.owner[role.value]) as client:
            answer = send(client, route.harmless(world))
        seen.setdefault(role.value, f"ok ({answer.status})")
        assert answer.status == route.harmless_status, (role, answer.text[:500])

    with world.client(world.intruder["admin"]) as intruder:
        answer = send(intruder, real)
        seen["other tenant"] = str(answer.status)
        assert answer.status in route.intruder, answer.text[:500]
        assert_nothing_of_the_owner(world, real, intruder, answer)
        if route.intruder_check is not None:
            route.intruder_check(world, answer)
        if route.undo is not None:
            route.undo(world, intruder, answer)
    if route.survives is not None:
        route.survives(world, answer)


def test_public_routes(world: World) -> None:
    public = {key for key in PUBLIC if key[0] != "MOUNT"} | {("MOUNT", p) for p in ROUTES.mounts}
    assert public == set(PUBLIC), "a public route or mount appeared or went: say in PUBLIC why it is open"
    with httpx.Client(base_url=world.server.url) as anyone:
        home = anyone.get("/")
        assert home.status_code == 307 and home.headers["location"] == "/supervisor/"
        mount = ROUTES.mounts["/supervisor"]
        files = sorted(p.name for p in Path(mount.directory).iterdir() if p.is_file())
        assert "index.html" in files
        for name in [*files, ""]:  # "" is the page itself (index.html)
            page = anyone.get(f"/supervisor/{name}")
            assert page.status_code == 200, name
            assert not KEY_RE.search(page.text), name
            leaked = sorted(m for m in world.markers if m in page.text)
            assert not leaked, (name, leaked)
        assert anyone.get("/supervisor/no-such-file.js").status_code == 404
        assert anyone.get("/supervisor/%2e%2e/streamer/api.py").status_code == 404
    SEEN["GET / and /supervisor/*"] = {"no key": "public (307 / 200)"}


# --- websockets --------------------------------------------------------------------------------------
def ws_url(world: World, path: str) -> str:
    return world.server.url.replace("http://", "ws://", 1) + path


async def _refusal(url: str, headers: dict[str, str]) -> tuple[int, str]:
    """The status and body of a refused upgrade (fails if the upgrade is accepted)."""
    try:
        async with connect(url, additional_headers=headers, open_timeout=10):
            pass
    except websockets.InvalidStatus as refused:
        return refused.response.status_code, refused.response.body.decode(errors="replace")
    raise AssertionError(f"{url} accepted the upgrade with {sorted(headers)}")


async def _accepted(url: str, headers: dict[str, str]) -> bool:
    async with connect(url, additional_headers=headers, open_timeout=10) as ws:
        return ws.protocol.state is State.OPEN


def refusal(url: str, headers: dict[str, str]) -> tuple[int, str]:
    return asyncio.run(_refusal(url, headers))


async def native_call(
    world: World, key: str, start: dict[str, Any], audio: np.ndarray | None = None
) -> tuple[list[dict[str, Any]], Any]:
    """A native call: the start message, 20 ms frames, stop; the server's frames and its close."""
    frames: list[dict[str, Any]] = []
    url = ws_url(world, "/v1/streams/native")
    async with connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        try:
            await ws.send(json.dumps({"encoding": "pcm16", "sample_rate": 8000, "channels": 1, **start}))
            pcm = to_pcm16(audio).tobytes() if audio is not None else b""
            for offset in range(0, len(pcm), 320):
                await ws.send(pcm[offset : offset + 320])
            await ws.send(json.dumps({"type": "stop"}))
            async for message in ws:
                frames.append(json.loads(message))
        except websockets.ConnectionClosed:
            pass
        return frames, ws.protocol.close_rcvd


def wait_until_ended(world: World, key: str, call_id: str, timeout: float = 60.0) -> None:
    """A call id is free again once its call has ended on the gateway (``end_call``): another test's
    call with the same id may still be finishing when this one starts."""
    deadline = time.monotonic() + timeout
    while True:
        with world.client(key) as client:
            calls = {c["call_id"]: c for c in client.get("/v1/calls").json()}
        if call_id not in calls or calls[call_id]["state"] == "ended":
            return
        assert time.monotonic() < deadline, f"call {call_id} still live after {timeout:.0f} s"
        time.sleep(0.2)


def owner_calls(world: World) -> dict[str, dict[str, Any]]:
    with world.client(world.owner["monitor"]) as monitor:
        return {c["call_id"]: c for c in monitor.get("/v1/calls").json()}


def check_native(world: World) -> None:
    url = ws_url(world, "/v1/streams/native")
    for name, (token, scheme) in bad_credentials(world).items():
        headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
        status, body = refusal(url, headers)
        SEEN.setdefault("WS /v1/streams/native", {})[name] = str(status)
        assert status == 401 and json.loads(body)["type"] == "urn:vpmon:problem:unauthorized", (name, body)
    for role in lacking(Permission.MONITOR):
        status, body = refusal(url, {"Authorization": f"Bearer {world.owner[role.value]}"})
        SEEN["WS /v1/streams/native"][role.value] = str(status)
        # The gateway refuses a key of the wrong role as it refuses a wrong key (401, "send a monitor
        # or admin API key"); what matters here is that the upgrade is refused.
        assert status in (401, 403), (role, body)
    for role in having(Permission.MONITOR):
        assert asyncio.run(_accepted(url, {"Authorization": f"Bearer {world.owner[role.value]}"}))

    intruder = world.intruder["monitor"]
    # A call that claims the owner's tenant in-band: closed (policy violation), nothing recorded.
    frames, close = asyncio.run(
        native_call(world, intruder, {"type": "start", "call_id": "claims-owner", "tenant": OWNER})
    )
    assert close is not None and close.code == 1008 and "tenant" in close.reason, close
    # The owner's agent: not enrolled in the intruder's tenant.
    frames, close = asyncio.run(
        native_call(world, intruder, {"type": "start", "call_id": "uses-owner-agent", "agent_id": AGENT})
    )
    assert close is not None and close.code == 4004 and INTRUDER in close.reason, close
    # The call id the owner bound to its agent: the binding is the owner's, not applied here.
    audio = speech(world.devset, "tuxpaint_ca", ENROL, ENROL + 2)
    wait_until_ended(world, intruder, BOUND_CALL)
    frames, close = asyncio.run(native_call(world, intruder, {"type": "start", "call_id": BOUND_CALL}, audio))
    assert close is not None and close.code == 1000, close
    assert frames and all(f.get("agent_id") is None for f in frames), frames
    assert AGENT not in json.dumps(frames)
    SEEN["WS /v1/streams/native"]["other tenant"] = "1008 (claims owner) / 4004 (owner's agent) / unbound"
    assert "claims-owner" not in owner_calls(world) and "uses-owner-agent" not in owner_calls(world)


def check_twilio(world: World) -> None:
    owner_url = ws_url(world, f"/v1/streams/twilio/{OWNER}")
    intruder_url = ws_url(world, f"/v1/streams/twilio/{INTRUDER}")
    intruder_token = "intruder-twilio-auth-token"
    with world.client(world.intruder["admin"]) as admin:
        admin.patch("/v1/tenant", json={"twilio_auth_token": intruder_token}).raise_for_status()
    # The owner's token still signs (no other tenant's PATCH changed it).
    assert asyncio.run(
        _accepted(owner_url, {"X-Twilio-Signature": twilio_signature(TWILIO_TOKEN, owner_url)})
    )
    refused = {
        "no signature": {},
        "malformed": {"X-Twilio-Signature": "not base64!"},
        "wrong token": {"X-Twilio-Signature": twilio_signature("not-the-token", owner_url)},
        "an API key instead": {"Authorization": f"Bearer {world.owner['admin']}"},
        "other tenant's token": {"X-Twilio-Signature": twilio_signature(intruder_token, owner_url)},
        "other tenant's URL": {"X-Twilio-Signature": twilio_signature(intruder_token, intruder_url)},
    }
    seen = SEEN.setdefault("WS /v1/streams/twilio/{tenant}", {})
    for name, headers in refused.items():
        status, body = refusal(owner_url, headers)
        seen[name] = str(status)
        assert status == 403 and json.loads(body)["type"] == "urn:vpmon:problem:forbidden", (name, body)
        assert not [m for m in world.markers if m in body and m != OWNER], body
    # A replaced token ("revoked"): the old one's signature no longer opens the stream.
    with world.client(world.owner["admin"]) as admin:
        admin.patch("/v1/tenant", json={"twilio_auth_token": "owner-new-twilio-token"}).raise_for_status()
        try:
            status, _ = refusal(owner_url, {"X-Twilio-Signature": twilio_signature(TWILIO_TOKEN, owner_url)})
            seen["replaced token"] = str(status)
            assert status == 403
            new = {"X-Twilio-Signature": twilio_signature("owner-new-twilio-token", owner_url)}
            assert asyncio.run(_accepted(owner_url, new))
        finally:
            admin.patch("/v1/tenant", json={"twilio_auth_token": TWILIO_TOKEN}).raise_for_status()

    # The intruder's own stream, claiming the owner's tenant in its start message: closed (1008).
    async def claims_owner() -> Any:
        headers = {"X-Twilio-Signature": twilio_signature(intruder_token, intruder_url)}
        silence = np.zeros(1600, np.float32)
        messages = twilio_messages("CA-claims-owner", silence, silence, {"tenant": OWNER, "agent_id": AGENT})
        async with connect(intruder_url, additional_headers=headers) as ws:
            try:
                for message in messages:
                    await ws.send(message)
                while True:
                    await ws.recv()
            except websockets.ConnectionClosed:
                pass
            return ws.protocol.close_rcvd

    close = asyncio.run(claims_owner())
    seen["other tenant"] = f"403 / in-band claim closed {close.code if close else None}"
    assert close is not None and close.code == 1008 and "tenant" in close.reason, close
    assert "CA-claims-owner" not in owner_calls(world)


def check_audiohook(world: World) -> None:
    audio = CallAudio.from_samples(speech(world.devset, "tuxpaint_ca", ENROL, ENROL + 1), 8000)
    seen = SEEN.setdefault("WS /v1/streams/audiohook", {})

    def stream(key: str | None, call_id: str | None = None) -> Any:
        options = StreamOptions("audiohook", world.server.url, key=key, call_id=call_id, speed=0)
        return asyncio.run(stream_call(audio, options))

    # Without X-API-KEY the upgrade is refused (the AudioHook headers are required).
    headers = {
        "Audiohook-Organization-Id": "0f3a8b8e-8f0e-4a4e-9a43-4d8f5a0b7c11",
        "Audiohook-Session-Id": "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f",
        "Audiohook-Correlation-Id": "2d3e4f5a-6b7c-4d8e-9f0a-1b2c3d4e5f6a",
    }
    status, body = refusal(ws_url(world, "/v1/streams/audiohook"), headers)
    seen["no key"] = str(status)
    assert status == 400 and "X-API-KEY" in body, body
    bad = {name: token for name, (token, _) in bad_credentials(world).items() if token is not None}
    bad.pop("other scheme")  # X-API-KEY has no scheme: the owner's valid admin key would pass
    bad |= {role.value: world.owner[role.value] for role in lacking(Permission.MONITOR)}
    for name, token in bad.items():
        result = stream(token)
        seen[name] = "disconnect: " + ("unauthorized" if "unauthorized" in (result.error or "") else "?")
        assert not result.ok and "unauthorized" in (result.error or ""), (name, result)
    assert stream(world.owner["monitor"]).ok  # the same client with a valid key is let in

    # The intruder streams the call id the owner bound to its agent: its own call, with no agent.
    wait_until_ended(world, world.intruder["monitor"], BOUND_CALL)
    result = stream(world.intruder["monitor"], BOUND_CALL)
    assert result.ok, result
    with world.client(world.intruder["monitor"]) as intruder:
        theirs = {c["call_id"]: c for c in intruder.get("/v1/calls").json()}
    assert theirs[BOUND_CALL]["agent_id"] is None, theirs[BOUND_CALL]
    assert BOUND_CALL not in owner_calls(world)
    seen["other tenant"] = "its own call; the owner's binding not applied"


WEBSOCKETS: dict[str, Callable[[World], None]] = {
    "/v1/streams/native": check_native,
    "/v1/streams/twilio/{tenant}": check_twilio,
    "/v1/streams/audiohook": check_audiohook,
}


@pytest.mark.parametrize("path", sorted(ROUTES.websockets))
def test_websocket_route(world: World, path: str) -> None:
    check = WEBSOCKETS.get(path)
    assert check is not None, f"websocket {path} is new: add a check of its refusals to WEBSOCKETS"
    check(world)


def test_the_owner_data_survived(world: World) -> None:
    """After everything above: the owner's voiceprint, key, webhook, alert and settings are as they were,
    and the intruder's tenant holds nothing of the owner's."""
    _owner_voiceprint_unchanged(world)
    _spare_key_works(world)
    _owner_webhook_unchanged(world)
    _owner_alert_unacknowledged(world)
    _owner_tenant_unchanged(world)
    assert owner_calls(world)[OWNER_CALL]["alerts"] == 1
    with world.client(world.intruder["admin"]) as intruder:
        assert intruder.get("/v1/voiceprints").json()["total"] == 0
        assert intruder.get("/v1/webhooks").json() == []
    width = max(map(len, SEEN))
    print("\nroute".ljust(width + 2), "what each caller got")
    for route, seen in SEEN.items():
        print(route.ljust(width), ", ".join(f"{name}: {status}" for name, status in seen.items()))
