"""Neural fields: density and albedo inside a bounding sphere, plus the background.

Two backbones share one interface. `prepare(occupancy)` returns a `FieldQuery` for one render: its
`samples(x)` gives density, albedo and normal, its `density(x)` density alone (the occupancy update,
the samplers and renders without gradients need no more). The field keeps no state between renders;
what a backbone derives from the occupancy grid is cached on the grid object (`OccupancyGrid.derived`).

- `GridField` ("grid", the CPU default): a small Fourier-feature MLP *generates* a dense grid of
  density, albedo and density gradient every render, and samples are read from it trilinearly
  (`engine.ops.grid_sample_3d`).
  Weight sharing through the MLP keeps SDS's noisy per-voxel gradients from drifting (a raw voxel grid
  fills the sphere), while the per-sample cost is that of a texture lookup.
- `HashField` ("hash"): a multi-resolution hash encoding (Instant-NGP) in pure torch, or tiny-cuda-nn's
  when it is installed and the field lives on CUDA, followed by a small MLP; normals by autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import BackgroundConfig, FieldConfig, SplatConfig
from engine.ops import grid_sample_3d, norm, normalize

if TYPE_CHECKING:
    from engine.render import OccupancyGrid


@dataclass
class FieldSamples:
    density: Tensor  # [N] sigma >= 0
    albedo: Tensor  # [N, 3] in [0, 1]
    normal: Tensor  # [N, 3] unit, -grad(sigma) / |grad(sigma)|


@dataclass(frozen=True)
class FieldQuery:
    """A field prepared for one render."""

    samples: Callable[[Tensor], FieldSamples]  # x [N, 3] -> density, albedo, normal
    density: Callable[[Tensor], Tensor]  # x [N, 3] -> sigma [N], without albedo or normals


def fourier_features(x: Tensor, bands: int) -> Tensor:
    """[..., 3] -> [..., 3 + 6 * bands]: x, sin(2^k pi x), cos(2^k pi x)."""
    freqs = (2.0 ** torch.arange(bands, device=x.device, dtype=x.dtype)) * math.pi
    xb = x[..., None, :] * freqs[:, None]  # [..., bands, 3]
    return torch.cat([x, xb.sin().flatten(-2), xb.cos().flatten(-2)], dim=-1)


def mlp(n_in: int, hidden: int, n_out: int, layers: int = 2) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(n_in if i == 0 else hidden, hidden), nn.ReLU(inplace=True)]
    mods.append(nn.Linear(hidden, n_out))
    return nn.Sequential(*mods)


class Field(nn.Module):
    """Common parts: density activation with the initial centre blob, and the dense query helper; and the
    interface the trainer meets every field through (`rasterized`, `param_groups`, `after_step`; the splat
    field, `engine.splats.field.SplatField`, meets it too)."""

    cfg: FieldConfig
    rasterized = False  # True: drawn by the splat rasterizer, not ray-marched (and no occupancy grid)

    def param_groups(self, lr: float) -> list[dict]:
        """The optimizer's groups for this field; the trainer sets each group's lr to the live rate * lr_scale."""
        return [{"params": list(self.parameters()), "lr": lr, "lr_scale": 1.0, "name": "field"}]

    def after_step(self, step: int, optimizer: torch.optim.Optimizer, out, generator: torch.Generator) -> dict:
        """Called after each optimizer step with its render `out` (the splat field densifies here, resizing
        the optimizer's state). Returns metrics for the step."""
        return {}

    def activate_density(self, raw: Tensor, x: Tensor) -> Tensor:
        """softplus(raw + blob): softplus keeps the gradient alive where density is low (exp explodes)."""
        return F.softplus(raw + self.cfg.blob_density * (1.0 - norm(x) / self.cfg.blob_radius))

    def prepare(self, occupancy: OccupancyGrid | None = None) -> FieldQuery:
        """The field for one render. `occupancy` marks space that may hold density; backbones that can
        save work with it do (points outside it are only ever queried as empty)."""
        raise NotImplementedError

    def query_density(self, x: Tensor) -> Tensor:
        """sigma at points x [N, 3] (zero outside the bounding sphere)."""
        inside = norm(x) <= self.cfg.radius
        return self.prepare().density(x) * inside


class GridField(Field):
    """An MLP over Fourier features of a fixed lattice generates a dense grid each render."""

    def __init__(self, cfg: FieldConfig):
        super().__init__()
        self.cfg = cfg
        n = cfg.grid_resolution
        lin = torch.linspace(-cfg.radius, cfg.radius, n)
        zz, yy, xx = torch.meshgrid(lin, lin, lin, indexing="ij")
        lattice = torch.stack([xx, yy, zz], -1)  # [D, H, W, 3] as (x, y, z)
        self.register_buffer("lattice", lattice, persistent=False)
        # the lattice never moves, so its Fourier features are computed once
        self.register_buffer("features", fourier_features(lattice / cfg.radius, cfg.fourier_bands), persistent=False)
        self.net = mlp(3 + 6 * cfg.fourier_bands, cfg.hidden, 4)

    def grid(self, active: Tensor | None = None) -> Tensor:
        """The generated grid [1, 7, D, H, W]: density, albedo (3), density gradient (3).

        `active` [D, H, W] bool limits the MLP to those lattice points (the rest is empty space: zero
        density), which is where empty-space skipping saves most on the CPU path.
        """
        if active is None:
            raw = self.net(self.features)  # [D, H, W, 4]
            sigma = self.activate_density(raw[..., 0], self.lattice)
        else:  # index_select / index_copy on flat views: much faster on CPU than advanced indexing
            idx = active.view(-1).nonzero().squeeze(1)
            feats = self.features.reshape(-1, self.features.shape[-1]).index_select(0, idx)
            part = self.net(feats)  # [M, 4]
            raw = torch.zeros(active.numel(), 4, device=part.device, dtype=part.dtype).index_copy(0, idx, part)
            raw = raw.view(*active.shape, 4)
            sig = self.activate_density(part[:, 0], self.lattice.reshape(-1, 3).index_select(0, idx))
            sigma = torch.zeros(active.numel(), device=part.device, dtype=part.dtype).index_copy(0, idx, sig)
            sigma = sigma.view(active.shape)
        albedo = torch.sigmoid(raw[..., 1:])
        h = 2.0 * self.cfg.radius / (self.cfg.grid_resolution - 1)
        p = F.pad(sigma[None, None], (1, 1, 1, 1, 1, 1), mode="replicate")[0, 0]
        gx = (p[1:-1, 1:-1, 2:] - p[1:-1, 1:-1, :-2]) / (2 * h)
        gy = (p[1:-1, 2:, 1:-1] - p[1:-1, :-2, 1:-1]) / (2 * h)
        gz = (p[2:, 1:-1, 1:-1] - p[:-2, 1:-1, 1:-1]) / (2 * h)
        grid = torch.cat([sigma[..., None], albedo, torch.stack([gx, gy, gz], -1)], -1)
        return grid.permute(3, 0, 1, 2)[None]

    def active_lattice(self, occupied_fn: Callable[[Tensor], Tensor]) -> Tensor:
        """Lattice points within two lattice cells of an occupied cell, as [D, H, W] bool."""
        occ = occupied_fn(self.lattice).float()[None, None]
        for k, p in (((5, 1, 1), (2, 0, 0)), ((1, 5, 1), (0, 2, 0)), ((1, 1, 5), (0, 0, 2))):  # separable dilation
            occ = F.max_pool3d(occ, kernel_size=k, stride=1, padding=p)
        return occ[0, 0] > 0

    def prepare(self, occupancy: OccupancyGrid | None = None) -> FieldQuery:
        active = None
        if occupancy is not None:  # recomputed only when the occupancy grid changes (every few steps)
            key = ("grid_field_active", self.cfg.grid_resolution, self.cfg.radius)
            active = occupancy.derived(key, lambda: self.active_lattice(occupancy.occupied))
        grid = self.grid(active)
        radius = self.cfg.radius

        def samples(x: Tensor) -> FieldSamples:
            s = grid_sample_3d(grid, x / radius).t()  # [N, 7]
            return FieldSamples(s[:, 0].clamp(min=0.0), s[:, 1:4], -normalize(s[:, 4:7]))

        def density(x: Tensor) -> Tensor:  # one channel of the grid
            return grid_sample_3d(grid[:, :1], x / radius)[0].clamp(min=0.0)

        return FieldQuery(samples, density)


class HashEncoding(nn.Module):
    """Multi-resolution hash encoding (Mueller et al. 2022), trilinear, pure torch. Input in [0, 1]^3."""

    PRIMES = (1, 2654435761, 805459861)

    def __init__(self, levels: int, log2_size: int, base_res: int, max_res: int, features: int = 2):
        super().__init__()
        growth = math.exp((math.log(max_res) - math.log(base_res)) / max(levels - 1, 1))
        self.resolutions = [int(math.floor(base_res * growth**lvl)) for lvl in range(levels)]
        self.size = 2**log2_size
        self.tables = nn.Parameter(torch.empty(levels, self.size, features).uniform_(-1e-4, 1e-4))
        corners = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)])
        self.register_buffer("corners", corners, persistent=False)
        self.n_output_dims = levels * features

    def forward(self, x: Tensor) -> Tensor:  # [N, 3] -> [N, levels * features]
        out = []
        primes = torch.tensor(self.PRIMES, device=x.device)
        for lvl, res in enumerate(self.resolutions):
            pos = x * res
            p0 = pos.floor().long()
            w = pos - p0  # [N, 3]
            p = p0[:, None, :] + self.corners  # [N, 8, 3]
            if (res + 1) ** 3 <= self.size:  # coarse levels fit densely: no collisions
                idx = (p[..., 0] * (res + 1) + p[..., 1]) * (res + 1) + p[..., 2]
            else:
                h = p * primes
                idx = h[..., 0] ^ h[..., 1] ^ h[..., 2]
            feats = self.tables[lvl][idx % self.size]  # [N, 8, F]
            cw = torch.where(self.corners.bool(), w[:, None, :], 1.0 - w[:, None, :]).prod(-1)  # [N, 8]
            out.append((feats * cw[..., None]).sum(1))
        return torch.cat(out, -1)


def _tcnn_encoding(cfg: FieldConfig):
    """tiny-cuda-nn's hash grid when installed (CUDA only), else None."""
    try:
        import tinycudann as tcnn
    except ImportError:
        return None
    growth = math.exp((math.log(cfg.hash_max_resolution) - math.log(cfg.hash_base_resolution)) / (cfg.hash_levels - 1))
    return tcnn.Encoding(3, {"otype": "HashGrid", "n_levels": cfg.hash_levels, "n_features_per_level": 2,
                             "log2_hashmap_size": cfg.hash_log2_size, "base_resolution": cfg.hash_base_resolution,
                             "per_level_scale": growth})


class HashField(Field):
    """Hash-grid features -> MLP -> density and albedo; normals are -grad(sigma) by autograd.
    Its cost is per queried point, so the renderer's sample skipping is all it needs."""

    def __init__(self, cfg: FieldConfig, use_tcnn: bool = False):
        super().__init__()
        self.cfg = cfg
        enc = _tcnn_encoding(cfg) if use_tcnn else None
        self.encoding = enc or HashEncoding(cfg.hash_levels, cfg.hash_log2_size, cfg.hash_base_resolution,
                                            cfg.hash_max_resolution)
        self.net = mlp(self.encoding.n_output_dims, cfg.hidden, 4, layers=1)

    def _density_albedo(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u = ((x / self.cfg.radius + 1.0) * 0.5).clamp(0.0, 1.0)
        raw = self.net(self.encoding(u).float())
        return self.activate_density(raw[:, 0], x), torch.sigmoid(raw[:, 1:])

    def prepare(self, occupancy: OccupancyGrid | None = None) -> FieldQuery:
        def samples(x: Tensor) -> FieldSamples:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                sigma, albedo = self._density_albedo(xg)
                (grad,) = torch.autograd.grad(sigma.sum(), xg, create_graph=torch.is_grad_enabled() and self.training)
            if not self.training or not torch.is_grad_enabled():
                sigma, albedo, grad = sigma.detach(), albedo.detach(), grad.detach()
            normal = -normalize(grad)
            return FieldSamples(sigma, albedo, normal)

        def density(x: Tensor) -> Tensor:  # no normals: no autograd pass, no double backward
            return self._density_albedo(x)[0]

        return FieldQuery(samples, density)


def make_field(cfg: FieldConfig, device="cpu", splats: SplatConfig | None = None) -> Field:
    """The field of `cfg.backbone`; "gaussians" starts as `splats` says (the blob of engine.splats.field)."""
    if cfg.backbone == "gaussians":
        from engine.splats.field import blob

        return blob(cfg, splats or SplatConfig(), device)
    if cfg.backbone == "grid":
        return GridField(cfg).to(device)
    if cfg.backbone == "hash":
        return HashField(cfg, use_tcnn=torch.device(device).type == "cuda").to(device)
    raise ValueError(f"unknown field backbone {cfg.backbone!r}; choose 'grid', 'hash' or 'gaussians'")


# the background MLP: a backdrop needs little capacity (32 wide), and few octaves of the ray direction (3) keep
# it smooth, with no room to paint the object into the backdrop
BACKGROUND_HIDDEN, BACKGROUND_BANDS = 32, 3


class Background(nn.Module):
    """Colour of rays that leave the sphere: an MLP on the direction, or a solid colour."""

    def __init__(self, cfg: BackgroundConfig):
        super().__init__()
        self.cfg = cfg
        self.net = mlp(3 + 6 * BACKGROUND_BANDS, BACKGROUND_HIDDEN, 3, layers=1) if cfg.kind == "mlp" else None

    def forward(self, dirs: Tensor) -> Tensor:
        """dirs [N, 3] unit -> rgb [N, 3]."""
        if self.net is not None:
            return torch.sigmoid(self.net(fourier_features(dirs, BACKGROUND_BANDS)))
        return torch.tensor(self.cfg.color, device=dirs.device, dtype=dirs.dtype).expand(dirs.shape[0], 3)
