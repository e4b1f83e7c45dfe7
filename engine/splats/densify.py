"""Densification and pruning of a splat field: the adaptive density control of 3DGS, as gsplat's default
strategy and DreamGaussian schedule it, with step counts sized for runs of a few hundred CPU steps.

Between two densifications every Gaussian's view-space positional gradient (d loss / d means2d, in NDC
units: pixels times 2 / width) is averaged over the views that saw it. At a densification:
1. Gaussians whose mean gradient exceeds `grad_threshold` grow: small ones (largest axis at most
   `split_scale` * radius) are cloned in place, large ones are split into two children drawn from the
   Gaussian itself, with scales / 1.6. If that would pass `max_count`, only the steepest grow.
2. Gaussians fainter than `prune_opacity`, larger than `prune_scale` * radius, or centred outside the
   bounding sphere (the NeRF is empty there too) are removed; at least one always stays.
3. The statistics restart at zero.

The optimizer's per-parameter moments follow the parameters: kept rows are kept, removed rows removed,
and new rows start at zero (gsplat's choice: a new Gaussian has no history).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from engine.config import SplatConfig
from engine.splats.rasterize import quat_to_rotmat

if TYPE_CHECKING:
    from engine.render import RenderOutput
    from engine.splats.field import SplatField

SPLIT_SHRINK = 1.6  # children's scales are the parent's / 1.6 (3DGS's)
PARAMS = ("means", "log_scales", "quats", "opacity_logits", "albedo_logits")  # a SplatField's per-Gaussian tensors


def densify_due(cfg: SplatConfig, step: int) -> bool:
    """Whether step `step` (0-based, just taken) ends with a densification."""
    # 1. not before the blob has taken a shape, nor after the last densification
    if step < cfg.densify_from or step > cfg.densify_until:
        return False
    # 2. every densify_every steps from densify_from on
    return (step - cfg.densify_from) % cfg.densify_every == 0


@torch.no_grad()
def accumulate(field: SplatField, out: RenderOutput) -> None:
    """Add the step's view-space positional gradient norms of the Gaussians each view saw to the field's
    statistics. Needs the render's `means2d` with its gradient (after backward)."""
    if out.means2d is None or out.means2d.grad is None:
        return
    _, _, h, w = out.rgb.shape
    grad = out.means2d.grad * torch.tensor([w / 2, h / 2], device=out.means2d.device)  # [C, N, 2] NDC units
    seen = out.visible.float()  # [C, N]
    field.grad_sum += (grad.norm(dim=-1) * seen).sum(0)
    field.grad_count += seen.sum(0)


def resize(field: SplatField, optimizer: torch.optim.Optimizer, keep: Tensor, extra: dict[str, Tensor]) -> None:
    """Keep the Gaussians at indices `keep` [K] and append `extra` ({parameter name: [E, ...]}, every name or
    none); Adam's moments are gathered the same way, zero for the new rows. Statistics restart at zero."""
    for name in PARAMS:
        p = getattr(field, name)
        new = p.data.index_select(0, keep)
        added = extra[name].to(new) if extra else new[:0]
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                v = state[key].index_select(0, keep)
                state[key] = torch.cat([v, v.new_zeros(added.shape)])
        p.data = torch.cat([new, added]).contiguous()
        p.grad = None
    n = len(field)
    field.grad_sum.data = field.grad_sum.new_zeros(n)
    field.grad_count.data = field.grad_count.new_zeros(n)


def _children(field: SplatField, idx: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
    """Two children of each Gaussian at idx: centres drawn from the parent, scales / SPLIT_SHRINK."""
    mu, log_s, q = field.means[idx], field.log_scales[idx], field.quats[idx]
    noise = torch.randn(2, len(idx), 3, generator=generator).to(mu)
    offset = (quat_to_rotmat(q)[None] @ (noise * log_s.exp())[..., None]).squeeze(-1)  # [2, S, 3]
    return {"means": (mu[None] + offset).reshape(-1, 3), "log_scales": (log_s - math.log(SPLIT_SHRINK)).repeat(2, 1),
            "quats": q.repeat(2, 1), "opacity_logits": field.opacity_logits[idx].repeat(2),
            "albedo_logits": field.albedo_logits[idx].repeat(2, 1)}


@torch.no_grad()
def densify_and_prune(field: SplatField, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict:
    """One densification (module docstring); returns counts of cloned, split and pruned Gaussians."""
    cfg, radius, n = field.splats, field.cfg.radius, len(field)
    mean_grad = field.grad_sum / field.grad_count.clamp(min=1)
    grow = (mean_grad > cfg.grad_threshold).nonzero().squeeze(1)
    room = max(cfg.max_count - n, 0)
    if grow.numel() > room:  # the steepest first: the count stays bounded
        grow = grow[mean_grad[grow].argsort(descending=True)[:room]]
    large = field.log_scales[grow].max(-1).values > math.log(cfg.split_scale * radius)
    clone, split = grow[~large], grow[large]
    # 1. grow: clones are copies, split parents are replaced by two children each
    extra = {name: getattr(field, name)[clone] for name in PARAMS}
    children = _children(field, split, generator)
    extra = {name: torch.cat([extra[name], children[name]]) for name in PARAMS}
    keep = torch.ones(n, dtype=torch.bool, device=field.means.device)
    keep[split] = False
    resize(field, optimizer, keep.nonzero().squeeze(1), extra)
    # 2. prune the faint, the oversized and those outside the bounding sphere
    drop = ((field.opacities < cfg.prune_opacity) | (field.log_scales.max(-1).values > math.log(cfg.prune_scale * radius))
            | (field.means.norm(dim=-1) > radius))
    if bool(drop.all()):
        drop[field.opacities.argmax()] = False
    if bool(drop.any()):
        resize(field, optimizer, (~drop).nonzero().squeeze(1), {})
    return {"cloned": int(clone.numel()), "split": int(split.numel()), "pruned": int(drop.sum())}
