"""The launched app, driven through Gradio's API with gradio_client: live control of a run, errors, launch
checks. The clean shutdown that frees both ports is checked where the shared app stops (conftest's
`playground_app` teardown, and tests/test_browser.py's last test)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client(playground_app):
    return Client(playground_app["url"], verbose=False)


def status(client) -> dict:
    return client.predict(api_name="/status")


def wait_status(client, pred, timeout=90.0, what="status"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = status(client)
        if pred(st):
            return st
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last status {st}")


def test_api_has_stable_names(client):
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/start", "/pause", "/resume", "/reset", "/set_params", "/status", "/export", "/prior_options"} <= names
    assert not any(n.startswith("/ui_") for n in names), "UI handlers stay out of the API"


def test_live_control_of_a_run(client):
    client.predict(api_name="/start")
    st = wait_status(client, lambda s: s["state"] == "running" and s["step"] >= 2, what="training")
    assert st["its_per_s"] >= 0 and st["prior"] == "oracle:cube"

    nxt = client.predict(guidance_scale=20, api_name="/set_params")
    assert nxt["guidance_scale"] == 20
    step0 = status(client)["step"]
    client.predict(shading="albedo", light_mode="fixed", light_azimuth=90, light_elevation=30, light_distance=4,
                   light_color="#ff8000", ambient=0.2, learning_rate=0.005, api_name="/set_params")
    st = wait_status(client, lambda s: s["shading"] == "albedo" and s["light_azimuth"] == 90, what="new params")
    assert st["guidance_scale"] == 20 and st["light_mode"] == "fixed" and st["light_distance"] == 4
    assert st["light_color"] == pytest.approx([1.0, 128 / 255, 0.0]) and st["ambient"] == 0.2
    assert st["learning_rate"] == 0.005 and st["shading_used"] == "albedo"
    assert st["step"] >= step0, "changing parameters must not restart the run"
    later = wait_status(client, lambda s: s["step"] >= st["step"] + 3, what="more steps")
    assert later["state"] == "running"

    client.predict(prompt="a blue sphere", negative_prompt="blurry", api_name="/set_params")
    wait_status(client, lambda s: s["prompt"] == "a blue sphere" and s["negative_prompt"] == "blurry")

    client.predict(api_name="/pause")
    paused = wait_status(client, lambda s: s["state"] == "paused", what="pause")
    time.sleep(0.6)
    assert status(client)["step"] == paused["step"]
    client.predict(api_name="/resume")
    wait_status(client, lambda s: s["step"] > paused["step"], what="resume")

    client.predict(api_name="/reset")
    st = wait_status(client, lambda s: s["step"] < paused["step"], what="reset")
    assert st["guidance_scale"] == 20, "reset keeps the settings"
    wait_status(client, lambda s: s["state"] == "running" and s["step"] >= 1, what="training after reset")


def test_bad_values_are_reported_and_the_run_goes_on(client):
    before = status(client)
    with pytest.raises(Exception, match="guidance_scale"):
        client.predict(guidance_scale=-5, api_name="/set_params")
    with pytest.raises(Exception, match="shading"):
        client.predict(shading="shiny", api_name="/set_params")
    with pytest.raises(Exception, match="light_color"):
        client.predict(light_color="warm", api_name="/set_params")
    assert status(client)["guidance_scale"] == before["guidance_scale"]


def test_checkpoint_export_runs_on_a_worker(client, playground_app):
    client.predict(kind="checkpoint", api_name="/export")
    st = wait_status(client, lambda s: s["exports"], what="the export")
    assert st["exports"][-1].startswith("checkpoint: ")
    assert (Path(st["run_dir"]) / "checkpoint.safetensors").is_file()


def _run_app(*args, timeout=60):
    return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_port_taken_is_a_clear_message(playground_app, free_port):
    r = _run_app("--port", str(playground_app["port"]), "--viewer-port", str(free_port))
    assert r.returncode != 0 and f"port {playground_app['port']}" in r.stderr and "--port" in r.stderr
    r = _run_app("--port", str(free_port), "--viewer-port", str(playground_app["viewer_port"]))
    assert r.returncode != 0 and "--viewer-port" in r.stderr


def test_public_host_needs_auth():
    r = _run_app("--host", "0.0.0.0")
    assert r.returncode != 0 and "--auth" in r.stderr


def test_viewer_camera_conversion_matches_the_engine():
    import numpy as np
    import torch
    import viser.transforms as vtf

    from engine.cameras import look_at
    from playground.viewer import frame_size, point_of, spherical_of, viser_to_c2w

    eye = torch.tensor([[2.0, -1.0, 1.5]])
    gl = look_at(eye, torch.zeros(1, 3), torch.tensor([[0.0, 0.0, 1.0]]))[0].double().numpy()
    cv = gl[:3, :3] @ np.diag([1.0, -1.0, -1.0])  # what viser reports: looks down +z, y down
    c2w = viser_to_c2w(eye[0].numpy(), vtf.SO3.from_matrix(cv).wxyz)
    assert np.allclose(c2w, gl, atol=1e-6)
    assert frame_size(256, 4 / 3) == (192, 256) and frame_size(256, 0.5) == (256, 128)
    az, el, dist = spherical_of(point_of(120.0, -30.0, 4.0))
    assert np.allclose((az, el, dist), (120.0, -30.0, 4.0))


def test_prior_options_through_the_api(client):
    st = client.predict(perp_neg=True, perp_neg_scale=1.5, api_name="/prior_options")
    assert st["prior_options"]["perp_neg"] is True and st["prior_options"]["perp_neg_scale"] == 1.5
    assert "next Start or Reset" in st["message"] or status(client)["prior_options"]["perp_neg"]
    with pytest.raises(Exception, match="perp_neg_scale"):
        client.predict(perp_neg_scale=-1, api_name="/prior_options")
    assert status(client)["prior_options"]["perp_neg_scale"] == 1.5
