"""The long-run rehearsal (benchmarks/long_run_rehearsal.py) at a small size: SIGKILLed twice, resumed, identical."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_killed_twice_ends_identical_to_an_uninterrupted_one():
    r = subprocess.run([sys.executable, "benchmarks/long_run_rehearsal.py", "--steps", "160", "--every", "20",
                        "--keep", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})  # this checkout's code, even beside another's install
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = next(line for line in r.stdout.splitlines() if line.startswith("RESULT long_run_rehearsal"))
    assert "identical=yes" in result and "kills=2" in result, r.stdout
    assert "identical to the uninterrupted run" in r.stdout
