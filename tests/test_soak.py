"""A short soak: `python bench/bench_soak.py --seconds 10`, an API client and three viewers against a running session.

The API client (gradio_client against the pane on 127.0.0.1) changes random controls at random times (one in
five a bad value, which must be refused with a message), pauses and resumes, and asks for snapshots; the
viewers render the live field at random cameras and connect to / disconnect from the real viser server mid-run.
Training must make progress, with no error state, no unexpected exception and no thread left hanging, and go on
after the soak. How fast it goes (steps, frames per second) is the benchmark's to report, not this test's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 4 s of soak by design, plus the pane's start
def test_short_soak_keeps_training_without_errors(tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "bench/bench_soak.py", "--seconds", "4", "--warmup", "1", "--settle", "0", "--json", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)  # a hang, not a speed: well under a minute here
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.exists(), tail
    result = json.loads(out.read_text())
    assert result["errors"] == 0, result["first_errors"]
    assert result["steps"] > 0 and result["frames"] > 0 and result["changes"] > 0, result  # progress, not a rate
    assert result["goes_on_after"] and result["state"] == "running", result
    assert proc.returncode == 0, tail
