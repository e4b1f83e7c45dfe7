"""The pane's textured mesh (playground/meshpane.py, the session's "textured" export): a UV-textured .glb of the
run's field at the asked budget; a bad budget refused in one line; an export overtaken by a reset refused, as
every export is; and in the launched app, the button shows the .glb in 3D (gr.Model3D) with a download.

Screenshots go to $PLAYGROUND_SCREENSHOTS (default: pytest's temporary folder)."""

from __future__ import annotations

import io
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from engine.config import LiveParams
from engine.testing import drag_from_centre, tiny_config, wait_for
from playground.meshpane import MeshPane
from playground.session import ExportRefused, Session
from playground.testing import app_client, trained

pytestmark = pytest.mark.usefixtures("rest_shared_app")  # the shared app pauses after this module


@pytest.fixture
def session(tmp_path):
    s = Session(tiny_config("oracle:cube"), LiveParams(steps=10_000), out_root=tmp_path)
    yield s
    s.stop()


def test_the_textured_export_writes_a_uv_textured_glb_at_the_budget(session):
    session.start()
    wait_for(lambda: session.step >= 20, timeout=120, what="training steps")
    path = Path(session.export("textured", faces=600, texture=128, resolution=64).result(timeout=120)["mesh"])
    assert re.fullmatch(r"mesh_textured-\d+\.glb", path.name) and path.parent.parent == session.worker.out_root
    mesh = trimesh.load(path, force="mesh", process=False)
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals) and 0 < len(mesh.faces) <= 600
    assert np.asarray(mesh.visual.material.baseColorTexture).shape[:2] == (128, 128)
    assert any(e.startswith("textured: ") and re.search(r"mesh_textured-\d+\.glb$", e) for e in session.status()["exports"])


@pytest.mark.parametrize(("budget", "message"), [
    (dict(faces=5), r"^face budget must be an integer in \[100, 2000000\]; got 5$"),
    (dict(texture=10_000), r"^texture size must be an integer in \[64, 4096\] texels; got 10000$"),
    (dict(faces=1500.5), r"^face budget must be an integer"),
])
def test_a_bad_budget_is_refused_in_one_line_before_anything_runs(session, budget, message):
    session.start()
    wait_for(lambda: session.step >= 1, what="a step")
    with pytest.raises(ValueError, match=message):
        session.export("textured", **budget)
    assert not list(session.worker.out_root.rglob("*.glb"))


def test_the_pane_handler_warns_on_a_bad_budget_and_an_idle_session(session):
    pane = MeshPane(session, {})
    assert pane.export(5.0, 1024.0)[1].startswith("⚠ face budget must be an integer in [100, 2000000]")
    assert pane.export(1000.0, 1024.0)[1] == "⚠ nothing to export yet: start a run first"


def test_a_textured_export_overtaken_by_a_reset_is_refused(session):
    session.start()
    wait_for(lambda: session.step >= 2, what="steps")
    gate = threading.Event()
    session.worker.submit(gate.wait, 30)  # the export queues behind this
    future = session.export("textured", faces=500, texture=64)
    session.reset()
    session.wait_idle_queue(30)
    gate.set()
    with pytest.raises(ExportRefused, match=r"^nothing was written: run A was reset .* before the textured began"):
        future.result(timeout=60)
    assert not list(session.worker.out_root.rglob("*.glb"))


def test_the_button_shows_the_textured_mesh_in_3d(playground_app, browser, shots, tmp_path):
    client = app_client(playground_app["url"])
    client.predict(api_name="/start")
    trained(playground_app, lambda st: st["step"] >= 20, what="training steps")
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(playground_app["url"], wait_until="domcontentloaded")
    page.locator("#prompt textarea").wait_for(timeout=60_000)
    faces = page.locator("#mesh_faces input")
    page.locator("#export_textured").wait_for(timeout=60_000)  # the Export section is open at first
    faces.fill("5")
    page.locator("#export_textured").click()
    page.get_by_text("face budget must be an integer in [100, 2000000]; got 5").first.wait_for(timeout=30_000)
    faces.fill("800")
    page.locator("#mesh_texture input").fill("128")
    page.locator("#export_textured").click()
    canvas = page.locator("#textured_model canvas")
    canvas.wait_for(timeout=120_000)
    page.wait_for_function("document.querySelector('#textured_note').innerText.includes('mesh_textured-')")
    before = drawn(canvas)  # each picture is taken once (a WebGL canvas is slow to shoot) and kept as a screenshot
    drag_from_centre(page, canvas, 90, 10)
    after = picture(canvas)
    for name, shot in (("pane-textured-mesh.png", before), ("pane-textured-mesh-orbited.png", after)):
        Image.fromarray(shot.astype(np.uint8)).save(shots / name)
    with page.expect_download(timeout=30_000) as download:
        page.locator("#textured_model").get_by_role("button", name="Download").click()
    download.value.save_as(tmp_path / "mesh.glb")
    page.close()
    mesh = trimesh.load(tmp_path / "mesh.glb", force="mesh", process=False)
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals) and 0 < len(mesh.faces) <= 800
    assert np.abs(after - before).mean() > 1, "a drag did not orbit the mesh"


def picture(locator) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB"), dtype=np.float32)


def drawn(locator, tries: int = 60) -> np.ndarray:
    """The component's picture once the mesh shows in it (Babylon loads after the canvas appears)."""
    for _ in range(tries):
        shot = picture(locator)
        if shot.std(axis=(0, 1)).max() > 10:
            return shot
        locator.page.wait_for_timeout(1000)
    raise AssertionError("the Model3D canvas stayed blank")
