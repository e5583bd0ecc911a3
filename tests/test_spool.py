"""The alert spool (streamer/spool.py) on its own: the file (append and fsync, order, a torn last line after
a crash, the lock that tells a live gateway's file from a stopped one's, no partial line after a failed
write), and the ``Outbox`` against a real Redis that is killed and restarted: alerts spooled while it is
away reach the stream in order and once each, and the file is emptied only once Redis has them all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis.asyncio as aredis
from prometheus_client import REGISTRY

from streamer.feeds import Feeds, alerts_key
from streamer.redis_server import RedisServer
from streamer.spool import RETRY_S, Outbox, SpoolFile, parse, redis_dir_name

REPO = Path(__file__).resolve().parent.parent


def entry(n: int, tenant: str = "spool") -> dict:
    return {
        "tenant": tenant,
        "kind": "alert",
        "data": {"alert_id": f"call:t:{n}", "kind": "takeover", "n": n},
    }


# --- the file -----------------------------------------------------------------------------------------
def test_append_is_on_disk_in_order_and_fsyncd_before_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "alerts-a.jsonl"
    spool = SpoolFile.open(path, create=True)
    assert spool is not None
    synced: list[int] = []  # the file's size on disk at each fsync of it (the real fsync still runs)
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.fstat(fd).st_size)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    for n in range(3):
        spool.append(entry(n))
        # fsync'd with this entry in it before append returned
        assert synced[-1] == path.stat().st_size == spool.size
    assert len(synced) == 3
    assert [e["data"]["n"] for e in parse(path.read_bytes(), "x")] == [0, 1, 2]
    assert spool.entries() == [entry(0), entry(1), entry(2)]
    spool.clear()
    assert path.read_bytes() == b"" and spool.entries() == []
    spool.append(entry(3))
    assert spool.entries() == [entry(3)]
    spool.delete()
    assert not path.exists()


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "alerts-a.jsonl"
    spool = SpoolFile.open(path, create=True)
    assert spool is not None
    spool.append(entry(0))
    spool.append(entry(1))
    spool.close()
    whole = (json.dumps(entry(2)) + "\n").encode()
    with path.open("ab") as file:  # a crash mid-append: part of the line, no newline
        file.write(whole[: len(whole) // 2])
    adopted = SpoolFile.open(path)
    assert adopted is not None
    with caplog.at_level(logging.WARNING, logger="vpmon.spool"):
        assert adopted.entries() == [entry(0), entry(1)]
    assert "without its newline" in caplog.text
    adopted.close()

    # Lines that are no spooled alert (not JSON, or not an entry) are skipped and said, never fatal.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vpmon.spool"):
        found = parse(b'{"tenant":"t","kind":"alert","data":{}}\nnot json\n[1]\n', "f")
    assert found == [{"tenant": "t", "kind": "alert", "data": {}}]
    assert "line 2" in caplog.text and "line 3" in caplog.text


def test_a_live_processs_file_is_locked_and_a_killed_ones_is_not(tmp_path: Path) -> None:
    path = tmp_path / "alerts-gone.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from streamer.spool import SpoolFile
            spool = SpoolFile.open(Path({str(path)!r}), create=True)
            spool.append({{"tenant": "t", "kind": "alert", "data": {{"alert_id": "x"}}}})
            print("holding", flush=True)
            time.sleep(600)
        """)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        assert SpoolFile.open(path) is None  # its gateway runs: not ours to take
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        adopted = SpoolFile.open(path)  # the kernel released the lock with the process
        assert adopted is not None
        assert adopted.entries() == [{"tenant": "t", "kind": "alert", "data": {"alert_id": "x"}}]
        assert SpoolFile.open(path) is None  # now we hold it (another open, even ours, is refused)
        adopted.close()
    finally:
        holder.kill()
        holder.wait()
    assert SpoolFile.open(tmp_path / "absent.jsonl") is None


def test_a_failed_write_leaves_no_partial_line(tmp_path: Path) -> None:
    """A write cut short (here by a file size limit, as a full disk would) is undone, so later entries
    are not glued to half a line."""
    path = tmp_path / "alerts-full.jsonl"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import resource, signal
            from pathlib import Path
            from streamer.spool import SpoolFile
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
            spool = SpoolFile.open(Path({str(path)!r}), create=True)
            spool.append({{"tenant": "t", "kind": "alert", "data": {{"n": 0}}}})
            resource.setrlimit(resource.RLIMIT_FSIZE, (spool.size + 100, resource.RLIM_INFINITY))
            try:
                spool.append({{"tenant": "t", "kind": "alert", "data": {{"pad": "x" * 1000}}}})
            except OSError as exc:
                print("refused", exc.errno)
            spool.append({{"tenant": "t", "kind": "alert", "data": {{"n": 1}}}})
        """)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.startswith("refused"), result.stderr
    assert [e["data"] for e in parse(path.read_bytes(), "x")] == [{"n": 0}, {"n": 1}]
    assert path.read_bytes().endswith(b"\n")


def test_one_spool_directory_per_redis_server() -> None:
    assert redis_dir_name("redis://:secret@127.0.0.1:6390/0") == "127.0.0.1-6390-0"
    assert redis_dir_name("redis://redis") == "redis-6379-0"
    assert redis_dir_name("rediss://user:pw@cache.example.com:7000/3") == "cache.example.com-7000-3"
    assert redis_dir_name("unix:///run/redis/redis.sock") == "run_redis_redis.sock"
    assert "secret" not in redis_dir_name("redis://:secret@h:1/0")


# --- the outbox, against a real Redis -----------------------------------------------------------------
def async_client(server: RedisServer) -> aredis.Redis:
    return aredis.Redis(host="127.0.0.1", port=server.port, password=server.password, protocol=2)


def stream(server: RedisServer, tenant: str = "spool") -> list[dict]:
    client = server.client()
    try:
        return [json.loads(fields[b"data"]) for _, fields in client.xrange(alerts_key(tenant))]
    finally:
        client.close()


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_an_alert_id_is_added_to_the_stream_once(redis_to_kill: RedisServer) -> None:
    async def scenario() -> tuple[str, str, str]:
        client = async_client(redis_to_kill)
        feeds = Feeds(client)
        data = entry(1)["data"]
        first = await feeds.add_alert("spool", "alert", data)
        again = await feeds.add_alert("spool", "alert", data)
        other = await feeds.add_alert("spool", "alert", {**data, "alert_id": "call:t:2"})
        await client.aclose()
        return first, again, other

    first, again, other = asyncio.run(scenario())
    assert first == again != other
    assert [a["alert_id"] for a in stream(redis_to_kill)] == ["call:t:1", "call:t:2"]
    ttl = redis_to_kill.client().execute_command("HTTL", "vpalert-ids:{spool}", "FIELDS", 1, "call:t:1")
    assert 0 < ttl[0] <= 7 * 24 * 3600  # the record of an id does not outlive its use


def test_alerts_spooled_while_redis_is_away_reach_it_in_order_once(
    tmp_path: Path, redis_to_kill: RedisServer
) -> None:
    spool_dir = tmp_path / "spool"
    spooled_before, unspooled_before = (
        sample("vpmon_alerts_spooled_total"),
        sample("vpmon_alerts_unspooled_total"),
    )
    dropped_before = sample("vpmon_verdicts_dropped_total")
    coalesced_before = sample("vpmon_call_states_coalesced_total")

    async def scenario() -> None:
        client = async_client(redis_to_kill)
        outbox = Outbox(Feeds(client), spool_dir, "gw1")
        await outbox.flush()
        assert outbox.writable
        assert await outbox.alert("spool", "alert", entry(0)["data"]) is not None  # Redis first
        assert outbox.file.size == 0

        redis_to_kill.kill()
        # The first write after the kill fails (after redis-py's retries), and is spooled; from then on
        # nothing is tried on Redis until the flusher finds it back.
        assert await outbox.alert("spool", "alert", entry(1)["data"]) is None
        assert not outbox.writable
        for n in (2, 3):
            assert await outbox.alert("spool", "alert", entry(n)["data"]) is None
        await outbox.verdict("spool", "verdict", {"state": "verified"})
        for state in ("verified", "mismatch", "ended"):
            await outbox.call_state("spool", "c1", {"call_id": "c1", "state": state}, ended=state == "ended")
        assert outbox.spooled == 3
        assert [e["data"]["n"] for e in parse(outbox.file.path.read_bytes(), "x")] == [1, 2, 3]

        await outbox.flush()  # Redis still away: nothing leaves the spool
        assert outbox.spooled == 3 and not outbox.writable
        assert len(parse(outbox.file.path.read_bytes(), "x")) == 3

        redis_to_kill.start()
        await outbox.flush()
        assert outbox.writable and outbox.spooled == 0
        assert outbox.file.path.read_bytes() == b""  # emptied once Redis had every entry
        # The newest state of the call, written when Redis returned, with the ended call's expiry.
        call = json.loads(await client.hget("vpcalls:{spool}", "c1"))
        assert call["state"] == "ended"
        assert (await client.execute_command("HTTL", "vpcalls:{spool}", "FIELDS", 1, "c1"))[0] > 0

        # Written again (a gateway that died before emptying its file would): still once each.
        for n in range(4):
            await outbox._write(entry(n))
        await outbox.close()
        await client.aclose()

    asyncio.run(scenario())
    assert [a["n"] for a in stream(redis_to_kill)] == [0, 1, 2, 3]
    assert not (spool_dir / "alerts-gw1.jsonl").exists()  # an empty spool goes at shutdown
    assert sample("vpmon_alerts_spooled_total") - spooled_before == 3
    assert sample("vpmon_alerts_unspooled_total") - unspooled_before == 3 + 4
    assert sample("vpmon_verdicts_dropped_total") - dropped_before == 1
    assert sample("vpmon_call_states_coalesced_total") - coalesced_before == 2


def test_a_stopped_gateways_spool_is_adopted_and_written_once(
    tmp_path: Path, redis_to_kill: RedisServer
) -> None:
    """A gateway died mid-flush: its first alert reached Redis, its file was not emptied. The next
    gateway on the spool dir writes the rest, the first not again, and deletes the file; a file whose
    gateway still runs is left alone."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    stopped = SpoolFile.open(spool_dir / "alerts-dead.jsonl", create=True)
    assert stopped is not None
    for n in range(3):
        stopped.append(entry(n))
    stopped.close()
    running = SpoolFile.open(spool_dir / "alerts-alive.jsonl", create=True)
    assert running is not None
    running.append(entry(9))

    async def scenario() -> None:
        client = async_client(redis_to_kill)
        feeds = Feeds(client)
        await feeds.add_alert("spool", "alert", entry(0)["data"])
        outbox = Outbox(feeds, spool_dir, "gw2")
        assert not outbox.writable  # until what the stopped gateway left is written
        await outbox.flush()
        assert outbox.writable and outbox.spooled == 0
        await outbox.close()
        await client.aclose()

    asyncio.run(scenario())
    assert [a["n"] for a in stream(redis_to_kill)] == [0, 1, 2]
    assert sorted(p.name for p in spool_dir.iterdir()) == ["alerts-alive.jsonl"]
    running.close()


def test_redis_refusing_the_write_spools_too(tmp_path: Path, redis_to_kill: RedisServer) -> None:
    """Not only a dead Redis: one that answers but refuses the write (here: the alert stream's key holds
    another type) keeps the alert in the spool until the write succeeds."""
    client_sync = redis_to_kill.client()
    client_sync.set(alerts_key("spool"), "not a stream")

    async def scenario() -> None:
        client = async_client(redis_to_kill)
        outbox = Outbox(Feeds(client), tmp_path / "spool", "gw3")
        await outbox.flush()
        assert outbox.writable
        assert await outbox.alert("spool", "alert", entry(0)["data"]) is None  # refused: spooled
        await outbox.flush()
        assert outbox.spooled == 1 and not outbox.writable
        client_sync.delete(alerts_key("spool"))
        await outbox.flush()
        assert outbox.spooled == 0 and outbox.writable
        await outbox.close()
        await client.aclose()

    asyncio.run(scenario())
    assert [a["n"] for a in stream(redis_to_kill)] == [0]
    client_sync.close()


def test_the_flusher_waits_between_attempts_while_redis_is_away(
    tmp_path: Path, redis_to_kill: RedisServer
) -> None:
    """A failed round must not wake the next one at once: an outage would turn into a busy loop."""

    class CountingOutbox(Outbox):
        rounds = 0

        async def flush(self) -> None:
            self.rounds += 1
            await super().flush()

    async def scenario() -> int:
        client = async_client(redis_to_kill)
        outbox = CountingOutbox(Feeds(client), tmp_path / "spool", "gw1")
        await outbox.flush()
        redis_to_kill.kill()
        assert await outbox.alert("spool", "alert", entry(1)["data"]) is None  # spooled: the outage begins
        outbox.rounds = 0
        flusher = asyncio.create_task(outbox.run())
        await asyncio.sleep(5 * RETRY_S)
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await client.aclose()
        return outbox.rounds

    rounds = asyncio.run(scenario())
    assert 1 <= rounds <= 6, rounds  # one round per RETRY_S, and the first at once
