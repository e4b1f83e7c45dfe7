"""Cameras and lights: DreamFusion's random training views, orbits for videos, and pinhole rays.

Conventions: z is up; azimuth 0 puts the camera on +x looking at the object's front; cameras follow
OpenGL (x right, y up, looking down -z in camera space); `c2w` maps camera to world.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.config import CameraConfig, LiveParams
from engine.sds import view_weights


@dataclass
class Cameras:
    """A batch of pinhole cameras."""

    c2w: Tensor  # [B, 4, 4] camera-to-world
    focal: Tensor  # [B] focal length as a multiple of the image width
    azimuth: Tensor  # [B] degrees
    elevation: Tensor  # [B] degrees
    distance: Tensor  # [B] scene units

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def origins(self) -> Tensor:  # [B, 3]
        return self.c2w[:, :3, 3]

    def view_weights(self) -> Tensor:  # [B, 4]
        return view_weights(self.azimuth, self.elevation)

    def to(self, device) -> Cameras:
        return Cameras(*(getattr(self, k).to(device) for k in ("c2w", "focal", "azimuth", "elevation", "distance")))

    def rays(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Rays through pixel centres. Returns origins and unit directions, each [B, H, W, 3]."""
        dev, dt = self.c2w.device, self.c2w.dtype
        j, i = torch.meshgrid(torch.arange(height, device=dev, dtype=dt) + 0.5,
                              torch.arange(width, device=dev, dtype=dt) + 0.5, indexing="ij")
        f = (self.focal * width).view(-1, 1, 1)
        dirs = torch.stack([(i - width / 2) / f, -(j - height / 2) / f, -torch.ones_like(i).expand_as(f * i)], -1)
        d = torch.einsum("bij,bhwj->bhwi", self.c2w[:, :3, :3], dirs)
        d = d / d.norm(dim=-1, keepdim=True)
        o = self.c2w[:, None, None, :3, 3].expand_as(d)
        return o, d


def look_at(eye: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """Camera-to-world matrices [B, 4, 4] for cameras at eye [B, 3] looking at target [B, 3]."""
    back = eye - target  # camera looks down -z, so +z points away from the target
    back = back / back.norm(dim=-1, keepdim=True)
    right = torch.cross(up, back, dim=-1)
    # straight overhead the up vector is parallel to the view: fall back to +x as up
    bad = right.norm(dim=-1, keepdim=True) < 1e-6
    alt = torch.cross(torch.tensor([1.0, 0.0, 0.0], device=eye.device, dtype=eye.dtype).expand_as(back), back, dim=-1)
    right = torch.where(bad, alt, right)
    right = right / right.norm(dim=-1, keepdim=True)
    true_up = torch.cross(back, right, dim=-1)
    c2w = torch.eye(4, device=eye.device, dtype=eye.dtype).repeat(eye.shape[0], 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, true_up, back, eye
    return c2w


def spherical(azimuth_deg: Tensor, elevation_deg: Tensor, distance: Tensor) -> Tensor:
    """Points [B, 3] at the given spherical coordinates (z up, azimuth 0 on +x)."""
    az, el = torch.deg2rad(azimuth_deg), torch.deg2rad(elevation_deg)
    return torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1) * distance[:, None]


def _uniform(lo: float, hi: float, n: int, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=g.device)


def sample_cameras(cfg: CameraConfig, n: int, generator: torch.Generator, device="cpu") -> Cameras:
    """The paper's random views: elevation, azimuth, distance and focal uniform; look-at and up jittered."""
    g = generator
    elev = _uniform(*cfg.elevation_range, n, g)
    azim = _uniform(*cfg.azimuth_range, n, g)
    dist = _uniform(*cfg.distance_range, n, g) * cfg.distance_scale
    focal = _uniform(*cfg.focal_range, n, g)
    eye = spherical(azim, elev, dist)
    target = torch.randn(n, 3, generator=g, device=g.device) * cfg.center_jitter
    up = torch.tensor([0.0, 0.0, 1.0], device=g.device) + torch.randn(n, 3, generator=g, device=g.device) * cfg.up_jitter
    cams = Cameras(look_at(eye, target, up), focal, torch.remainder(azim, 360.0), elev, dist)
    return cams.to(device)


def orbit(n: int, elevation: float = 15.0, distance: float = 2.5, focal: float = 1.0, start_azimuth: float = 0.0,
          device="cpu") -> Cameras:
    """n cameras evenly spaced on a circle around the object, for videos and previews."""
    azim = start_azimuth + torch.arange(n, dtype=torch.float32) * (360.0 / n)
    return fixed_views(azim.tolist(), [elevation] * n, distance, focal, device)


def fixed_views(azimuths: list[float], elevations: list[float], distance: float = 2.5, focal: float = 1.0,
                device="cpu") -> Cameras:
    """Cameras looking at the origin from the given angles (degrees)."""
    az = torch.tensor(azimuths, dtype=torch.float32)
    el = torch.tensor(elevations, dtype=torch.float32)
    dist = torch.full_like(az, float(distance))
    eye = spherical(az, el, dist)
    c2w = look_at(eye, torch.zeros_like(eye), torch.tensor([0.0, 0.0, 1.0]).expand_as(eye))
    return Cameras(c2w, torch.full_like(az, float(focal)), torch.remainder(az, 360.0), el, dist).to(device)


PREVIEW_VIEWS = ((0.0, 15.0), (90.0, 15.0), (180.0, 15.0), (45.0, 70.0))  # front, side, back, overhead


def preview_cameras(device="cpu") -> Cameras:
    az, el = zip(*PREVIEW_VIEWS)
    return fixed_views(list(az), list(el), device=device)


def camera_from_c2w(c2w: Tensor, focal: float) -> Cameras:
    """Wrap a single [4, 4] camera-to-world matrix (e.g. a viewer's camera)."""
    c2w = c2w.reshape(1, 4, 4).float()
    eye = c2w[:, :3, 3]
    dist = eye.norm(dim=-1)
    el = torch.rad2deg(torch.asin((eye[:, 2] / dist.clamp(min=1e-6)).clamp(-1, 1)))
    az = torch.rad2deg(torch.atan2(eye[:, 1], eye[:, 0]))
    return Cameras(c2w, torch.tensor([float(focal)]), torch.remainder(az, 360.0), el, dist)


@dataclass
class Light:
    """A point light per view (the paper's shading model)."""

    position: Tensor  # [B, 3] world position
    color: Tensor  # [B, 3] l_rho
    ambient: Tensor  # [B] l_a

    def to(self, device) -> Light:
        return Light(self.position.to(device), self.color.to(device), self.ambient.to(device))


def make_light(cams: Cameras, live: LiveParams, cfg: CameraConfig, generator: torch.Generator | None) -> Light:
    """The light of each view: random around the camera (training), at the camera, or fixed by the UI."""
    n, dev = len(cams), cams.c2w.device
    eye = cams.origins
    if live.light_mode == "fixed":
        one = torch.ones(n, device=dev)
        pos = spherical(one * live.light_azimuth, one * live.light_elevation, one * live.light_distance)
    elif live.light_mode == "camera" or generator is None:
        pos = eye.clone()
    else:  # "random": direction jittered around the camera's, distance a multiple of the camera's
        g = generator
        d = eye / eye.norm(dim=-1, keepdim=True) + torch.randn(n, 3, generator=g, device=g.device).to(dev) * cfg.light_jitter
        d = d / d.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        r = _uniform(*cfg.light_distance_range, n, g).to(dev) * eye.norm(dim=-1)
        pos = d * r[:, None]
    color = torch.tensor(live.light_color, dtype=torch.float32, device=dev).expand(n, 3)
    return Light(pos, color, torch.full((n,), float(live.ambient), device=dev))


