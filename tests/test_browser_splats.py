"""Gaussian splats in headless Chromium, on the shared app (tests/conftest.py `playground_app`): a splat run drawn by
the browser itself changes as the camera orbits while it trains, and a fork as splats shows run A's NeRF frame and
run B's splats side by side, each labelled. One viewer page follows both; the app is left on a NeRF run. (The pane's
page is not loaded: its Field and "as splats" are tested without a browser, tests/test_fork.py.)

Screenshots go to $PLAYGROUND_SCREENSHOTS (default: pytest's temporary folder)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.testing import canvas_image, drag_from_centre, wait_for
from playground.testing import app_client, trained

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
                           timeout=120_000)


def test_splats_are_drawn_by_the_browser_and_a_fork_as_splats_shows_both_fields(playground_app, browser, shots):
    client = app_client(playground_app["url"])

    def status() -> dict:
        return client.predict(api_name="/status")

    page = browser.new_page(viewport={"width": 800, "height": 480})
    try:
        client.predict(backbone="gaussians", api_name="/reset")
        client.predict(api_name="/start")
        page.goto(playground_app["viewer_url"])  # the page loads while the run trains
        canvas = page.locator("canvas").first
        canvas.wait_for(timeout=60_000)
        trained(playground_app, lambda st: st["settings"]["backbone"] == "gaussians" and st["step"] >= 20,
                what="steps of the splat run")
        info_says(page, "step \\d+ · shaded in the browser")
        # the browser sorts and draws the splats: the canvas shows them, not a blank background
        first = wait_for(lambda: (img := canvas_image(page)) is not None and centre_vs_corner(img) > 30
                         and img.std() > 5 and [img], timeout=60, what="the splats on the canvas")[0]
        save(first, shots / "viewer_splats.png")  # (a WebGL page is slow to shoot: each picture is taken once)
        drag_from_centre(page, canvas, 150, 30)  # orbit while it trains
        h, w, _ = first.shape

        seen = {}

        def change() -> float:
            seen["orbited"] = canvas_image(page)
            return float(np.abs(first - seen["orbited"])[h // 4:3 * h // 4, w // 4:3 * w // 4].mean())

        wait_for(lambda: change() > 2.0, timeout=30, what="the splats seen from another side after orbiting")
        save(seen["orbited"], shots / "viewer_splats_orbited.png")

        client.predict(backbone="nerf", api_name="/reset")
        trained(playground_app, lambda st: st["settings"]["backbone"] == "grid" and st["step"] >= 40,
                what="steps of the NeRF run")
        st = client.predict(backbone="gaussians", api_name="/fork")  # the pane's "as splats": tests/test_fork.py
        assert [r["backbone"] for r in st["runs"]] == ["grid", "gaussians"]
        info_says(page, "A NeRF step \\d+ · B splats step \\d+ · \\d+×\\d+ shaded")  # at rest: labelled

        def halves() -> tuple[float, float]:
            both = seen["fork"] = canvas_image(page)
            half = both.shape[1] // 2
            return centre_vs_corner(both[:, :half]), centre_vs_corner(both[:, half:])

        # A's NeRF frame on the left and B's splats, drawn by the browser, on the right: each shows an object
        wait_for(lambda: min(halves()) > 30, timeout=60, what="A's NeRF and B's splats side by side")
        save(seen["fork"], shots / "viewer_fork_splats.png")
    finally:
        page.close()
        client.predict(api_name="/close_fork")
        if status()["settings"]["backbone"] != "grid":  # later modules expect the app's NeRF
            client.predict(backbone="nerf", api_name="/reset")


def save(image: np.ndarray, path) -> None:
    Image.fromarray(image.astype(np.uint8)).save(path)
