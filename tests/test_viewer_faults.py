"""The viewer's render thread under faults: out of memory lowers the frame size, other errors are shown,
and training's session is never touched. Uses stand-ins for the viser client (no server, no browser)."""

from __future__ import annotations

import types

import numpy as np
import torch

from playground import viewer as vw


class _Handle:
    def __init__(self, value=None):
        self.value, self.content = value, ""

    def on_update(self, fn):
        self.fn = fn


class FakeClient:
    def __init__(self):
        self.client_id = 7
        self.frames: list[np.ndarray] = []
        self.gui = types.SimpleNamespace(add_dropdown=lambda label, options, initial_value: _Handle(initial_value),
                                         add_markdown=lambda text: _Handle())
        self.camera = types.SimpleNamespace(aspect=1.0, fov=0.8, position=np.array([2.5, 0.0, 0.5]), image_height=0,
                                            image_width=0,
                                            wxyz=np.array([1.0, 0.0, 0.0, 0.0]), on_update=lambda fn: None)
        self.scene = types.SimpleNamespace(set_background_image=lambda frame, **kw: self.frames.append(frame))


class FakeSnapshot:
    """Renders grey frames; frames with more than `limit` pixels raise out of memory (or `error`)."""

    def __init__(self, limit: int, error: Exception | None = None):
        self.key, self.step, self.limit, self.error, self.sizes = (1, 5), 5, limit, error, []

    def render(self, cams, H, W, mode, live, samples):
        self.sizes.append((H, W))
        if self.error is not None:
            raise self.error
        if H * W > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.full((1, 3, H, W), 0.5)


def make_renderer(snap):
    session = types.SimpleNamespace(render_sources=lambda: [("A", snap, None)], used=None, state="running",
                                    set_view=lambda *a: None, status=lambda: {"state": "running"})
    viewer = types.SimpleNamespace(session=session, low_res=64, full_res=256, low_samples=8, full_samples=8,
                                   still_s=0.0, refresh_s=1.0, refresh_factor=4.0, jpeg_quality=80,
                                   rest_budget_s=0.35, sync_scene=lambda: None)
    r = vw.ClientRenderer.__new__(vw.ClientRenderer)  # the real class, without starting its thread
    client = FakeClient()
    r.viewer, r.client, r.session = viewer, client, session
    r.moved_at, r.sent, r.full_at, r.full_cost, r.frames, r.last_frame_s = -10.0, None, 0.0, 0.0, 0, 0.0
    r.full_side = 0
    r.scale, r.errors, r._stamp = 1.0, 0, 0
    r.log = []
    r._wake, r._stop = types.SimpleNamespace(set=lambda: None), None
    r.mode, r.info = _Handle("shaded"), _Handle()
    r.splats = vw.SplatLayer(client.scene)  # no splat run here: it stays empty
    return r, client


def test_out_of_memory_halves_the_frame_until_it_fits():
    snap = FakeSnapshot(limit=70 * 70)  # 256 and 128 px frames do not fit; 64 px does
    r, client = make_renderer(snap)
    for _ in range(4):
        r.render_safely()
    assert snap.sizes[:3] == [(256, 256), (128, 128), (64, 64)]
    assert r.scale == 0.25 and r.errors == 2 and len(client.frames) >= 1
    assert client.frames[0].shape == (64, 64, 3)
    assert "step 5" in r.info.content  # the frame that fitted was sent and reported


def test_out_of_memory_at_the_smallest_size_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(vw.time, "sleep", lambda s: None)
    snap = FakeSnapshot(limit=0)  # nothing fits
    r, client = make_renderer(snap)
    for _ in range(8):
        r.render_safely()
    assert min(h for h, _ in snap.sizes) == vw.MIN_SIDE and not client.frames
    assert "out of memory" in r.info.content and "even at 32 px" in r.info.content


def test_other_render_errors_are_shown_and_the_loop_goes_on(monkeypatch):
    monkeypatch.setattr(vw.time, "sleep", lambda s: None)
    r, client = make_renderer(FakeSnapshot(limit=10**9, error=RuntimeError("bad field")))
    r.render_safely()
    r.render_safely()
    assert r.errors == 2 and "RuntimeError: bad field" in r.info.content and r.scale == 1.0


class ColourSnapshot(FakeSnapshot):
    """Renders a flat colour, so each half of a side-by-side frame can be told apart."""

    def __init__(self, colour, step):
        super().__init__(limit=10**9)
        self.colour, self.key, self.step = colour, (id(self), step), step

    def render(self, cams, H, W, mode, live, samples):
        self.sizes.append((H, W))
        return torch.tensor(self.colour).view(1, 3, 1, 1).expand(1, 3, H, W).clone()


def test_a_fork_is_shown_side_by_side_labelled_from_the_same_camera():
    a, b = ColourSnapshot((1.0, 0.0, 0.0), 7), ColourSnapshot((0.0, 0.0, 1.0), 8)
    r, client = make_renderer(a)
    r.session.render_sources = lambda: [("A", a, None), ("B", b, None)]
    r.render_safely()
    frame = client.frames[-1]
    assert frame.shape == (256, 256, 3) and a.sizes == [(256, 128)] and b.sizes == [(256, 128)]
    left, right = frame[128:, :128].reshape(-1, 3).mean(0), frame[128:, 128:].reshape(-1, 3).mean(0)
    assert left[0] > 200 > left[2] and right[2] > 200 > right[0]
    for name, x, base in (("A", 0, frame[20, 20]), ("B", 128, frame[20, 200])):  # bottom centre of each half
        x0, y0, x1, y1 = vw.label_box(256, 128, name)
        assert (frame[y0:y1, x + x0:x + x1] != base).any(axis=-1).sum() > 30, f"run {name}'s half carries its label"
    assert "A step 7 · B step 8" in r.info.content


def test_rest_frames_follow_the_canvas_within_the_render_budget():
    side = vw.rest_side
    assert side(last_side=0, last_cost=0.0, budget_s=0.35, canvas=900, cap=512, floor=64) == vw.FIRST_REST
    assert side(last_side=0, last_cost=0.0, budget_s=0.35, canvas=200, cap=512, floor=64) == 200
    # a cheap first frame: twice the side at most, then up to the canvas, never over the cap
    assert side(last_side=256, last_cost=0.02, budget_s=0.35, canvas=900, cap=512, floor=64) == 512
    assert side(last_side=256, last_cost=0.02, budget_s=0.35, canvas=400, cap=512, floor=64) == 400
    assert side(last_side=512, last_cost=0.01, budget_s=0.35, canvas=2000, cap=1024, floor=64) == 1024
    # a slow frame: the side that fits the budget (cost grows with the pixels)
    assert side(last_side=512, last_cost=1.4, budget_s=0.35, canvas=900, cap=512, floor=64) == 256
    assert side(last_side=128, last_cost=10.0, budget_s=0.35, canvas=900, cap=512, floor=64) == 64


def test_the_first_cheap_rest_frame_is_refined_to_the_canvas():
    snap = FakeSnapshot(limit=10**9)
    r, client = make_renderer(snap)
    r.viewer.full_res = 512
    r.client.camera.image_width, r.client.camera.image_height, r.client.camera.aspect = 640, 480, 640 / 480
    for _ in range(3):  # rest at 256 px (no cost known yet), refined once to the canvas (capped at 512), then idle
        r.render_safely()
    assert snap.sizes == [(192, 256), (384, 512)]
    assert client.frames[-1].shape == (384, 512, 3) and "512×384" in r.info.content
