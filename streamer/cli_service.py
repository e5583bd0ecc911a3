"""CLI commands of the voiceprint service and the server: enrol, verify, search, voiceprints, keys,
the embedded Redis, ``serve`` and ``config``. They work on Redis directly (``--tenant``) or through a
running server (``--url`` and ``--key``); ``streamer/client.py`` hides which."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from streamer.auth import KeyStore, parse_role
from streamer.cli_common import JsonOption, err, out, progress_bar, user_errors
from streamer.client import HttpClient, LocalClient, VoiceprintClient
from streamer.redis_server import RedisServer, default_dir, embedded
from streamer.settings import Settings
from verifier.errors import AudioError, VpmonError

service_app = typer.Typer()
voiceprints_app = typer.Typer(help="List and delete enrolled voiceprints.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
redis_app = typer.Typer(help="The embedded Redis server (no docker, no root).", no_args_is_help=True)
config_app = typer.Typer(help="The settings in force, secrets masked.")

UrlOption = Annotated[
    str | None, typer.Option("--url", envvar="VPMON_URL", help="A vpmon server; default: Redis directly.")
]
KeyOption = Annotated[
    str | None, typer.Option("--key", envvar="VPMON_API_KEY", help="API key for --url.", show_default=False)
]
TenantOption = Annotated[
    str | None, typer.Option("--tenant", "-t", envvar="VPMON_TENANT", help="Tenant (without --url).")
]
SiteOption = Annotated[str | None, typer.Option("--site", help="Site (e.g. a contact centre).")]


@dataclass(frozen=True)
class Target:
    url: str | None
    key: str | None
    tenant: str | None


def connect_client(target: Target) -> VoiceprintClient:
    """Through the API with --url, else on Redis directly for --tenant."""
    if target.url:
        if not target.key:
            raise VpmonError("--url needs an API key: pass --key or set VPMON_API_KEY")
        return HttpClient(target.url, target.key)
    if not target.tenant:
        raise VpmonError(
            "say which tenant: --tenant T (or VPMON_TENANT), or use a server with --url and --key"
        )
    from streamer.app import build_service, redis_client  # loads the model: only when needed

    settings = Settings()
    client = redis_client(settings)
    return LocalClient(build_service(settings, client), KeyStore(client), target.tenant)


def key_store() -> KeyStore:
    from streamer.app import redis_client

    return KeyStore(redis_client(Settings()))


def emit(data: Any, as_json: bool, render: Any) -> None:
    if as_json:
        out.print_json(json.dumps(data))
    else:
        render(data)


# --- enrolment ----------------------------------------------------------------------------------------
def _enrolled(result: dict[str, Any]) -> None:
    vp = result["voiceprint"]
    verb = "re-enrolled" if result["replaced"] else "enrolled"
    out.print(
        f"{verb} {vp['speaker_id']}: {vp['net_speech_seconds']:.1f} s of speech from "
        f"{len(result['recordings'])} recording(s), model {vp['model_id']}"
        + (f", site {vp['site']}" if vp["site"] else "")
        + (", audio retained" if vp["audio_retained"] else ""),
        highlight=False,
    )
    for rec in result["recordings"]:
        consistency = "" if rec["consistency"] is None else f", agrees {rec['consistency']:.2f}"
        out.print(
            f"  {rec['name']}: {rec['net_speech_seconds']:.1f} s speech, SNR {rec['snr_db']:.0f} dB, "
            f"level {rec['level_dbfs']:.0f} dBFS{consistency}",
            highlight=False,
        )


@service_app.command()
@user_errors
def enroll(
    speaker_id: Annotated[str, typer.Argument(metavar="ID", help="The speaker (agent) id.")],
    files: Annotated[list[Path], typer.Argument(help="One or more recordings of the speaker.")],
    site: SiteOption = None,
    name: Annotated[str, typer.Option("--name", help="Display name.")] = "",
    tags: Annotated[str, typer.Option(help="Comma-separated tags.")] = "",
    replace: Annotated[bool, typer.Option(help="Re-enrol a speaker that is already enrolled.")] = False,
    retain_audio: Annotated[
        bool | None, typer.Option("--retain-audio/--no-retain-audio", help="Default: the tenant's setting.")
    ] = None,
    url: UrlOption = None,
    key: KeyOption = None,
    tenant: TenantOption = None,
    as_json: JsonOption = False,
) -> None:
    """Enrol a speaker from one or more recordings (quality-checked)."""
    client = connect_client(Target(url, key, tenant))
    result = client.enrol(
        speaker_id, files, site=site, display_name=name, tags=_split(tags), retain_audio=retain_audio,
        replace=replace,
    )  # fmt: skip
    emit(result, as_json, _enrolled)


@service_app.command("enroll-bulk")
@user_errors
def enroll_bulk(
    source: Annotated[
        Path,
        typer.Argument(
            help="A folder with one sub-folder of recordings per speaker id, or a CSV with columns "
            "speaker_id,path[,site,display_name] (paths relative to the CSV)."
        ),
    ],
    site: SiteOption = None,
    replace: Annotated[bool, typer.Option(help="Re-enrol speakers that are already enrolled.")] = False,
    url: UrlOption = None,
    key: KeyOption = None,
    tenant: TenantOption = None,
    as_json: JsonOption = False,
) -> None:
    """Enrol many speakers; rejects are listed at the end with their reasons (exit 1 if any)."""
    plan = bulk_plan(source, site)
    client = connect_client(Target(url, key, tenant))
    enrolled, rejected = [], []
    with progress_bar(f"enrolling {len(plan)} speakers", len(plan)) as advance:
        for item in plan:
            try:
                client.enrol(
                    item.speaker_id, item.files, site=item.site, display_name=item.display_name, tags=[],
                    retain_audio=None, replace=replace,
                )  # fmt: skip
                enrolled.append(item.speaker_id)
            except VpmonError as exc:
                rejected.append({"speaker_id": item.speaker_id, "error": str(exc)})
            advance(1)
    summary = {"enrolled": len(enrolled), "rejected": rejected}
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        out.print(f"enrolled {len(enrolled)} of {len(plan)} speakers", highlight=False)
        if rejected:
            table = Table("speaker", "why it was rejected", title=f"{len(rejected)} rejected")
            for reject in rejected:
                table.add_row(reject["speaker_id"], reject["error"])
            out.print(table)
    if rejected:
        raise typer.Exit(1)


@dataclass(frozen=True)
class BulkItem:
    speaker_id: str
    files: list[Path]
    site: str | None
    display_name: str = ""


AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga"}


def bulk_plan(source: Path, site: str | None) -> list[BulkItem]:
    """Who to enrol with which files, from a folder of folders or a CSV."""
    if source.is_dir():
        items = []
        for folder in sorted(p for p in source.iterdir() if p.is_dir()):
            files = sorted(f for f in folder.iterdir() if f.suffix.lower() in AUDIO_SUFFIXES)
            if files:
                items.append(BulkItem(folder.name, files, site))
        if not items:
            raise AudioError(f"{source} has no sub-folders with recordings (speaker id/recording.wav)")
        return items
    if source.suffix.lower() == ".csv" and source.is_file():
        grouped: dict[str, BulkItem] = {}
        with source.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"speaker_id", "path"} <= set(reader.fieldnames):
                raise VpmonError(f"{source}: the CSV needs a header with speaker_id and path columns")
            for line, row in enumerate(reader, start=2):
                if not row.get("speaker_id") or not row.get("path"):
                    raise VpmonError(f"{source}:{line}: speaker_id and path must not be empty")
                item = grouped.setdefault(
                    row["speaker_id"],
                    BulkItem(row["speaker_id"], [], row.get("site") or site, row.get("display_name") or ""),
                )
                item.files.append(source.parent / row["path"])
        return list(grouped.values())
    raise VpmonError(f"{source} is neither a folder nor a .csv file")


# --- verify / compare / search ------------------------------------------------------------------------
@service_app.command()
@user_errors
def verify(
    speaker_id: Annotated[str, typer.Argument(metavar="ID", help="The enrolled speaker id.")],
    file: Annotated[Path, typer.Argument(help="A recording to check.")],
    url: UrlOption = None,
    key: KeyOption = None,
    tenant: TenantOption = None,
    as_json: JsonOption = False,
) -> None:
    """1:1: is this recording the enrolled speaker ID?"""
    result = connect_client(Target(url, key, tenant)).verify(speaker_id, file)

    def render(data: dict[str, Any]) -> None:
        v = data["verdict"]
        colour = {"MATCH": "green", "MISMATCH": "red"}.get(v["decision"], "yellow")
        out.print(
            f"[bold {colour}]{v['decision']}[/] {data['speaker_id']}: score {v['score']:.3f}, threshold "
            f"{v['threshold']:.3f} at {v['net_speech_seconds']:.1f} s of speech ({v['model_id']})"
            + (f" — {v['reason']}" if v["reason"] else ""),
            highlight=False,
        )

    emit(result, as_json, render)


@service_app.command()
@user_errors
def search(
    file: Annotated[Path, typer.Argument(help="A recording of the voice to look up.")],
    top: Annotated[int, typer.Option("--top", "-k", min=1, max=1000, help="How many speakers.")] = 10,
    site: SiteOption = None,
    threshold: Annotated[float | None, typer.Option(help="Cosine threshold (default: calibrated).")] = None,
    url: UrlOption = None,
    key: KeyOption = None,
    tenant: TenantOption = None,
    as_json: JsonOption = False,
) -> None:
    """1:N: the enrolled speakers most similar to a recording."""
    result = connect_client(Target(url, key, tenant)).search(file, top_k=top, site=site, threshold=threshold)

    def render(data: dict[str, Any]) -> None:
        table = Table("#", "speaker", "score", "match", "site", "name", title=f"top {top} for {file.name}")
        for rank, hit in enumerate(data["hits"], start=1):
            match = "[green]yes[/]" if hit["above_threshold"] else "no"
            table.add_row(str(rank), hit["speaker_id"], f"{hit['score']:.3f}", match, hit["site"] or "",
                          hit["display_name"])  # fmt: skip
        out.print(table)
        out.print(f"threshold {data['threshold']:.3f} ({data['model_id']})", highlight=False)

    emit(result, as_json, render)


# --- voiceprints ----------------------------------------------------------------------------------------
@voiceprints_app.command("list")
@user_errors
def voiceprints_list(
    site: SiteOption = None,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    url: UrlOption = None,
    key: KeyOption = None,
    tenant: TenantOption = None,
    as_json: JsonOption = False,
) -> None:
    """Enrolled voiceprints, ordered by speaker id."""
    result = connect_client(Target(url, key, tenant)).list(site=site, offset=offset, limit=limit)

    def render(data: dict[str, Any]) -> None:
        table = Table("speaker", "site", "name", "speech s", "model", "enrolled", "audio")
        for vp in data["voiceprints"]:
            table.add_row(
                vp["speaker_id"], vp["site"] or "", vp["display_name"], f"{vp['net_speech_seconds']:.1f}",
                vp["model_id"], vp["enrolled_at"], "kept" if vp["audio_retained"] else "",
            )  # fmt: skip
        out.print(table)
        shown = len(data["voiceprints"])
        out.print(f"{data['offset'] + 1 if shown else 0}-{data['offset'] + shown} of {data['total']}")

    emit(result, as_json, render)


@voiceprints_app.command("delete")
@user_errors
def voiceprints_delete(
    speaker_id: Annotated[str, typer.Argument(metavar="ID")],
    url: UrlOption = None,
    key: KeyOption = None,
    tenant: TenantOption = None,
) -> None:
    """Delete a voiceprint and its retained audio."""
    connect_client(Target(url, key, tenant)).delete(speaker_id)
    out.print(f"deleted {speaker_id}", highlight=False)


@service_app.command()
@user_errors
def reembed(
    speaker_id: Annotated[
        str | None, typer.Argument(metavar="[ID]", help="One speaker; default: all.")
    ] = None,
    url: UrlOption = None,
    key: KeyOption = None,
    tenant: TenantOption = None,
) -> None:
    """Rebuild voiceprints from retained audio with the current model (after a model change)."""
    client = connect_client(Target(url, key, tenant))
    if speaker_id is not None:
        result = client.reembed(speaker_id)
        out.print(f"re-embedded {speaker_id} with {result['voiceprint']['model_id']}", highlight=False)
        return
    if not isinstance(client, LocalClient):
        raise VpmonError("re-embedding a whole tenant runs on Redis directly: use --tenant, not --url")
    rebuilt = client.service.reembed_tenant(client.tenant)
    out.print(f"re-embedded {len(rebuilt)} voiceprints with {client.service.model_id}", highlight=False)


# --- keys -------------------------------------------------------------------------------------------------
@keys_app.command("create")
@user_errors
def keys_create(
    role: Annotated[str, typer.Option(help="admin, enrol, read or monitor.")],
    name: Annotated[str, typer.Option(help="What the key is for.")] = "",
    url: UrlOption = None,
    key: KeyOption = None,
    tenant: TenantOption = None,
    as_json: JsonOption = False,
) -> None:
    """A new API key; its token is printed once. Without --url this is how the first admin key is made."""
    result = _key_client(url, key, tenant).create_key(parse_role(role), name)

    def render(data: dict[str, Any]) -> None:
        k = data["key"]
        err.print(f"created {k['role']} key {k['key_id']} for tenant {k['tenant']}; store the token now:")
        out.print(data["token"], highlight=False)

    emit(result, as_json, render)


@keys_app.command("list")
@user_errors
def keys_list(
    url: UrlOption = None, key: KeyOption = None, tenant: TenantOption = None, as_json: JsonOption = False
) -> None:
    """The tenant's keys (never their secrets)."""

    def render(keys: list[dict[str, Any]]) -> None:
        table = Table("key id", "role", "name", "created", "revoked")
        for k in keys:
            table.add_row(k["key_id"], k["role"], k["name"], k["created_at"], k["revoked_at"] or "")
        out.print(table)

    emit(_key_client(url, key, tenant).list_keys(), as_json, render)


@keys_app.command("revoke")
@user_errors
def keys_revoke(
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID")],
    url: UrlOption = None,
    key: KeyOption = None,
    tenant: TenantOption = None,
) -> None:
    """Revoke a key: it stops working at once."""
    revoked = _key_client(url, key, tenant).revoke_key(key_id)
    out.print(f"revoked {revoked['key_id']} at {revoked['revoked_at']}", highlight=False)


class _KeysOnly:
    """Key commands without --url need only Redis, not the model."""

    def __init__(self, tenant: str) -> None:
        self.keys = key_store()
        self.tenant = tenant

    create_key = LocalClient.create_key
    list_keys = LocalClient.list_keys
    revoke_key = LocalClient.revoke_key


def _key_client(url: str | None, key: str | None, tenant: str | None) -> Any:
    if url:
        return connect_client(Target(url, key, tenant))
    if not tenant:
        raise VpmonError(
            "say which tenant: --tenant T (or VPMON_TENANT), or use a server with --url and --key"
        )
    return _KeysOnly(tenant)


# --- the embedded Redis and the server ------------------------------------------------------------------
PortOption = Annotated[int | None, typer.Option(help="Port (default: the last one used, else 6390).")]


@redis_app.command("start")
@user_errors
def redis_start(port: PortOption = None) -> None:
    """Start the embedded redis-server (loopback only, password, AOF) unless it is running."""
    server = embedded(port=port)
    server.start()
    out.print(server.status().describe(), highlight=False)


@redis_app.command("stop")
@user_errors
def redis_stop(port: PortOption = None) -> None:
    """Stop the embedded redis-server (its data stay on disk)."""
    server = embedded(port=port)
    out.print("stopped" if server.stop() else f"not running (data in {default_dir()})", highlight=False)


@redis_app.command("status")
@user_errors
def redis_status(port: PortOption = None) -> None:
    """Is the embedded redis-server running, and what does it hold?"""
    server: RedisServer = embedded(port=port)
    status = server.status()
    out.print(status.describe(), highlight=False)
    if not status.running:
        raise typer.Exit(1)


@service_app.command()
@user_errors
def serve(
    host: Annotated[str | None, typer.Option(help="Listen address (VPMON_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (VPMON_PORT).")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1, max=64, help="Gateway processes sharing the port, one event loop each (VPMON_WORKERS)."
        ),
    ] = None,
) -> None:
    """Run the vpmon server: the HTTP API, live calls, alerts, /metrics and the supervisor page."""
    overrides = {k: v for k, v in {"host": host, "port": port, "workers": workers}.items() if v is not None}
    settings = Settings(**overrides)
    if settings.workers > 1:
        from streamer.workers import serve_workers

        raise typer.Exit(serve_workers(settings))
    from streamer.app import serve as run_server

    run_server(settings)


@config_app.callback(invoke_without_command=True)
def config(ctx: typer.Context) -> None:
    """The settings in force (`vpmon config show`; `vpmon config` alone does the same)."""
    if ctx.invoked_subcommand is None:
        config_show()


@config_app.command("show")
@user_errors
def config_show() -> None:
    """The settings in force (environment, then the TOML file) as JSON, secrets masked."""
    # default=str: SecretStr fields print as '**********'; masked() keeps the Redis URL but its password.
    out.print_json(json.dumps(Settings().masked(), default=str))


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]
