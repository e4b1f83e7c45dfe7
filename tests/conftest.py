"""Test-wide settings: offline hub, no telemetry, one torch thread per test process (2-core machines)."""

import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "GRADIO_ANALYTICS_ENABLED": "False", "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402
import torch  # noqa: E402

# one torch thread per xdist worker (the suite runs on two: pyproject.toml's addopts), up to two without xdist
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))

# Modules that share one worker: those of the session-wide app (one app for all), those with apps and browsers
# of their own (one at a time beside the first group's), and those that start a local Ray (one at a time).
SERIAL = {"app": ("test_app", "test_browser", "test_browser_splats", "test_meshpane"),  # the session-wide app's
          "pages": ("test_app_priors", "test_gallery3d", "test_pane_browser"),  # apps and Chromium of their own
          "ray": ("test_batch", "test_protocol")}
_GROUP_OF = {module: group for group, modules in SERIAL.items() for module in modules}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    """Marks each test of a SERIAL module with its xdist group (`--dist loadgroup` keeps a group on one worker)."""
    for item in items:
        group = _GROUP_OF.get(item.module.__name__.rpartition(".")[2])
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


# -- small runs (engine.testing: shared with bench/) --------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_config():
    """tiny_config(prior="oracle:sphere", **config_fields) -> a fresh small Config (`engine.testing.tiny_config`)."""
    from engine.testing import tiny_config

    return tiny_config


@pytest.fixture(scope="session")
def wait_for():
    """wait_for(pred, timeout=30.0, what="condition") -> pred()'s first truthy value (`engine.testing.wait_for`)."""
    from engine.testing import wait_for

    return wait_for


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


def _port_is_free(port: int) -> bool:
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
    """A TCP port on 127.0.0.1 that nothing listens on."""
    return _free_port()


@pytest.fixture(scope="session")
def port_is_free():
    """port_is_free(port) -> whether a server could bind `port` on 127.0.0.1 now."""
    return _port_is_free


def _launch_app(out, *args: str) -> dict:
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
def launch_app():
    """launch_app(out, *app_args) -> `python app.py ARGS` on free ports, once ready (see `_launch_app`)."""
    return _launch_app


@pytest.fixture(scope="session")
def playground_app(tmp_path_factory):
    """`python app.py` with the oracle prior at tiny settings on free ports; stopped with Ctrl-C at the end
    (it must exit 0 and free both ports). It trains a tenth of the time (`--train-util`; tests wait for steps at its
    full share with `playground.testing.trained`), so the browser and the tests keep most of a 2-core machine.
    Yields `launch_app`'s dict."""
    info = _launch_app(tmp_path_factory.mktemp("app"), "--prior", "oracle:cube", "--resolution", "24",
                       "--batch-size", "1", "--samples", "24", "--steps", "100000", "--prompt", "a red cube",
                       "--train-util", "0.1")
    yield info
    proc, log, port, viewer_port = info["proc"], info["log"], info["port"], info["viewer_port"]
    if proc.poll() is None:
        from playground.testing import stop_app

        assert stop_app(proc), "app.py did not stop within 60 s of Ctrl-C"
        assert proc.returncode == 0, log.read_text()[-3000:]
        assert _port_is_free(port) and _port_is_free(viewer_port), "a port is still taken after shutdown"


@pytest.fixture(scope="module")
def rest_shared_app(playground_app):
    """Pauses the session-wide app after a module that trained it, so it does not take a core from the modules
    after it (`pytestmark = pytest.mark.usefixtures("rest_shared_app")`)."""
    yield
    if playground_app["proc"].poll() is None:
        from playground.testing import app_client

        app_client(playground_app["url"]).predict(api_name="/pause")


from playground.testing import CHROMIUM_ARGS  # noqa: E402  (as bench/bench_app.py launches it)


@pytest.fixture(scope="session")
def browser():
    """Debian's headless Chromium driven by Playwright (SwiftShader draws viser's WebGL canvas), one per worker."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Where screenshots go: $PLAYGROUND_SCREENSHOTS, else a temp folder."""
    import os
    from pathlib import Path

    out = Path(os.environ.get("PLAYGROUND_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out
