"""What tests and benchmarks share to drive a launched app (`python app.py`) through its API.
(engine/testing.py holds the rest; engine may not import gradio_client, so this lives here.)"""

from __future__ import annotations

# Debian's headless Chromium as the tests and bench/bench_app.py drive it: SwiftShader draws viser's WebGL canvas
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--enable-unsafe-swiftshader", "--use-angle=swiftshader",
                 "--disable-dev-shm-usage", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def app_client(url: str):
    """A `gradio_client.Client` of the app at `url`. A new one each time, on purpose: a client held for the whole
    suite keeps its heartbeat thread reaching for its app, even after that app stopped (with clients cached, the
    suite's later browser tests ran 3-4× slower)."""
    from gradio_client import Client

    return Client(url, verbose=False)


def app_status(app: dict) -> dict:
    """A launched app's /status (`app`: the dict of tests/conftest.py's `launch_app`)."""
    return app_client(app["url"]).predict(api_name="/status")  # (dropped after: its heartbeat ends with it)


def trained(app: dict, until, timeout: float = 180.0, what: str = "training") -> dict:
    """The app's first /status for which `until(status)` holds, polled while it trains at its full share; its share
    is put back after. Test apps train a small share of the time (`--train-util`), leaving the CPU to the browser
    and the tests, and train flat out only while a test waits for steps."""
    from engine.testing import wait_for

    client = app_client(app["url"])
    share = client.predict(api_name="/status")["train_util"]
    client.predict(train_util=1.0, api_name="/set_params")
    try:
        return wait_for(lambda: until(st := app_status(app)) and st, timeout=timeout, what=what, every=0.2)
    finally:
        client.predict(train_util=share, api_name="/set_params")


def stop_app(proc, timeout: float = 60.0) -> bool:
    """Ctrl-C to a launched app's process (a `subprocess.Popen`), as a person stops it; killed if it has not exited
    within `timeout` seconds. Returns whether it stopped by itself."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
