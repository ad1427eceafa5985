"""README command one: the demo runs offline and prints per-user totals."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_prints_exact_totals_per_user(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/demo.db"
    result = subprocess.run(
        [sys.executable, "-m", "llm_tally", "demo", "--database-url", url, "--port", "0", "--once"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = [line for line in result.stdout.splitlines() if "@example.com" in line]
    assert len(lines) == 4
    calls = int(re.search(r"(\d+) requests served", result.stdout).group(1))  # type: ignore[union-attr]
    assert sum(int(line.split()[1]) for line in lines) == calls
    for line in lines:
        assert re.fullmatch(r"\S+\s+\d+\s+\d+\s+\d+\s+\d+\.\d{9}", line.strip()), line


def test_demo_serves_the_usage_endpoint_until_stopped(tmp_path: object) -> None:
    import json
    import signal
    import time
    import urllib.request

    url = f"sqlite:///{tmp_path}/demo.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_tally", "demo", "--database-url", url, "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        usage_url = None
        while usage_url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            match = re.search(r"\(JSON: (\S+)\)", line)
            usage_url = match.group(1) if match else None
        assert usage_url is not None, "the demo did not print the usage URL"
        with urllib.request.urlopen(usage_url, timeout=10) as response:
            payload = json.load(response)
        assert payload["total"] == 4
        assert {u["user_id"] for u in payload["users"]} == {
            "alice@example.com",
            "bob@example.com",
            "carol@example.com",
            "dave@example.com",
        }
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == 0
