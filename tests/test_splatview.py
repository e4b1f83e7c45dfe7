"""Splat runs in the viewer: the Gaussians baked for viser (lit as the engine shades them), one browser's splat
node added and refreshed while a real session trains (a real viser server's scene; a stand-in camera, no
browser), and a fork of a NeRF and splats laid out side by side, labelled."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import viser
import viser.transforms as vtf

from engine.config import FieldConfig, LiveParams, SplatConfig
from engine.splats import SplatField
from engine.testing import tiny_config, tiny_live, wait_for
from playground import viewer as vw
from playground.session import Session
from playground.splatview import beside, splat_cloud


def flat_field(n: int = 6) -> SplatField:
    """n flat Gaussians in a row along x, each facing +z (its shortest axis), coloured, of rising opacity."""
    field = SplatField(FieldConfig(), SplatConfig(), n)
    means = torch.stack([torch.linspace(-0.5, 0.5, n), torch.zeros(n), torch.zeros(n)], -1)
    albedo = torch.tensor([[0.9, 0.2, 0.1]]).repeat(n, 1)
    return field.set_gaussians(means=means, scales=torch.tensor([[0.1, 0.1, 0.01]]).repeat(n, 1), albedo=albedo,
                               opacities=torch.linspace(0.2, 0.9, n))


def test_splats_are_baked_lit_as_the_engine_shades_them():
    field, eye = flat_field(), np.array([0.0, 0.0, 3.0])
    live = LiveParams(light_mode="fixed", light_azimuth=0.0, light_elevation=45.0, light_distance=3.0, ambient=0.1,
                      light_color=(1.0, 0.8, 0.6))
    albedo = splat_cloud(field, "albedo", eye=eye, live=live)
    assert {k: v.shape for k, v in albedo.items()} == {"centers": (6, 3), "covariances": (6, 3, 3), "rgbs": (6, 3),
                                                       "opacities": (6, 1)}
    assert all(v.dtype == np.float32 for v in albedo.values())
    np.testing.assert_allclose(albedo["rgbs"], field.albedo.detach().numpy(), atol=1e-6)
    lit = splat_cloud(field, "lambertian", eye=eye, live=live)
    # by hand for the Gaussian at x = -0.5: normal +z (turned to the camera), light at 45° elevation over +x
    light = 3.0 * np.array([math.cos(math.pi / 4), 0.0, math.sin(math.pi / 4)])
    to_light = light - np.array([-0.5, 0.0, 0.0])
    diffuse = max(0.0, to_light[2] / np.linalg.norm(to_light))
    np.testing.assert_allclose(lit["rgbs"][0], np.array([0.9, 0.2, 0.1]) * (np.array([1.0, 0.8, 0.6]) * diffuse + 0.1),
                               atol=1e-5)
    assert np.abs(lit["rgbs"] - albedo["rgbs"]).max() > 0.05, "lit colours differ from the albedo"
    white = splat_cloud(field, "textureless", eye=eye, live=live)["rgbs"]
    np.testing.assert_allclose(white * albedo["rgbs"], lit["rgbs"], atol=1e-6)  # albedo := 1
    at_camera = splat_cloud(field, "lambertian", eye=eye, live=live.replace(light_mode="camera"))["rgbs"]
    assert at_camera[0, 0] > lit["rgbs"][0, 0], "the light at the camera faces these Gaussians more squarely"
    few = splat_cloud(field, "albedo", eye=eye, max_count=2)
    np.testing.assert_allclose(np.sort(few["opacities"][:, 0]), [0.76, 0.9], atol=1e-5)  # the most opaque ones


def look_at(position) -> np.ndarray:
    """A viser camera orientation (OpenCV axes, wxyz) at `position` looking at the origin, z up."""
    forward = -np.asarray(position, dtype=np.float64) / np.linalg.norm(position)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    return vtf.SO3.from_matrix(np.stack([right, np.cross(forward, right), forward], 1)).wxyz


def test_beside_places_a_run_in_its_strip_of_the_canvas():
    pos, fov, aspect = np.array([3.0, 0.0, 0.0]), 0.8, 2.0
    wxyz = look_at(pos)
    assert np.allclose(beside(pos, wxyz, fov, aspect, 0, 1), 0.0)
    left, right = beside(pos, wxyz, fov, aspect, 0, 2), beside(pos, wxyz, fov, aspect, 1, 2)
    np.testing.assert_allclose(left, -right)
    # seen from the camera, B's centre projects to the centre of the right half: x = W / 4 from the middle
    c2w = vw.viser_to_c2w(pos, wxyz)
    cam = np.linalg.inv(c2w) @ np.append(right, 1.0)  # OpenGL camera axes: x right, z backwards
    f_px = 0.5 / math.tan(fov / 2)  # in units of the canvas height
    assert f_px * cam[0] / -cam[2] == pytest.approx(aspect / 4, rel=1e-6)


class Handle:
    def __init__(self, value=None):
        self.value, self.content = value, ""

    def on_update(self, fn):
        self.fn = fn


class Client:
    """A browser's stand-in: its camera and GUI; its scene is a real viser server's, and frames are recorded."""

    def __init__(self, scene):
        self.client_id, self.frames = 1, []
        self.gui = types.SimpleNamespace(add_dropdown=lambda label, options, initial_value: Handle(initial_value),
                                         add_markdown=lambda text: Handle())
        pos = np.array([2.5, 0.8, 1.0])
        self.camera = types.SimpleNamespace(aspect=4 / 3, fov=0.8, position=pos, wxyz=look_at(pos), image_height=240,
                                            image_width=320, on_update=lambda fn: None)
        self.scene = types.SimpleNamespace(add_gaussian_splats=scene.add_gaussian_splats,
                                           set_background_image=lambda frame, **kw: self.frames.append(frame))


@pytest.fixture
def server(free_port):
    s = viser.ViserServer(host="127.0.0.1", port=free_port, verbose=False)
    yield s
    s.stop()


@pytest.fixture
def watched(server, tmp_path):
    """(session, renderer, client): a tiny oracle session and one viewer client's renderer thread watching it."""
    session = Session(tiny_config("oracle:cube"), tiny_live(prompt="a red cube"), out_root=tmp_path, score_every_s=0)
    viewer = types.SimpleNamespace(session=session, low_res=32, full_res=128, low_samples=8, full_samples=8,
                                   still_s=0.0, refresh_s=0.2, refresh_factor=1.0, jpeg_quality=80, rest_budget_s=0.2,
                                   sync_scene=lambda: None)
    client = Client(server.scene)
    renderer = vw.ClientRenderer(viewer, client)
    yield session, renderer, client
    renderer.stop()
    renderer.thread.join(10)
    session.stop()


def node_rgbs(renderer, name="A") -> np.ndarray:
    return np.array(renderer.splats.handles[name].rgbs, dtype=np.float32) / 255


def test_a_splat_run_is_drawn_by_the_browser_and_refreshed_while_it_trains(watched):
    session, r, client = watched
    session.next_run({"field.backbone": "gaussians"})
    session.start()
    wait_for(lambda: "A" in r.splats.handles, what="the splat node")
    assert client.frames[-1:] == [None], "no server frame behind the browser's splats"
    wait_for(lambda: session.worker.view is not None, what="the view at rest, for snapshots")
    assert session.worker.view[1:] == (240, 320)
    field = session.a.trainer.field
    handle = r.splats.handles["A"]
    assert handle.buffer.shape[0] == len(field)
    sends, step = r.splats.sends, session.step
    wait_for(lambda: r.splats.sends >= sends + 3, what="refreshes while training")
    assert session.step > step and handle.buffer.shape[0] == len(session.a.trainer.field)
    session.pause()
    session.wait_idle_queue()
    snap = session.render_source()
    wait_for(lambda: r.splats.sent["A"][0][0] == snap.key, what="the last step's Gaussians")
    albedo = snap.source.field.albedo.numpy()
    assert np.abs(node_rgbs(r) - albedo).max() > 0.05, "shaded: lit colours, not the albedo"
    r.mode.value = "albedo"
    wait_for(lambda: np.abs(node_rgbs(r) - albedo).max() < 0.01, what="albedo colours")
    assert "step" in r.info.content and "in the browser" in r.info.content


def test_a_fork_as_splats_shows_the_nerf_frame_beside_the_labelled_splats(watched):
    session, r, client = watched
    session.start()
    wait_for(lambda: session.step >= 4, what="run A's steps")
    session.fork(backbone="gaussians")
    wait_for(lambda: "B" in r.splats.handles and "B splats step" in r.info.content, what="B's splats beside A")
    assert "A NeRF step" in r.info.content and "A" not in r.splats.handles
    wait_for(lambda: client.frames[-1] is not None and client.frames[-1].shape[1] >= 100, what="a frame of both halves")
    frame = client.frames[-1]
    h, w, _ = frame.shape
    assert (frame[: h // 2, w // 2:] == vw.PLAIN).all(), "B's half is left to the browser's splats"
    cam = client.camera
    right = vtf.SO3(cam.wxyz).as_matrix()[:, 0]
    assert float(np.asarray(r.splats.handles["B"].position) @ right) > 0.2, "B's splats sit in the right half"
    session.close_fork()
    wait_for(lambda: not r.splats.handles, what="B's node removed with the fork")
