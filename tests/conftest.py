"""Test-wide settings: offline hub, no telemetry, one torch thread per test process (2-core machines)."""

import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "GRADIO_ANALYTICS_ENABLED": "False", "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


# -- small runs: a config that trains in milliseconds a step, and a poll for a session's progress ----------
def _tiny_config(prior: str = "oracle:sphere", **kw):
    """16x16 renders, 16 samples per ray, a 16^3 grid, one view per step, shading after 2 albedo steps, the
    occupancy grid from step 2. `kw`: Config's own fields. Sessions built on it get 10,000 steps (`TINY_LIVE`), so
    that they keep running."""
    from engine.config import Config

    return Config(prior=prior, **kw).with_settings({
        "render.resolution": 16, "render.num_samples": 16, "field.grid_resolution": 16, "render.occupancy_warmup": 2,
        "render.occupancy_every": 2, "camera.batch_size": 1, "shading.albedo_only_steps": 2})


def _wait_for(pred, timeout: float = 30.0, what: str = "condition"):
    """pred()'s first truthy value, polled every 20 ms; AssertionError naming `what` after `timeout` seconds."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def tiny_config():
    """tiny_config(prior="oracle:sphere", **config_fields) -> a fresh small Config (see `_tiny_config`)."""
    return _tiny_config


@pytest.fixture(scope="session")
def wait_for():
    """wait_for(pred, timeout=30.0, what="condition") -> pred()'s first truthy value (see `_wait_for`)."""
    return _wait_for


# -- a tiny embedded prior (8-16-16 channels, 100 timesteps): trains and samples in milliseconds ----------
TINY_EMBEDDED = {"block_out_channels": [8, 16, 16], "text_dim": 16, "num_train_timesteps": 100}


@pytest.fixture
def tiny_embedded_config() -> dict:
    """The tiny model's config overrides (`EmbeddedModel(config)`, `python -m lab.train_prior --config JSON`)."""
    return dict(TINY_EMBEDDED)


@pytest.fixture
def tiny_embedded_model(tiny_embedded_config):
    """A freshly initialised tiny `EmbeddedModel` (seed 0), in eval mode."""
    from engine.priors.embedded import EmbeddedModel

    torch.manual_seed(0)
    return EmbeddedModel(tiny_embedded_config).eval()


# -- servers for the playground's tests (tests/test_app.py, tests/test_browser.py) ---------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    import socket

    with socket.socket() as s:  # as a server binds: SO_REUSEADDR, so closed connections in TIME_WAIT do not count
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def free_port():
    return _free_port()


def launch_app(out, *args: str) -> dict:
    """`python app.py ARGS` on free ports with its exports under `out`, once it says it is ready.
    Returns a dict: url, viewer_url, port, viewer_port, proc, log (path of its output)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    port, viewer_port = _free_port(), _free_port()
    while viewer_port == port:
        viewer_port = _free_port()
    log = out / "app.log"
    cmd = [sys.executable, "app.py", *args, "--port", str(port), "--viewer-port", str(viewer_port),
           "--out", str(out / "outputs")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=root, stdout=fh, stderr=subprocess.STDOUT, env=env)
    end = time.monotonic() + 180
    while "Press Ctrl-C" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"app.py did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return {"url": f"http://127.0.0.1:{port}/", "viewer_url": f"http://127.0.0.1:{viewer_port}/", "port": port,
            "viewer_port": viewer_port, "proc": proc, "log": log}


@pytest.fixture(scope="session")
def playground_app(tmp_path_factory):
    """`python app.py` with the oracle prior at tiny settings on free ports; stopped with Ctrl-C at the end
    (it must exit 0 and free both ports). Yields `launch_app`'s dict."""
    import subprocess

    info = launch_app(tmp_path_factory.mktemp("app"), "--prior", "oracle:cube", "--resolution", "24",
                      "--batch-size", "1", "--samples", "24", "--steps", "100000", "--prompt", "a red cube")
    yield info
    proc, log, port, viewer_port = info["proc"], info["log"], info["port"], info["viewer_port"]
    if proc.poll() is None:
        import signal

        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("app.py did not stop within 60 s of Ctrl-C") from None
        assert proc.returncode == 0, log.read_text()[-3000:]
        assert port_is_free(port) and port_is_free(viewer_port), "a port is still taken after shutdown"
