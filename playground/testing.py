"""What tests and benchmarks share to drive a launched app (`python app.py`) through its API: one client per app.
(engine/testing.py holds the rest; engine may not import gradio_client, so this lives here.)"""

from __future__ import annotations

_CLIENTS: dict = {}


def app_client(url: str):
    """One `gradio_client.Client` per app URL for the whole process (making one costs ~0.2 s of both sides' CPU)."""
    if url not in _CLIENTS:
        from gradio_client import Client

        _CLIENTS[url] = Client(url, verbose=False)
    return _CLIENTS[url]


def app_status(app: dict) -> dict:
    """A launched app's /status (`app`: the dict of tests/conftest.py's `launch_app`)."""
    return app_client(app["url"]).predict(api_name="/status")
