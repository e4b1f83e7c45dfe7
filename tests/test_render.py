"""The renderer against a plain dense reference, with and without empty-space skipping; fields."""

import torch

from engine.cameras import fixed_views, make_light
from engine.config import BackgroundConfig, CameraConfig, FieldConfig, LiveParams, RenderConfig
from engine.field import Background, FieldQuery, make_field
from engine.priors.analytic import AnalyticField
from engine.render import OccupancyGrid, render, sphere_intersect


def occupancy_of(field, scale: float, resolution: int = 32, threshold: float = 1e-3) -> OccupancyGrid:
    """An occupancy grid of `field` after one update (alpha = density * scale)."""
    occ = OccupancyGrid(1.0, resolution)
    occ.estimator.update_every_n_steps(0, occ_eval_fn=lambda x: field.query_density(x) * scale, occ_thre=threshold,
                                       n=1, warmup_steps=1, ema_decay=0.0)
    return occ


def reference_render(field, cams, H, W, n_samples, bg_color):
    """Textbook volume rendering (Max 1995), midpoint samples, albedo shading, no nerfacc."""
    o, d = cams.rays(H, W)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    near, far, hit = sphere_intersect(o, d, field.cfg.radius)
    t = near[:, None] + (far - near)[:, None] * (torch.arange(n_samples) + 0.5) / n_samples
    delta = ((far - near) / n_samples)[:, None].expand_as(t)
    x = o[:, None] + d[:, None] * t[..., None]
    s = field.prepare().samples(x.reshape(-1, 3))
    sigma = s.density.view_as(t) * hit[:, None]
    alpha = 1 - torch.exp(-sigma * delta)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1), 1)
    w = alpha * trans
    rgb = (w[..., None] * s.albedo.view(*t.shape, 3)).sum(1) + (1 - w.sum(1, keepdim=True)) * bg_color
    return rgb.view(len(cams), H, W, 3).permute(0, 3, 1, 2), w.sum(1).view(len(cams), 1, H, W)


def _setup(field):
    cams = fixed_views([0.0, 120.0], [10.0, 50.0], distance=2.5)
    light = make_light(cams, LiveParams(light_mode="camera"), CameraConfig(), None)
    bg = Background(BackgroundConfig(kind="solid", color=(1.0, 1.0, 1.0)))
    return cams, light, bg


def test_dense_render_matches_reference():
    field = AnalyticField("cube", (0.9, 0.2, 0.1), sigma_max=50.0, eps=0.03)
    cams, light, bg = _setup(field)
    cfg = RenderConfig(num_samples=128, occupancy=False)
    with torch.no_grad():
        out = render(field, bg, cams, 24, 24, shading="albedo", light=light, cfg=cfg)
    ref_rgb, ref_alpha = reference_render(field, cams, 24, 24, 128, torch.ones(3))
    assert (out.rgb - ref_rgb).abs().max() < 1e-4
    assert (out.opacity - ref_alpha).abs().max() < 1e-4
    assert 0.1 < out.opacity.mean() < 0.9  # the cube is in the frame and does not fill it


def test_empty_space_skipping_gives_the_same_image_with_fewer_samples():
    field = AnalyticField("torus", (0.2, 0.5, 0.9), sigma_max=80.0, eps=0.02)
    cams, light, bg = _setup(field)
    cfg = RenderConfig(num_samples=96)
    occ = occupancy_of(field, 2.0 / 32 * 3**0.5)
    with torch.no_grad():
        dense = render(field, bg, cams, 32, 32, shading="lambertian", light=light, cfg=cfg)
        skip = render(field, bg, cams, 32, 32, shading="lambertian", light=light, cfg=cfg, occupancy=occ)
    assert skip.samples < dense.samples / 3
    assert (skip.rgb - dense.rgb).abs().max() < 0.02
    assert (skip.depth - dense.depth).abs().mean() < 0.01


def test_chunked_render_equals_single_pass():
    field = make_field(FieldConfig())
    cams, light, bg = _setup(field)
    with torch.no_grad():
        a = render(field, bg, cams, 16, 16, shading="lambertian", light=light, cfg=RenderConfig(chunk=100))
        b = render(field, bg, cams, 16, 16, shading="lambertian", light=light, cfg=RenderConfig(chunk=10**6))
    assert torch.allclose(a.rgb, b.rgb, atol=1e-6)


def test_fields_start_as_a_centre_blob_and_normals_point_outwards():
    for backbone in ("grid", "hash"):
        cfg = FieldConfig(backbone=backbone, hash_log2_size=12, hash_max_resolution=64)
        field = make_field(cfg)
        x = torch.tensor([[0.0, 0.0, 0.05], [0.3, 0.0, 0.0], [0.0, -0.3, 0.0], [0.9, 0.0, 0.0]])
        s = field.prepare().samples(x)
        assert s.density[0] > 5 and s.density[3] < 0.1, backbone
        assert s.normal[1, 0] > 0.9 and s.normal[2, 1] < -0.9, backbone  # -grad(sigma) points away from the centre
        assert ((s.albedo >= 0) & (s.albedo <= 1)).all()


def test_render_outputs_have_gradients_into_the_field():
    field = make_field(FieldConfig())
    cams, light, bg = _setup(field)
    out = render(field, bg, cams, 8, 8, shading="textureless", light=light, cfg=RenderConfig(),
                 generator=torch.Generator().manual_seed(0))
    (out.rgb.mean() + out.orientation.mean()).backward()
    grads = [p.grad for p in field.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_grid_field_skips_empty_lattice_points_without_changing_the_render():
    field = make_field(FieldConfig())  # the initial blob: occupied only near the centre
    cams, light, bg = _setup(field)
    occ = occupancy_of(field, 0.1)
    active = field.active_lattice(occ.occupied)
    assert 0.01 < active.float().mean() < 0.5
    cfg = RenderConfig(num_samples=64)
    with torch.no_grad():
        dense = render(field, bg, cams, 24, 24, shading="lambertian", light=light, cfg=cfg)
        skip = render(field, bg, cams, 24, 24, shading="lambertian", light=light, cfg=cfg, occupancy=occ)
        whole_lattice = field.prepare(None)  # the same samples, every lattice point generated
        skip_samples_only = render(field, bg, cams, 24, 24, shading="lambertian", light=light, cfg=cfg,
                                   occupancy=occ, query=whole_lattice)
    assert torch.equal(skip.rgb, skip_samples_only.rgb)  # the lattice skip is exact
    assert skip.samples < dense.samples / 2  # fewer evaluations, though the box packs samples denser
    assert (skip.rgb - dense.rgb).abs().max() < 0.01


def test_occupancy_derived_state_is_cached_until_the_grid_changes():
    """The occupied box and the grid field's active lattice are computed once per occupancy update; an
    update, an in-place load or a copy of the grid gives them fresh, and renders stay the same as without
    any cache."""
    import copy

    field = make_field(FieldConfig())
    cams, light, bg = _setup(field)
    occ = occupancy_of(field, 0.1)
    calls = []

    def active():
        calls.append(1)
        return field.active_lattice(occ.occupied)

    assert occ.derived("k", active) is occ.derived("k", active) and len(calls) == 1  # reused, not recomputed
    assert occ.box() is occ.box()
    box_small = occ.box()
    occ.estimator.update_every_n_steps(0, occ_eval_fn=lambda x: field.query_density(x) * 100.0, occ_thre=1e-3,
                                       n=1, warmup_steps=1, ema_decay=0.0)  # a new grid tensor
    box_big = occ.box()
    assert (box_big[0] < box_small[0]).all() and (box_big[1] > box_small[1]).all()
    occ.derived("k", active)
    assert len(calls) == 2
    state = copy.deepcopy(occ.estimator.state_dict())
    occ.estimator.binaries.zero_()  # an in-place write
    assert occ.box() is None
    occ.estimator.load_state_dict(state)  # in place again (a checkpoint load)
    assert torch.equal(torch.stack(occ.box()), torch.stack(box_big))
    twin = copy.deepcopy(occ)  # a copy (the viewer's) never serves a stale cache
    assert torch.equal(torch.stack(twin.box()), torch.stack(occ.box()))
    cfg = RenderConfig(num_samples=32)
    with torch.no_grad():
        cached = render(field, bg, cams, 16, 16, shading="lambertian", light=light, cfg=cfg, occupancy=occ)
        fresh_occ = OccupancyGrid(1.0, 32)
        fresh_occ.estimator.load_state_dict(occ.estimator.state_dict())  # the same grid, no cache
        fresh = render(field, bg, cams, 16, 16, shading="lambertian", light=light, cfg=cfg, occupancy=fresh_occ)
    assert torch.equal(cached.rgb, fresh.rgb) and cached.samples == fresh.samples


def test_renders_without_gradients_shade_only_the_samples_that_count():
    """The no-grad path (viewer, videos, the oracle's target) computes density first and shades only
    samples of weight > shade_threshold: same opacity and depth, colour within S * threshold."""
    field = AnalyticField("cube", (0.2, 0.7, 0.3), sigma_max=60.0, eps=0.02)
    cams, light, bg = _setup(field)
    cfg = RenderConfig(num_samples=64)
    occ = occupancy_of(field, 0.1)
    shaded = []
    q = field.prepare(occ)

    def samples(x):
        shaded.append(x.shape[0])
        return q.samples(x)

    counting = FieldQuery(samples, q.density)
    with torch.enable_grad():  # the one-pass path: every occupied sample is shaded
        full = render(field, bg, cams, 32, 32, shading="lambertian", light=light, cfg=cfg, occupancy=occ,
                      query=counting)
    with torch.no_grad():
        two = render(field, bg, cams, 32, 32, shading="lambertian", light=light, cfg=cfg, occupancy=occ,
                     query=counting)
    assert len(shaded) == 2 and shaded[1] < 0.75 * shaded[0]
    assert torch.allclose(two.opacity, full.opacity, atol=1e-6)
    assert torch.allclose(two.depth, full.depth, atol=1e-5)
    assert (two.rgb - full.rgb.detach()).abs().max() < cfg.num_samples * cfg.shade_threshold
    assert (two.rgb - full.rgb.detach()).abs().max() > 0  # it did drop something


def test_occupancy_lookup_matches_integer_cell_indexing():
    """`occupied` computes the flat cell index in float; it must name the same cell as integer arithmetic,
    also at the box's faces and outside it (clamped), for small and large grids."""
    g = torch.Generator().manual_seed(0)
    for res in (32, 128, 300):  # 300: past float32's exact range, the float64 branch
        occ = OccupancyGrid(1.0, res)
        occ.estimator.binaries[0] = torch.rand(res, res, res, generator=g) < 0.5
        x = torch.cat([torch.rand(20000, 3, generator=g) * 2.4 - 1.2,
                       torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, -1.0, 0.999]])])
        idx = ((x + 1.0) * (res / 2.0)).clamp(0, res - 1).long()
        expect = occ.estimator.binaries[0][idx[:, 0], idx[:, 1], idx[:, 2]]
        assert torch.equal(occ.occupied(x), expect)
        assert occ.occupied(x[:20000].view(100, 200, 3)).shape == (100, 200)  # any leading shape


def test_occupancy_along_rays_matches_the_lookup_of_the_points():
    field = AnalyticField("torus", (0.2, 0.5, 0.9), sigma_max=80.0, eps=0.02)
    occ = occupancy_of(field, 0.1)
    g = torch.Generator().manual_seed(0)
    o = torch.randn(500, 3, generator=g) * 2
    d = torch.nn.functional.normalize(-o + torch.randn(500, 3, generator=g) * 0.3, dim=-1)
    t = torch.rand(500, 64, generator=g).sort(-1).values * 4
    along = occ.occupied_along(o, d, t)
    points = occ.occupied(o[:, None, :] + d[:, None, :] * t[..., None])
    assert along.shape == (500, 64) and 0.02 < points.float().mean() < 0.5
    assert (along != points).float().mean() < 1e-3  # only float rounding at cell faces may differ


def test_density_queries_match_the_full_samples_on_every_backbone():
    """`FieldQuery.density` (occupancy updates, samplers, first passes) is the density of `samples`, without
    the albedo and normals (the hash backbone's autograd normal) that those callers do not need."""
    x = torch.rand(300, 3, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    for field in (make_field(FieldConfig()), make_field(FieldConfig(backbone="hash", hash_log2_size=12)),
                  AnalyticField("mug", (0.5, 0.5, 0.5))):
        q = field.prepare()
        assert torch.allclose(q.density(x), q.samples(x).density, rtol=1e-5, atol=1e-5), type(field).__name__
    hash_field = make_field(FieldConfig(backbone="hash", hash_log2_size=12))
    with torch.no_grad():  # no autograd graph is needed, so none may be built (the normal's grad needs one)
        assert not hash_field.prepare().density(x).requires_grad


def test_the_packed_path_is_used_only_when_asked_and_never_builds_kernels(monkeypatch):
    """The torch path is the baseline everywhere: render() never imports nerfacc's kernels by itself, and a
    trainer on CPU (or on CUDA without built kernels) does not ask for the packed sampler."""
    import sys

    from engine import accel
    from engine.config import Config
    from engine.priors import load_prior
    from engine.trainer import Trainer

    sys.modules.pop("nerfacc.cuda._backend", None)
    field = AnalyticField("cube", (0.9, 0.2, 0.1))
    cams, light, bg = _setup(field)
    with torch.no_grad():
        render(field, bg, cams, 8, 8, shading="albedo", light=light, cfg=RenderConfig(), occupancy=occupancy_of(field, 0.1))
    assert "nerfacc.cuda._backend" not in sys.modules
    monkeypatch.setattr(accel, "kernels_status", lambda: {"cuda": True, "built": False})
    cfg = Config(prior="oracle:cube")
    assert Trainer(cfg, load_prior("oracle:cube")).packed is False
