"""Soak: a gateway under churning live calls for a long time; does anything grow that should not?

    python benchmarks/soak.py                         30 min, 40 concurrent calls (≈ 1,000 calls played)
    python benchmarks/soak.py --minutes 5 --calls 20  a short run

The same real parts as benchmarks/load.py, whose machinery this reuses: an embedded Redis, a ``vpmon
serve`` subprocess, agents enrolled through the API from the telephone dev voices, and a load generator in
its own process streaming Twilio calls in real time (a fifth of them taken over). The run is a series of
rounds of ``--round-seconds``; within a round every call that ends is replaced at once, so calls connect,
stream, get verified or raise alerts and disconnect all the time; at the end of a round every call
stops, and once they have all closed the gateway is idle.

**At each idle point** (no call live: whatever is still held then is held for good) it records the
gateway's RSS, open file descriptors (``/proc/<pid>/fd``) and how many of them are connections to Redis,
threads, asyncio tasks (``vpmon_asyncio_tasks`` on /metrics, when this gateway exports it), Redis' used
memory, and the calls played so far; per round also the load figures (verdict p99, frames dropped,
takeovers caught, false alerts) from load.py.

**Slopes**: least squares over the idle points after the first quarter of the run (allocator arenas,
caches and connection pools fill first), per hour and per 1,000 calls played. A **leak** is flagged
when file descriptors other than Redis connections, threads or tasks at idle end above where they
started after warm-up (these should return exactly to a baseline), or when RSS grows by more than
``RSS_LEAK_MB_PER_1000_CALLS`` over the second half of the run (a leak grows with every call, all run
long; a heap reaching the high-water mark of the busiest round steps up once and stays, so the fit over
the whole run is shown but not judged). Redis connections are shown, not judged: the connection pool
keeps what its busiest moment opened (bounded by ``VPMON_REDIS_MAX_CONNECTIONS``), which a slower
machine raises.
Redis' memory is shown, not judged: alert and verdict streams grow by design up to their retention.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import load  # noqa: E402
from common import environment  # noqa: E402

OUTPUT = BENCH / "results" / "soak.json"
MINUTES = 30.0
CALLS = 40
ROUND_SECONDS = 120.0
ROUND_WARMUP_SECONDS = 10.0
IDLE_TIMEOUT = 60.0  # for the gateway to report no live call after a round
WARM_UP_SHARE = 0.25
RSS_LEAK_MB_PER_1000_CALLS = 5.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def redis_connections(pid: int, redis_port: int) -> int:
    """The process's sockets connected to Redis: its connection pools, which keep what a busy moment
    opened (up to ``VPMON_REDIS_MAX_CONNECTIONS``) — a high-water mark, judged apart from other fds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    connected = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                connected += remote_port == redis_port and fields[9] in inodes
    return connected


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


def idle_point(http: Any, pid: int, redis: Any, started: float, calls_played: int) -> dict[str, Any]:
    """Wait until the gateway holds no call, then measure what it still holds."""
    deadline = time.monotonic() + IDLE_TIMEOUT
    live = None
    while time.monotonic() < deadline:
        metrics = load.Metrics.scrape(http)
        live = metrics.values.get("vpmon_calls_active", 0.0)
        if live == 0:
            break
        time.sleep(1.0)
    metrics = load.Metrics.scrape(http)
    return {
        "minutes": round((time.monotonic() - started) / 60, 2),
        "calls_played": calls_played,
        "calls_live": live,
        "rss_mb": round(load.memory_mb(pid, "VmRSS"), 1),
        "open_fds": open_fds(pid),
        "redis_connections": redis_connections(pid, redis.port),
        "threads": threads(pid),
        "asyncio_tasks": metrics.values.get("vpmon_asyncio_tasks"),
        "redis_used_mb": round(redis.client().info("memory")["used_memory"] / 2**20, 1),
    }


def slope(points: list[dict[str, Any]], field: str, x: str) -> float | None:
    values = [(p[x], p[field]) for p in points if p.get(field) is not None]
    if len(values) < 3:
        return None
    xs, ys = np.array(values, dtype=float).T
    if np.ptp(xs) == 0:
        return None
    return float(np.polyfit(xs, ys, 1)[0])


def judge(points: list[dict[str, Any]]) -> dict[str, Any]:
    # The point before any call and the first round are always warm-up (pools and threads start lazily).
    settled = points[max(2, int(len(points) * WARM_UP_SHARE)) :]
    result: dict[str, Any] = {"settled_points": len(settled), "slopes": {}, "leaks": []}
    if len(settled) < 3:
        result["leaks"] = None  # too short to judge
        settled = points[-2:]
    first, last = settled[0], settled[-1]
    for point in points:
        if "redis_connections" in point:
            point["other_fds"] = point["open_fds"] - point["redis_connections"]
    for field in ("rss_mb", "open_fds", "other_fds", "redis_connections", "threads", "asyncio_tasks",
                  "redis_used_mb"):  # fmt: skip
        per_hour = slope(settled, field, "minutes")
        per_1000 = slope(settled, field, "calls_played")
        result["slopes"][field] = {
            "per_hour": None if per_hour is None else round(60 * per_hour, 3),
            "per_1000_calls": None if per_1000 is None else round(1000 * per_1000, 3),
            "first": first.get(field),
            "last": last.get(field),
        }
    # A one-off step (an allocator arena growing once) and a steady climb fit the same line over a short
    # run; the second half of the run alone tells them apart.
    tail = points[len(points) // 2 :]
    tail_rss = slope(tail, "rss_mb", "calls_played")
    result["rss_second_half_mb_per_1000_calls"] = None if tail_rss is None else round(1000 * tail_rss, 3)
    if result["leaks"] is None:
        return result
    # Redis connections are a pool's high-water mark (bounded, reused), not a leak: judged are the others.
    for field in ("other_fds", "threads", "asyncio_tasks"):
        if first.get(field) is not None and last.get(field) is not None and last[field] > first[field]:
            result["leaks"].append(f"{field}: {first[field]} → {last[field]} at idle")
    # A leak costs memory per call, in every part of the run; a heap that grows to the high-water mark of
    # its busiest round (glibc keeps freed arenas) steps up and stays. So RSS is judged on the second half.
    if tail_rss is not None and 1000 * tail_rss > RSS_LEAK_MB_PER_1000_CALLS:
        result["leaks"].append(f"RSS grows {1000 * tail_rss:.1f} MB per 1,000 calls over the second half")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=MINUTES)
    parser.add_argument("--calls", type=int, default=CALLS, help="concurrent calls in each round")
    parser.add_argument("--round-seconds", type=float, default=ROUND_SECONDS)
    parser.add_argument("--model", help="speaker model (VPMON_MODEL; default: the gateway's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    if args.model:
        os.environ["VPMON_MODEL"] = args.model
    signal.signal(signal.SIGTERM, load._terminate)
    out = load.console()

    from devset import devset_dir
    from takeover import load_utterances

    from tests.redis_fixtures import start_server

    began = time.monotonic()
    rng = np.random.default_rng(args.seed)
    utterances = load_utterances(devset_dir("telephone"))
    work = Path(tempfile.mkdtemp(prefix="vpmon-bench-soak-"))
    redis = None
    report: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/soak.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **environment(),
        "settings": {
            "minutes": args.minutes,
            "calls": args.calls,
            "round_seconds": args.round_seconds,
            "warm_up_share": WARM_UP_SHARE,
            "rss_leak_mb_per_1000_calls": RSS_LEAK_MB_PER_1000_CALLS,
        },
        "construction": __doc__,
    }
    points: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    try:
        redis = start_server(work / "redis", with_search=False)
        import httpx

        with load.gateway(redis, work, {}) as server:
            admin = server.key(load.TENANT, "admin")
            with server.client(admin) as http:
                out.print(f"enrolling {len(utterances)} agents through the API")
                for_calls, _ = load.enrol_agents(http, utterances)
                token = uuid.uuid4().hex
                http.patch("/v1/tenant", json={"twilio_auth_token": token}).raise_for_status()
            scripts, audio = load.build_scripts(utterances, for_calls, rng)
            plan = load.call_plan(server.url, token, load.write_scripts(scripts, audio, work))
            del audio
            monitor = server.key(load.TENANT, "monitor")
            pid = server.process.pid
            with httpx.Client(
                base_url=server.url, headers={"Authorization": f"Bearer {monitor}"}, timeout=60
            ) as http:
                started = time.monotonic()
                played = 0
                points.append(idle_point(http, pid, redis, started, played))
                out.print(f"idle at start: {points[-1]}")
                while time.monotonic() - started + args.round_seconds <= 60 * args.minutes:
                    row = load.run_step(
                        args.calls,
                        server,
                        redis,
                        http,
                        plan,
                        scripts,
                        ROUND_WARMUP_SECONDS,
                        args.round_seconds - ROUND_WARMUP_SECONDS,
                        work,
                    )
                    played += row["calls_played"]
                    rounds.append(row)
                    points.append(idle_point(http, pid, redis, started, played))
                    out.print(
                        f"round {len(rounds)}: {row['calls_played']} calls, verdict p99 "
                        f"{load._ms(row['verdict_latency_p99_s'])} ms, dropped {row['frames_dropped']:.0f}, "
                        f"takeovers {row['takeovers_caught']}/{row['takeovers_evaluated']}, false "
                        f"{row['false_alerts']} | idle: {points[-1]}"
                    )
    except KeyboardInterrupt:
        out.print("interrupted: everything this run started is stopped; no results")
        sys.exit(130)
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(work, ignore_errors=True)

    verdict = judge(points)
    report.update(
        {
            "idle_points": points,
            "rounds": rounds,
            "calls_played": points[-1]["calls_played"],
            "frames_dropped": sum(r["frames_dropped"] for r in rounds),
            "calls_failed": sum(r["calls_failed"] for r in rounds),
            "false_alerts": sum(r["false_alerts"] for r in rounds),
            "takeovers": [
                sum(r["takeovers_caught"] for r in rounds),
                sum(r["takeovers_evaluated"] for r in rounds),
            ],
            **verdict,
            "elapsed_seconds": round(time.monotonic() - began, 1),
        }
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print_report(out, report)


def print_report(out: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"Soak: {report['calls_played']} calls in {len(report['rounds'])} rounds")
    for column in ("at idle", "first (settled)", "last", "slope / hour", "slope / 1,000 calls"):
        table.add_column(column, justify="right")
    for field, figures in report["slopes"].items():
        table.add_row(
            field,
            str(figures["first"]),
            str(figures["last"]),
            str(figures["per_hour"]),
            str(figures["per_1000_calls"]),
        )
    out.print(table)
    out.print(f"RSS over the second half: {report['rss_second_half_mb_per_1000_calls']} MB per 1,000 calls")
    out.print(
        f"frames dropped {report['frames_dropped']:.0f}, calls failed {report['calls_failed']}, takeovers "
        f"caught {report['takeovers'][0]}/{report['takeovers'][1]}, false alerts {report['false_alerts']}"
    )
    if report["leaks"] is None:
        out.print("leaks: not judged (fewer than 3 idle points after warm-up: run longer)")
    else:
        out.print("leaks: " + ("; ".join(report["leaks"]) if report["leaks"] else "none"))


if __name__ == "__main__":
    main()
