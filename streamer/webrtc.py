"""What the WHIP endpoint (streamer/whip.py) and the WHIP client (streamer/whip_client.py) share about
aiortc: the ICE configuration, and loopback host candidates."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer

from streamer.settings import IceServer

LOOPBACK = "127.0.0.1"


def ice_configuration(servers: Iterable[IceServer]) -> RTCConfiguration:
    """aiortc's configuration; with no servers, host candidates only (enough on one network)."""
    return RTCConfiguration(
        iceServers=[
            RTCIceServer(
                urls=server.urls,
                username=server.username,
                credential=server.credential.get_secret_value() if server.credential else None,
            )
            for server in servers
        ]
    )


def include_loopback_candidates() -> None:
    """Offer 127.0.0.1 as a host candidate in this process's peer connections.

    aioice gathers host candidates from every interface but loopback, so a publisher that can only reach
    this host over loopback (headless Chromium in a test's network namespace, with
    ``--allow-loopback-in-peer-connection``) finds no candidate pair and no audio arrives. aioice has no
    option for it; its module-level ``get_host_addresses`` is what ``Connection.gather_candidates`` calls,
    so it is wrapped here, once per process.
    """
    original: Callable[[bool, bool], list[str]] = aioice.ice.get_host_addresses
    if getattr(original, "vpmon_loopback", False):
        return

    def with_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        addresses = original(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
        if use_ipv4 and LOOPBACK not in addresses:
            addresses.append(LOOPBACK)
        return addresses

    with_loopback.vpmon_loopback = True  # type: ignore[attr-defined]
    aioice.ice.get_host_addresses = with_loopback
