"""The launched app, driven through Gradio's API with gradio_client: live control of a run, errors, launch
checks. The clean shutdown that frees both ports is checked where the shared app stops (conftest's
`playground_app` teardown, and tests/test_browser.py's last test)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from playground.testing import app_client

pytestmark = pytest.mark.usefixtures("rest_shared_app")  # the shared app pauses after this module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client(playground_app):
    return app_client(playground_app["url"])


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
    assert {"/start", "/pause", "/resume", "/reset", "/set_params", "/status", "/export", "/prior_options", "/fork",
            "/close_fork"} <= names
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

    share = status(client)["train_util"]
    client.predict(train_util=0.5, api_name="/set_params")  # the session's share of time spent training
    half = wait_status(client, lambda s: s["train_util"] == 0.5, what="training share")
    wait_status(client, lambda s: s["step"] >= half["step"] + 2, what="steps at half the time")
    client.predict(train_util=share, api_name="/set_params")

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
    with pytest.raises(Exception, match="train_util"):
        client.predict(train_util=2.0, api_name="/set_params")
    st = status(client)
    assert st["guidance_scale"] == before["guidance_scale"] and st["train_util"] == before["train_util"]


def test_a_refused_value_is_one_line_in_the_servers_log(client, playground_app):
    with pytest.raises(Exception, match="shading must be one of"):
        client.predict(shading="toon" * 2500, api_name="/set_params")
    log = playground_app["log"].read_text()
    lines = [line for line in log.splitlines() if "refused /set_params: shading" in line and "toon" in line]
    assert len(lines) == 1 and len(lines[0]) < 300, lines
    assert "toon" * 30 not in log and "Traceback" not in log


def test_every_live_parameter_can_be_set_and_forked_through_the_api(client):
    """A new live parameter (a distillation loss, say) is forkable as soon as it is in LiveParams: this fails
    until /set_params and /fork take it."""
    import dataclasses

    from engine.config import LiveParams

    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    live = {f.name for f in dataclasses.fields(LiveParams)}
    for name in ("/set_params", "/fork"):
        assert live <= {p["parameter_name"] for p in api[name]["parameters"]}, name


def test_fork_through_the_api(client):
    client.predict(api_name="/start")
    wait_status(client, lambda s: s["state"] == "running" and s["step"] >= 2, what="training")
    st = client.predict(guidance_scale=30, api_name="/fork")
    assert st["fork"]["name"] == "B" and st["fork"]["differs"] == {"guidance_scale": [st["guidance_scale"], 30.0]}
    b0 = st["fork"]["step"]
    st = wait_status(client, lambda s: s["fork"]["step"] >= b0 + 3 and s["fork"]["loss"] is not None, what="B")
    assert [r["name"] for r in st["runs"]] == ["A", "B"] and st["state"] == "running"
    assert client.predict(guidance_scale=40, run="B", api_name="/set_params")["guidance_scale"] == 40
    wait_status(client, lambda s: s["fork"]["live"]["guidance_scale"] == 40, what="B's new guidance")
    assert status(client)["guidance_scale"] != 40, "A keeps its own"
    assert client.predict(kind="snapshot", run="B", api_name="/export") == {"submitted": "snapshot", "run": "B"}
    st = wait_status(client, lambda s: any(e.startswith("snapshot of run B") for e in s["exports"]), what="export")
    line = next(e for e in st["exports"] if e.startswith("snapshot of run B"))
    assert "-B/" in line and "failed" not in line
    st = client.predict(api_name="/close_fork")
    assert st["fork"] is None and len(st["runs"]) == 1
    with pytest.raises(Exception, match="no run B"):
        client.predict(guidance_scale=40, run="B", api_name="/set_params")


def test_start_with_a_prior_while_running_says_what_it_did(client):
    wait_status(client, lambda s: s["state"] == "running", what="a running run")
    st = client.predict(prior="oracle:sphere", api_name="/start")
    st = wait_status(client, lambda s: any("oracle:sphere was not used" in w for w in s["warnings"]), what="warning")
    assert st["prior"] == "oracle:cube" and st["state"] == "running"
    assert any("press Reset with it to switch" in w for w in st["warnings"])


def test_checkpoint_export_runs_on_a_worker(client, playground_app):
    client.predict(kind="checkpoint", api_name="/export")
    st = wait_status(client, lambda s: any(e.startswith("checkpoint: ") for e in s["exports"]), what="the export")
    assert (Path(st["run_dir"]) / "checkpoint.safetensors").is_file()


def _run_app(*args, timeout=60):
    return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_port_taken_is_a_clear_message(playground_app, free_port):
    r = _run_app("--port", str(playground_app["port"]), "--viewer-port", str(free_port))
    assert r.returncode != 0 and f"port {playground_app['port']}" in r.stderr and "--port" in r.stderr
    r = _run_app("--port", str(free_port), "--viewer-port", str(playground_app["viewer_port"]))
    assert r.returncode != 0 and "--viewer-port" in r.stderr


def test_public_host_needs_auth_and_a_bad_training_share_is_one_line():
    r = _run_app("--host", "0.0.0.0")
    assert r.returncode != 0 and "--auth" in r.stderr
    r = _run_app("--train-util", "0")
    assert r.returncode != 0 and "train_util must be a finite number in [0.05, 1]" in r.stderr
    assert "Traceback" not in r.stderr


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
