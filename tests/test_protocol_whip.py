"""WHIP ingest without sockets: request ids, SDP offer checks, and one call's decoded frames as events."""

from __future__ import annotations

import json
from fractions import Fraction

import aioice.ice
import pytest

from streamer.protocols.events import AudioChunk, AudioDiscarded, CallEnded, CallStarted, ProtocolViolation
from streamer.protocols.native import NativeStream
from streamer.protocols.whip import (
    WhipCall,
    WhipRefusal,
    call_identity,
    check_offer,
    is_sdp,
)
from streamer.webrtc import LOOPBACK, include_loopback_candidates
from streamer.whip_client import is_loopback, whip_url

FINGERPRINT = ":".join(["AB"] * 32)

# An offer as Chrome sends it after ICE gathering completed (no trickle): one sendonly microphone track
# with Chrome's codec list, and the data channel a page may open for the verdicts.
CHROME_OFFER = f"""v=0
o=- 4611731400430051336 2 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE 0 1
a=extmap-allow-mixed
a=msid-semantic: WMS 5f3c2b1a-0d4e-4f6a-9b8c-7d6e5f4a3b2c
m=audio 50000 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126
c=IN IP4 127.0.0.1
a=rtcp:9 IN IP4 0.0.0.0
a=candidate:3411914425 1 udp 2113937151 127.0.0.1 50000 typ host generation 0 network-cost 999
a=end-of-candidates
a=ice-ufrag:Xq9z
a=ice-pwd:0123456789abcdefABCDEFgh
a=ice-options:trickle
a=fingerprint:sha-256 {FINGERPRINT}
a=setup:actpass
a=mid:0
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level
a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time
a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid
a=sendonly
a=msid:5f3c2b1a-0d4e-4f6a-9b8c-7d6e5f4a3b2c 1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f
a=rtcp-mux
a=rtcp-rsize
a=rtpmap:111 opus/48000/2
a=rtcp-fb:111 transport-cc
a=fmtp:111 minptime=10;useinbandfec=1
a=rtpmap:63 red/48000/2
a=fmtp:63 111/111
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:13 CN/8000
a=rtpmap:110 telephone-event/48000
a=rtpmap:126 telephone-event/8000
a=ssrc:2873419230 cname:Yb4mW0rVq1kLzN9c
a=ssrc:2873419230 msid:5f3c2b1a-0d4e-4f6a-9b8c-7d6e5f4a3b2c 1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f
m=application 50000 UDP/DTLS/SCTP webrtc-datachannel
c=IN IP4 127.0.0.1
a=candidate:3411914425 1 udp 2113937151 127.0.0.1 50000 typ host generation 0 network-cost 999
a=end-of-candidates
a=ice-ufrag:Xq9z
a=ice-pwd:0123456789abcdefABCDEFgh
a=ice-options:trickle
a=fingerprint:sha-256 {FINGERPRINT}
a=setup:actpass
a=mid:1
a=sctp-port:5000
a=max-message-size:262144
""".replace("\n", "\r\n")


def audio_only(offer: str) -> str:
    """The offer without its data channel (a page that opens none)."""
    head, _, _ = offer.partition("m=application")
    return head.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0")


# -------------------------------------------------------------------------------------------- request


def test_ids_from_headers_or_query_and_they_must_agree() -> None:
    none = call_identity({}, {})
    assert (none.call_id, none.agent_id, none.tenant) == (None, None, None)
    headers = {"vpmon-call-id": "c-1", "vpmon-agent-id": "agent@site", "vpmon-tenant": "acme"}
    from_headers = call_identity(headers, {})
    assert (from_headers.call_id, from_headers.agent_id, from_headers.tenant) == ("c-1", "agent@site", "acme")
    query = {"call_id": "c-1", "agent_id": "agent@site", "tenant": "acme"}
    assert call_identity({}, query) == from_headers
    assert call_identity(headers, query) == from_headers  # the same twice is fine
    with pytest.raises(WhipRefusal, match="agent_id is 'b' in the query but 'a'") as conflict:
        call_identity({"vpmon-agent-id": "a"}, {"agent_id": "b"})
    assert conflict.value.status == 400
    for bad in ({"call_id": "a b"}, {"agent_id": "x" * 129}, {"tenant": "a:b"}):
        with pytest.raises(WhipRefusal, match="is invalid") as invalid:
            call_identity({}, bad)
        assert invalid.value.status == 400


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("application/sdp", True),
        ("Application/SDP; charset=utf-8", True),
        ("application/json", False),
        ("text/plain", False),
        ("", False),
        (None, False),
    ],
)
def test_content_type(value: str | None, ok: bool) -> None:
    assert is_sdp(value) is ok


# -------------------------------------------------------------------------------------------- offers


def test_a_chrome_offer_is_opus_with_a_data_channel() -> None:
    offered = check_offer(CHROME_OFFER)
    assert (offered.codec, offered.data_channel) == ("opus", True)
    assert check_offer(audio_only(CHROME_OFFER)).data_channel is False
    sendrecv = CHROME_OFFER.replace("a=sendonly", "a=sendrecv")
    assert check_offer(sendrecv).codec == "opus"


def test_pcmu_when_opus_is_not_offered() -> None:
    pcmu_only = CHROME_OFFER.replace("UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126", "UDP/TLS/RTP/SAVPF 0")
    pcmu_only = "\r\n".join(
        line
        for line in pcmu_only.split("\r\n")
        if not line.startswith(("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:")) or line.startswith("a=rtpmap:0 ")
    )
    assert check_offer(pcmu_only).codec == "PCMU"


@pytest.mark.parametrize(
    ("offer", "says"),
    [
        ("", "body is empty"),
        ("hello", "must start with v=0"),
        ("v=0\r\nm=audio x RTP/AVP 0\r\n", "cannot be parsed"),
        (CHROME_OFFER.replace("m=audio", "m=video").replace("opus/48000/2", "VP8/90000"), "video media"),
        (CHROME_OFFER[: CHROME_OFFER.index("m=audio")] + CHROME_OFFER[CHROME_OFFER.index("m=application") :],
         "no audio track"),
        (CHROME_OFFER.replace("a=sendonly", "a=recvonly"), "the audio track is recvonly"),
        (CHROME_OFFER.replace("a=sendonly", "a=inactive"), "the audio track is inactive"),
        (CHROME_OFFER.replace("opus/48000/2", "ISAC/16000").replace("PCMU/8000", "G729/8000"),
         "offers CN, G722, G729, ISAC, PCMA, red, telephone-event: vpmon takes Opus or PCMU"),
        (audio_only(CHROME_OFFER) + audio_only(CHROME_OFFER)[audio_only(CHROME_OFFER).index("m=audio") :],
         "has 2 audio tracks"),
        ("\r\n".join(x for x in CHROME_OFFER.split("\r\n") if not x.startswith("a=fingerprint")),
         "audio section has no DTLS fingerprint"),
        ("\r\n".join(x for x in CHROME_OFFER.split("\r\n") if not x.startswith("a=ice-pwd")),
         "audio section has no ICE credentials"),
    ],
)  # fmt: skip
def test_offers_vpmon_cannot_take_are_400_with_what_to_do(offer: str, says: str) -> None:
    with pytest.raises(WhipRefusal) as refused:
        check_offer(offer)
    assert refused.value.status == 400
    assert says in refused.value.detail


# -------------------------------------------------------------------------------------------- one call


def frame(samples: int, channels: int = 2) -> bytes:
    return bytes(2 * channels * samples)


def fed(call: WhipCall, *timestamps: int, samples: int = 960, channels: int = 2, rate: int = 48000) -> list:
    for pts in timestamps:
        call.receive_audio(
            frame(samples, channels),
            sample_format="s16",
            sample_rate=rate,
            channels=channels,
            pts=pts,
            time_base=Fraction(1, rate),
        )
    return call.events_received()


def started(codec: str = "opus", agent_id: str | None = "agent-1") -> WhipCall:
    call = WhipCall("call-1", codec, agent_id)  # type: ignore[arg-type]
    call.start()
    return call


def test_call_starts_in_the_decoded_format_of_its_codec() -> None:
    [opus] = started("opus").events_received()
    assert opus == CallStarted(
        "call-1", "pcm16", 48000, 2, agent_id="agent-1", agent_channel=0, metadata={"codec": "opus"}
    )
    [pcmu] = started("PCMU", None).events_received()
    assert (pcmu.sample_rate, pcmu.channels, pcmu.agent_channel, pcmu.agent_id) == (8000, 1, None, None)


def test_media_times_come_from_the_rtp_timestamps_across_a_wrap() -> None:
    call = started()
    call.events_received()
    first = 2**32 - 2 * 960  # the 32-bit RTP clock wraps after the second frame
    events = fed(call, first, first + 960, 0, 960)
    assert [type(e) for e in events] == [AudioChunk] * 4
    assert [e.media_time for e in events] == pytest.approx([0.0, 0.02, 0.04, 0.06])
    assert all(len(e.payload) == 960 * 4 for e in events)


def test_a_gap_in_the_timestamps_is_discarded_audio_on_the_clock() -> None:
    call = started("PCMU")
    call.events_received()
    events = fed(call, 1000, 1160, 1160 + 160 * 26, samples=160, channels=1, rate=8000)  # 25 frames lost
    assert [type(e) for e in events] == [AudioChunk, AudioChunk, AudioDiscarded, AudioChunk]
    gap = events[2]
    assert gap.media_time == pytest.approx(0.04) and gap.seconds == pytest.approx(0.5)
    assert events[3].media_time == pytest.approx(0.54)
    assert call.discarded_seconds == pytest.approx(0.5)


def test_a_repeated_frame_is_dropped_and_a_new_rtp_clock_is_not_a_gap() -> None:
    call = started()
    call.events_received()
    events = fed(call, 5000, 5960, 5000, 6920)  # the first frame again, late
    assert [e.media_time for e in events] == pytest.approx([0.0, 0.02, 0.04])
    jumped = fed(call, 6920 + 960 + 48000 * 3600)  # an hour ahead: the sender restarted its clock
    assert [(type(e), e.media_time) for e in jumped] == [(AudioChunk, pytest.approx(0.06))]
    after = fed(call, 6920 + 960 * 2 + 48000 * 3600)
    assert after[0].media_time == pytest.approx(0.08)


def test_a_frame_in_another_format_ends_the_call() -> None:
    call = started()
    call.events_received()
    events = fed(call, 0, samples=160, channels=1, rate=8000)
    assert [type(e) for e in events] == [ProtocolViolation, CallEnded]
    assert "expected s16 48000 Hz 2 ch" in events[0].reason
    assert call.close_requested is not None and call.close_requested.code == 1003
    assert json.loads(call.data_to_send()[0])["type"] == "error"
    assert fed(call, 960) == []  # nothing after the end


def test_delete_is_a_normal_end_and_the_last_verdicts_still_go_out() -> None:
    call = started()
    call.events_received()
    call.stop()
    assert call.events_received() == [CallEnded("stop")]
    assert call.close_requested is not None and call.close_requested.code == 1000
    call.send_verdict({"state": "verified", "score": 0.7, "type": "ignored"})
    call.send_alert({"kind": "takeover"})
    assert [json.loads(m) for m in call.data_to_send()] == [
        {"type": "verdict", "state": "verified", "score": 0.7},
        {"type": "alert", "kind": "takeover"},
    ]
    call.stop()
    assert call.events_received() == []


def test_verdict_messages_are_the_native_protocols() -> None:
    verdict = {"tenant": "t", "call_id": "c", "state": "mismatch", "score": 0.1, "llr": -5.0}
    whip, native = started(), NativeStream()
    whip.send_verdict(verdict)
    whip.send_alert(verdict)
    native.send_verdict(verdict)
    native.send_alert(verdict)
    assert whip.data_to_send() == native.data_to_send()


def test_idle_or_an_unverifiable_agent_ends_the_call_with_an_error_message() -> None:
    call = started()
    call.events_received()
    call.fail(1008, "no audio for 30 s")
    assert call.events_received() == [CallEnded("no audio for 30 s")]
    assert json.loads(call.data_to_send()[0]) == {
        "type": "error",
        "code": 1008,
        "reason": "no audio for 30 s",
    }
    call.send_verdict({"state": "verified"})
    assert call.data_to_send() == []  # after a failure, nothing more


# -------------------------------------------------------------------------------------------- helpers


def test_loopback_candidates_are_added_once() -> None:
    include_loopback_candidates()
    include_loopback_candidates()
    addresses = aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False)
    assert addresses.count(LOOPBACK) == 1
    assert LOOPBACK not in aioice.ice.get_host_addresses(use_ipv4=False, use_ipv6=True)


def test_whip_urls() -> None:
    assert whip_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080/v1/whip"
    assert whip_url("wss://vpmon.example.com/base/") == "https://vpmon.example.com/base/v1/whip"
    assert whip_url("https://h/x/v1/whip") == "https://h/x/v1/whip"
    assert whip_url("ws://h:1/v1/streams/native") == "http://h:1/v1/whip"
    assert is_loopback("http://127.0.0.1:1/v1/whip") and is_loopback("http://localhost:8080")
    assert not is_loopback("https://vpmon.example.com")
