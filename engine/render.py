"""Volume rendering of a field inside its bounding sphere, through nerfacc.

Two samplers, one compositing:
- torch (every device; the baseline): stratified samples between the ray's entry and exit of the
  sphere; an occupancy grid (nerfacc's `OccGridEstimator`, updated in torch) looked up in torch so the
  field is evaluated and shaded only at occupied samples; nerfacc's batched `render_weight_from_density`
  and `accumulate_along_rays` on [n_rays, n_samples].
- CUDA with nerfacc's kernels built (`engine.accel`): `OccGridEstimator.sampling` marches only occupied
  space and nerfacc's packed compositing follows. The caller chooses it (`packed=True`); nothing here
  builds kernels or falls back silently, so an out-of-memory error reaches the caller as one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import nerfacc
import torch
from torch import Tensor

from engine.cameras import Cameras, Light
from engine.config import RenderConfig
from engine.field import Background, Field, FieldQuery
from engine.ops import dot, max3, min3, norm, sumsq
from engine.shading import shade


@dataclass
class RenderOutput:
    rgb: Tensor  # [B, 3, H, W] shaded colour composited over the background
    opacity: Tensor  # [B, 1, H, W] accumulated alpha
    depth: Tensor  # [B, 1, H, W] expected distance along the ray (0 where empty)
    normal: Tensor  # [B, 3, H, W] accumulated world normals
    albedo: Tensor  # [B, 3, H, W] accumulated albedo
    orientation: Tensor  # [B, H, W] sum_i w_i max(0, n_i . d)^2 (Ref-NeRF's orientation penalty)
    samples: int = 0  # field evaluations made (splats: tile-Gaussian pairs)
    means2d: Tensor | None = None  # [B, N, 2] splats only: projected centres; their .grad drives densification
    visible: Tensor | None = None  # [B, N] bool, splats only: the Gaussians each view drew


@dataclass
class Rays:
    """Flat rays and their segment inside the sphere (or the occupied box)."""

    o: Tensor  # [R, 3] origins
    d: Tensor  # [R, 3] unit directions
    view: Tensor  # [R] index of the camera (and light) of each ray
    near: Tensor  # [R] entry distance
    far: Tensor  # [R] exit distance
    hit: Tensor  # [R] bool: the ray meets the (occupied part of the) sphere

    def __getitem__(self, idx) -> Rays:
        """The rays at `idx` (a slice, or a long index tensor gathered with index_select)."""
        if isinstance(idx, slice):
            return Rays(self.o[idx], self.d[idx], self.view[idx], self.near[idx], self.far[idx], self.hit[idx])
        return Rays(*(take(t, idx) for t in (self.o, self.d, self.view, self.near, self.far, self.hit)))

    def __len__(self) -> int:
        return self.o.shape[0]


def sphere_intersect(o: Tensor, d: Tensor, radius: float) -> tuple[Tensor, Tensor, Tensor]:
    """Entry and exit distances of unit rays with the sphere |x| = radius. Returns near, far, hit [N]."""
    b = dot(o, d)
    c = sumsq(o) - radius * radius
    disc = b * b - c
    hit = disc > 0
    s = disc.clamp(min=0).sqrt()
    near = (-b - s).clamp(min=0.0)
    far = (-b + s).clamp(min=0.0)
    return near, far, hit & (far > near)


class OccupancyGrid:
    """nerfacc's occupancy estimator (one level) and what is derived from its grid, recomputed only when
    the grid changes: the box around occupied cells, and whatever a field derives through `derived`
    (the grid backbone's active lattice).

    nerfacc replaces `binaries` with a new tensor on every update and in-place writes (a checkpoint load)
    bump the tensor's version counter, so (tensor, version) identifies the grid's content.
    """

    def __init__(self, radius: float, resolution: int, device="cpu"):
        aabb = torch.tensor([-radius, -radius, -radius, radius, radius, radius], dtype=torch.float32)
        self.estimator = nerfacc.OccGridEstimator(roi_aabb=aabb, resolution=resolution, levels=1).to(device)
        self._content: tuple | None = None  # (binaries tensor, its version) the cache below belongs to
        self._derived: dict = {}

    def derived(self, key: Hashable, compute: Callable[[], object]):
        """compute(), cached until the grid changes."""
        binaries = self.estimator.binaries
        if self._content is None or self._content[0] is not binaries or self._content[1] != binaries._version:
            self._content, self._derived = (binaries, binaries._version), {}
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    def _cells_occupied(self, g: Tensor) -> Tensor:
        """Occupancy at cell coordinates g [..., 3] ((x - lo) * n / (hi - lo)); clamps g in place."""
        grid = self.estimator.binaries[0]  # [res, res, res], indexed (x, y, z)
        n = grid.shape[0]
        # the cell's flat index, computed in float with one matmul: ~6x faster on CPU than per-axis integer
        # arithmetic; float32 is exact while n^3 < 2^24 (n <= 256)
        cell = g.clamp_(0, n - 1).floor_() @ torch.tensor([n * n, n, 1.0], device=g.device, dtype=g.dtype)
        return grid.reshape(-1).index_select(0, cell.reshape(-1).long()).view(cell.shape)

    def occupied(self, x: Tensor) -> Tensor:
        """Whether points x [..., 3] fall in occupied cells."""
        n = self.estimator.binaries.shape[1]
        lo, hi = self.estimator.aabbs[0, :3], self.estimator.aabbs[0, 3:]
        dtype = torch.float32 if n**3 < 2**24 else torch.float64
        return self._cells_occupied((x.to(dtype) - lo) * (n / (hi - lo)))

    def occupied_along(self, o: Tensor, d: Tensor, t: Tensor) -> Tensor:
        """`occupied(o + t d)` for rays o, d [R, 3] at distances t [R, S], as [R, S] bool, without forming
        the points: the cell coordinates are (o - lo) k + t (d k), one fused op over [R, S, 3]."""
        n = self.estimator.binaries.shape[1]
        if n**3 >= 2**24:  # the float32 index would not be exact
            return self.occupied(o[:, None, :] + d[:, None, :] * t[..., None])
        lo, hi = self.estimator.aabbs[0, :3], self.estimator.aabbs[0, 3:]
        k = n / (hi - lo)
        return self._cells_occupied(torch.addcmul(((o - lo) * k)[:, None, :], (d * k)[:, None, :], t[..., None]))

    def box(self) -> tuple[Tensor, Tensor] | None:
        """Corners of the box bounding all occupied cells, or None when nothing is occupied."""
        def compute():
            cells = self.estimator.binaries[0].nonzero()
            if cells.numel() == 0:
                return None
            lo, hi = self.estimator.aabbs[0, :3], self.estimator.aabbs[0, 3:]
            size = (hi - lo) / self.estimator.binaries.shape[1]
            return lo + cells.min(0).values * size, lo + (cells.max(0).values + 1) * size

        return self.derived("box", compute)

    def update(self, step: int, field: Field, cfg: RenderConfig, seed: int) -> None:
        """nerfacc's every-n-steps update, from the field's density alone.

        nerfacc samples cells and jitters points with the global RNG: it runs in a forked global RNG seeded
        with `seed` (drawn by the caller from the run's generator), so a resumed run stays bit-identical. It
        also writes cells with duplicate indices (a race under several threads): it runs on one thread.
        """
        radius = field.cfg.radius
        cell = 2.0 * radius / cfg.occupancy_resolution
        query: FieldQuery | None = None

        def occ_eval(x: Tensor) -> Tensor:  # alpha over the cell's diagonal
            nonlocal query
            query = query or field.prepare()  # only on the steps that update
            return query.density(x) * (norm(x) <= radius) * cell * math.sqrt(3)

        device = self.estimator.binaries.device
        threads = torch.get_num_threads()
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            torch.set_num_threads(1)
            try:
                self.estimator.update_every_n_steps(step, occ_eval_fn=occ_eval, occ_thre=cfg.occupancy_threshold,
                                                    n=cfg.occupancy_every, warmup_steps=cfg.occupancy_warmup)
            finally:
                torch.set_num_threads(threads)


def box_intersect(o: Tensor, d: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Slab-test entry and exit distances of rays with an axis-aligned box (exit < entry: a miss)."""
    inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    t1, t2 = (lo - o) * inv, (hi - o) * inv
    return max3(torch.minimum(t1, t2)), min3(torch.maximum(t1, t2))


def take(t: Tensor, idx: Tensor) -> Tensor:
    """t[idx] along dim 0 through index_select: on CPU ~10x faster than advanced indexing, and its
    backward is an index_add rather than an index_put."""
    return t.index_select(0, idx)


def _shade_samples(query: FieldQuery, x: Tensor, d: Tensor, view: Tensor, mode: str, light: Light):
    """Field and shading at flat samples x [M, 3] with ray dirs d [M, 3] and view index [M]."""
    s = query.samples(x)
    rgb = shade(mode, s.albedo, s.normal, x, light_pos=take(light.position, view), light_color=take(light.color, view),
                ambient=take(light.ambient, view)[:, None])
    orient = dot(s.normal, d).clamp(min=0.0) ** 2
    return s.density, torch.cat([rgb, s.albedo, s.normal, orient[:, None]], -1)  # values: [M, 10]


def _density_pass(query: FieldQuery, x: Tensor, flat: Tensor, R: int, S: int) -> Tensor:
    """sigma [R, S] from the field's density alone at the samples x [M, 3] of flat indices `flat` (zero
    elsewhere): the first pass of renders without gradients."""
    sigma = torch.zeros(R * S, device=x.device, dtype=x.dtype)
    return sigma.index_copy_(0, flat, query.density(x).to(x.dtype)).view(R, S)


def _composite_batched(query: FieldQuery, rays: Rays, *, cfg: RenderConfig, mode: str, light: Light,
                       occupancy: OccupancyGrid | None, generator: torch.Generator | None):
    """Torch path: only rays that meet the (occupied part of the) sphere are sampled, S samples each.
    Returns per-ray values [R, 10], opacity [R, 1], depth [R, 1] and the number of field samples."""
    R = len(rays)
    hits = rays.hit.nonzero(as_tuple=True)[0]
    u = None
    if generator is not None:  # jitter drawn for every ray, so the random stream does not depend on hits
        u = torch.rand(R, cfg.num_samples, generator=generator, device=generator.device).to(rays.o)
    if hits.numel() == R:
        return _composite_rays(query, rays, cfg=cfg, mode=mode, light=light, occupancy=occupancy, u=u)
    acc, opacity, depth, n = _composite_rays(query, rays[hits], cfg=cfg, mode=mode, light=light, occupancy=occupancy,
                                             u=None if u is None else take(u, hits))
    out = [torch.zeros(R, t.shape[1], device=rays.o.device, dtype=t.dtype).index_copy(0, hits, t)
           for t in (acc, opacity, depth)]
    return (*out, n)


def _composite_rays(query: FieldQuery, rays: Rays, *, cfg: RenderConfig, mode: str, light: Light,
                    occupancy: OccupancyGrid | None, u: Tensor | None):
    """Samples, occupancy mask, shading and nerfacc's batched compositing for rays that all hit."""
    o, d, view = rays.o, rays.d, rays.view
    R, S = len(rays), cfg.num_samples
    steps = torch.arange(S + 1, device=o.device, dtype=o.dtype) / S
    edges = rays.near[:, None] + (rays.far - rays.near)[:, None] * steps  # [R, S+1]
    t0, t1 = edges[:, :-1], edges[:, 1:]
    tm = t0 + (t1 - t0) * (u if u is not None else 0.5)
    if occupancy is None:  # dense: every sample, no gathers or scatters
        x = torch.addcmul(o[:, None, :], d[:, None, :], tm[..., None])  # [R, S, 3]
        sig, val = _shade_samples(query, x.view(-1, 3), d.repeat_interleave(S, 0), view.repeat_interleave(S), mode,
                                  light)
        weights, _, _ = nerfacc.render_weight_from_density(t0, t1, sig.view(R, S))
        acc = nerfacc.accumulate_along_rays(weights, val.view(R, S, val.shape[-1]))
        n = R * S
    else:  # only samples in occupied cells are evaluated: their flat indices (ray * S + sample) and positions
        flat = occupancy.occupied_along(o, d, tm).view(-1).nonzero().squeeze(1)
        n = flat.numel()
        ray_idx = flat // S
        x = torch.addcmul(take(o, ray_idx), take(d, ray_idx), take(tm.reshape(-1), flat)[:, None])  # [M, 3]
        if not torch.is_grad_enabled():  # viewer, video, oracle target
            # two passes: density at the occupied samples, then field and shading only where the weight
            # counts (opacity and depth stay exact; colour loses at most S * shade_threshold)
            weights, _, _ = nerfacc.render_weight_from_density(t0, t1, _density_pass(query, x, flat, R, S))
            w = take(weights.reshape(-1), flat)
            keep = (w > cfg.shade_threshold).nonzero().squeeze(1)
            flat, w, x = take(flat, keep), take(w, keep), take(x, keep)
            ray_idx = flat // S
            _, val = _shade_samples(query, x, take(d, ray_idx), take(view, ray_idx), mode, light)
            acc = nerfacc.accumulate_along_rays(w, val, ray_indices=ray_idx, n_rays=R)
        else:
            sig, val = _shade_samples(query, x, take(d, ray_idx), take(view, ray_idx), mode, light)
            sigma = torch.zeros(R * S, device=o.device, dtype=sig.dtype).index_copy(0, flat, sig).view(R, S)
            weights, _, _ = nerfacc.render_weight_from_density(t0, t1, sigma)  # batched: runs on CPU
            acc = nerfacc.accumulate_along_rays(take(weights.reshape(-1), flat), val, ray_indices=ray_idx,
                                                n_rays=R)  # packed sum: index_add
    opacity = nerfacc.accumulate_along_rays(weights, None)
    depth = nerfacc.accumulate_along_rays(weights, tm[..., None])
    return acc, opacity, depth, n


def _composite_packed(query: FieldQuery, rays: Rays, *, cfg: RenderConfig, mode: str, light: Light,
                      occupancy: OccupancyGrid, stratified: bool):
    """CUDA path: nerfacc's occupancy-grid marching (it stops rays at transmittance 1e-4) and packed
    compositing. Needs nerfacc's kernels (`engine.accel.load_kernels`)."""
    o, d, R = rays.o, rays.d, len(rays)

    def sigma_fn(t_starts, t_ends, ray_indices):
        return query.density(take(o, ray_indices) + take(d, ray_indices) * ((t_starts + t_ends) / 2)[:, None])

    ray_indices, t0, t1 = occupancy.estimator.sampling(
        o, d, sigma_fn=sigma_fn, t_min=rays.near, t_max=torch.where(rays.hit, rays.far, rays.near),
        render_step_size=cfg.render_step_size, stratified=stratified, alpha_thre=0.0)
    if ray_indices.numel() == 0:  # nothing occupied along these rays: all background
        zeros = o.new_zeros(R, 1)
        return o.new_zeros(R, 10), zeros, zeros, 0
    tm = (t0 + t1) / 2
    xs = take(o, ray_indices) + take(d, ray_indices) * tm[:, None]
    sig, val = _shade_samples(query, xs, take(d, ray_indices), take(rays.view, ray_indices), mode, light)
    weights, _, _ = nerfacc.render_weight_from_density(t0, t1, sig, ray_indices=ray_indices, n_rays=R)
    acc = nerfacc.accumulate_along_rays(weights, val, ray_indices=ray_indices, n_rays=R)
    opacity = nerfacc.accumulate_along_rays(weights, None, ray_indices=ray_indices, n_rays=R)
    depth = nerfacc.accumulate_along_rays(weights, tm[:, None], ray_indices=ray_indices, n_rays=R)
    return acc, opacity, depth, int(ray_indices.numel())


def render(field: Field, background: Background, cams: Cameras, height: int, width: int, *, shading: str,
           light: Light, cfg: RenderConfig, occupancy: OccupancyGrid | None = None,
           generator: torch.Generator | None = None, packed: bool = False, query: FieldQuery | None = None
           ) -> RenderOutput:
    """Render B views of the field. `generator` jitters samples (training); None renders deterministically.

    `occupancy` enables empty-space skipping; `packed` (with it, on CUDA, kernels loaded) picks nerfacc's
    CUDA sampler. `query` reuses a field already prepared against this occupancy (a frozen copy's).
    """
    if field.rasterized:  # Gaussian splats: drawn by their rasterizer; `packed` picks gsplat's kernels there
        from engine.splats.rasterize import render_splats

        return render_splats(field, background, cams, height, width, shading=shading, light=light, accelerated=packed)
    B = len(cams)
    o, d = cams.rays(height, width)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    near, far, hit = sphere_intersect(o, d, field.cfg.radius)
    box = occupancy.box() if occupancy is not None else None
    if occupancy is not None and box is None:
        hit = torch.zeros_like(hit)  # nothing is occupied: every ray sees the background
    elif box is not None:  # march only the part of each ray inside the box around occupied cells
        b_near, b_far = box_intersect(o, d, *box)
        near, far = torch.maximum(near, b_near), torch.minimum(far, b_far)
        hit = hit & (far > near)
    rays = Rays(o, d, torch.arange(B, device=o.device).repeat_interleave(height * width), near, far, hit)
    query = query or field.prepare(occupancy)
    chunk = len(rays) if torch.is_grad_enabled() else max(cfg.chunk, 1)
    parts = []
    for i in range(0, len(rays), chunk):
        common = {"cfg": cfg, "mode": shading, "light": light, "occupancy": occupancy}
        if packed and occupancy is not None:
            parts.append(_composite_packed(query, rays[i:i + chunk], **common, stratified=generator is not None))
        else:
            parts.append(_composite_batched(query, rays[i:i + chunk], **common, generator=generator))
    acc, opacity, depth = (torch.cat([p[k] for p in parts]) for k in range(3))
    rgb = acc[:, 0:3] + (1.0 - opacity) * background(d)

    def img(t: Tensor) -> Tensor:  # [B*H*W, C] -> [B, C, H, W]
        return t.view(B, height, width, -1).permute(0, 3, 1, 2)

    return RenderOutput(rgb=img(rgb), opacity=img(opacity), depth=img(depth), normal=img(acc[:, 6:9]),
                        albedo=img(acc[:, 3:6]), orientation=acc[:, 9].view(B, height, width),
                        samples=sum(p[3] for p in parts))
