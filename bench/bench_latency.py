"""The waits a person meets outside training, on this machine: how long each takes (the tests check only what
each does, never how fast).

1. `python -m engine doctor --json` against the local Hugging Face cache, end to end (median of 3);
2. the prior loads that must fail at once with one message: a missing folder, a Hub id with HF_HUB_OFFLINE set,
   a DeepFloyd IF folder without sentencepiece (before any weights load);
3. the Hub probe (`engine.priors.hub.hub_reachable`, timeout 2 s): whatever this machine's network does;
4. one live score of a run (`playground.score`, 6 views at 32 px) while the session trains (median and max of 5).

    python bench/bench_latency.py                  # ~1 min; prints one JSON
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def doctor_s(n: int = 3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "engine", "doctor", "--json"], cwd=ROOT, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 2)


def failing_load_s(spec: str, env: dict | None = None, hide: str | None = None) -> dict:
    """Seconds until load_prior(spec) raises, in a fresh process (imports included), and the message's start."""
    code = ("import sys, time\n"
            + (f"sys.modules[{hide!r}] = None\n" if hide else "")
            + "from engine.priors import load_prior\nt0 = time.perf_counter()\n"
              f"try:\n    load_prior({spec!r})\nexcept Exception as e:\n"
              "    print(round(time.perf_counter() - t0, 3)); print(str(e)[:80])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    lines = out.stdout.strip().splitlines()
    return {"s": float(lines[0]), "message": lines[1]} if len(lines) >= 2 else {"error": out.stderr[-500:]}


def hub_probe_s() -> dict:
    from engine.priors import hub

    t0 = time.perf_counter()
    reachable = hub.hub_reachable(timeout=2.0)
    return {"s": round(time.perf_counter() - t0, 3), "reachable": reachable}


def live_score_s(n: int = 5) -> dict:
    from engine.testing import tiny_config, wait_for
    from playground.session import Session

    with tempfile.TemporaryDirectory() as out:
        s = Session(tiny_config("oracle:cube"), out_root=out, score_every_s=0.2)
        try:
            s.start()
            wait_for(lambda: len(s.scorer.costs) >= n or s.scorer.unavailable, timeout=600, what=f"{n} live scores")
            if s.scorer.unavailable:
                return {"error": s.scorer.unavailable}
            costs = list(s.scorer.costs)
        finally:
            s.stop()
    return {"median_s": round(statistics.median(costs), 3), "max_s": round(max(costs), 3), "n": len(costs)}


def main() -> int:
    from engine.testing import write_tiny_if

    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "doctor_s": doctor_s()}
    offline = {"HF_HUB_OFFLINE": "1"}
    result["missing_folder"] = failing_load_s("sd:/no/such/sd-folder", offline)
    result["offline_hub_id"] = failing_load_s("sd:nobody/no-such-model", offline)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_if(str(Path(tmp) / "if"))
        result["if_without_sentencepiece"] = failing_load_s(f"if:{folder}", offline, hide="sentencepiece")
    result["hub_probe"] = hub_probe_s()
    result["live_score"] = live_score_s()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
