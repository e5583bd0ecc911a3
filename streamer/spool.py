"""Live calls through a Redis outage: alerts go to a local append-only spool and reach Redis, in order and
once each, when it returns.

What a live call writes to Redis (streamer/feeds.py) goes through the gateway's ``Outbox``, which decides
what happens to each kind of write while Redis cannot take it; the call itself goes on, verified against
the voiceprint its session already holds:

- alerts and notices are never lost: each is appended to this gateway's spool file and fsync'd before the
  call moves on (sends it to the peer), then written to the alert stream, in the order raised, as soon as
  Redis answers again;
- verdict stream entries (verdicts, call starts and ends) are dropped: the peer has its verdicts, and the
  stream is a short live view (``vpmon_verdicts_dropped_total``);
- call states are coalesced: each call's newest is kept in memory and written when Redis returns, so the
  calls list is right again, calls that ended meanwhile included (``vpmon_call_states_coalesced_total``
  counts the ones superseded). They are not kept across a gateway restart; alerts are.

Once a write has failed nothing more is tried on Redis until the flusher (``Outbox.run``) finds it
answering: no call waits on a dead server twice. While anything is spooled, new alerts queue behind it,
never written around it, so the stream keeps their order. Every alert carries an id given by the gateway,
and the stream takes each id once (``Feeds.add_alert``): an alert whose write failed ambiguously (sent,
then the connection dropped) and was spooled, or a spool flushed twice (a gateway stopped between writing
its entries and emptying its file), is stored once.

Files: one directory per Redis server under the spool dir (``127.0.0.1-6390-0``: a spool is only ever
flushed to the Redis it was for); in it each gateway (each worker process of ``vpmon serve --workers N``
is one, with an id of its own) appends to its own ``alerts-<gateway id>.jsonl``,
one JSON object per line, and holds an exclusive lock (flock) on it while it runs. The file is emptied only
once Redis has acknowledged every entry in it. A file that no process holds was left by a gateway that
stopped: the flusher adopts it, writes what it holds, and deletes it, so the next gateway on the same
spool dir (a restart, or a sibling) delivers what a stopped one had spooled. A crash mid-append leaves a
last line without its newline: that alert was never confirmed to anyone, and it is skipped with a warning.

``SpoolFile`` is plain file I/O; ``Outbox`` is the asyncio side.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from streamer import metrics
from streamer.feeds import Feeds
from streamer.redis_clients import REDIS_ERRORS

log = logging.getLogger("vpmon.spool")

RETRY_S = 1.0  # between attempts to reach Redis while it is away
CHECK_S = 5.0  # between probes while all is well (and looks for spools that stopped gateways left)


def redis_dir_name(url: str) -> str:
    """The spool's subdirectory for a Redis URL: its host, port and database (never its password)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        name = parts.path
    else:
        database = parts.path.strip("/") or "0"
        name = f"{parts.hostname or 'localhost'}-{parts.port or 6379}-{database}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "redis"


class SpoolFile:
    """An append-only file of JSON lines, locked (flock) by the one process that uses it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self.size = os.fstat(fd).st_size  # bytes up to the end of the last whole line we know of

    @classmethod
    def open(cls, path: Path, create: bool = False) -> SpoolFile | None:
        """The file, locked for this process; None if another process holds it, or it is gone."""
        flags = os.O_RDWR | os.O_APPEND | (os.O_CREAT if create else 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if create:
            _fsync_dir(path.parent)  # the new file's name survives a crash of the machine too
        return cls(path, fd)

    def append(self, entry: Mapping[str, Any]) -> None:
        """One entry, on disk (fsync) when this returns."""
        line = (json.dumps(entry, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        try:
            view = memoryview(line)
            while view:  # a regular file takes it all at once, unless the disk is full
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError:
            # Leave no partial line for the next append to be glued to.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.size)
            raise
        self.size += len(line)

    def entries(self) -> list[dict[str, Any]]:
        return parse(os.pread(self._fd, os.fstat(self._fd).st_size, 0), str(self.path))

    def clear(self) -> None:
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self.size = 0

    def close(self) -> None:
        """Release the lock: the file's entries are for the next gateway to adopt."""
        os.close(self._fd)

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.close()


def parse(data: bytes, where: str) -> list[dict[str, Any]]:
    """The entries in a spool file's bytes, in order."""
    *lines, torn = data.split(b"\n")
    if torn:
        log.warning("%s: skipped a last line without its newline (%d bytes): a crash cut its write", where,
                    len(torn))  # fmt: skip
    entries = []
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict) and {"tenant", "kind", "data"} <= entry.keys():
            entries.append(entry)
        else:
            log.warning("%s: skipped line %d, which is not a spooled alert", where, number)
    return entries


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


class Outbox:
    """What live calls write to Redis, through outages (see the module's docstring). ``run`` is the
    flusher: start it as a task for as long as the gateway runs, then ``close``."""

    def __init__(self, feeds: Feeds, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.feeds = feeds
        self.directory = directory
        spool = SpoolFile.open(directory / f"alerts-{name}.jsonl", create=True)
        if spool is None:
            raise RuntimeError(f"{directory}/alerts-{name}.jsonl is locked by another process")
        self.file = spool
        self.pending: deque[dict[str, Any]] = deque()  # spooled here, not yet in Redis, oldest first
        self.adopted: deque[tuple[SpoolFile, deque[dict[str, Any]]]] = deque()  # stopped gateways' spools
        self.calls: dict[tuple[str, str], tuple[dict[str, Any], bool]] = {}  # newest state, ended
        # False until the flusher's first round has written what stopped gateways left here, so that new
        # alerts come after those.
        self.writable = False
        self._outage = False  # a write or probe failed, and none has succeeded since
        self._lock = asyncio.Lock()  # appends to the file, and its emptying
        self._wake = asyncio.Event()

    @property
    def spooled(self) -> int:
        """Alerts waiting for Redis: this gateway's and those of the spools it adopted."""
        return len(self.pending) + sum(len(entries) for _, entries in self.adopted)

    # --- what calls write ---------------------------------------------------------------------------
    async def alert(self, tenant: str, kind: str, data: Mapping[str, Any]) -> str | None:
        """The alert's stream id; None when it was spooled instead (on disk when this returns)."""
        if self.writable and not self.pending:
            try:
                return await self.feeds.add_alert(tenant, kind, data)
            except REDIS_ERRORS as exc:
                self._unwritable(exc)  # and spool it: if the write did happen, the flush finds its id
        entry = {"tenant": tenant, "kind": kind, "data": dict(data)}
        async with self._lock:
            # In memory first: should this task be cancelled while the file write runs, the flusher
            # still has the alert (and the file is not emptied while we hold the lock).
            self.pending.append(entry)
            try:
                await asyncio.to_thread(self.file.append, entry)
            except OSError:
                log.exception(
                    "alert %s not spooled to %s: it waits in memory only (lost if this gateway stops "
                    "before Redis returns)", data.get("alert_id"), self.file.path, extra={"tenant": tenant},
                )  # fmt: skip
        metrics.ALERTS_SPOOLED.inc()
        self._wake.set()
        return None

    async def verdict(self, tenant: str, kind: str, data: Mapping[str, Any]) -> None:
        if self.writable:
            try:
                await self.feeds.add_verdict(tenant, kind, data)
                return
            except REDIS_ERRORS as exc:
                self._unwritable(exc)
        metrics.VERDICTS_DROPPED.inc()

    async def call_state(
        self, tenant: str, call_id: str, state: Mapping[str, Any], ended: bool = False
    ) -> None:
        if self.writable:
            try:
                await self.feeds.set_call(tenant, call_id, state, ended)
                return
            except REDIS_ERRORS as exc:
                self._unwritable(exc)
        if (tenant, call_id) in self.calls:
            metrics.CALL_STATES_COALESCED.inc()
        self.calls[(tenant, call_id)] = (dict(state), ended)

    def _unwritable(self, exc: Exception) -> None:
        if not self._outage:
            log.error("Redis cannot take writes (%s): live calls go on, alerts are spooled to %s until it "
                      "does", exc, self.file.path)  # fmt: skip
        self._outage = True
        self.writable = False
        self._wake.set()

    # --- the flusher --------------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            await self.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), CHECK_S if self.writable else RETRY_S)

    async def flush(self) -> None:
        """One round of the flusher (the gateway runs one before it serves: what stopped gateways spooled
        comes first). Never raises: the next round resumes where this one failed."""
        self._wake.clear()
        try:
            await self._flush()
        except REDIS_ERRORS as exc:
            self._unwritable(exc)
            # Its own failure must not wake the flusher again at once: the next round comes RETRY_S
            # later, however quickly redis-py's own retries gave up.
            self._wake.clear()
        except Exception:  # a disk error, or a bug: the flusher must outlive it, or alerts wait forever
            log.exception("flushing the spool failed; retrying")

    async def _flush(self) -> None:
        """Spools left by stopped gateways, then this gateway's, then call states, in order; each entry
        leaves memory once Redis has it. The first failure raises and the next round resumes there."""
        for spool in await asyncio.to_thread(self._adoptable):
            entries = deque(await asyncio.to_thread(spool.entries))
            log.warning("adopted %s: %d spooled alerts of a stopped gateway", spool.path, len(entries))
            self.adopted.append((spool, entries))
        written = 0
        while self.adopted:
            spool, entries = self.adopted[0]
            while entries:
                await self._write(entries[0])
                entries.popleft()
                written += 1
            await asyncio.to_thread(spool.delete)
            self.adopted.popleft()
        while self.pending:
            await self._write(self.pending[0])
            self.pending.popleft()
            written += 1
        while self.calls:
            key, newest = next(iter(self.calls.items()))
            await self.feeds.set_call(*key, *newest)
            if self.calls.get(key) is newest:  # else a newer one came meanwhile: the next turn writes it
                del self.calls[key]
        await self.feeds.client.ping()  # when there was nothing to write: does Redis answer?
        async with self._lock:
            if self.pending or self.calls:
                return  # spooled or coalesced since: the next round
            if self.file.size:
                # Redis has every entry in it. On the event loop (one fsync, once an outage): nothing may
                # be spooled or coalesced between emptying the file and writing directly again.
                try:
                    self.file.clear()
                except OSError as exc:  # a later gateway writes them again, to no effect
                    log.error("could not empty %s: %s", self.file.path, exc)
            self.writable = True
        if self._outage:
            self._outage = False
            log.warning("Redis takes writes again: %d spooled alerts written", written)

    async def _write(self, entry: Mapping[str, Any]) -> None:
        await self.feeds.add_alert(entry["tenant"], entry["kind"], entry["data"])
        metrics.ALERTS_UNSPOOLED.inc()

    def _adoptable(self) -> list[SpoolFile]:
        """Spool files no live process holds (their gateway stopped), oldest first."""
        held = {self.file.path} | {spool.path for spool, _ in self.adopted}
        found = []
        for path in sorted(self.directory.glob("alerts-*.jsonl"), key=_mtime):
            spool = None if path in held else SpoolFile.open(path)
            if spool is not None:
                found.append(spool)
        return found

    async def close(self) -> None:
        """At shutdown: what is still spooled stays on disk for the next gateway; an empty file goes."""
        async with self._lock:
            if self.pending:
                self.file.close()
            else:
                self.file.delete()
            for spool, _ in self.adopted:
                spool.close()
