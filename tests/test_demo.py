"""``vpmon demo`` as a user runs it: a subprocess with the real model, Redis, gateway and dev voices.

Checks that the call is verified while agent A speaks and alerted once agent B has taken over, that the
supervisor URL and the monitor key it prints work while it serves, and that nothing it started
(redis-server, the gateway's port) is left behind, after ``--exit`` and after Ctrl-C.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240.0

pytestmark = pytest.mark.devset


def demo_command(devset: Path, *args: str) -> list[str]:
    # --speed 0: the call as fast as the gateway takes it; pacing is the stream client's own tested job.
    return [sys.executable, "-m", "streamer.cli", "demo", "--devset", str(devset), "--port", "0", *args]


def env() -> dict[str, str]:
    # A wide, colourless console, so the table's cells and the lines read back whole.
    return {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}


def redis_port(output: str) -> int:
    return int(re.search(r"embedded Redis \S+ on 127\.0\.0\.1:(\d+)", output).group(1))


def gateway_url(output: str) -> str:
    return re.search(r"supervisor page: (http://127\.0\.0\.1:\d+)/supervisor/", output).group(1)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def redis_processes_on(port: int) -> list[int]:
    """redis-server processes serving ``port`` (redis names itself ``redis-server 127.0.0.1:PORT``)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "redis-server" in cmdline and f":{port}" in cmdline:
            found.append(int(proc.name))
    return found


def verdict_rows(output: str) -> list[tuple[str, str]]:
    """(voice, state) of each row of the verdict table."""
    return re.findall(r"│\s*[\d.]+\s*│\s*([AB])\s*│\s*(\w+)\s*│", output)


def assert_nothing_left(output: str) -> None:
    port = redis_port(output)
    assert redis_processes_on(port) == [], f"redis-server on {port} outlived the demo"
    assert not listening(port)
    assert not listening(int(gateway_url(output).rpartition(":")[2]))


def assert_the_story(output: str) -> None:
    rows = verdict_rows(output)
    assert rows, output
    states_a = [state for voice, state in rows if voice == "A"]
    states_b = [state for voice, state in rows if voice == "B"]
    assert "verified" in states_a and "mismatch" not in states_a, output
    assert "mismatch" in states_b, output
    alerts = re.findall(r"ALERT takeover of agent-a at ([\d.]+) s", output)
    takeover_at = float(re.search(r"agent B takes over at ([\d.]+) s", output).group(1))
    assert len(alerts) == 1 and float(alerts[0]) > takeover_at, output
    assert re.search(r"monitor key:\s+vpk_\S+", output), output


def test_demo_exit_runs_the_story_and_leaves_nothing_running(telephone_devset: Path) -> None:
    began = time.monotonic()
    result = subprocess.run(
        demo_command(telephone_devset, "--exit", "--speed", "0"),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env(),
        timeout=TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert_the_story(output)
    assert "stopped the gateway and Redis" in output
    assert_nothing_left(output)
    assert time.monotonic() - began < 120, "the scripted part must take under two minutes"


def sigint_at_its_default() -> None:
    """In the demo's process before it starts: Ctrl-C in a terminal reaches a foreground program whose
    SIGINT is at its default. A test run started in the background has SIGINT ignored, which children
    inherit and Python then leaves ignored: the demo would never hear the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_demo_serves_until_ctrl_c(telephone_devset: Path, tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            demo_command(telephone_devset, "--speed", "0"),
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env=env(),
            preexec_fn=sigint_at_its_default,
        )
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while "serving until Ctrl-C" not in log.read_text():
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            output = log.read_text()
            assert_the_story(output)
            url = gateway_url(output)
            key = re.search(r"monitor key:\s+(vpk_\S+)", output).group(1)
            # The printed URL and key work: the page loads and the key reads the demo's alert.
            assert httpx.get(f"{url}/supervisor/").status_code == 200
            alerts = httpx.get(f"{url}/v1/alerts", headers={"Authorization": f"Bearer {key}"})
            assert alerts.status_code == 200, alerts.text
            assert "takeover" in alerts.text and "demo-call" in alerts.text

            process.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
            assert process.wait(timeout=60) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    output = log.read_text()
    assert "stopped the gateway and Redis" in output
    assert_nothing_left(output)
