"""What tests and benchmarks share to drive a launched app (`python app.py`) through its API.
(engine/testing.py holds the rest; engine may not import gradio_client, so this lives here.)"""

from __future__ import annotations


def app_client(url: str):
    """A `gradio_client.Client` of the app at `url`. A new one each time, on purpose: a client held for the whole
    suite keeps its heartbeat thread reaching for its app, even after that app stopped (with clients cached, the
    suite's later browser tests ran 3-4× slower)."""
    from gradio_client import Client

    return Client(url, verbose=False)


def app_status(app: dict) -> dict:
    """A launched app's /status (`app`: the dict of tests/conftest.py's `launch_app`)."""
    return app_client(app["url"]).predict(api_name="/status")  # (dropped after: its heartbeat ends with it)
