"""The HTTP API of the voiceprint service (``/v1/…``), health and readiness.

Every route needs an API key (``Authorization: Bearer vpk_…``); the key decides the tenant, so no route
takes a tenant and no key can reach another tenant's data. Audio arrives as multipart uploads; embedding
runs in worker threads (``AppState.run``) so the event loop keeps serving live calls meanwhile.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from streamer import metrics, problems
from streamer.auth import ApiKey, Permission, Role
from streamer.limits import retry_after
from streamer.redis_clients import REDIS_UNAVAILABLE
from streamer.service import EnrolResult, Side, Upload
from streamer.state import AppState
from streamer.store import MAX_PAGE_OFFSET, SearchHit, Voiceprint, check_label
from verifier.enrolment import RecordingReport
from verifier.scoring import Verdict

router = APIRouter()
bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer vpk_…`")


# --- authentication ---------------------------------------------------------------------------------
def state(request: Request) -> AppState:
    return request.app.state.vpmon


def require(permission: Permission) -> Callable[..., Any]:
    """A dependency: the caller's key, if it is valid and its role allows ``permission``."""

    async def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> ApiKey:
        challenge = {"WWW-Authenticate": 'Bearer realm="vpmon"'}
        if credentials is None:
            raise HTTPException(401, "send an API key: Authorization: Bearer vpk_…", challenge)
        key = await authenticate(state(request), credentials.credentials)
        if key is None:
            raise HTTPException(401, "the API key is unknown, malformed or revoked", challenge)
        # Counted per key once it is authenticated: nobody can spend another key's requests.
        limiter = state(request).limits.requests
        if wait := limiter.check(key.key_id):
            detail = (
                f"this key is over {limiter.rate:g} requests a second (bursts of {limiter.burst}) on this "
                "gateway (VPMON_KEY_REQUESTS_PER_SECOND, VPMON_KEY_REQUEST_BURST): retry after Retry-After"
            )
            raise HTTPException(429, detail, {"Retry-After": retry_after(wait)})
        if not key.can(permission):
            raise HTTPException(403, f"a {key.role.value} key may not do this (needs {permission.value})")
        request.state.key = key
        return key

    return dependency


# While Redis cannot be reached, a key this gateway verified up to this long before Redis last verified
# one still authenticates: probes and scrapes then see the degraded gateway (/readyz, /metrics) instead of
# failing on the key check. (A revocation in those last minutes before an outage waits for its end.)
KEY_GRACE_S = 300.0


async def authenticate(app: AppState, token: str) -> ApiKey | None:
    """The key a token belongs to (see ``KeyStore.authenticate``), through a Redis outage if it was
    verified shortly before it."""
    digest = hashlib.sha256(token.encode()).digest()
    try:
        key = await app.run_io(app.keys.authenticate, token)
    except REDIS_UNAVAILABLE:
        known = app.verified_keys.get(digest)
        if known is None or known[1] < app.keys_checked_at - KEY_GRACE_S:
            raise
        return known[0]
    if key is None:
        app.verified_keys.pop(digest, None)
        return None
    app.keys_checked_at = time.monotonic()  # a key found: Redis answered
    app.verified_keys[digest] = (key, app.keys_checked_at)
    return key


Health = Annotated[ApiKey, Depends(require(Permission.HEALTH))]
Reader = Annotated[ApiKey, Depends(require(Permission.READ_VOICEPRINTS))]
Writer = Annotated[ApiKey, Depends(require(Permission.WRITE_VOICEPRINTS))]
Admin = Annotated[ApiKey, Depends(require(Permission.ADMIN))]
Monitor = Annotated[ApiKey, Depends(require(Permission.MONITOR))]


# --- response bodies --------------------------------------------------------------------------------
class VoiceprintOut(BaseModel):
    speaker_id: str
    site: str | None
    display_name: str
    tags: list[str]
    model_id: str
    enrolled_at: str
    net_speech_seconds: float
    quality: dict[str, float]
    audio_retained: bool
    updates: int = Field(description="Verified calls averaged into the voiceprint since enrolment.")
    updated_from_calls_seconds: float = Field(description="Their speech, in the voiceprint's weight.")
    embedding: list[float] | None = Field(None, description="Only with include_embedding=true.")

    @classmethod
    def of(cls, vp: Voiceprint, include_embedding: bool = False) -> VoiceprintOut:
        return cls(
            speaker_id=vp.speaker_id,
            site=vp.site,
            display_name=vp.display_name,
            tags=list(vp.tags),
            model_id=vp.model_id,
            enrolled_at=vp.enrolled_at,
            net_speech_seconds=vp.net_speech_seconds,
            quality=dict(vp.quality),
            audio_retained=vp.audio_retained,
            updates=vp.updates,
            updated_from_calls_seconds=round(vp.updated_from_calls_seconds, 2),
            embedding=[round(float(x), 7) for x in vp.vector] if include_embedding else None,
        )


class RecordingOut(BaseModel):
    name: str
    net_speech_seconds: float
    windows: int
    level_dbfs: float
    snr_db: float
    clipped_fraction: float
    consistency: float | None = Field(description="Cosine with the other recordings' combined embedding.")
    consistency_threshold: float | None = Field(description="Below this cosine it would have been refused.")

    @classmethod
    def of(cls, report: RecordingReport) -> RecordingOut:
        return cls(
            name=report.name,
            net_speech_seconds=round(report.net_speech_seconds, 2),
            windows=report.windows,
            level_dbfs=round(report.level_dbfs, 1),
            snr_db=round(report.snr_db, 1),
            clipped_fraction=round(report.clipped_fraction, 5),
            consistency=None if report.consistency is None else round(report.consistency, 4),
            consistency_threshold=None
            if report.consistency_threshold is None
            else round(report.consistency_threshold, 4),
        )


class EnrolOut(BaseModel):
    voiceprint: VoiceprintOut
    recordings: list[RecordingOut]
    replaced: bool
    audio_bytes_retained: int

    @classmethod
    def of(cls, result: EnrolResult) -> EnrolOut:
        return cls(
            voiceprint=VoiceprintOut.of(result.voiceprint),
            recordings=[RecordingOut.of(r) for r in result.enrolment.recordings],
            replaced=result.replaced,
            audio_bytes_retained=result.audio_bytes_retained,
        )


class VoiceprintPage(BaseModel):
    voiceprints: list[VoiceprintOut]
    total: int
    offset: int
    limit: int


class VerdictOut(BaseModel):
    decision: str = Field(description="MATCH, MISMATCH, or UNKNOWN (not enough speech).")
    score: float = Field(description="Cosine similarity in [-1, 1].")
    threshold: float = Field(description="The cosine at which the decision flips, for this much speech.")
    llr: float | None = Field(description="Calibrated log-likelihood ratio (natural log).")
    net_speech_seconds: float
    model_id: str
    reason: str
    centred: bool = Field(
        description="The score is a cosine centred on the mean of the tenant's other voiceprints (from "
        "sixteen of them on), calibrated for that; false: a raw cosine."
    )

    @classmethod
    def of(cls, verdict: Verdict) -> VerdictOut:
        return cls(**verdict.to_dict())


class SideOut(BaseModel):
    name: str
    net_speech_seconds: float
    windows: int

    @classmethod
    def of(cls, side: Side) -> SideOut:
        return cls(name=side.name, net_speech_seconds=round(side.net_speech_seconds, 2), windows=side.windows)


class VerifyOut(BaseModel):
    speaker_id: str
    verdict: VerdictOut
    recording: SideOut


class CompareOut(BaseModel):
    verdict: VerdictOut
    recordings: list[SideOut]


class HitOut(BaseModel):
    speaker_id: str
    score: float
    above_threshold: bool
    site: str | None
    display_name: str
    tags: list[str]

    @classmethod
    def of(cls, hit: SearchHit, threshold: float) -> HitOut:
        return cls(
            speaker_id=hit.speaker_id,
            score=round(hit.score, 5),
            above_threshold=hit.score >= threshold,
            site=hit.site,
            display_name=hit.display_name,
            tags=list(hit.tags),
        )


class SearchOut(BaseModel):
    hits: list[HitOut]
    threshold: float
    net_speech_seconds: float | None
    model_id: str


class EmbeddingQuery(BaseModel):
    embedding: list[float] = Field(min_length=1, max_length=4096)
    model_id: str | None = Field(
        None, description="The model that made the embedding (default: the server's)."
    )
    top_k: int = Field(10, ge=1, le=1000)
    site: str | None = None
    tags: list[str] = Field(default_factory=list, max_length=16)
    threshold: float | None = Field(None, ge=-1, le=1)
    net_speech_seconds: float = Field(3.0, gt=0, le=3600, description="Sets the default threshold.")


class KeyOut(BaseModel):
    key_id: str
    tenant: str
    role: str
    name: str
    created_at: str
    revoked_at: str | None


class NewKeyOut(BaseModel):
    key: KeyOut
    token: str = Field(description="The API key. Shown once: store it now.")


class KeyIn(BaseModel):
    role: Role
    name: str = Field("", max_length=64)


class TenantSettingsOut(BaseModel):
    tenant: str
    retain_audio: bool
    voiceprint_updates: bool
    twilio_auth_token_set: bool
    audiohook_client_secret_set: bool


class TenantSettingsIn(BaseModel):
    retain_audio: bool | None = None
    voiceprint_updates: bool | None = Field(
        None,
        description="Agents' confidently verified calls (30 s of speech or more, no doubt at any point) "
        "update their voiceprints; calls never make up more than half of a voiceprint. Off by default.",
    )
    twilio_auth_token: str | None = Field(
        None, max_length=256, description="Twilio signs stream requests with it ('' removes it)."
    )
    audiohook_client_secret: str | None = Field(
        None, max_length=256, description="Base64 AudioHook client secret for signatures ('' removes it)."
    )


class HealthOut(BaseModel):
    status: str
    model_id: str | None = None
    store_backend: str | None = None
    tenant: str | None = None
    alerts_spooled: int | None = Field(
        None, description="/readyz: alerts in this gateway's local spool, waiting to be written to Redis."
    )


# --- helpers ----------------------------------------------------------------------------------------
async def _uploads(files: list[UploadFile]) -> list[Upload]:
    return [Upload(file.filename or f"recording-{i + 1}", await file.read()) for i, file in enumerate(files)]


def _tags(text: str) -> list[str]:
    return [check_label("tag", tag.strip()) for tag in text.split(",") if tag.strip()]


# --- voiceprints ------------------------------------------------------------------------------------
async def _enrol(
    request: Request, key: ApiKey, speaker_id: str, files: list[UploadFile], replace: bool, **fields: Any
) -> EnrolOut:
    app = state(request)
    if len(files) > app.settings.max_files:
        raise HTTPException(413, f"{len(files)} recordings; at most {app.settings.max_files} per enrolment")
    uploads = await _uploads(files)
    result = await app.run(app.service.enrol, key.tenant, speaker_id, uploads, replace=replace, **fields)
    return EnrolOut.of(result)


EnrolFiles = Annotated[list[UploadFile], File(description="One or more recordings (WAV, FLAC, OGG).")]
SiteForm = Annotated[str | None, Form(description="The site (e.g. a contact centre).")]
TagsForm = Annotated[str, Form(description="Comma-separated tags.")]
RetainForm = Annotated[bool | None, Form(description="Keep the audio (default: the tenant's setting).")]


@router.post("/v1/voiceprints", status_code=201, tags=["voiceprints"])
async def create_voiceprint(
    request: Request,
    response: Response,
    key: Writer,
    speaker_id: Annotated[str, Form()],
    files: EnrolFiles,
    site: SiteForm = None,
    display_name: Annotated[str, Form(max_length=200)] = "",
    tags: TagsForm = "",
    retain_audio: RetainForm = None,
) -> EnrolOut:
    """Enrol a new speaker from one or more recordings (409 if the id is already enrolled)."""
    out = await _enrol(
        request, key, speaker_id, files, False,
        site=site, display_name=display_name, tags=_tags(tags), retain_audio=retain_audio,
    )  # fmt: skip
    response.headers["Location"] = f"/v1/voiceprints/{speaker_id}"
    return out


@router.put("/v1/voiceprints/{speaker_id}", tags=["voiceprints"])
async def enrol_or_replace_voiceprint(
    request: Request,
    key: Writer,
    speaker_id: str,
    files: EnrolFiles,
    site: SiteForm = None,
    display_name: Annotated[str, Form(max_length=200)] = "",
    tags: TagsForm = "",
    retain_audio: RetainForm = None,
) -> EnrolOut:
    """Enrol a speaker, replacing any voiceprint it had (re-enrolment)."""
    return await _enrol(
        request, key, speaker_id, files, True,
        site=site, display_name=display_name, tags=_tags(tags), retain_audio=retain_audio,
    )  # fmt: skip


@router.get("/v1/voiceprints", tags=["voiceprints"])
async def list_voiceprints(
    request: Request,
    key: Reader,
    site: str | None = None,
    offset: Annotated[int, Query(ge=0, le=MAX_PAGE_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> VoiceprintPage:
    app = state(request)
    page = await app.run_io(app.service.list, key.tenant, site, offset, limit)
    total = await app.run_io(app.service.count, key.tenant, site)
    return VoiceprintPage(
        voiceprints=[VoiceprintOut.of(vp) for vp in page], total=total, offset=offset, limit=limit
    )


@router.get("/v1/voiceprints/{speaker_id}", tags=["voiceprints"])
async def get_voiceprint(
    request: Request, key: Reader, speaker_id: str, include_embedding: bool = False
) -> VoiceprintOut:
    app = state(request)
    return VoiceprintOut.of(await app.run_io(app.service.get, key.tenant, speaker_id), include_embedding)


@router.delete("/v1/voiceprints/{speaker_id}", status_code=204, tags=["voiceprints"])
async def delete_voiceprint(request: Request, key: Writer, speaker_id: str) -> Response:
    """Delete a voiceprint and its retained audio."""
    app = state(request)
    if not await app.run_io(app.service.delete, key.tenant, speaker_id):
        raise HTTPException(404, f"speaker {speaker_id!r} is not enrolled in tenant {key.tenant!r}")
    return Response(status_code=204)


@router.post("/v1/voiceprints/{speaker_id}/reembed", tags=["voiceprints"])
async def reembed_voiceprint(request: Request, key: Admin, speaker_id: str) -> EnrolOut:
    """Rebuild a voiceprint from its retained audio with the server's model."""
    app = state(request)
    return EnrolOut.of(await app.run(app.service.reembed, key.tenant, speaker_id))


# --- 1:1 and 1:N ------------------------------------------------------------------------------------
@router.post("/v1/verify", tags=["verification"])
async def verify(
    request: Request,
    key: Reader,
    speaker_id: Annotated[str, Form()],
    file: Annotated[UploadFile, File(description="The recording to check.")],
) -> VerifyOut:
    """1:1: is this recording the enrolled speaker?"""
    app = state(request)
    upload = (await _uploads([file]))[0]
    verdict, _, side = await app.run(app.service.verify, key.tenant, speaker_id, upload)
    return VerifyOut(speaker_id=speaker_id, verdict=VerdictOut.of(verdict), recording=SideOut.of(side))


@router.post("/v1/compare", tags=["verification"])
async def compare(
    request: Request,
    key: Reader,
    first: Annotated[UploadFile, File()],
    second: Annotated[UploadFile, File()],
) -> CompareOut:
    """1:1: are these two recordings the same speaker? (Nothing is stored.)"""
    app = state(request)
    uploads = await _uploads([first, second])
    verdict, sides = await app.run(app.service.compare, uploads[0], uploads[1])
    return CompareOut(verdict=VerdictOut.of(verdict), recordings=[SideOut.of(s) for s in sides])


@router.post("/v1/search", tags=["verification"])
async def search(
    request: Request,
    key: Reader,
    file: Annotated[UploadFile, File(description="The recording to look up.")],
    top_k: Annotated[int, Form(ge=1, le=1000)] = 10,
    site: Annotated[str | None, Form()] = None,
    tags: TagsForm = "",
    threshold: Annotated[float | None, Form(ge=-1, le=1)] = None,
) -> SearchOut:
    """1:N: the enrolled speakers most similar to a recording, best first."""
    app = state(request)
    upload = (await _uploads([file]))[0]
    result = await app.run(
        app.service.search,
        key.tenant,
        upload=upload,
        k=top_k,
        site=site,
        tags=_tags(tags),
        threshold=threshold,
    )
    return _search_out(result)


@router.post("/v1/search/by-embedding", tags=["verification"])
async def search_by_embedding(request: Request, key: Reader, query: EmbeddingQuery) -> SearchOut:
    """1:N with an embedding the caller already has (made by the same model as the voiceprints)."""
    app = state(request)
    result = await app.run_io(
        lambda: app.service.search(
            key.tenant,
            embedding=query.embedding,
            model_id=query.model_id,
            k=query.top_k,
            site=query.site,
            tags=query.tags,
            threshold=query.threshold,
            net_speech_seconds=query.net_speech_seconds,
        )
    )
    return _search_out(result)


def _search_out(result: Any) -> SearchOut:
    return SearchOut(
        hits=[HitOut.of(hit, result.threshold) for hit in result.hits],
        threshold=round(result.threshold, 4),
        net_speech_seconds=None if result.net_speech_seconds is None else round(result.net_speech_seconds, 2),
        model_id=result.model_id,
    )


# --- keys and tenant settings -----------------------------------------------------------------------
def _key_out(key: ApiKey) -> KeyOut:
    return KeyOut(**key.to_dict())  # type: ignore[arg-type]


@router.post("/v1/keys", status_code=201, tags=["admin"])
async def create_key(request: Request, key: Admin, body: KeyIn) -> NewKeyOut:
    """A new API key for the caller's tenant; the token is in this response only."""
    app = state(request)
    new = await app.run_io(app.keys.create, key.tenant, body.role, body.name)
    return NewKeyOut(key=_key_out(new.key), token=new.token)


@router.get("/v1/keys", tags=["admin"])
async def list_keys(request: Request, key: Admin) -> list[KeyOut]:
    app = state(request)
    return [_key_out(k) for k in await app.run_io(app.keys.list, key.tenant)]


@router.delete("/v1/keys/{key_id}", tags=["admin"])
async def revoke_key(request: Request, key: Admin, key_id: str) -> KeyOut:
    """Revoke a key: it stops working at once (it stays listed, with the time it was revoked)."""
    app = state(request)
    return _key_out(await app.run_io(app.keys.revoke, key.tenant, key_id))


@router.get("/v1/tenant", tags=["admin"])
async def get_tenant_settings(request: Request, key: Admin) -> TenantSettingsOut:
    app = state(request)
    return _tenant_out(key.tenant, await app.run_io(app.service.tenants.get, key.tenant))


@router.patch("/v1/tenant", tags=["admin"])
async def update_tenant_settings(request: Request, key: Admin, body: TenantSettingsIn) -> TenantSettingsOut:
    """Change tenant settings; secrets are written, never read back (only whether they are set)."""
    app = state(request)
    changes = body.model_dump(exclude_none=True)
    return _tenant_out(
        key.tenant, await app.run_io(lambda: app.service.tenants.update(key.tenant, **changes))
    )


def _tenant_out(tenant: str, settings: Any) -> TenantSettingsOut:
    return TenantSettingsOut(
        tenant=tenant,
        retain_audio=settings.retain_audio,
        voiceprint_updates=settings.voiceprint_updates,
        twilio_auth_token_set=settings.twilio_auth_token_set,
        audiohook_client_secret_set=settings.audiohook_client_secret_set,
    )


@router.get("/openapi.json", tags=["health"], include_in_schema=False)
async def openapi_schema(request: Request, key: Health) -> dict[str, Any]:
    """The OpenAPI description of this API (any valid key)."""
    return request.app.openapi()


# --- health -----------------------------------------------------------------------------------------
@router.get("/healthz", tags=["health"])
async def healthz(key: Health) -> HealthOut:
    """Liveness: the process answers (any valid key)."""
    return HealthOut(status="ok", tenant=key.tenant)


@router.get(
    "/readyz",
    tags=["health"],
    response_model=HealthOut,
    responses={
        503: {
            "model": HealthOut,
            "description": "Not ready: Redis is loading its data, alerts spooled in an outage are being "
            "written to it, or (a problem) it cannot be reached.",
            "content": {problems.PROBLEM_JSON: {"schema": problems.PROBLEM_SCHEMA_REF}},
        }
    },
)
async def readyz(request: Request, response: Response, key: Health) -> HealthOut | JSONResponse:
    """Readiness: Redis answers and has loaded its data, no alert waits in the local spool, and the model
    is loaded. While Redis cannot be reached: a problem that says so and how many alerts are spooled
    (live calls go on meanwhile; see streamer/spool.py)."""
    app = state(request)
    spooled = app.outbox.spooled
    try:
        ready = await app.run_io(app.service.store.ready)
    except REDIS_UNAVAILABLE:
        return problems.problem(
            503, "store-unavailable", "Voiceprint store unavailable",
            f"Redis cannot be reached: live calls go on with the voiceprints they hold, new calls are "
            f"refused; {spooled} alerts are spooled on this gateway and are written when Redis returns",
            {"Retry-After": "5"}, alerts_spooled=spooled,
        )  # fmt: skip
    status = "ready"
    if not ready:
        status = "loading"
    elif not app.outbox.writable:
        status = "flushing"  # Redis answers; the spooled alerts are on their way to it
    if status != "ready":
        response.status_code = 503
    return HealthOut(
        status=status,
        model_id=app.service.model_id,
        store_backend=app.service.store.backend,
        tenant=key.tenant,
        alerts_spooled=spooled,
    )


@router.get(
    "/metrics",
    tags=["health"],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
async def prometheus_metrics(key: Monitor) -> Response:
    """This gateway's Prometheus metrics (a monitor or admin key, e.g. Prometheus' ``authorization:
    credentials_file``): totals over all tenants, with no call, agent or tenant ids (streamer/metrics.py)."""
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
