"""Camera and light sampling: the paper's ranges, look-at geometry, view labels."""

import math

import torch

from engine.cameras import fixed_views, make_light, orbit, sample_cameras
from engine.config import CameraConfig, LiveParams
from engine.sds import view_labels, view_weights


def test_sampled_cameras_respect_the_papers_ranges(generator):
    cfg = CameraConfig()
    cams = sample_cameras(cfg, 4096, generator)
    assert cams.elevation.min() >= -10 and cams.elevation.max() <= 90
    assert cams.azimuth.min() >= 0 and cams.azimuth.max() < 360
    lo, hi = (r * cfg.distance_scale for r in cfg.distance_range)
    dist = cams.origins.norm(dim=-1)
    assert dist.min() >= lo - 1e-4 and dist.max() <= hi + 1e-4
    assert cams.focal.min() >= 0.7 and cams.focal.max() <= 1.35
    # uniform, not clumped: every decile of azimuth is populated
    hist = torch.histc(cams.azimuth, bins=10, min=0, max=360)
    assert hist.min() > 4096 / 10 * 0.7


def test_rays_are_unit_and_centre_ray_looks_at_target():
    cams = fixed_views([0.0, 90.0, 200.0], [0.0, 30.0, 80.0], distance=2.5)
    o, d = cams.rays(9, 9)
    assert torch.allclose(d.norm(dim=-1), torch.ones(3, 9, 9), atol=1e-5)
    centre = d[:, 4, 4]
    to_origin = -o[:, 4, 4] / o[:, 4, 4].norm(dim=-1, keepdim=True)
    assert torch.allclose(centre, to_origin, atol=1e-5)
    # image x grows to the camera's right, image y grows downwards (z is up)
    assert d[0, 0, 4, 2] > d[0, 8, 4, 2]


def test_orbit_is_evenly_spaced():
    cams = orbit(8, elevation=20.0, distance=3.0)
    assert torch.allclose(cams.azimuth, torch.arange(8.0) * 45)
    assert torch.allclose(cams.origins.norm(dim=-1), torch.full((8,), 3.0), atol=1e-5)
    assert torch.allclose(cams.origins[:, 2], torch.full((8,), 3.0 * math.sin(math.radians(20))), atol=1e-5)


def test_view_labels_follow_thresholds():
    az = torch.tensor([0.0, 44.0, 46.0, 90.0, 134.0, 136.0, 180.0, 300.0, 10.0])
    el = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 61.0])
    w = view_weights(az, el)
    assert torch.allclose(w.sum(-1), torch.ones(len(az)))
    assert view_labels(w) == ["front", "front", "side", "side", "side", "back", "back", "side", "overhead"]


def test_light_modes(generator):
    cams = fixed_views([0.0, 90.0], [0.0, 0.0], distance=2.0)
    cfg = CameraConfig()
    fixed = make_light(cams, LiveParams(light_mode="fixed", light_azimuth=90, light_elevation=0, light_distance=3),
                       cfg, generator)
    assert torch.allclose(fixed.position, torch.tensor([[0.0, 3.0, 0.0]] * 2), atol=1e-5)
    at_cam = make_light(cams, LiveParams(light_mode="camera"), cfg, generator)
    assert torch.allclose(at_cam.position, cams.origins)
    rnd = make_light(sample_cameras(cfg, 2000, generator), LiveParams(), cfg, generator)
    ratio = rnd.position.norm(dim=-1)
    assert ratio.min() > 0.8 * 2.0 - 1e-3  # light distance is a multiple (0.8..1.5) of the camera's
