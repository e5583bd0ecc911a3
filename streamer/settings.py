"""Settings of the vpmon server and CLI: ``VPMON_*`` environment variables, then an optional TOML file.

The TOML file is ``$VPMON_CONFIG`` if set, else ``<vpmon home>/vpmon.toml`` if it exists; keys are the
field names below without the prefix (``redis_url = "redis://…"``). Environment variables win over the
file, and explicit arguments (the CLI's options) win over both. ``vpmon config`` prints the result,
with secrets masked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from verifier.models.provision import default_home
from verifier.models.registry import DEFAULT_MODEL

MiB = 1024 * 1024


def config_file() -> Path:
    return Path(os.environ.get("VPMON_CONFIG") or default_home() / "vpmon.toml")


class IceServer(BaseModel):
    """A STUN or TURN server for WebRTC calls, as in RTCIceServer: ``{"urls": "turn:host:3478",
    "username": …, "credential": …}``."""

    urls: str | list[str]
    username: str | None = None
    credential: SecretStr | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VPMON_", extra="forbid", validate_default=True)

    # --- where things are ---------------------------------------------------------------------------
    redis_url: SecretStr | None = Field(
        None,
        description="Redis 8 (or Redis Stack) URL, e.g. redis://:password@host:6379/0. "
        "Unset: vpmon runs its own embedded redis-server under the vpmon home.",
    )
    redis_cluster: bool = Field(
        False,
        description="The Redis URL is one node of a Redis Cluster (or a managed Redis in cluster mode): "
        "vpmon finds the other nodes from it. Vector-set store only. See docs/scale-out.md.",
    )
    store_backend: Literal["auto", "vset", "ft"] = Field(
        "auto", description="Voiceprint index: vector sets (vset), the query engine (ft), or auto."
    )
    store_quantization: Literal["NOQUANT", "Q8"] = Field(
        "NOQUANT", description="Vector-set quantisation (NOQUANT keeps scores exact; see streamer/store.py)."
    )
    model: str = Field(DEFAULT_MODEL, description="Speaker model id, alias or .toml spec file.")

    # --- the server ---------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the server listens on.")
    port: int = Field(8080, ge=1, le=65535, description="Port the server listens on.")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Gateway processes behind the port, each with its own event loop and embedding pool "
        "(streamer/workers.py); 1: the server is one process.",
    )
    embed_threads: int = Field(2, ge=1, le=64, description="onnxruntime threads per inference.")
    embed_workers: int = Field(2, ge=1, le=64, description="Uploads embedded at the same time.")
    embedding_mode: Literal["pool", "naive"] = Field(
        "pool",
        description="Live calls' windows: batched across calls in worker threads (pool), or each embedded "
        "alone on the event loop (naive: the load benchmark's baseline, never for production).",
    )
    embedding_workers: int = Field(
        2, ge=1, le=64, description="Worker threads of the embedding pool, each running one batch at a time."
    )
    embedding_threads: int = Field(
        1, ge=1, le=64, description="onnxruntime threads per batch of the embedding pool."
    )
    embedding_max_batch: int = Field(16, ge=1, le=256, description="Most windows in one embedding batch.")
    embedding_max_wait_ms: float = Field(
        5.0, ge=0, le=100, description="How long a batch waits for windows of other calls to join it."
    )
    embedding_queue_windows: int = Field(
        256, ge=1, description="Most windows waiting for the embedding pool; beyond, windows are shed."
    )

    # --- live calls ---------------------------------------------------------------------------------
    public_url: str | None = Field(
        None,
        description="The server's URL as telephony platforms reach it (e.g. wss://vpmon.example.com), for "
        "Twilio signatures behind a TLS-terminating proxy. Unset: the URL the server sees.",
    )
    twilio_agent_track: Literal["inbound", "outbound"] = Field(
        "outbound", description="The Twilio track that carries the agent (outbound on the customer's leg)."
    )
    ws_idle_seconds: float = Field(30.0, gt=0, description="A call with no message for this long is closed.")
    gateway_lease_seconds: float = Field(
        30.0,
        ge=1.0,
        description="A gateway that has not renewed its lease in Redis for this long is gone (killed, host "
        "lost): another gateway ends its live calls (ended_reason gateway_lost). streamer/liveness.py",
    )
    max_frame_bytes: int = Field(
        64 * 1024, ge=1024, le=1024 * 1024, description="Largest audio frame on the native protocol."
    )
    spool_dir: Path | None = Field(
        None,
        description="Where alerts wait, fsync'd, while Redis cannot be reached (one file per gateway, in a "
        "subdirectory per Redis server; a gateway flushes the files that stopped gateways left there). "
        "Unset: <vpmon home>/spool. Keep it on a persistent disk.",
    )
    redis_max_connections: int = Field(
        1000,
        ge=2,
        description="Connections the gateway's asyncio Redis client may open (each SSE reader holds one "
        "while it waits); beyond it, commands wait for a free one.",
    )
    whip_ice_servers: list[IceServer] = Field(
        default_factory=list,
        description='STUN/TURN servers for WebRTC (WHIP) calls, as JSON: [{"urls": "stun:host:3478"}]. '
        "None are needed when publishers reach this host directly.",
    )
    whip_loopback_candidates: bool = Field(
        False,
        description="Offer 127.0.0.1 as an ICE candidate for WebRTC calls (aioice leaves loopback out): "
        "for publishers that reach this host over loopback only, e.g. headless Chromium in tests.",
    )

    # --- limits on uploads --------------------------------------------------------------------------
    max_upload_bytes: int = Field(25 * MiB, ge=1024, description="Largest request body accepted.")
    max_audio_seconds: float = Field(300.0, gt=0, description="Longest recording accepted, per file.")
    max_files: int = Field(10, ge=1, le=100, description="Most recordings in one enrolment.")
    min_sample_rate: int = Field(8000, ge=1000, description="Lowest sample rate accepted (Hz).")
    max_sample_rate: int = Field(48000, le=384000, description="Highest sample rate accepted (Hz).")

    # --- decisions ----------------------------------------------------------------------------------
    min_net_speech: float = Field(
        1.0, gt=0, description="Net speech (s) a recording needs before 1:1 verification decides."
    )
    score_centring: bool = Field(
        True,
        description="Centre verification scores on the mean of the tenant's other voiceprints (from 16 of "
        "them on; README 'Accuracy'). Off: raw cosines.",
    )

    # --- webhooks -----------------------------------------------------------------------------------
    webhook_retry_schedule: list[float] = Field(
        default_factory=lambda: [5, 30, 120, 600, 1800, 7200, 21600, 43200],
        min_length=1,
        description="Seconds to wait before each retry of a failed webhook (±10 % jitter), as JSON; "
        "after the last one the delivery goes to the tenant's dead letters.",
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, le=60, description="How long a webhook receiver has to answer one delivery."
    )

    # --- per-key limits: each gateway process counts its own (streamer/limits.py, docs/security.md) --
    key_requests_per_second: float = Field(
        200.0, gt=0, description="HTTP requests per second one API key may make, on average (a token "
        "bucket); beyond it, 429 with Retry-After.",
    )  # fmt: skip
    key_request_burst: int = Field(
        2000, ge=1, description="Requests one API key may make at once above that rate (the bucket's size)."
    )
    key_max_calls: int = Field(
        1000, ge=1, description="Live calls one API key (for Twilio: one tenant) may hold at once; beyond "
        "it, a new call is refused (close 1008, AudioHook disconnect, WHIP 429).",
    )  # fmt: skip
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Server log level; secrets are masked at every level (streamer/logs.py)."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = config_file()
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if path.is_file():
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=path),)
        return sources

    def redis_url_value(self) -> str | None:
        return self.redis_url.get_secret_value() if self.redis_url is not None else None

    def masked(self) -> dict[str, object]:
        """For printing: every setting, the password in the Redis URL replaced by ***."""
        values = self.model_dump()
        url = self.redis_url_value()
        if url is not None:
            values["redis_url"] = _mask_password(url)
        return values


def _mask_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = credentials.partition(":")
    return f"{scheme}{sep}{user}{':***' if colon else ''}@{host}"
