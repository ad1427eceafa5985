"""README command one: the demo runs offline and prints per-user totals."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_prints_exact_totals_per_user(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/demo.db"
    result = subprocess.run(
        [sys.executable, "-m", "llm_tally", "demo", "--database-url", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = [line for line in result.stdout.splitlines() if "@example.com" in line]
    assert len(lines) == 4
    calls = int(re.search(r"(\d+) calls made", result.stdout).group(1))  # type: ignore[union-attr]
    assert sum(int(line.split()[1]) for line in lines) == calls
    for line in lines:
        assert re.fullmatch(r"\S+\s+\d+\s+\d+\s+\d+\s+\d+\.\d{9}", line.strip()), line
