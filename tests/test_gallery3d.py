"""The batch's textured mesh and the gallery's 3D view of it (engine/batch/viewer3d.py), offline.

The meshes are baked from the oracle's painted solids (engine.testing.painted_source) at a small budget; the
gallery is written for a two-run manifest and opened in headless Chromium (Debian's, driven by Playwright)
both from file:// and from a local http.server, with every request that is neither refused and recorded: the
page must load nothing from the network. Each card's `<model-viewer>` must draw the mesh (pixels vary) and an
orbit (a mouse drag, then `cameraOrbit`) must change the picture.

Screenshots go to $PLAYGROUND_SCREENSHOTS (default: pytest's temporary folder)."""

from __future__ import annotations

import functools
import http.server
import io
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from engine.batch import viewer3d
from engine.batch.gallery import write_gallery
from engine.batch.spec import RunOutputs
from engine.batch.worker import _export
from engine.export import export_textured_mesh
from engine.source import RenderSource
from engine.testing import drag_from_centre, painted_source
from playground.testing import CHROMIUM_ARGS

SMALL = dict(faces=1500, texture=128, resolution=64)
CHROMIUM = "/usr/bin/chromium"


def row(run_id: str, prompt: str, files: dict) -> dict:
    return {"run_id": run_id, "prompt": prompt, "seed": 0, "prior": "oracle", "status": "done", "step": 10,
            "settings": {}, "files": files, "geometry_r_precision": 1.0}


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Path:
    """A batch folder with two runs, each with a textured mesh.glb, and its gallery."""
    out = tmp_path_factory.mktemp("batch")
    rows = []
    for solid in ("torus", "cube"):
        export_textured_mesh(painted_source(solid, sigma_max=1000.0, eps=0.003), out / solid / "mesh.glb", **SMALL)
        rows.append(row(solid, f"a painted {solid}", {"mesh": f"{solid}/mesh.glb"}))
    rows.append(row("nomesh", "a run without exports", {}))
    write_gallery(out, rows)
    return out


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = Path(os.environ.get("PLAYGROUND_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_the_batch_mesh_is_a_uv_textured_glb(monkeypatch):
    """worker._export's "mesh" is the textured .glb at the outputs' budget, sent back as bytes."""
    monkeypatch.setattr(RenderSource, "from_trainer", staticmethod(lambda _t: painted_source("sphere")))
    outputs = RunOutputs(exports=("mesh",), mesh_faces=800, mesh_texture=128, mesh_resolution=48)
    files, errors = _export(object(), None, outputs)
    assert errors == {} and set(files) == {"mesh", "preview"}  # a preview always (the gallery shows it)
    mesh = trimesh.load(io.BytesIO(files["mesh"]), file_type="glb", force="mesh", process=False)
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    assert np.asarray(mesh.visual.material.baseColorTexture).shape[:2] == (128, 128)
    assert 0 < len(mesh.faces) <= 800


def test_the_gallery_ships_its_viewer_beside_the_page(batch):
    page = (batch / "index.html").read_text()
    assert page.count("<model-viewer ") == 2 and '<script src="model-viewer-umd.min.js">' in page
    assert not re.search(r'(src|href)="(https?:)?//', page), "the page must reference nothing off this folder"
    for name in viewer3d.ASSETS:
        assert (batch / name).read_bytes() == (viewer3d.STATIC / name).read_bytes()
    assert "Apache License" in (batch / "model-viewer.LICENSE").read_text()
    side = (batch / "torus" / "mesh.glb.js").read_text()
    assert side.startswith('galleryMesh("torus","') and len(side) > (batch / "torus" / "mesh.glb").stat().st_size
    assert not list(batch.rglob(".*.part*")), "a temp file was left behind"


def test_a_gallery_without_meshes_ships_no_viewer(tmp_path):
    write_gallery(tmp_path, [row("a", "a cube", {})])
    assert "model-viewer" not in (tmp_path / "index.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]


@pytest.fixture(scope="module")
def served(batch):
    """The batch folder on a local http.server (127.0.0.1, a free port)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(batch))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/index.html"
    server.shutdown()
    server.server_close()


def picture(locator) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB"), dtype=np.float32)


@pytest.mark.parametrize("where", ["file", "http"])
def test_each_card_shows_its_mesh_in_3d_offline_and_orbits(batch, served, shots, where):
    from playwright.sync_api import sync_playwright

    url = (batch / "index.html").as_uri() if where == "file" else served
    blocked = []

    def guard(route):
        u = route.request.url
        if u.startswith(("file://", "blob:", "data:", "http://127.0.0.1:", "http://localhost:")):
            route.continue_()
        else:
            blocked.append(u)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.route("**/*", guard)
            page.goto(url)
            page.wait_for_function("[...document.querySelectorAll('model-viewer')].every(m => m.loaded)",
                                   timeout=60_000)
            viewer = page.locator('model-viewer[data-run="torus"]')
            page.wait_for_timeout(500)  # the first frames after load fade the model in
            before = picture(viewer)
            page.screenshot(path=str(shots / f"gallery3d-{where}.png"), full_page=True)
            drag_from_centre(page, viewer, 80, 20)
            dragged = picture(viewer)
            viewer.evaluate("m => { m.cameraOrbit = '180deg 20deg auto'; m.jumpCameraToGoal(); }")
            page.wait_for_timeout(500)
            turned = picture(viewer)
            viewer.screenshot(path=str(shots / f"gallery3d-{where}-orbited.png"))
        finally:
            browser.close()
    assert blocked == [], f"the page asked the network for {blocked}"
    assert before.std(axis=(0, 1)).max() > 10, "the viewer drew nothing"
    assert np.abs(dragged - before).mean() > 1, "a drag did not orbit the mesh"
    assert np.abs(turned - dragged).mean() > 1, "setting cameraOrbit did not move the camera"
