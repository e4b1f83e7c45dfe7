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
        self.camera = types.SimpleNamespace(aspect=1.0, fov=0.8, position=np.array([2.5, 0.0, 0.5]),
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
                                    status=lambda: {"state": "running"})
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
