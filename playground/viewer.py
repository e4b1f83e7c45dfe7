"""The viser viewer: every browser sees the live field from its own camera, on its own render thread.

Each client's thread follows a small transition table (nerfstudio's render state machine, nerfview's
renderer): while the camera moves it sends low-resolution frames as fast as they render; once the
camera has rested for `still_s` it sends a frame at rest, sized to the browser's canvas (up to `full_res`)
as far as the last rest frame's cost says fits `rest_budget_s`, and refines it once when the first one came
out smaller; while training runs it refreshes that frame when the field has changed, at most as often as
keeps the viewer's share of the CPU small. While a fork is open the frame shows run A and run B side by
side from the same camera, each half the width, labelled. The browser draws a run of Gaussian splats itself
(splatview.py): no frame of it is sent; in a fork of a NeRF and splats B's half of the frame is plain, and B's
splats are placed, as the camera moves, where they appear in that half. Frames are rendered from a frozen
copy of the field (`Session.render_source`) under `torch.no_grad()`. A render error is logged and shown in the
viewer's panel; the thread goes on. An out-of-memory error (CUDA) halves that client's frame size instead (down
to MIN_SIDE pixels): training keeps its memory and goes on.
The point light is a gizmo the user can drag; it sets the fixed light the pane's controls show.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time

import numpy as np
import torch
import viser
import viser.transforms as vtf
from PIL import Image, ImageDraw, ImageFont

from engine.cameras import camera_from_c2w
from engine.export import to_uint8
from playground.session import Session
from playground.snapshot import RENDER_MODES
from playground.splatview import PLAIN, SplatLayer, beside

log = logging.getLogger(__name__)
MODE_LABELS = {"shaded": "lambertian", "albedo": "albedo", "normals": "normal", "textureless": "textureless",
               "depth": "depth", "opacity": "opacity"}
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])  # flip y and z: viser looks down +z with y down
assert set(MODE_LABELS.values()) == set(RENDER_MODES)
MIN_SIDE = 32  # smallest long side the out-of-memory fallback goes down to
FIRST_REST = 256  # long side of the first frame at rest, before any cost is known


def rest_side(*, last_side: int, last_cost: float, budget_s: float, canvas: int, cap: int, floor: int) -> int:
    """Long side of the next frame at rest: the canvas's, up to `cap`, as far as the budget allows.

    A frame's cost grows with its pixels, so the side that fits `budget_s` is last_side * sqrt(budget / cost);
    it is at most doubled at once, rounded to 16 px and kept in [floor, min(canvas, cap)].
    """
    limit = max(floor, min(cap, canvas or cap))
    if last_side <= 0 or last_cost <= 0:
        return max(floor, min(limit, FIRST_REST))
    side = min(last_side * math.sqrt(budget_s / last_cost), 2 * last_side)
    return max(floor, min(limit, int(side) // 16 * 16))


def label_box(height: int, width: int, text: str) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in pixels of the label `label` draws on a frame of this size: bottom centre, clear of
    viser's notices (top left), its axes gizmo (bottom left) and its control panel (docked right, beside the
    canvas)."""
    font = ImageFont.load_default(size=label_size(height))
    x0, y0, x1, y1 = ImageDraw.Draw(Image.new("RGB", (8, 8))).textbbox((0, 0), text, font=font)
    w, h, pad = x1 - x0 + 8, y1 - y0 + 6, label_size(height) // 2
    return (width - w) // 2, height - pad - h, (width - w) // 2 + w, height - pad


def label_size(height: int) -> int:
    """The label's font size: about 4 % of the frame's height (18 px on a 450-px canvas), at least 12."""
    return max(12, height // 24)


def label(frame: np.ndarray, text: str) -> np.ndarray:
    """The frame with `text` in a dark box at its bottom centre (names the run of each half)."""
    img = Image.fromarray(frame)
    x0, y0, x1, y1 = label_box(frame.shape[0], frame.shape[1], text)
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=label_size(frame.shape[0]))
    draw.rectangle((x0, y0, x1, y1), fill=(20, 20, 20))
    tx0, ty0, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.text((x0 + 4 - tx0, y0 + 3 - ty0), text, fill=(255, 255, 255), font=font)
    return np.asarray(img)


def quat_to_matrix(wxyz) -> np.ndarray:
    w, x, y, z = (float(v) for v in wxyz)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def viser_to_c2w(position, wxyz) -> np.ndarray:
    """A viser camera (OpenCV axes) as the engine's camera-to-world (OpenGL axes, z up)."""
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = quat_to_matrix(wxyz), np.asarray(position, dtype=np.float64)
    return c2w @ OPENCV_TO_OPENGL


def frame_size(long_side: int, aspect: float) -> tuple[int, int]:
    """(H, W) with the given long side and aspect = W / H."""
    aspect = aspect if math.isfinite(aspect) and aspect > 0 else 1.0
    if aspect >= 1:
        return max(8, round(long_side / aspect)), long_side
    return long_side, max(8, round(long_side * aspect))


def spherical_of(p) -> tuple[float, float, float]:
    """(azimuth, elevation, distance) of a point, degrees, z up."""
    x, y, z = (float(v) for v in p)
    r = max(math.sqrt(x * x + y * y + z * z), 1e-6)
    return math.degrees(math.atan2(y, x)), math.degrees(math.asin(max(-1.0, min(1.0, z / r)))), r


def point_of(az: float, el: float, dist: float) -> tuple[float, float, float]:
    a, e = math.radians(az), math.radians(el)
    return (dist * math.cos(e) * math.cos(a), dist * math.cos(e) * math.sin(a), dist * math.sin(e))


class ClientRenderer:
    """One browser: its camera, its render mode and its render thread."""

    def __init__(self, viewer: Viewer, client: viser.ClientHandle):
        self.viewer, self.client, self.session = viewer, client, viewer.session
        self.moved_at = 0.0  # when the camera last changed
        self.sent: tuple | None = None  # (camera stamp, snapshot keys, mode, kind, long side) of the last frame sent
        self.full_at, self.full_cost, self.full_side = 0.0, 0.0, 0  # the last frame at rest: when, its cost, its side
        self.frames, self.last_frame_s = 0, 0.0
        self.scale = 1.0  # frame-size factor, halved on each out-of-memory error
        self.errors = 0  # render errors shown to this client (out-of-memory ones included)
        self.log: collections.deque = collections.deque(maxlen=2000)  # (sent at, long side, render s) per frame
        self._stamp = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.splats = SplatLayer(client.scene)  # this browser's splat nodes, one per splat run
        self.mode = client.gui.add_dropdown("Render mode", tuple(MODE_LABELS), initial_value="shaded")
        self.info = client.gui.add_markdown("connecting…")
        self.mode.on_update(lambda _: self._wake.set())
        client.camera.on_update(lambda _: self.on_move())
        self.thread = threading.Thread(target=self._loop, name=f"viewer-{client.client_id}", daemon=True)
        self.thread.start()

    def on_move(self) -> None:
        self.moved_at, self._stamp = time.perf_counter(), self._stamp + 1
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # -- the transition table: what to render next, if anything -----------------------------------------
    def _next_job(self, now: float, snap_key) -> str | None:
        """"low" (moving), "rest" (at rest: a new view or mode, a refinement, a changed field) or None."""
        cfg, mode, sent = self.viewer, self.mode.value, self.sent
        if now - self.moved_at < cfg.still_s:  # moving: a low-resolution frame of every new camera
            return "low" if sent is None or sent[0] != self._stamp else None
        if sent is None or sent[0] != self._stamp or sent[2] != mode or sent[3] != "rest":
            return "rest"  # camera came to rest (or mode changed)
        if sent[4] < 0.8 * self.rest_side():
            return "rest"  # the first frame at rest was cheap: refine it once to the canvas's size
        if sent[1] != snap_key and now - self.full_at >= max(cfg.refresh_s, cfg.refresh_factor * self.full_cost):
            return "rest"  # the field changed: refresh, keeping the viewer's share of the CPU small
        return None

    def canvas_side(self) -> int:
        """The long side of the browser's canvas in pixels (0 until the browser has reported it)."""
        try:
            return int(max(self.client.camera.image_width, self.client.camera.image_height))
        except (AssertionError, AttributeError, TypeError, ValueError):
            return 0

    def rest_side(self) -> int:
        cfg = self.viewer
        return rest_side(last_side=self.full_side, last_cost=self.full_cost, budget_s=cfg.rest_budget_s,
                         canvas=self.canvas_side(), cap=cfg.full_res, floor=cfg.low_res)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=0.1)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.render_safely()

    def render_safely(self) -> None:
        """One turn of the loop; errors are reported to this client and never leave the thread."""
        try:
            self._render_once()
        except torch.OutOfMemoryError:
            self._out_of_memory()
        except Exception as err:  # shown in the viewer; the thread and the app go on
            self.errors += 1
            log.exception("viewer render failed")
            self.info.content = f"**render error:** {type(err).__name__}: {err}"
            time.sleep(0.5)

    def _out_of_memory(self) -> None:
        """Halve this client's frame size and try again; training's memory is left alone."""
        self.errors += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        side = round((self.full_side or self.viewer.full_res) * self.scale)
        if side <= MIN_SIDE:
            log.error("viewer out of memory even at %d px", side)
            self.info.content = f"**out of memory** even at {side} px: close other viewers or pause training"
            time.sleep(1.0)
            return
        self.scale /= 2
        log.warning("viewer out of memory: frames now at %.0f %% size", 100 * self.scale)
        self.info.content = f"**out of memory:** frames lowered to {round(side / 2)} px"
        self.sent = None  # render the current view again at the new size
        self._wake.set()

    def _render_once(self) -> None:
        self.viewer.sync_scene()
        sources = self.session.render_sources()  # [(name, snapshot, live)]: A, and B while forked
        splat_runs = [name for name, snap, _ in sources if getattr(snap, "rasterized", False)]
        self.splats.keep(splat_runs)
        if not sources:
            self.info.content = f"**{self.session.state}** · no field yet: press Start in the pane"
            return
        now, mode, cam = time.perf_counter(), self.mode.value, self.client.camera
        if splat_runs:
            self._show_splats(sources, now)
        if len(sources) == 1 and splat_runs:  # the browser draws the run: no frame behind it
            self.sent = self.splats.hide_frame()
            if now - self.moved_at >= self.viewer.still_s and self.splats.view_due(self._stamp):  # what snapshots show
                self._publish_view(torch.from_numpy(viser_to_c2w(cam.position, cam.wxyz)).float(), cam)
            self.info.content = f"**{self.session.state}** · {self._steps(sources)} · {mode} in the browser"
            return
        keys = (tuple(snap.key for name, snap, _ in sources if name not in splat_runs), tuple(splat_runs))
        job = self._next_job(now, keys)
        if job is None:
            return
        side = self.viewer.low_res if job == "low" else self.rest_side()
        stamp = self._stamp
        H, W = frame_size(max(MIN_SIDE, round(side * self.scale)), cam.aspect)
        c2w = torch.from_numpy(viser_to_c2w(cam.position, cam.wxyz)).float()
        t0 = time.perf_counter()
        halves, w = [], W // len(sources)  # side by side: each run gets its share of the width, same camera
        for name, snap, live in sources:
            frame = self._half(snap, live, c2w, H, w, plain=name in splat_runs, job=job)
            halves.append(label(frame, self._label(name, snap, sources)) if len(sources) > 1 and job == "rest"
                          else frame)  # labelled at rest only: on a small moving frame a label is a blur
        frame = halves[0] if len(halves) == 1 else np.concatenate(halves, axis=1)
        self._send(frame)
        cost = time.perf_counter() - t0
        self.sent, self.frames, self.last_frame_s = (stamp, keys, mode, job, side), self.frames + 1, cost
        self.log.append((time.perf_counter(), side, cost))
        if job == "rest":
            self.full_at, self.full_cost, self.full_side = time.perf_counter(), cost, side
            self._publish_view(c2w, cam)
        else:
            self._wake.set()  # keep going while the camera moves; the rest frame follows
        size = f"{frame.shape[1]}×{frame.shape[0]}"
        self.info.content = f"**{self.session.state}** · {self._steps(sources)} · {size} {mode} in {1e3 * cost:.0f} ms"

    def _half(self, snap, live, c2w: torch.Tensor, H: int, w: int, *, plain: bool, job: str) -> np.ndarray:
        """One run's share of the frame [H, w, 3]: its NeRF from the camera, or plain where the browser draws splats."""
        if plain:
            return np.full((H, w, 3), PLAIN, dtype=np.uint8)
        focal = (0.5 / math.tan(self.client.camera.fov / 2)) * H / w  # engine focal is in units of the image width
        samples = self.viewer.low_samples if job == "low" else self.viewer.full_samples
        with torch.no_grad():
            img = snap.render(camera_from_c2w(c2w, focal), H, w, MODE_LABELS[self.mode.value], live=live,
                              samples=samples)
        return to_uint8(img)[0]

    def _show_splats(self, sources, now: float) -> None:
        cam = self.client.camera  # each splat run's node: added, refreshed, placed in its strip of a fork's frame
        for i, (name, snap, live) in enumerate(sources):
            if getattr(snap, "rasterized", False):
                place = beside(cam.position, cam.wxyz, cam.fov, cam.aspect, i, len(sources))
                self.splats.show(name, snap, live, MODE_LABELS[self.mode.value], eye=cam.position, position=place,
                                 now=now)

    @staticmethod
    def _label(name: str, snap, sources) -> str:
        """A half's label: the run's name, and its kind of field when the fork shows both kinds."""
        kinds = {getattr(s, "rasterized", False) for _, s, _ in sources}
        return f"{name} · {'splats' if getattr(snap, 'rasterized', False) else 'NeRF'}" if len(kinds) > 1 else name

    def _steps(self, sources) -> str:
        """"step 12", or per run "A step 12 · B step 12" ("A NeRF step 12 · B splats step 12" for both kinds)."""
        one = len(sources) == 1
        return " · ".join(f"{'' if one else self._label(n, snap, sources).replace(' · ', ' ') + ' '}step {snap.step}"
                          for n, snap, _ in sources)

    def _publish_view(self, c2w: torch.Tensor, cam) -> None:
        """This view at the canvas's size in device pixels (not the frame's, which the CPU budget may keep
        smaller): what a snapshot shows."""
        h, w = int(cam.image_height or 0), int(cam.image_width or 0)
        if h >= 16 and w >= 16:
            scale = min(1.0, 2048 / max(h, w))  # the engine's largest image
            h, w = max(16, round(h * scale)), max(16, round(w * scale))
            self.session.set_view(camera_from_c2w(c2w, (0.5 / math.tan(cam.fov / 2)) * h / w), h, w)

    def _send(self, frame: np.ndarray) -> None:
        self.client.scene.set_background_image(frame, format="jpeg", jpeg_quality=self.viewer.jpeg_quality)
        self.splats.hidden = False


class Viewer:
    """A viser server showing the session's field; `url` is where a browser opens it."""

    def __init__(self, session: Session, *, host: str = "127.0.0.1", port: int = 8080, low_res: int = 64,
                 full_res: int | None = None, rest_budget_s: float | None = None, low_samples: int = 24,
                 full_samples: int = 32, still_s: float = 0.2, refresh_s: float = 1.0, refresh_factor: float = 4.0,
                 jpeg_quality: int = 85, show_training_cameras: bool = False):
        """low_res: long side of frames while the camera moves; full_res: the largest long side at rest (default
        4096: frames at rest match the browser's canvas in device pixels, as far as their render time stays within
        rest_budget_s (default 0.35 s on a CPU, 0.15 s on a GPU); *_samples: samples
        per ray of each (32 samples step about one cell of the 32^3 grid); a frame at rest is refreshed as the
        field changes, at most every max(refresh_s, refresh_factor x its render time)."""
        gpu = str(session.device).startswith("cuda")
        full_res = full_res or 4096
        self.rest_budget_s = rest_budget_s or (0.15 if gpu else 0.35)
        self.session, self.low_res, self.full_res, self.still_s = session, low_res, full_res, still_s
        self.low_samples, self.full_samples = low_samples, full_samples
        self.refresh_s, self.refresh_factor, self.jpeg_quality = refresh_s, refresh_factor, jpeg_quality
        self.server = viser.ViserServer(host=host, port=port, label="DreamFusion Playground", verbose=False)
        self.port = self.server.get_port()
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self.port}"
        self.clients: dict[int, ClientRenderer] = {}
        self._retired: list[ClientRenderer] = []  # stopped on disconnect; joined on stop()
        self.server.gui.main_panel.dock_right()  # beside the canvas, not over the frame and its labels
        scene = self.server.scene
        scene.set_up_direction("+z")
        self.server.initial_camera.position = (2.6, 1.2, 1.2)
        self.server.initial_camera.look_at = (0.0, 0.0, 0.0)
        self.server.initial_camera.up = (0.0, 0.0, 1.0)
        live = session.a.live
        self.light = scene.add_transform_controls(
            "/light", scale=0.35, disable_rotations=True,
            position=point_of(live.light_azimuth, live.light_elevation, live.light_distance))
        scene.add_icosphere("/light/bulb", radius=0.06, color=(255, 220, 80))
        self.light.on_update(lambda _: self._light_moved())
        self.frustums = self.server.gui.add_checkbox("Show training cameras", show_training_cameras)
        self._frustum_handles: list = []
        self._frustums_at, self._dragged_at = 0.0, 0.0
        self._scene_mu = threading.Lock()
        self.server.on_client_connect(self._connect)
        self.server.on_client_disconnect(self._disconnect)

    def _connect(self, client: viser.ClientHandle) -> None:
        self.clients[client.client_id] = ClientRenderer(self, client)

    def _disconnect(self, client: viser.ClientHandle) -> None:
        r = self.clients.pop(client.client_id, None)
        if r is not None:
            r.stop()
            self._retired = [x for x in self._retired if x.thread.is_alive()] + [r]

    def _light_moved(self) -> None:
        self._dragged_at = time.perf_counter()
        az, el, dist = spherical_of(self.light.position)
        try:
            self.session.set_params(light_mode="fixed", light_azimuth=round(az, 2), light_elevation=round(el, 2),
                                    light_distance=round(min(max(dist, 0.5), 100.0), 3))
        except ValueError as err:
            log.warning("light gizmo: %s", err)
        for r in list(self.clients.values()):
            r._wake.set()

    def sync_scene(self) -> None:
        """Move the light gizmo to the light the pane set, and draw the recent training cameras if asked."""
        with self._scene_mu:  # every client's thread calls this
            self._sync_scene()

    def _sync_scene(self) -> None:
        live, now = self.session.a.live, time.perf_counter()
        want = point_of(live.light_azimuth, live.light_elevation, live.light_distance)
        if now - self._dragged_at > 1.0 and np.abs(np.subtract(want, self.light.position)).max() > 1e-2:
            self.light.position = want
        cams = self.session.a.recent_cameras
        if not self.frustums.value:
            if self._frustum_handles:
                for h in self._frustum_handles:
                    h.remove()
                self._frustum_handles = []
            return
        if cams is None or now - self._frustums_at < 1.0:
            return
        self._frustums_at = now
        c2w, focal = cams
        for i in range(c2w.shape[0]):
            pose = c2w[i].double().numpy() @ OPENCV_TO_OPENGL  # back to viser's axes
            h = self.server.scene.add_camera_frustum(
                f"/training/camera_{i}", fov=2 * math.atan(0.5 / float(focal[i])), aspect=1.0, scale=0.15,
                color=(255, 120, 40), wxyz=vtf.SO3.from_matrix(pose[:3, :3]).wxyz, position=pose[:3, 3])
            if i >= len(self._frustum_handles):
                self._frustum_handles.append(h)

    def stop(self) -> None:
        renderers = list(self.clients.values()) + self._retired
        for r in renderers:
            r.stop()
        for r in renderers:
            r.thread.join(timeout=10)
        self.server.stop()
