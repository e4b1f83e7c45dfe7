"""The app with a prior switch, as a GPU user meets it: embedded -> Stable Diffusion (a tiny pipeline saved
in a folder, loaded through the real diffusers code) -> embedded, each run with its prior's own settings."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client

from engine.testing import write_tiny_sd

ROOT = Path(__file__).resolve().parents[1]


def wait(client, pred, what, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = client.predict(api_name="/status")
        if pred(st):
            return st
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; last status {st}")


@pytest.fixture(scope="module")
def app(tmp_path_factory, launch_app):
    out = tmp_path_factory.mktemp("app_priors")
    info = launch_app(out, "--prior", "embedded", "--prompt", "a red cube", "--perp-neg", "--perp-neg-scale", "1.5")
    yield Client(info["url"], verbose=False), out
    info["proc"].send_signal(signal.SIGINT)
    info["proc"].wait(60)


def test_a_switch_to_stable_diffusion_and_back_runs_each_prior_with_its_own_settings(app):
    client, out = app
    st = client.predict(api_name="/status")
    assert st["prior"] == "embedded" and st["guidance_scale"] == 10.0
    assert st["prior_options"]["perp_neg"] is True and st["prior_options"]["perp_neg_scale"] == 1.5  # app flags
    sd = write_tiny_sd(str(out / "tiny-sd"))
    client.predict(prior=f"sd:{sd}", api_name="/reset")
    st = wait(client, lambda s: s["prior"] == f"sd:{sd}" and s["message"].startswith("new field"), "the SD run")
    assert st["next"]["guidance_scale"] == 100.0 and st["settings"]["resolution"] == 64
    assert st["settings"]["t_max_end"] == 0.98 and st["settings"]["entropy"] == 0.05 and st["steps"] == 10000
    assert st["next"]["prompt"] == "a red cube" and "sd settings" in st["settings_note"]
    client.predict(api_name="/start")
    st = wait(client, lambda s: s["step"] >= 2, "SD steps")
    assert st["guidance_scale"] == 100.0 and st["error"] is None and st["loss"] is not None
    client.predict(api_name="/pause")
    client.predict(prior="embedded", api_name="/reset")
    st = wait(client, lambda s: s["prior"] == "embedded" and s["step"] == 0, "the embedded run again")
    assert st["next"]["guidance_scale"] == 10.0 and st["settings"]["resolution"] == 32
    assert st["settings"]["t_max_end"] == 0.5 and st["settings"]["entropy"] == 0.2 and st["steps"] == 2000
    client.predict(api_name="/start")
    st = wait(client, lambda s: s["step"] >= 2 and s["state"] == "running", "embedded steps")
    assert st["guidance_scale"] == 10.0


def test_a_bad_prior_option_flag_is_one_line_and_nothing_starts():
    r = subprocess.run([sys.executable, "app.py", "--perp-neg-scale", "-1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and r.stderr.strip() == "error: perp_neg_scale must be a number >= 0; got -1.0"
