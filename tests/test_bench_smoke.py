"""The benchmark, seconds-long: it runs end to end against fastrelay and a
peer, and every delivery verifies. No timing is asserted (figures live in
bench/RESULTS.md with the command that made them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.checkout  # bench/ is not part of the installed package
@pytest.mark.timeout(300)
def test_quick_benchmark_runs_and_verifies(tmp_path):
    out = tmp_path / "quick.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/run.py",
            "--quick",
            "--servers",
            "fastrelay,websockets",
            "--json",
            str(out),
            "--markdown",
            str(tmp_path / "quick.md"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert {run["server"] for run in runs} == {"fastrelay", "websockets"}
    for run in runs:
        assert run["ok"] and run["loss"] == 0 and not run["errors"], run
        if "deliveries_expected" in run:
            assert run["deliveries_verified"] == run["deliveries_expected"] > 0
