"""The pane, the viewer and the gallery as a person meets them, in headless Chromium at 1400 × 1000: a failed
prior switch says its whole advice once and the dropdown goes back; exports are offered as downloads; a fork
draws log-scale loss curves with a legend of the series that exist and asks which runs to export; the viewer's
run labels sit clear of viser's notice and panel; a frame at rest has the canvas's pixel size (up to the CPU
budget). Screenshots go to $PLAYGROUND_SCREENSHOTS (default: pytest's temporary folder)."""

from __future__ import annotations

import functools
import re
import signal
import time

import pytest

from engine.testing import wait_for
from playground.testing import app_client, app_status
from playground.viewer import label_box

REST = r"(\d+)×(\d+) shaded in (\d+) ms"  # the viewer's line after a frame: its size and render time


@pytest.fixture(scope="module")
def app(tmp_path_factory, launch_app):
    """The app on the oracle prior at tiny settings, training from launch."""
    info = launch_app(tmp_path_factory.mktemp("pane_app"), "--prior", "oracle:cube", "--resolution", "24",
                      "--batch-size", "1", "--samples", "24", "--steps", "100000", "--prompt", "a red cube", "--start",
                      "--train-util", "0.25")
    yield info
    info["proc"].send_signal(signal.SIGINT)
    info["proc"].wait(60)


status = app_status
wait_until = functools.partial(wait_for, timeout=120.0, every=0.2)  # a page and a server: more time, calmer polls


def open_pane(app, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app["url"], wait_until="domcontentloaded")
    page.wait_for_function("(document.querySelector('#status')?.innerText || '').includes('running')", timeout=90_000)
    return page


def test_a_failed_prior_switch_is_said_whole_once_and_the_dropdown_goes_back(app, browser, shots):
    page = open_pane(app, browser)
    prior = page.locator("#prior input")
    prior.fill("sd:/no/such/folder")
    prior.press("Enter")
    page.locator("#reset").click()
    page.wait_for_function("(document.querySelector('#status')?.innerText || '').includes('failed')", timeout=120_000)
    text = page.locator("#status").inner_text()
    assert "switch to sd:/no/such/folder failed" in text and "prior oracle:cube" in text, text
    assert text.rstrip().endswith("Pick another prior (e.g. oracle:cube) and press Reset."), text  # the advice, whole
    assert "…" not in text.split("is not available")[1], "the app's own advice is not cut"
    assert page.locator("body").inner_text().count("is not available") == 1, "the message is shown once"
    page.wait_for_function("document.querySelector('#prior input').value === 'oracle:cube'", timeout=30_000)
    page.screenshot(path=str(shots / "pane_failed_switch.png"), full_page=True)
    page.close()


def test_a_snapshot_is_offered_as_a_download(app, browser, shots):
    page = open_pane(app, browser)
    page.locator("#export_snapshot").click()
    page.wait_for_function("document.querySelectorAll('#downloads a[href]').length >= 3", timeout=120_000)
    names = page.locator("#downloads").inner_text()
    assert re.search(r"snapshot-\d+-lambertian\s*\.png", names) and "checkpoint" in names, names
    info = page.locator("#downloads_info").inner_text()
    assert "snapshot" in info and "PNG" in info and "checkpoint (safetensors weights)" in info, info
    href = page.locator("#downloads a[href*='.png']").first.get_attribute("href")
    body = page.request.get(href if href.startswith("http") else app["url"].rstrip("/") + href).body()
    assert body[:8] == b"\x89PNG\r\n\x1a\n", "the link downloads the PNG"
    page.close()


def test_fork_charts_are_log_scale_with_a_legend_of_what_exists_and_exports_ask_which_run(app, browser, shots):
    page = open_pane(app, browser)
    legend = "[...document.querySelectorAll('#loss_plot .role-legend-label text')].map(t => t.textContent)"
    page.wait_for_function(f"{legend}.length > 0", timeout=60_000)
    assert set(page.evaluate(legend)) == {"A", "A raw"}, "no series of run B before a fork"
    assert "log" in page.locator("#loss_plot").inner_text()
    assert not page.locator("#export_runs").is_visible()
    page.locator("#fork_guidance input[type=number]").fill("60")
    page.locator("#fork").scroll_into_view_if_needed()
    y = page.evaluate("window.scrollY")
    page.locator("#fork").click()
    page.wait_for_function(f"{legend}.includes('B')", timeout=90_000)
    assert abs(page.evaluate("window.scrollY") - y) < 5, "Fork does not scroll the page"
    assert set(page.evaluate(legend)) == {"A", "A raw", "B", "B raw"}
    page.locator("#export_runs").wait_for(state="visible", timeout=30_000)  # said before exporting: which runs
    assert page.locator("#export_runs input[value='A and B']").is_checked()
    time.sleep(2)  # a tick or two of both runs for the screenshot
    page.screenshot(path=str(shots / "pane_forked.png"), full_page=True)
    page.close()


def test_viewer_labels_clear_of_overlays_and_a_rest_frame_at_canvas_size(app, browser, shots):
    if status(app)["fork"] is None:
        app_client(app["url"]).predict(guidance_scale=60.0, api_name="/fork")
    page = browser.new_page(viewport={"width": 800, "height": 480})
    page.goto(app["viewer_url"])
    page.wait_for_function("[...document.querySelectorAll('*')].some(e => /A step \\d+ · B step \\d+ · "
                           "[1-9]\\d{2,}×\\d+ shaded/.test(e.textContent))", timeout=90_000)
    time.sleep(2)  # the refinement after the first frame at rest
    geometry = page.evaluate("""(() => {
      const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
      const canvas = [...document.querySelectorAll('canvas')].sort((a, b) =>
        b.clientWidth * b.clientHeight - a.clientWidth * a.clientHeight)[0];
      const panel = [...document.querySelectorAll('div')].filter(e => e.textContent.includes('Render mode')
        && e.getBoundingClientRect().width < innerWidth).sort((a, b) => b.clientHeight - a.clientHeight)[0];
      const info = [...document.querySelectorAll('*')].filter(e => /shaded in/.test(e.textContent)).pop();
      return {canvas: box(canvas), dpr: devicePixelRatio, panel: box(panel), info: info.textContent,
              notices: [...document.querySelectorAll('.mantine-Notification-root')].map(box)};
    })()""")
    page.screenshot(path=str(shots / "viewer_fork.png"))
    width, height, ms = (int(v) for v in re.search(REST, geometry["info"]).groups())
    left, top, right, bottom = geometry["canvas"]
    device_w = round((right - left) * geometry["dpr"])
    # at the canvas's pixel size, or as large as the CPU budget (0.35 s) lets it be
    assert width >= 0.9 * device_w or ms * (device_w / width) ** 2 > 350, (width, device_w, ms)
    scale = (right - left) / width
    for i, name in enumerate("AB"):
        x0, y0, x1, y1 = label_box(height, width // 2, name)
        label = (left + (x0 + i * width // 2) * scale, top + y0 * scale, left + (x1 + i * width // 2) * scale,
                 top + y1 * scale)
        for other in [geometry["panel"], *geometry["notices"]]:
            apart = label[2] <= other[0] or other[2] <= label[0] or label[3] <= other[1] or other[3] <= label[1]
            assert apart, f"label {name} {label} lies under an overlay {other}"
    page.close()


def test_a_stopped_app_says_so_on_the_page(app, browser):
    page = open_pane(app, browser)
    app["proc"].send_signal(signal.SIGINT)
    assert app["proc"].wait(60) == 0
    page.wait_for_function("document.body.hasAttribute('data-offline')", timeout=30_000)
    assert page.evaluate("getComputedStyle(document.querySelector('#status'), '::before').content").find(
        "stopped") > 0
    page.close()
