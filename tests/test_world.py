"""The procedural world: solids fit their canonical size, renders look like what they claim."""

import torch

from engine import world
from engine.cameras import fixed_views, make_light
from engine.config import CameraConfig, LiveParams


def _render(shapes, az, el=15.0, color="red", shading="albedo", size=32):
    cams = fixed_views([az] * len(shapes), [el] * len(shapes))
    light = make_light(cams, LiveParams(light_mode="camera"), CameraConfig(), None)
    rgb = torch.tensor(world.COLORS[color]).expand(len(shapes), 3)
    return world.render(list(shapes), rgb, cams, light, shading, size=size)


def test_solids_fit_the_canonical_sphere_and_contain_the_origin_region():
    d = torch.randn(4000, 3)
    far = d / d.norm(dim=-1, keepdim=True) * 0.78
    for name in world.SHAPES:
        assert (world.solid_sdf(name, far) > 0).all(), name
        pts = torch.rand(20000, 3) * 1.6 - 0.8
        assert (world.solid_sdf(name, pts) < 0).float().mean() > 0.02, name  # not empty


def test_every_shape_has_its_own_silhouette():
    _, masks = _render(world.SHAPES, 30.0)
    flat = masks.flatten(1) > 0.5
    for i in range(len(world.SHAPES)):
        assert flat[i].float().mean() > 0.05
        for j in range(i):
            iou = (flat[i] & flat[j]).sum() / (flat[i] | flat[j]).sum()
            assert iou < 0.95, (world.SHAPES[i], world.SHAPES[j], iou)


def test_albedo_render_has_the_caption_colour_and_background_is_white():
    for color in ("red", "blue", "white"):
        rgb, mask = _render(["sphere"], 0.0, color=color)
        assert torch.allclose(rgb[0, :, 16, 16], torch.tensor(world.COLORS[color]), atol=0.02)
        assert torch.allclose(rgb[0, :, 0, 0], torch.ones(3)) and mask[0, 0, 0, 0] == 0


def test_symmetric_solids_have_symmetric_silhouettes():
    _, masks = _render(["sphere", "cylinder", "cone", "torus", "cube"], 0.0, el=10.0)
    assert (masks - masks.flip(-1)).abs().mean() < 0.01


def test_front_objects_differ_front_and_back_round_solids_do_not():
    front, _ = _render(["house", "snowman", "mug", "sphere", "cylinder"], 0.0)
    back, _ = _render(["house", "snowman", "mug", "sphere", "cylinder"], 180.0)
    diff = (front - back).abs().mean((1, 2, 3))
    assert (diff[:3] > 0.001).all() and (diff[3:] < 1e-4).all(), diff
    # the mug's handle is on its right seen from the front, on its left from the back
    _, m_front = _render(["mug"], 0.0)
    assert m_front[0, 0, :, 16:].sum() > m_front[0, 0, :, :16].sum() + 3






def _plain_trace(name, o, d, iters=48):
    """The tracer without early outs: every ray takes every step."""
    b = (o * d).sum(-1)
    disc = b * b - (o * o).sum(-1) + 1.0
    t = (-b - disc.clamp(min=0).sqrt()).clamp(min=0)
    alive = disc > 0
    for _ in range(iters):
        t = t + torch.where(alive, world.solid_sdf(name, o + t[:, None] * d) * 0.9, torch.zeros_like(t))
    p = o + t[:, None] * d
    return p, alive & (world.solid_sdf(name, p).abs() < 4e-3) & (p.norm(dim=-1) < 1.0)


def test_textureless_renders_are_grey():
    tl, _ = _render(["cube"], 20.0, color="red", shading="textureless")
    assert torch.allclose(tl[0, 0], tl[0, 1], atol=1e-4)  # no colour left


def test_tracer_early_outs_do_not_change_hits():
    cams = fixed_views([20.0, 200.0], [5.0, 60.0], distance=2.2)
    o, d = (t.reshape(-1, 3) for t in cams.rays(40, 40))
    for name in ("cube", "torus", "mug"):
        p_ref, hit_ref = _plain_trace(name, o, d)
        p, hit = world._trace(name, o, d)  # dropping missed and escaped rays: exact
        assert hit.any() and torch.equal(hit, hit_ref) and torch.equal(p[hit], p_ref[hit])


