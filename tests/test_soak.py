"""A short soak (bench/bench_soak.py, 15 s): an API client and three viewers against a running session.

The API client changes random controls at random times (one in five a bad value, which must be refused
with a message), pauses and resumes, and asks for snapshots; the viewers render the live field at random
cameras and connect to / disconnect from the real viser server mid-run. Steps must keep advancing, with no
error state, no unexpected exception and no thread left hanging.
"""

from __future__ import annotations

import pytest

from bench.bench_soak import Soak


@pytest.mark.slow  # 10 s of soak by design
def test_short_soak_keeps_training_without_errors(tmp_path, free_port, tiny_config, wait_for):
    from engine.config import LiveParams
    from playground.panel import Panel
    from playground.session import Session
    from playground.viewer import Viewer

    session = Session(tiny_config("oracle:cube"), LiveParams(steps=10_000), out_root=tmp_path)
    viewer = Viewer(session, host="127.0.0.1", port=free_port)
    panel = Panel(session, viewer.url)
    try:
        session.start()
        wait_for(lambda: session.step >= 1, what="the first step")
        soak = Soak(session, lambda name, **kw: getattr(panel, f"api_{name}")(**kw), viewer.port, seed=1)
        result = soak.run(10.0)
        assert result["errors"] == 0, result["first_errors"]
        assert result["steps"] >= 10 and result["frames"] >= 10 and result["changes"] >= 5, result
        before = session.step
        session.resume()  # in case the last thing the client did was a pause
        session.wait_idle_queue()
        assert session.state == "running"
        wait_for(lambda: session.step > before, what="steps after the soak")
    finally:
        viewer.stop()
        session.stop()
