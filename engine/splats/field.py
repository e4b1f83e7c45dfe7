"""A field of 3D Gaussians (`field.backbone = "gaussians"`): the splat counterpart of engine.field's NeRFs.

Each Gaussian has a centre, a log-scale per axis, a rotation quaternion (w, x, y, z), an opacity logit and an
albedo logit (sigmoid to [0, 1]; no view-dependent colour, as the NeRF's albedo has none). It meets the
interface the trainer and `RenderSource` use with every field (`engine.field.Field`):

- `rasterized = True`: `engine.render.render` hands it to the rasterizer (`engine.splats.rasterize`) instead
  of marching rays, and no occupancy grid is made for it;
- `param_groups(lr)`: one optimizer group per attribute, each with its own multiple of the live rate;
- `after_step(...)`: accumulates the view-space positional gradient and, on the schedule of
  `engine.splats.densify`, clones, splits and prunes Gaussians (resizing the optimizer's moments with them);
- `prepare()` / `density_lattice(n)`: the summed opacity field sum_i o_i exp(-d_i(x)^2 / 2) (d_i: Mahalanobis
  distance) at any points or on a lattice, the quantity DreamGaussian extracts meshes from (`engine.mesh` cuts
  meshes from it; `blur` widens every Gaussian for a lattice of that spacing).

The set of Gaussians changes size, so parameters are resized in place (`p.data = ...`, the optimizer keeps
the same parameter objects), and loading a state dict of another size resizes them first: checkpoints and
the trainer's rollback copies hold whatever count the run had reached.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from engine.config import FieldConfig, SplatConfig
from engine.field import Field, FieldQuery, FieldSamples
from engine.ops import dot, normalize
from engine.splats.densify import PARAMS, accumulate, densify_and_prune, densify_due
from engine.splats.rasterize import covariances, quat_to_rotmat

if TYPE_CHECKING:
    from engine.render import OccupancyGrid, RenderOutput

# learning rates as multiples of the live rate (default 1e-2): DreamGaussian's position 1e-3, scaling 5e-3,
# rotation 5e-3, opacity 5e-2 against its colour 1e-2
LR_SCALE = {"means": 0.1, "log_scales": 0.5, "quats": 0.5, "opacity_logits": 5.0, "albedo_logits": 1.0}
QUERY_CHUNK = 1 << 22  # (point, Gaussian) pairs per block of a density query
QUERY_CELLS = 16  # point queries are grouped by the cells of a 16^3 lattice over the bounding cube
LATTICE_CHUNK = 1 << 22  # (lattice point, Gaussian) pairs per block of `density_lattice`
CUTOFF = 1e-3  # a Gaussian counts as 0 where o exp(-d^2 / 2) is below this (a quarter of the rasterizer cut-off)


def logit(p: Tensor) -> Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return (p / (1 - p)).log()


class SplatField(Field):
    """N Gaussians; N starts at `splats.init_count` and is bounded by `splats.max_count`."""

    rasterized = True

    def __init__(self, cfg: FieldConfig, splats: SplatConfig, count: int | None = None):
        super().__init__()
        self.cfg, self.splats = cfg, splats
        n = splats.init_count if count is None else count
        self.means = nn.Parameter(torch.zeros(n, 3))  # [N, 3] world units
        self.log_scales = nn.Parameter(torch.full((n, 3), math.log(0.05)))  # [N, 3]
        self.quats = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1))  # [N, 4] (w, x, y, z)
        self.opacity_logits = nn.Parameter(torch.full((n,), float(logit(torch.tensor(splats.init_opacity)))))  # [N]
        self.albedo_logits = nn.Parameter(torch.zeros(n, 3))  # [N, 3] sigmoid -> albedo
        # densification's statistics since the last densification: sum and count of the gradient norm
        self.register_buffer("grad_sum", torch.zeros(n))  # [N]
        self.register_buffer("grad_count", torch.zeros(n))  # [N]

    def __len__(self) -> int:
        return self.means.shape[0]

    # -- values ---------------------------------------------------------------------------------------
    @property
    def scales(self) -> Tensor:  # [N, 3]
        return self.log_scales.exp()

    @property
    def opacities(self) -> Tensor:  # [N]
        return torch.sigmoid(self.opacity_logits)

    @property
    def albedo(self) -> Tensor:  # [N, 3]
        return torch.sigmoid(self.albedo_logits)

    def normals(self, origins: Tensor) -> Tensor:
        """Each Gaussian's shortest axis, turned toward each camera at origins [C, 3]: [C, N, 3]."""
        axes = quat_to_rotmat(self.quats)  # columns are the axes
        shortest = self.log_scales.argmin(-1)
        n = axes.gather(2, shortest.view(-1, 1, 1).expand(-1, 3, 1)).squeeze(-1)  # [N, 3]
        facing = dot(n[None], origins[:, None, :] - self.means[None])  # [C, N]
        return n[None] * torch.where(facing < 0, -1.0, 1.0)[..., None]

    def set_gaussians(self, *, means: Tensor, scales: Tensor, opacities: Tensor, albedo: Tensor,
                      quats: Tensor | None = None) -> SplatField:
        """Replace every Gaussian (any count); returns self. Statistics restart at zero."""
        n = means.shape[0]
        with torch.no_grad():
            self.means.data = means.detach().float().to(self.means.device).contiguous()
            self.log_scales.data = scales.detach().float().log().to(self.means.device).contiguous()
            q = quats if quats is not None else torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1)
            self.quats.data = q.detach().float().to(self.means.device).contiguous()
            self.opacity_logits.data = logit(opacities.detach().float()).to(self.means.device).contiguous()
            self.albedo_logits.data = logit(albedo.detach().float()).to(self.means.device).contiguous()
            self.grad_sum.data = torch.zeros(n, device=self.means.device)
            self.grad_count.data = torch.zeros(n, device=self.means.device)
        return self

    # -- the interface every field meets ------------------------------------------------------------
    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [getattr(self, name)], "lr": lr * LR_SCALE[name], "lr_scale": LR_SCALE[name],
                 "name": f"field.{name}"} for name in PARAMS]

    def after_step(self, step: int, optimizer: torch.optim.Optimizer, out: RenderOutput,
                   generator: torch.Generator) -> dict:
        accumulate(self, out)
        metrics = {}
        if densify_due(self.splats, step):
            metrics = densify_and_prune(self, optimizer, generator)
        return {"gaussians": len(self), **metrics}

    def blurred_scales(self, blur: float = 0.0) -> Tensor:
        """Scales [N, 3] of the Gaussians convolved with an isotropic one of std `blur`: sqrt(s^2 + blur^2)."""
        return self.scales if not blur else (self.scales.square() + blur * blur).sqrt()

    def reach(self, blur: float = 0.0) -> Tensor:
        """Half-widths [N, 3] of each Gaussian's axis-aligned box, beyond which o exp(-d^2 / 2) < CUTOFF."""
        sigmas = covariances(self.quats, self.blurred_scales(blur)).diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
        d = (2 * (self.opacities / CUTOFF).clamp(min=1.0).log()).sqrt()  # [N] Mahalanobis cut-off
        return sigmas * d[:, None]

    def prepare(self, occupancy: OccupancyGrid | None = None, *, blur: float = 0.0) -> FieldQuery:
        """The summed opacity field, its albedo (the weighted mean) and normal at any points. Points are grouped
        by the cells of a QUERY_CELLS^3 lattice over the bounding cube, and each group meets only the Gaussians
        whose box (`reach`) touches the group's own box: exact up to CUTOFF per Gaussian. `blur` (world units)
        widens every Gaussian by that std, as a lattice of that spacing needs (engine.mesh)."""
        means, opac, albedo = self.means, self.opacities, self.albedo
        rot, inv_s, reach = quat_to_rotmat(self.quats), 1.0 / self.blurred_scales(blur), self.reach(blur).detach()
        lo, hi = means.detach() - reach, means.detach() + reach  # [N, 3]

        def weights(x: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:  # [M, K] o exp(-d^2 / 2), [M, K, 3] local
            local = torch.einsum("kji,mkj->mki", rot[ids], x[:, None, :] - means[ids][None]) * inv_s[ids]
            return opac[ids] * torch.exp(-0.5 * (local * local).sum(-1)), local

        def groups(x: Tensor):  # (indices of points [M], Gaussians near them [K]) per non-empty group
            cell = ((x.detach() / self.cfg.radius + 1) * (QUERY_CELLS / 2)).floor().clamp(0, QUERY_CELLS - 1).long()
            key = (cell[:, 0] * QUERY_CELLS + cell[:, 1]) * QUERY_CELLS + cell[:, 2]
            order = key.argsort()
            for pts in order.split(torch.unique_consecutive(key[order], return_counts=True)[1].tolist()):
                box = x[pts].detach()
                near = ((lo <= box.max(0).values) & (hi >= box.min(0).values)).all(-1).nonzero().squeeze(1)
                if near.numel():
                    yield from ((part, near) for part in pts.split(max(1, QUERY_CHUNK // near.numel())))

        def density(x: Tensor) -> Tensor:
            parts = [(pts, weights(x[pts], ids)[0].sum(-1)) for pts, ids in groups(x)]
            return gather(x.new_zeros(len(x)), parts)

        def samples(x: Tensor) -> FieldSamples:
            dens, alb, nrm = [], [], []
            for pts, ids in groups(x):
                w, local = weights(x[pts], ids)
                # grad of sum_i w_i: -sum_i w_i Sigma_i^-1 (x - mu_i); the normal is minus its direction
                grad = -torch.einsum("mk,kij,mkj->mi", w, rot[ids], local * inv_s[ids])
                dens.append((pts, w.sum(-1)))
                alb.append((pts, (w @ albedo[ids]) / w.sum(-1, keepdim=True).clamp(min=1e-8)))
                nrm.append((pts, -normalize(grad)))
            # where no Gaussian reaches: empty, grey, facing +z
            return FieldSamples(gather(x.new_zeros(len(x)), dens), gather(x.new_full((len(x), 3), 0.5), alb),
                                gather(x.new_tensor([0.0, 0.0, 1.0]).expand(len(x), 3), nrm))

        return FieldQuery(samples, density)

    @torch.no_grad()
    def density_lattice(self, resolution: int, blur: float = 0.0) -> Tensor:
        """The summed opacity on a resolution^3 lattice spanning [-r, r]^3, indexed [x, y, z] (what meshes are cut
        from). Each Gaussian adds itself to the lattice points inside its box (`reach`), in chunks of similar box
        sizes: the work is the Gaussians' volume in voxels, not lattice points times Gaussians. `blur` as `prepare`'s."""
        r, n = self.cfg.radius, int(resolution)
        spacing = 2 * r / (n - 1)
        keep = (self.opacities > CUTOFF).nonzero().squeeze(1)
        mu, opac, reach = self.means[keep].float(), self.opacities[keep].float(), self.reach(blur)[keep].float()
        rot, inv_s = quat_to_rotmat(self.quats[keep]).float(), 1.0 / self.blurred_scales(blur)[keep].float()
        precision = (rot * inv_s[:, None, :].square()) @ rot.transpose(1, 2)  # [N, 3, 3] Sigma^-1 = R S^-2 R^T
        first = ((mu - reach + r) / spacing).ceil().clamp(0, n).long()  # [N, 3] first lattice index in the box
        count = (((mu + reach + r) / spacing).floor().clamp(-1, n - 1).long() - first + 1).clamp(min=0)  # [N, 3]
        volume = torch.zeros(n**3, device=mu.device)
        order = count.prod(-1).argsort()
        boxes = count[order].tolist()  # [N] boxes (lattice points per axis), smallest first
        start = 0
        while start < len(order):
            # a chunk: Gaussians of similar boxes, at most LATTICE_CHUNK (lattice point, Gaussian) pairs padded
            span, stop = boxes[start], start + 1
            while stop < len(order):
                wider = [max(a, b) for a, b in zip(span, boxes[stop])]
                if (stop + 1 - start) * math.prod(wider) > LATTICE_CHUNK:
                    break
                span, stop = wider, stop + 1
            ids, start = order[start:stop], stop
            if min(span) == 0:
                continue
            # per axis: lattice indices [B, s] and offsets from the centre; the quadratic form d^T Sigma^-1 d is
            # then six broadcast products, with no [B, K, 3] gather of lattice points
            idx = [first[ids, a][:, None] + torch.arange(span[a], device=mu.device) for a in range(3)]
            ok = [idx[a] < (first[ids, a] + count[ids, a])[:, None] for a in range(3)]
            d = [idx[a] * spacing - r - mu[ids, a][:, None] for a in range(3)]
            x, y, z = d[0][:, :, None, None], d[1][:, None, :, None], d[2][:, None, None, :]
            a = precision[ids]  # [B, 3, 3]
            q = (a[:, 0, 0, None, None, None] * x * x + a[:, 1, 1, None, None, None] * y * y
                 + a[:, 2, 2, None, None, None] * z * z + 2 * (a[:, 0, 1, None, None, None] * x * y
                 + a[:, 0, 2, None, None, None] * x * z + a[:, 1, 2, None, None, None] * y * z))
            w = opac[ids][:, None, None, None] * torch.exp(-0.5 * q)  # [B, sx, sy, sz]
            valid = ok[0][:, :, None, None] & ok[1][:, None, :, None] & ok[2][:, None, None, :]
            flat = (idx[0][:, :, None, None] * n + idx[1][:, None, :, None]) * n + idx[2][:, None, None, :]
            volume.index_add_(0, flat[valid], w[valid])
        return volume.view(n, n, n)

    def covariances(self) -> Tensor:  # [N, 3, 3]
        return covariances(self.quats, self.scales)

    # -- variable size ---------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Resize every parameter and buffer to the incoming shape before the copy: a checkpoint (or the
        trainer's rollback copy) holds whatever count it was taken at."""
        for name, t in list(self._parameters.items()) + list(self._buffers.items()):
            key = prefix + name
            if t is not None and key in state_dict and state_dict[key].shape != t.shape:
                t.data = t.data.new_empty(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def gather(base: Tensor, parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """`base` with rows `idx` replaced by `values` for each (idx, values) in parts, in one differentiable copy."""
    if not parts:
        return base
    return base.index_copy(0, torch.cat([i for i, _ in parts]), torch.cat([v for _, v in parts]))


def blob(cfg: FieldConfig, splats: SplatConfig, device="cpu") -> SplatField:
    """The start of a run, as the NeRF starts: `init_count` Gaussians uniform in a ball of `init_radius`,
    isotropic, half as wide as their mean spacing, grey, with opacity `init_opacity` (global RNG: the trainer
    seeds it for network initialisation)."""
    n, r = splats.init_count, splats.init_radius
    direction = normalize(torch.randn(n, 3))
    means = direction * r * torch.rand(n, 1) ** (1 / 3)
    spacing = r * (4 / 3 * math.pi / n) ** (1 / 3)
    field = SplatField(cfg, splats, n).to(device)
    return field.set_gaussians(means=means, scales=torch.full((n, 3), 0.5 * spacing),
                               opacities=torch.full((n,), splats.init_opacity), albedo=torch.full((n, 3), 0.5))


@torch.no_grad()
def splats_from_field(source: Field, cfg: FieldConfig, splats: SplatConfig, count: int,
                      generator: torch.Generator, resolution: int = 64) -> SplatField:
    """Gaussians drawn from a trained NeRF (GaussianDreamer's start from a 3D shape): lattice points picked with
    probability proportional to their alpha over a cell, jittered within it, coloured by the field's albedo,
    with that alpha as opacity and a third of a cell as scale. For "fork as splats"."""
    r = source.cfg.radius
    lin = torch.linspace(-r, r, resolution)
    x = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).view(-1, 3)
    x = x[x.norm(dim=-1) <= r]
    device = next((t.device for t in (*source.parameters(), *source.buffers())), torch.device("cpu"))
    query, cell = source.prepare(), 2 * r / (resolution - 1)
    sigma = torch.cat([query.density(part.to(device)).float().cpu() for part in x.split(1 << 16)])
    alpha = 1 - torch.exp(-sigma.clamp(min=0) * cell)
    if float(alpha.sum()) <= 0:
        raise ValueError("the field is empty: there is nothing to draw Gaussians from")
    pick = torch.multinomial(alpha, count, replacement=int((alpha > 0).sum()) < count, generator=generator)
    points = x[pick] + (torch.rand(count, 3, generator=generator) - 0.5) * cell
    albedo = torch.cat([query.samples(part.to(device)).albedo.float().cpu() for part in points.split(1 << 16)])
    out = SplatField(cfg, splats, count).to(device)
    return out.set_gaussians(means=points, scales=torch.full((count, 3), cell / 3), albedo=albedo.clamp(0.01, 0.99),
                             opacities=alpha[pick].clamp(0.05, 0.95))
