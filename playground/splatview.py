"""Splat runs in the viewer: the browser draws them (viser's Gaussian splats, sorted and blended in WebGL), so the
server renders no frame of them.

`splat_cloud` turns a frozen copy of a splat field (`Snapshot`, copied under the session lock by the session
thread) into numpy arrays viser sends: centres, covariances, opacities and one colour per Gaussian, baked for
the client's render mode. The lit modes use the engine's shading with the engine's per-Gaussian normal
(`SplatField.normals`: the shortest axis, turned towards the camera) and the light a frame of the field gets
(`RenderSource`: at the camera unless the live light is fixed):

    lambertian:  c = albedo * (light_colour * max(0, n . l) + ambient);  textureless: albedo := 1

`SplatLayer` is one browser's splat nodes (one per splat run, by run name), each re-sent at most every
`refresh_s` while its run trains (a fresh copy, another mode, light or camera) and moved, as the camera moves,
to where the frame of the other run leaves room for it (a fork: A's NeRF frame in the left half of the canvas,
B's splats in the right half; `beside`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from engine.cameras import spherical
from engine.config import LiveParams
from engine.shading import shade

MAX_SENT = 8192  # Gaussians sent to a browser at most: the most opaque ones of a larger field
PLAIN = 255  # grey level of a fork frame's strip where the browser draws a run's splats
REFRESH_S = 0.25  # a training splat run's colours and shapes are re-sent at most this often (4 per second)


def light_position(live: LiveParams, eye: torch.Tensor) -> torch.Tensor:
    """The light of a view for people: the live fixed light, else at the camera `eye` [3]."""
    if live.light_mode != "fixed":
        return eye
    one = torch.ones(1)
    return spherical(one * live.light_azimuth, one * live.light_elevation, one * live.light_distance)[0]


@torch.no_grad()
def splat_cloud(field, mode: str, *, eye, live: LiveParams | None = None, max_count: int = MAX_SENT) -> dict:
    """A splat field as viser's `add_gaussian_splats` takes it: {"centers" [N, 3], "covariances" [N, 3, 3],
    "rgbs" [N, 3], "opacities" [N, 1]}, float32 numpy, N <= max_count. `mode`: a render mode of the viewer
    (lambertian, albedo, textureless, normal, depth, opacity); `eye`: the camera's position [3] (world)."""
    live = live or LiveParams()
    keep = None
    if len(field) > max_count:  # the most opaque ones: the others add least to what is seen
        keep = field.opacities.detach().float().cpu().topk(max_count).indices
    pick = (lambda t: t) if keep is None else (lambda t: t.index_select(0, keep.to(t.device)))
    means = pick(field.means.detach().float()).cpu()
    albedo = pick(field.albedo.detach().float()).cpu()
    eye_t = torch.as_tensor(np.asarray(eye, dtype=np.float32)).view(3)
    if mode in ("lambertian", "textureless", "normal"):
        normal = pick(field.normals(eye_t[None].to(field.means.device))[0].float()).cpu()
        rgb = shade(mode, albedo, normal, means, light_pos=light_position(live, eye_t),
                    light_color=torch.tensor(live.light_color, dtype=torch.float32),
                    ambient=torch.tensor([float(live.ambient)]))
    elif mode == "depth":  # near bright, far dark over the field's radius, as the NeRF's depth frames
        dist = (means - eye_t).norm(dim=-1, keepdim=True)
        near, radius = eye_t.norm() - field.cfg.radius, field.cfg.radius
        rgb = (1.0 - (dist - near) / (2 * radius)).expand(-1, 3)
    elif mode == "opacity":
        rgb = torch.ones_like(albedo)
    else:
        rgb = albedo
    cov = pick(field.covariances().detach().float()).cpu()
    opacity = pick(field.opacities.detach().float()).cpu()[:, None]
    return {"centers": means.numpy(), "covariances": cov.numpy(), "rgbs": rgb.clamp(0, 1).numpy(),
            "opacities": opacity.numpy()}


def beside(position, wxyz, fov: float, aspect: float, index: int, count: int) -> np.ndarray:
    """Where to place a run's splats so that, seen from this camera, they sit at the centre of the `index`-th
    of `count` equal vertical strips of the canvas, as a frame of side-by-side halves shows each run (a NeRF
    half is rendered with the camera's own axis at its centre). A world offset along the camera's right axis:
    depth of the origin x tan(fov / 2) x aspect x (2 index + 1 - count) / count."""
    if count <= 1:
        return np.zeros(3)
    w, x, y, z = (float(v) for v in wxyz)
    right = np.array([1 - 2 * (y * y + z * z), 2 * (x * y + w * z), 2 * (x * z - w * y)])  # R[:, 0] (OpenCV x)
    forward = np.array([2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)])  # R[:, 2]
    depth = max(float(-forward @ np.asarray(position, dtype=np.float64)), 0.1)
    shift = depth * math.tan(fov / 2) * (aspect if math.isfinite(aspect) and aspect > 0 else 1.0)
    return right * shift * (2 * index + 1 - count) / count


class SplatLayer:
    """One browser's splat nodes: {run name: viser handle}, added, refreshed, moved and removed here only."""

    def __init__(self, scene, refresh_s: float = REFRESH_S):
        self.scene, self.refresh_s = scene, refresh_s  # scene: the client's (`client.scene`)
        self.handles: dict = {}  # run name -> GaussianSplatHandle
        self.sent: dict = {}  # run name -> (what its colours were baked from, when)
        self.sends = 0  # Gaussian buffers sent to this browser (added or refreshed)
        self.hidden = False  # whether the browser's background frame was taken away (a splat run alone)
        self.view_stamp = -1  # the camera stamp of the last view at rest published for snapshots

    def view_due(self, stamp: int) -> bool:
        """Whether the view at rest of camera stamp `stamp` is yet to be published (once per stamp)."""
        due, self.view_stamp = stamp != self.view_stamp, stamp
        return due

    def hide_frame(self) -> None:
        """Take the server's frame away (once): the browser's splats are what is seen."""
        if not self.hidden:
            self.scene.set_background_image(None)
            self.hidden = True

    def keep(self, names) -> None:
        """Remove the nodes of runs no longer shown as splats (a closed fork, a reset to a NeRF)."""
        for name in [n for n in self.handles if n not in names]:
            self.handles.pop(name).remove()
            self.sent.pop(name, None)

    def show(self, name: str, snap, live: LiveParams, mode: str, *, eye, position, now: float) -> bool:
        """Add or refresh run `name`'s node from its frozen copy `snap`, if what it shows changed and `refresh_s`
        has passed (at once for a new node or another mode); move it to `position`. True when Gaussians were sent."""
        handle, (was, at) = self.handles.get(name), self.sent.get(name, (None, -math.inf))
        light = (live.light_mode, live.light_azimuth, live.light_elevation, live.light_distance,
                 tuple(live.light_color), live.ambient)
        view = tuple(np.round(np.asarray(eye, dtype=np.float64), 2)) if mode != "albedo" else None
        what = (snap.key, mode, light, view)
        due = handle is None or was[1] != mode or (what != was and now - at >= self.refresh_s)
        if due:
            cloud = splat_cloud(snap.source.field, mode, eye=eye, live=live)
            if handle is None:
                handle = self.scene.add_gaussian_splats(f"/splats/{name}", **cloud, position=tuple(position))
                self.handles[name] = handle
            else:
                handle.set_gaussians(**cloud)
            self.sent[name], self.sends = (what, now), self.sends + 1
        if np.abs(np.subtract(handle.position, position)).max() > 1e-4:
            handle.position = tuple(float(v) for v in position)
        return due
