"""Score Distillation Sampling: the pieces every prior shares.

For a render x = g(theta) and a frozen denoiser eps_hat, DreamFusion's gradient is

    grad_theta L_SDS = E_{t, eps}[ w(t) (eps_hat(z_t; y, t) - eps) dx/dtheta ],   z_t = sqrt(abar_t) x + sigma_t eps,

which skips the U-Net's Jacobian. A prior computes g = w(t)(eps_hat - eps) (in image space, see
`engine.priors.base.Prior`); the trainer turns g into a loss whose gradient w.r.t. x is exactly g with
`sds_loss`.

The other distillations change only what eps is compared with, and where z_t comes from; each is written once,
in `distillation_grad`, for any prior that describes itself as a `Denoiser` (its x0 in the model's own space,
its alphas_cumprod, and its noise predictions). The prior maps the result back to image space.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.config import DISTILLATIONS  # the losses `distillation_grad` computes (docs/priors.md)

VIEWS = ("front", "side", "back", "overhead")  # labels of view-dependent prompting, in the order of view weights
NFSD_T = 0.2  # NFSD: below t = 0.2 T the domain term is eps_null alone (Katzir et al.: t < 200 of 1000)
ISM_INTERVAL = 0.08  # ISM: s = t - 0.08 T (LucidDreamer's delta_t = 80 of 1000)
ISM_STRIDE = 0.2  # ISM: x0 -> x_s in DDIM inversion steps of at most 0.2 T (its xs_delta_t 200; <= 5 steps)


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


# ---------------------------------------------------------------------------------------------------
# Distillations: the score a render is pushed along, for any prior


@dataclass
class Denoiser:
    """What a distillation step needs from a prior, in the prior's own space (latents for SD, pixels otherwise)."""

    x0: Tensor  # [B, C, h, w] the renders in the model's space, float32, no graph
    alphas_cumprod: Tensor  # [T] the prior's schedule
    # eps(z_t [B, C, h, w], t [B], branches) -> {branch: eps [B, C, h, w]}, no graph. Branches: "cond" (the
    # view-mixed prompt), "uncond" (the negative prompt; "" by default), "null" (the empty prompt). A prior may add
    # entries that its `guide` reads (Perp-Neg's negatives).
    eps: Callable[[Tensor, Tensor, tuple[str, ...]], dict[str, Tensor]]
    guide: Callable[[dict[str, Tensor], float], Tensor]  # eps_hat from "cond" and "uncond": CFG, Perp-Neg, ...
    copy: Callable[[Tensor, Tensor], Tensor] | None = None  # VSD: eps of the trainable copy (cond), with graph
    copy_optimizer: torch.optim.Optimizer | None = None  # VSD: steps the copy's parameters


def distillation_grad(kind: str, d: Denoiser, *, guidance_scale: float, t_range: tuple[float, float],
                      generator: torch.Generator) -> tuple[Tensor, dict]:
    """g = dL/dx0 in the model's space for the distillation `kind`; every kind draws t, then eps, as SDS does.

    With z_t = sqrt(abar) x0 + sigma eps, eps_c / eps_u / eps_0 the cond / negative-prompt / empty-prompt
    predictions and eps_hat the guided one (eps_u + s (eps_c - eps_u), or Perp-Neg), w(t) = 1 - abar_t:

    - sds  (DreamFusion): g = w (eps_hat - eps). eps_hat - eps = (eps_u - eps) + s (eps_c - eps_u): a noisy
      "denoise me" term plus the classifier direction.
    - csd  (Yu et al. 2023, Classifier Score Distillation): keep only the classifier direction,
      g = w (eps_hat - eps_u) = w s (eps_c - eps_u); with a negative prompt eps_u is its branch, which is CSD's
      negative form with both weights s.
    - nfsd (Katzir et al. 2023, Noise-Free Score Distillation): replace the noisy term by one without the
      random eps, g = w (delta_D + s (eps_c - eps_0)): delta_D = eps_0 for t < NFSD_T T (at small t the empty
      prompt's prediction is the pull towards the image domain) and eps_0 - eps_u above it (away from the
      negative prompt; 0 when there is none).
    - ism  (Liang et al. 2023, LucidDreamer's Interval Score Matching): compare eps_hat with the prediction that
      made z_t instead of the random eps. x0 -> x_s by DDIM inversion with eps_0 (steps <= ISM_STRIDE T), then one
      inversion step x_s -> x_t with eps_0(x_s, s); g = w (eps_hat(x_t, t) - eps_0(x_s, s)), s = t - ISM_INTERVAL T.
      (LucidDreamer weighs by sqrt(sigma^2 / abar); w is kept here so the losses compare at one learning rate.)
    - vsd  (Wang et al. 2023, ProlificDreamer's Variational Score Distillation): compare with the score of the
      renders' own distribution, estimated by a trainable copy of the prior fitted online to the renders with the
      diffusion loss: g = w (eps_hat - eps_copy(z_t; y)), then one fitting step of the copy.
    """
    if kind not in DISTILLATIONS:
        raise ValueError(f"unknown distillation {kind!r}; choose from {', '.join(DISTILLATIONS)}")
    x0, abar_all = d.x0, d.alphas_cumprod
    b, T = x0.shape[0], abar_all.shape[0]
    # 1. t ~ U(t_min, t_max) T and eps ~ N(0, I), from the run's generator
    t = sample_timesteps(b, t_range[0], t_range[1], T, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0)
    abar = abar_all[t]
    w = sds_weight(abar).view(-1, *[1] * (x0.dim() - 1))
    info: dict = {"t": t.tolist()}
    # 2. the noisy point (and, for ISM, the prediction that made it: what eps_hat is compared with)
    z_t, target = ism_point(d, noise, t) if kind == "ism" else (add_noise(x0, noise, abar), None)
    # 3. the predictions (no graph) and the gradient
    if kind == "nfsd":
        e = d.eps(z_t, t, ("cond", "null", "uncond"))
        small = (t < NFSD_T * T).view(-1, *[1] * (x0.dim() - 1))
        domain = torch.where(small, e["null"], e["null"] - e["uncond"])
        classifier = d.guide({**e, "uncond": e["null"]}, guidance_scale) - e["null"]
        return w * (domain + classifier), info
    e = d.eps(z_t, t, ("cond", "uncond"))
    eps_hat = d.guide(e, guidance_scale)
    if kind == "sds":  # eps_err: the unweighted residual, how far x0 is from the prior's mode (lab.residual)
        return w * (eps_hat - noise), {**info, "eps_err": (eps_hat - noise).pow(2).mean().item()}
    if kind == "csd":
        return w * (eps_hat - e["uncond"]), info
    if kind == "ism":
        return w * (eps_hat - target), info
    # vsd
    if d.copy is None or d.copy_optimizer is None:
        raise ValueError("vsd needs the prior's trainable copy (SDSContext.vsd)")
    with torch.no_grad():
        eps_copy = d.copy(z_t, t).float()
    info["vsd_loss"] = fit_copy(d, t_range, generator)
    return w * (eps_hat - eps_copy), info


def ism_point(d: Denoiser, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """ISM's z_t and the eps_0 that made it: x0 -> x_s by DDIM inversion with eps_0, s = t - ISM_INTERVAL T, then
    one inversion step x_s -> x_t with eps_0(x_s, s)."""
    abar_all, T = d.alphas_cumprod, d.alphas_cumprod.shape[0]
    s = (t - int(round(ISM_INTERVAL * T))).clamp(min=0)
    z_s = ddim_invert(d, add_noise(d.x0, noise, abar_all[torch.zeros_like(t)]), torch.zeros_like(t), s,
                      int(round(ISM_STRIDE * T)))
    eps_s = d.eps(z_s, s, ("null",))["null"]
    return ddim_step(z_s, eps_s, abar_all[s], abar_all[t]), eps_s


def ddim_step(z: Tensor, eps: Tensor, abar_from: Tensor, abar_to: Tensor) -> Tensor:
    """Deterministic DDIM move of z from noise level abar_from to abar_to along the predicted eps:
    x0_hat = (z - sqrt(1 - a) eps) / sqrt(a), z' = sqrt(a') x0_hat + sqrt(1 - a') eps. Up in noise it inverts DDIM."""
    shape = (-1, *[1] * (z.dim() - 1))
    a, a2 = abar_from.view(shape), abar_to.view(shape)
    x0_hat = (z - (1.0 - a).sqrt() * eps) / a.sqrt()
    return a2.sqrt() * x0_hat + (1.0 - a2).sqrt() * eps


def ddim_invert(d: Denoiser, z: Tensor, t_from: Tensor, t_to: Tensor, stride: int) -> Tensor:
    """z at t_from -> t_to [B] by unconditional DDIM inversion, each row in ceil((t_to - t_from) / stride) equal
    steps (so a row's path does not depend on its batch); the U-Net runs max over rows of that, none at t_to = t_from."""
    span = t_to - t_from
    n = torch.div(span + stride - 1, max(stride, 1), rounding_mode="floor")  # [B] steps per row
    for i in range(int(n.max()) if n.numel() else 0):
        k = n.clamp(min=1)
        a, b = t_from + torch.minimum(span * i // k, span), t_from + torch.minimum(span * (i + 1) // k, span)
        eps = d.eps(z, a, ("null",))["null"]
        moved = ddim_step(z, eps, d.alphas_cumprod[a], d.alphas_cumprod[b])
        z = torch.where((i < n).view(-1, *[1] * (z.dim() - 1)), moved, z)
    return z


def fit_copy(d: Denoiser, t_range: tuple[float, float], generator: torch.Generator) -> float:
    """One step of the diffusion loss ||eps_copy(z_t; y) - eps||^2 on the renders (VSD's copy); returns the loss."""
    x0, T = d.x0, d.alphas_cumprod.shape[0]
    t = sample_timesteps(x0.shape[0], t_range[0], t_range[1], T, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0)
    with torch.enable_grad():
        loss = torch.nn.functional.mse_loss(d.copy(add_noise(x0, noise, d.alphas_cumprod[t]), t).float(), noise)
        d.copy_optimizer.zero_grad(set_to_none=True)
        loss.backward()
    d.copy_optimizer.step()
    return float(loss.detach())
