"""The renderer against a plain dense reference, with and without empty-space skipping; fields."""

import torch

from engine.cameras import fixed_views, make_light
from engine.config import BackgroundConfig, CameraConfig, FieldConfig, LiveParams, RenderConfig
from engine.field import Background, make_field
from engine.priors.analytic import AnalyticField
from engine.render import (
    OccupiedFn,
    make_occupancy,
    occupancy_stamp,
    occupied_along,
    occupied_box,
    render,
    sphere_intersect,
)
from engine.render import occupied as occupied_cells


def reference_render(field, cams, H, W, n_samples, bg_color):
    """Textbook volume rendering (Max 1995), midpoint samples, albedo shading, no nerfacc."""
    o, d = cams.rays(H, W)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    near, far, hit = sphere_intersect(o, d, field.cfg.radius)
    t = near[:, None] + (far - near)[:, None] * (torch.arange(n_samples) + 0.5) / n_samples
    delta = ((far - near) / n_samples)[:, None].expand_as(t)
    x = o[:, None] + d[:, None] * t[..., None]
    s = field.prepare()(x.reshape(-1, 3))
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
    est = make_occupancy(1.0, 32)
    cell = 2.0 / 32
    est.update_every_n_steps(0, occ_eval_fn=lambda x: field.query_density(x) * cell * 3**0.5, occ_thre=1e-3,
                             n=1, warmup_steps=1)
    with torch.no_grad():
        dense = render(field, bg, cams, 32, 32, shading="lambertian", light=light, cfg=cfg)
        skip = render(field, bg, cams, 32, 32, shading="lambertian", light=light, cfg=cfg, estimator=est)
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
        s = field.prepare()(x)
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
    est = make_occupancy(1.0, 32)
    est.update_every_n_steps(0, occ_eval_fn=lambda x: field.query_density(x) * 0.1, occ_thre=1e-3, n=1,
                             warmup_steps=1)
    active = field.active_lattice(lambda x: occupied_cells(est, x))
    assert 0.01 < active.float().mean() < 0.5
    cfg = RenderConfig(num_samples=64)
    full_prepare = field.prepare
    with torch.no_grad():
        dense = render(field, bg, cams, 24, 24, shading="lambertian", light=light, cfg=cfg)
        skip = render(field, bg, cams, 24, 24, shading="lambertian", light=light, cfg=cfg, estimator=est)
        field.prepare = lambda occupied_fn=None: full_prepare(None)  # whole lattice, same samples
        skip_samples_only = render(field, bg, cams, 24, 24, shading="lambertian", light=light, cfg=cfg,
                                   estimator=est)
    assert torch.equal(skip.rgb, skip_samples_only.rgb)  # the lattice skip is exact
    assert skip.samples < dense.samples / 2  # fewer evaluations, though the box packs samples denser
    assert (skip.rgb - dense.rgb).abs().max() < 0.01



def test_occupancy_derived_state_is_cached_until_the_grid_changes():
    """The occupied box and the grid field's active lattice are computed once per occupancy update; an
    update, an in-place load or a copy of the estimator gives them fresh, and renders stay the same as
    without any cache."""
    import copy

    field = make_field(FieldConfig())
    cams, light, bg = _setup(field)
    est = make_occupancy(1.0, 32)

    def update(scale):
        est.update_every_n_steps(0, occ_eval_fn=lambda x: field.query_density(x) * scale, occ_thre=1e-3, n=1,
                                 warmup_steps=1, ema_decay=0.0)

    update(0.1)
    stamp = occupancy_stamp(est)
    assert occupancy_stamp(est) == stamp and occupied_box(est) is occupied_box(est)  # reused, not recomputed
    fn = OccupiedFn(est)
    assert fn.stamp == stamp and torch.equal(fn(field.lattice), occupied_cells(est, field.lattice))
    assert field._active(fn) is field._active(OccupiedFn(est))
    box_small = occupied_box(est)
    update(100.0)  # more of the blob is occupied: a new grid tensor
    assert occupancy_stamp(est) != stamp
    box_big = occupied_box(est)
    assert (box_big[0] < box_small[0]).all() and (box_big[1] > box_small[1]).all()
    assert field._active(OccupiedFn(est)).sum() > field.active_lattice(lambda x: occupied_cells(est, x)).sum() - 1
    state = copy.deepcopy(est.state_dict())
    before = occupancy_stamp(est)
    est.binaries.zero_()  # an in-place write
    assert occupancy_stamp(est) != before and occupied_box(est) is None
    est.load_state_dict(state)  # in place again (a checkpoint load)
    assert torch.equal(torch.stack(occupied_box(est)), torch.stack(box_big))
    twin = copy.deepcopy(est)  # a copy (the viewer's) never serves a stale cache
    assert torch.equal(torch.stack(occupied_box(twin)), torch.stack(occupied_box(est)))
    cfg = RenderConfig(num_samples=32)
    with torch.no_grad():
        cached = render(field, bg, cams, 16, 16, shading="lambertian", light=light, cfg=cfg, estimator=est)
        est.__dict__.pop("_occupancy_stamp")  # forget every cache: recomputed from scratch
        field.__dict__.pop("_active_cache")
        fresh = render(field, bg, cams, 16, 16, shading="lambertian", light=light, cfg=cfg, estimator=est)
    assert torch.equal(cached.rgb, fresh.rgb) and cached.samples == fresh.samples


def test_renders_without_gradients_shade_only_the_samples_that_count():
    """The no-grad path (viewer, videos, the oracle's target) computes density first and shades only
    samples of weight > shade_threshold: same opacity and depth, colour within S * threshold."""
    field = AnalyticField("cube", (0.2, 0.7, 0.3), sigma_max=60.0, eps=0.02)
    cams, light, bg = _setup(field)
    cfg = RenderConfig(num_samples=64)
    est = make_occupancy(1.0, 32)
    est.update_every_n_steps(0, occ_eval_fn=lambda x: field.query_density(x) * 0.1, occ_thre=1e-3, n=1,
                             warmup_steps=1)
    shaded = []
    prepare = field.prepare

    def counting_prepare(occupied_fn=None):
        q = prepare(occupied_fn)

        def query(x):
            shaded.append(x.shape[0])
            return q(x)

        if hasattr(q, "density"):
            query.density = q.density
        return query

    field.prepare = counting_prepare
    with torch.enable_grad():  # the one-pass path: every occupied sample is shaded
        full = render(field, bg, cams, 32, 32, shading="lambertian", light=light, cfg=cfg, estimator=est)
    with torch.no_grad():
        two = render(field, bg, cams, 32, 32, shading="lambertian", light=light, cfg=cfg, estimator=est)
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
        est = make_occupancy(1.0, res)
        est.binaries[0] = torch.rand(res, res, res, generator=g) < 0.5
        x = torch.cat([torch.rand(20000, 3, generator=g) * 2.4 - 1.2,
                       torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, -1.0, 0.999]])])
        idx = ((x + 1.0) * (res / 2.0)).clamp(0, res - 1).long()
        expect = est.binaries[0][idx[:, 0], idx[:, 1], idx[:, 2]]
        assert torch.equal(occupied_cells(est, x), expect)
        assert occupied_cells(est, x[:20000].view(100, 200, 3)).shape == (100, 200)  # any leading shape


def test_early_ray_termination_keeps_the_image_and_its_gradients():
    """Training renders that stop rays once transmittance < 1e-4 (as nerfacc's CUDA sampler does) drop the
    samples behind opaque surfaces, and the image and the field's gradients stay the same."""
    field = make_field(FieldConfig(blob_density=80.0))  # an opaque centre blob
    cams, light, bg = _setup(field)
    est = make_occupancy(1.0, 32)
    est.update_every_n_steps(0, occ_eval_fn=lambda x: field.query_density(x) * 0.1, occ_thre=1e-3, n=1,
                             warmup_steps=1)
    cfg = RenderConfig(num_samples=48)
    weights = torch.rand(len(cams), 3, 24, 24, generator=torch.Generator().manual_seed(1))
    results = []
    for early_stop in (0.0, 1e-4):
        field.zero_grad()
        out = render(field, bg, cams, 24, 24, shading="lambertian", light=light, cfg=cfg, estimator=est,
                     generator=torch.Generator().manual_seed(0), early_stop=early_stop)
        ((out.rgb * weights).sum() + out.orientation.sum()).backward()
        results.append((out, torch.cat([p.grad.flatten() for p in field.parameters()])))
    (full, g_full), (stop, g_stop) = results
    assert full.samples == full.occupied_samples == stop.occupied_samples
    assert stop.samples < 0.85 * stop.occupied_samples  # the blob's far side is never evaluated
    assert (full.rgb - stop.rgb).abs().max() < 1e-3
    assert (full.opacity - stop.opacity).abs().max() < 1e-3
    assert (g_full - g_stop).norm() < 1e-3 * g_full.norm()


def test_occupancy_along_rays_matches_the_lookup_of_the_points():
    field = AnalyticField("torus", (0.2, 0.5, 0.9), sigma_max=80.0, eps=0.02)
    est = make_occupancy(1.0, 32)
    est.update_every_n_steps(0, occ_eval_fn=lambda x: field.query_density(x) * 0.1, occ_thre=1e-3, n=1,
                             warmup_steps=1)
    g = torch.Generator().manual_seed(0)
    o = torch.randn(500, 3, generator=g) * 2
    d = torch.nn.functional.normalize(-o + torch.randn(500, 3, generator=g) * 0.3, dim=-1)
    t = torch.rand(500, 64, generator=g).sort(-1).values * 4
    along = occupied_along(est, o, d, t)
    points = occupied_cells(est, o[:, None, :] + d[:, None, :] * t[..., None])
    assert along.shape == (500, 64) and 0.02 < points.float().mean() < 0.5
    assert (along != points).float().mean() < 1e-3  # only float rounding at cell faces may differ
