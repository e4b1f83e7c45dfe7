"""The launched app in headless Chromium (Debian's, driven by Playwright): the pane starts a run from a typed
prompt; the viewer's canvas shows the object and a drag orbits to a new frame; Ctrl-C frees both ports; a prior
picked in the pane runs with its own preset but for what the user typed.

Screenshots go to $PLAYGROUND_SCREENSHOTS (default: pytest's temporary folder)."""

from __future__ import annotations

import functools
import signal
import time

import numpy as np
import pytest

from engine.testing import canvas_image, wait_for
from playground.panel import SERIES_COLORS
from playground.testing import app_client, app_status, trained

pytestmark = pytest.mark.usefixtures("rest_shared_app")  # the shared app pauses after this module


status = app_status
wait_until = functools.partial(wait_for, timeout=120.0, every=0.2)  # a page and a server: more time, calmer polls


def test_pane_types_a_prompt_and_starts(playground_app, browser, shots):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(playground_app["url"], wait_until="domcontentloaded")
    box = page.locator("#prompt textarea")
    box.wait_for(timeout=60_000)
    current = status(playground_app)["prompt"]  # the page fills in the run's settings on load: type after that
    page.wait_for_function(f"document.querySelector('#prompt textarea').value === {current!r}", timeout=30_000)
    box.fill("a red cube on a table")
    page.locator("#start").click()
    page.wait_for_function("document.querySelector('#status')?.innerText.includes('running')", timeout=60_000)
    wait_until(lambda: status(playground_app)["step"] >= 3, what="steps after Start")
    st = status(playground_app)
    assert st["prompt"] == "a red cube on a table" and st["state"] == "running"
    page.wait_for_function("document.querySelector('#preview img') !== null", timeout=60_000)
    page.screenshot(path=str(shots / "pane.png"), full_page=True)
    assert "step" in page.locator("#status").inner_text()
    assert page.locator("#viewer iframe").get_attribute("src").rstrip("/") == playground_app["viewer_url"].rstrip("/")
    page.close()


def test_a_page_opened_mid_run_shows_the_runs_settings(playground_app, browser):
    """Settings changed elsewhere (another tab, the API) are what a page opened later shows, not the values
    the app started with: a reload mid-run does not show a stale prompt."""
    app_client(playground_app["url"]).predict("a green cone", "a blurry photo", 25.0, "textureless",
                                                         api_name="/set_params")
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(playground_app["url"], wait_until="domcontentloaded")
    box = page.locator("#prompt textarea")
    box.wait_for(timeout=60_000)
    page.wait_for_function("document.querySelector('#prompt textarea').value === 'a green cone'", timeout=30_000)
    assert page.locator("#negative_prompt textarea").input_value() == "a blurry photo"
    assert float(page.locator("#guidance_scale input[type=number]").input_value()) == 25.0
    assert page.locator("input[type=radio][value=textureless]").is_checked()
    page.close()
    app_client(playground_app["url"]).predict("a red cube on a table", "", 10.0, "random",
                                                         api_name="/set_params")


def centre_vs_border(img: np.ndarray) -> float:
    """Mean colour distance between the centre patch (the object) and the canvas's bottom-right corner."""
    h, w, _ = img.shape
    centre = img[h // 2 - 30:h // 2 + 30, w // 2 - 30:w // 2 + 30].reshape(-1, 3).mean(0)
    corner = img[h - 80:h - 20, w - 80:w - 20].reshape(-1, 3).mean(0)
    return float(np.abs(centre - corner).sum())


def test_viewer_shows_the_object_and_orbits(playground_app, browser, shots):
    st = status(playground_app)
    if st["state"] != "running":
        app_client(playground_app["url"]).predict(api_name="/start")
    trained(playground_app, lambda st: st["step"] >= 40, what="some training")
    page = browser.new_page(viewport={"width": 640, "height": 480})
    page.goto(playground_app["viewer_url"])
    page.locator("canvas").first.wait_for(timeout=60_000)
    info = page.get_by_text("shaded in")
    info.first.wait_for(timeout=60_000)
    page.wait_for_function("[...document.querySelectorAll('*')].some(e => /[1-9]\\d{2,}×\\d+ shaded/.test(e.textContent))",
                           timeout=60_000)
    first = canvas_image(page, shots / "viewer.png")
    assert centre_vs_border(first) > 30, "the canvas should show the object, not a uniform background"
    assert first.std() > 5

    page.mouse.move(120, 300)  # on the canvas: the panel is docked at the right
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(120 + 15 * i, 300 + 3 * i)
        time.sleep(0.03)
    page.mouse.up()
    time.sleep(0.5)
    page.wait_for_function("[...document.querySelectorAll('*')].some(e => /[1-9]\\d{2,}×\\d+ shaded/.test(e.textContent))",
                           timeout=60_000)
    time.sleep(0.3)
    second = canvas_image(page, shots / "viewer_orbited.png")
    h, w, _ = first.shape
    diff = np.abs(first - second)[h // 4:3 * h // 4, w // 4:3 * w // 4].mean()
    assert diff > 2.0, f"dragging should orbit to a new frame (mean change {diff:.2f})"
    page.close()


def drag(page, steps: int = 10) -> None:
    page.mouse.move(120, 300)  # on the canvas: the panel is docked at the right
    page.mouse.down()
    for i in range(1, steps + 1):
        page.mouse.move(120 + 15 * i, 300 + 3 * i)
        time.sleep(0.03)
    page.mouse.up()


def test_viewers_that_leave_mid_render_and_join_mid_run_are_fine(playground_app, browser, shots):
    """Two browsers watch; one drags (frames rendering) and is closed at once; a third joins mid-run.
    Training goes on, the app serves, and the others still get fresh frames."""
    frame = "[...document.querySelectorAll('*')].some(e => /[1-9]\\d{2,}×\\d+ shaded/.test(e.textContent))"
    staying, leaving = (browser.new_page(viewport={"width": 640, "height": 480}) for _ in range(2))
    for page in (staying, leaving):
        page.goto(playground_app["viewer_url"])
        page.wait_for_function(frame, timeout=60_000)
    step = status(playground_app)["step"]
    drag(leaving, steps=5)
    leaving.close()  # mid-render: its low-resolution frames are still being made
    joining = browser.new_page(viewport={"width": 640, "height": 480})
    joining.goto(playground_app["viewer_url"])
    joining.wait_for_function(frame, timeout=60_000)
    before = canvas_image(staying)
    drag(staying)
    time.sleep(0.5)
    staying.wait_for_function(frame, timeout=60_000)
    time.sleep(0.3)
    after = canvas_image(staying)
    joining.screenshot(path=str(shots / "viewer_joined_mid_run.png"))
    h, w, _ = after.shape
    assert np.abs(before - after)[h // 4:3 * h // 4, w // 4:3 * w // 4].mean() > 2.0
    assert centre_vs_border(canvas_image(joining)) > 30
    st = status(playground_app)
    assert st["state"] == "running" and st["error"] is None
    wait_until(lambda: status(playground_app)["step"] > step + 5, timeout=60, what="training to go on")
    staying.close()
    joining.close()


def halves_show_objects(img: np.ndarray) -> tuple[float, float]:
    w = img.shape[1] // 2
    return centre_vs_border(img[:, :w]), centre_vs_border(img[:, w:])


def test_fork_changes_guidance_in_b_and_shows_two_objects_and_two_curves(playground_app, browser, shots):
    """The pane's Fork button starts run B with its own guidance; B's slider changes it live; the viewer shows A
    and B side by side from one camera; the loss plot draws two curves (each smoothed over its faint raw one)."""
    client = app_client(playground_app["url"])
    if status(playground_app)["state"] != "running":
        client.predict(api_name="/start")
    trained(playground_app, lambda st: st["step"] >= 80, what="a formed object")  # both halves must show it
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.goto(playground_app["url"], wait_until="domcontentloaded")
    page.locator("#fork").wait_for(timeout=60_000)
    current = status(playground_app)["prompt"]
    page.wait_for_function(f"document.querySelector('#prompt textarea').value === {current!r}", timeout=30_000)
    guidance_b = page.locator("#fork_guidance input[type=number]")
    guidance_b.fill("30")
    guidance_b.press("Enter")
    page.locator("#fork").click()
    page.wait_for_function("document.querySelector('#fork_info')?.innerText.includes('B differs in: guidance_scale')",
                           timeout=60_000)
    a_guidance = status(playground_app)["guidance_scale"]
    assert status(playground_app)["fork"]["differs"] == {"guidance_scale": [a_guidance, 30.0]}
    guidance_b.fill("45")  # B's guidance, changed while both train
    guidance_b.press("Enter")
    wait_until(lambda: status(playground_app)["fork"]["live"]["guidance_scale"] == 45.0, timeout=60, what="B at 45")
    assert status(playground_app)["guidance_scale"] == a_guidance
    curves = ("[...document.querySelectorAll('#loss_plot g.mark-line path')].filter(p => p.getAttribute('stroke'))"
              ".map(p => p.getAttribute('aria-label'))")  # drawn curves: with a colour
    want = sorted(SERIES_COLORS)  # a curve per run, each drawn over its faint raw one
    page.wait_for_function(f"(w => {{ const s = new Set({curves}.map(l => (l || '').split('series: ')[1])); "
                           f"return w.every(n => s.has(n)); }})({want!r})", timeout=60_000)
    time.sleep(1.5)  # the plot redraws on each tick: let one settle for the screenshot
    page.screenshot(path=str(shots / "pane_fork.png"), full_page=True)

    viewer = browser.new_page(viewport={"width": 800, "height": 480})
    viewer.goto(playground_app["viewer_url"])
    viewer.wait_for_function("[...document.querySelectorAll('*')].some(e => "
                             "/A step \\d+ · B step \\d+ · [1-9]\\d{2,}×\\d+ shaded/.test(e.textContent))", timeout=60_000)
    time.sleep(0.5)
    img = canvas_image(viewer, shots / "viewer_fork.png")
    left, right = halves_show_objects(img)
    assert left > 30 and right > 30, f"both halves should show an object ({left:.0f}, {right:.0f})"
    viewer.close()

    page.locator("#close_fork").click()
    wait_until(lambda: status(playground_app)["fork"] is None, timeout=60, what="run B closed")
    before = status(playground_app)["step"]
    page.locator("#examples button", has_text="a green cone").click()  # one click: a fresh run of the example
    wait_until(lambda: (st := status(playground_app))["prompt"] == "a green cone" and st["step"] < before
               and st["state"] == "running", timeout=60, what="the example's fresh run")
    page.wait_for_function("document.querySelector('#prompt textarea').value === 'a green cone'", timeout=30_000)
    page.close()


@pytest.fixture(scope="module")
def embedded_app(tmp_path_factory, launch_app):
    """The app on the embedded prior (its preset: 2000 steps, learning rate 0.01), idle, at tiny settings."""
    info = launch_app(tmp_path_factory.mktemp("embedded_app"), "--prior", "embedded", "--resolution", "16",
                      "--batch-size", "1", "--samples", "16", "--prompt", "a red cube", "--train-util", "0.25")
    yield info
    info["proc"].send_signal(signal.SIGINT)
    info["proc"].wait(60)


def test_a_prior_picked_in_the_pane_runs_with_its_own_preset_and_what_was_typed(embedded_app, browser, shots):
    """Start sends only what the user changed: the oracle's steps (1500) and learning rate (0.03) replace the
    embedded prior's (2000, 0.01) shown in the pane, while a guidance typed (not yet submitted) before Start is
    kept; the pane then shows the new run's values."""
    before = status(embedded_app)
    assert (before["prior"], before["steps"], before["learning_rate"]) == ("embedded", 2000, 0.01)
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.goto(embedded_app["url"], wait_until="domcontentloaded")
    page.locator("#prompt textarea").wait_for(timeout=60_000)
    page.wait_for_function("document.querySelector('#prompt textarea').value === 'a red cube'", timeout=30_000)
    page.get_by_text("Optimisation").click()
    steps = page.locator("#steps input")
    steps.wait_for(timeout=30_000)
    assert steps.input_value() == "2000"
    prior = page.locator("#prior input")
    prior.fill("oracle:sphere")
    prior.press("Enter")
    prior.blur()  # the dropdown keeps a value typed (allow_custom_value) once it leaves the box
    page.wait_for_function("document.querySelector('#prior input').value === 'oracle:sphere'", timeout=30_000)
    page.locator("#guidance_scale input[type=number]").fill("12")  # typed, not submitted: Start takes it
    page.locator("#start").click()
    page.wait_for_function("(t => t.includes('running') && t.includes('/ 1500') && t.includes('oracle:sphere'))"
                           "(document.querySelector('#status')?.innerText || '')", timeout=90_000)
    wait_until(lambda: status(embedded_app)["step"] >= 2, what="steps of the oracle's run")
    st = status(embedded_app)
    assert (st["prior"], st["steps"], st["learning_rate"], st["guidance_scale"]) == ("oracle:sphere", 1500, 0.03, 12.0)
    kept = st["settings_note"].partition("kept what you set: ")[2].split(", ")
    assert "guidance_scale" in kept and "steps" not in kept and "learning_rate" not in kept, st["settings_note"]
    page.wait_for_function("document.querySelector('#steps input').value === '1500'", timeout=30_000)
    assert float(page.locator("#learning_rate input").input_value()) == 0.03
    assert float(page.locator("#guidance_scale input[type=number]").input_value()) == 12.0
    assert "1500 steps" in page.locator("#status").inner_text()
    page.screenshot(path=str(shots / "pane_prior_switch.png"), full_page=True)
    page.close()


def test_ctrl_c_stops_cleanly_and_frees_both_ports(embedded_app, port_is_free):
    """Last in this module: it stops the module's own app (the session-wide one goes on for other modules)."""
    proc = embedded_app["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    assert "stopped" in embedded_app["log"].read_text()
    assert port_is_free(embedded_app["port"]) and port_is_free(embedded_app["viewer_port"])
