"""Score Distillation Sampling: the pieces every prior shares.

For a render x = g(theta) and a frozen denoiser eps_hat, DreamFusion's gradient is

    grad_theta L_SDS = E_{t, eps}[ w(t) (eps_hat(z_t; y, t) - eps) dx/dtheta ],   z_t = sqrt(abar_t) x + sigma_t eps,

which skips the U-Net's Jacobian. A prior computes g = w(t)(eps_hat - eps) (in image space, see
`engine.priors.base.Prior`); the trainer turns g into a loss whose gradient w.r.t. x is exactly g with
`sds_loss`.
"""

from __future__ import annotations

import torch
from torch import Tensor

VIEWS = ("front", "side", "back", "overhead")  # labels of view-dependent prompting, in the order of view weights


def sample_timesteps(batch: int, t_min: float, t_max: float, num_train_timesteps: int,
                     generator: torch.Generator, device) -> Tensor:
    """Integer timesteps t ~ U(t_min, t_max) * T, one per view. Returns [B] long."""
    lo = int(round(t_min * num_train_timesteps))
    hi = max(lo + 1, int(round(t_max * num_train_timesteps)))
    t = torch.randint(lo, hi, (batch,), generator=generator, device=generator.device)
    return t.clamp_(0, num_train_timesteps - 1).to(device)


def sds_weight(alphas_cumprod_t: Tensor) -> Tensor:
    """The paper's w(t) = sigma_t^2 = 1 - abar_t (variance preserving) for the prior's abar_t."""
    return 1.0 - alphas_cumprod_t


def classifier_free_guidance(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """eps_u + s (eps_c - eps_u); s = 1 + omega in the paper's notation (omega = 100 there)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def add_noise(x0: Tensor, noise: Tensor, alphas_cumprod_t: Tensor) -> Tensor:
    """z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with abar_t of shape [B]."""
    a = alphas_cumprod_t.view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise


def sds_loss(x: Tensor, grad: Tensor) -> Tensor:
    """A scalar whose gradient w.r.t. x is `grad`.

    With target = (x - grad).detach(), L = 0.5 * ||x - target||^2 = 0.5 * ||grad||^2 in value, and
    dL/dx = x - target = grad. The prior's network never enters the graph.
    """
    target = (x - grad).detach()
    return 0.5 * torch.nn.functional.mse_loss(x, target, reduction="sum")


def view_weights(azimuth_deg: Tensor, elevation_deg: Tensor) -> Tensor:
    """Interpolation weights over VIEWS for each camera. Returns [B, 4], rows summing to 1.

    Azimuth 0 is the front. Front and back weights fall linearly to zero 90 degrees away, side takes
    the rest; overhead ramps in from 45 to 75 degrees of elevation, so the argmax switches to
    "overhead" at 60 degrees and to "side" at |azimuth| = 45 and 135 degrees (threestudio's thresholds).
    """
    az = torch.remainder(azimuth_deg + 180.0, 360.0) - 180.0  # (-180, 180]
    front = (1.0 - az.abs() / 90.0).clamp(min=0.0)
    back = (1.0 - (180.0 - az.abs()) / 90.0).clamp(min=0.0)
    side = 1.0 - front - back
    over = ((elevation_deg - 45.0) / 30.0).clamp(0.0, 1.0)
    ring = torch.stack([front, side, back], dim=-1) * (1.0 - over)[..., None]
    return torch.cat([ring, over[..., None]], dim=-1)


def view_labels(weights: Tensor) -> list[str]:
    """The dominant view label of each row of `view_weights`."""
    return [VIEWS[i] for i in weights.argmax(dim=-1).tolist()]
