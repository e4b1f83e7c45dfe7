"""Gaussian splats in headless Chromium, on the shared app (tests/conftest.py `playground_app`): a splat run drawn by
the browser itself changes as the camera orbits while it trains, and a fork as splats shows run A's NeRF frame and
run B's splats side by side, each labelled. One viewer page follows both; the app is left on a NeRF run.

Screenshots go to $PLAYGROUND_SCREENSHOTS (default: pytest's temporary folder)."""

from __future__ import annotations

import numpy as np
import pytest
from gradio_client import Client

from engine.testing import canvas_image, drag_from_centre, wait_for

pytestmark = pytest.mark.usefixtures("rest_shared_app")  # the shared app pauses after this module


def centre_vs_corner(img: np.ndarray) -> float:
    """Mean colour distance between the centre patch (the object) and the bottom-right corner (the background)."""
    h, w, _ = img.shape
    centre = img[h // 2 - 20:h // 2 + 20, w // 2 - 20:w // 2 + 20].reshape(-1, 3).mean(0)
    corner = img[h - 60:h - 15, w - 60:w - 15].reshape(-1, 3).mean(0)
    return float(np.abs(centre - corner).sum())


def info_says(page, pattern: str) -> None:
    """Wait until the viewer's panel shows text matching the JS regular expression `pattern`."""
    page.wait_for_function(f"[...document.querySelectorAll('*')].some(e => /{pattern}/.test(e.textContent))",
                           timeout=90_000)


def test_splats_are_drawn_by_the_browser_and_a_fork_as_splats_shows_both_fields(playground_app, browser, shots):
    client = Client(playground_app["url"], verbose=False)

    def status() -> dict:
        return client.predict(api_name="/status")

    page = browser.new_page(viewport={"width": 800, "height": 480})
    try:
        client.predict(backbone="gaussians", api_name="/reset")
        client.predict(api_name="/start")
        wait_for(lambda: (st := status())["settings"]["backbone"] == "gaussians" and st["step"] >= 25, timeout=120,
                 what="steps of the splat run")
        page.goto(playground_app["viewer_url"])
        canvas = page.locator("canvas").first
        canvas.wait_for(timeout=60_000)
        info_says(page, "step \\d+ · shaded in the browser")
        page.wait_for_timeout(1000)  # the browser sorts and draws the splats
        first = canvas_image(page)
        page.screenshot(path=str(shots / "viewer_splats.png"))
        assert centre_vs_corner(first) > 30 and first.std() > 5, "the canvas shows the splats, not a blank background"
        drag_from_centre(page, canvas, 150, 30)  # orbit while it trains
        page.wait_for_timeout(500)
        second = canvas_image(page)
        page.screenshot(path=str(shots / "viewer_splats_orbited.png"))
        h, w, _ = first.shape
        change = np.abs(first - second)[h // 4:3 * h // 4, w // 4:3 * w // 4].mean()
        assert change > 2.0, f"orbiting shows the splats from another side (mean change {change:.2f})"

        client.predict(backbone="nerf", api_name="/reset")
        wait_for(lambda: (st := status())["settings"]["backbone"] == "grid" and st["step"] >= 40, timeout=120,
                 what="steps of the NeRF run")
        st = client.predict(backbone="gaussians", api_name="/fork")
        assert [r["backbone"] for r in st["runs"]] == ["grid", "gaussians"]
        info_says(page, "A NeRF step \\d+ · B splats step \\d+ · [1-9]\\d{2,}×\\d+ shaded")
        page.wait_for_timeout(1000)
        both = canvas_image(page)
        page.screenshot(path=str(shots / "viewer_fork_splats.png"))
        half = both.shape[1] // 2
        left, right = centre_vs_corner(both[:, :half]), centre_vs_corner(both[:, half:])
        assert left > 30 and right > 30, f"A's NeRF and B's splats each show an object ({left:.0f}, {right:.0f})"
    finally:
        page.close()
        client.predict(api_name="/close_fork")
        if status()["settings"]["backbone"] != "grid":  # later modules expect the app's NeRF
            client.predict(backbone="nerf", api_name="/reset")
