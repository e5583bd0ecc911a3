"""``vpmon stream``: play an audio file to a vpmon gateway as a live call (``streamer/stream_client.py``).

Exit status: 0 when the call ran and the server closed it normally (1000; whip: the DELETE answered 200);
1 when the call ran but the server ended it otherwise (an error frame, an AudioHook disconnect, another
close code: the summary is printed, then the reason); 2 when no call could be streamed (bad options or
file, server unreachable, upgrade refused with an HTTP status).
"""

from __future__ import annotations

import asyncio
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from streamer.cli_common import JsonOption, err, out, user_errors
from streamer.stream_client import (
    Accepted,
    ClientEvent,
    Pushed,
    StreamError,
    StreamOptions,
    StreamResult,
    agent_channel_for,
    is_notice,
    load_call_audio,
    stream_call,
)

stream_app = typer.Typer()


class Protocol(StrEnum):
    twilio = "twilio"
    audiohook = "audiohook"
    native = "native"
    whip = "whip"


class WhipCodec(StrEnum):
    opus = "opus"
    pcmu = "PCMU"


class Track(StrEnum):
    inbound = "inbound"
    outbound = "outbound"


@stream_app.command()
@user_errors
def stream(
    file: Annotated[Path, typer.Argument(help="A recording: mono (all agent) or stereo (agent + customer).")],
    protocol: Annotated[
        Protocol, typer.Option("--protocol", "-p", help="The wire protocol to speak.")
    ] = Protocol.native,
    url: Annotated[
        str | None,
        typer.Option("--url", envvar="VPMON_URL", help="The vpmon server: http(s)://host:port or ws(s)://…"),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            envvar="VPMON_API_KEY",
            help="A monitor API key (native, audiohook, whip).",
            show_default=False,
        ),
    ] = None,
    tenant: Annotated[
        str | None,
        typer.Option("--tenant", "-t", envvar="VPMON_TENANT", help="Tenant (required for twilio)."),
    ] = None,
    agent: Annotated[
        str | None,
        typer.Option(
            "--agent", help="The agent's id: in-band (twilio, native) or bound through the API (audiohook)."
        ),
    ] = None,
    call_id: Annotated[
        str | None, typer.Option("--call-id", help="Call id (a UUID for audiohook); default: a new one.")
    ] = None,
    agent_channel: Annotated[
        int | None,
        typer.Option(
            "--agent-channel", min=0, help="The agent's channel of a stereo file (default 0; audiohook: 1)."
        ),
    ] = None,
    speed: Annotated[
        float,
        typer.Option("--speed", min=0, help="1 = real time, 4 = four times faster, 0 = as fast as possible."),
    ] = 1.0,
    twilio_auth_token: Annotated[
        str | None,
        typer.Option(
            "--twilio-auth-token",
            envvar="VPMON_TWILIO_AUTH_TOKEN",
            help="The tenant's Twilio auth token (signs the twilio upgrade).",
            show_default=False,
        ),
    ] = None,
    twilio_track: Annotated[
        Track, typer.Option("--twilio-track", help="The Twilio track that carries the agent.")
    ] = Track.outbound,
    audiohook_client_secret: Annotated[
        str | None,
        typer.Option(
            "--audiohook-client-secret",
            envvar="VPMON_AUDIOHOOK_CLIENT_SECRET",
            help="Sign the audiohook upgrade with this base64 client secret (if the tenant has one).",
            show_default=False,
        ),
    ] = None,
    whip_codec: Annotated[
        WhipCodec, typer.Option("--whip-codec", help="The codec of a whip call's audio track.")
    ] = WhipCodec.opus,
    as_json: JsonOption = False,
) -> None:
    """Play FILE to a vpmon server as a live call; print the verdicts and alerts it pushes back (native,
    whip: over a WebRTC data channel)."""
    if not url:
        raise StreamError("say which server to stream to: --url http://host:port (or set VPMON_URL)")
    options = StreamOptions(
        protocol=protocol.value,  # type: ignore[arg-type]
        url=url,
        key=key,
        tenant=tenant,
        agent_id=agent,
        call_id=call_id,
        agent_channel=agent_channel,
        speed=speed,
        twilio_auth_token=twilio_auth_token,
        twilio_track=twilio_track.value,  # type: ignore[arg-type]
        audiohook_client_secret=audiohook_client_secret,
        whip_codec=whip_codec.value,  # type: ignore[arg-type]
    )
    audio = load_call_audio(file)
    agent_index = agent_channel_for(options.protocol, audio, agent_channel)
    layout = "mono" if audio.channel_count == 1 else f"stereo, agent on channel {agent_index}"
    pace = "as fast as possible" if speed == 0 else ("real time" if speed == 1 else f"{speed:g}x real time")
    err.print(
        f"streaming {file.name} ({audio.duration:.1f} s, {audio.sample_rate} Hz, {layout}) "
        f"over {options.protocol} at {pace}",
        highlight=False,
    )
    if options.protocol not in ("native", "whip") and not as_json:
        err.print(
            f"{options.protocol} carries no verdicts back: watch them on GET /v1/calls/stream or the "
            "supervisor page",
            highlight=False,
        )
    result = asyncio.run(stream_call(audio, options, on_event=lambda event: _show(event, as_json)))
    if as_json:
        _json_line(result.to_dict())
    else:
        out.print(_summary(result), highlight=False, markup=False)
    if result.error:
        err.print(f"[bold red]error:[/] {escape(result.error)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _json_line(data: Any) -> None:
    sys.stdout.write(json.dumps(data, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _show(event: ClientEvent, as_json: bool) -> None:
    """Print what the server pushed as it arrives: one JSON line each with --json, else one line of text."""
    if isinstance(event, Pushed):
        if as_json:
            _json_line(dict(event.data))
        else:
            out.print(_pushed_line(event.kind, event.data), highlight=False)
    elif isinstance(event, Accepted) and not as_json:
        err.print(f"accepted: {event.message.get('type', 'ok')}", highlight=False, markup=False)


def _number(data: Any, key: str, spec: str) -> str:
    value = data.get(key)
    return format(value, spec) if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def _pushed_line(kind: str, data: Any) -> str:
    if is_notice(data):
        return f"[bold yellow]notice[/] {escape(str(data.get('kind', '')))}: {escape(str(data['message']))}"
    span = f"{_number(data, 'media_start', '.1f')}-{_number(data, 'media_end', '.1f')} s"
    if "media_start" not in data:
        span = "so far"
    state = escape(str(data.get("state", ""))).upper()
    colour = {"VERIFIED": "green", "MISMATCH": "red", "SUSPECT": "yellow"}.get(state, "white")
    figures = (
        f"score {_number(data, 'score', '.3f')} / threshold {_number(data, 'threshold', '.3f')}, "
        f"{_number(data, 'net_speech_seconds', '.1f')} s speech"
    )
    agent = escape(str(data.get("agent_id") or "agent unknown"))
    if kind == "alert":
        since = _number(data, "impostor_since", ".1f")
        what = escape(str(data.get("kind", "takeover")))
        return f"[bold red]ALERT[/] {what} of {agent} since {since} s: {figures}"
    if data.get("score") is None:
        return f"verdict {span}: [{colour}]{state.lower() or '?'}[/] ({agent})"
    return f"verdict {span}: [{colour}]{state.lower()}[/] {agent}, {figures}"


def _summary(result: StreamResult) -> str:
    if result.close_code is None:  # WHIP has no close code: its reason is the DELETE's status
        close = result.close_reason or "no close"
    else:
        close = f"close {result.close_code}" + (f" ({result.close_reason})" if result.close_reason else "")
    return (
        f"{result.protocol} call {result.call_id}: sent {result.frames_sent} frames, "
        f"{result.media_seconds:.1f} of {result.audio_seconds:.1f} s of audio "
        f"in {result.elapsed_seconds:.1f} s; "
        f"server {close}; {len(result.verdicts)} verdicts, {len(result.alerts)} alerts"
        + (f", {len(result.notices)} notices" if result.notices else "")
    )
