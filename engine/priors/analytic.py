"""Analytic priors whose denoiser is known exactly: for tests and for trying the engine without weights.

- `GaussianPrior`: data ~ N(mu, s^2 I) in image space. Under z_t = sqrt(abar) x0 + sigma_t eps the
  posterior mean of the noise is eps_hat(z_t) = sigma_t (z_t - sqrt(abar) mu) / (abar s^2 + sigma_t^2),
  so SDS on a free image must converge to mu.
- `OraclePrior`: the "data" is the true render x0* of an analytic solid (engine.world) for the very
  camera, light and shading of the step; then eps_hat = (z_t - sqrt(abar) x0*) / sigma_t and SDS becomes
  reconstruction weighted by w(t) sqrt(abar) / sigma_t.
Both ignore guidance (eps_hat is the conditional eps). For the distillations that compare branches (csd, nfsd,
ism) their unconditional model is "any image": pixels ~ N(0.5, 0.5^2), closed form as above; the negative prompt
is ignored. The Gaussian's VSD copy is a Gaussian with trainable mean and log-variance; the oracle has none (its
data change with every camera, which a copy without camera conditioning cannot follow).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine import sds, world
from engine.config import BackgroundConfig, FieldConfig, RenderConfig
from engine.field import Background, Field, FieldQuery, FieldSamples
from engine.ops import normalize
from engine.priors.base import PromptEmbedding, SDSContext, check_distillation
from engine.priors.vsd import TrainableCopy


def linear_alphas_cumprod(T: int = 1000) -> Tensor:
    """DDPM's linear beta schedule (1e-4 .. 0.02)."""
    return torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, T), 0)


UNCOND_MEAN, UNCOND_STD = 0.5, 0.5  # the analytic priors' unconditional model: any image in [0, 1]
VSD_LR = 0.1  # Adam's learning rate for the Gaussian's VSD copy (mean image and log-variance)


def gaussian_eps(z: Tensor, abar: Tensor, mean, var) -> Tensor:
    """The exact eps posterior mean for data ~ N(mean, var I): sigma (z - sqrt(abar) mean) / (abar var + sigma^2)."""
    a = abar.view(-1, 1, 1, 1)
    return (1 - a).sqrt() * (z - a.sqrt() * mean) / (a * var + 1 - a)


class _Analytic:
    num_train_timesteps = 1000
    distillations = ("sds", "csd", "nfsd", "ism")

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.alphas_cumprod = linear_alphas_cumprod(self.num_train_timesteps).to(self.device)

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> PromptEmbedding:
        z = torch.zeros(4, 1, device=self.device)
        return PromptEmbedding(prompt, negative_prompt, cond=z, uncond=z[:1])

    def _grad(self, images: Tensor, ctx: SDSContext, eps_cond, guidance_scale, t_range, generator, copy=None):
        """The distillation's gradient (engine.sds) with the conditional eps `eps_cond(z, t)`: images are the data space."""
        check_distillation(self, ctx.distillation)

        def eps(z, t, branches):  # "uncond" and "null" are both the unconditional model
            return {n: eps_cond(z, t) if n == "cond" else gaussian_eps(z, self.alphas_cumprod[t], UNCOND_MEAN,
                                                                          UNCOND_STD ** 2) for n in branches}

        model = sds.Denoiser(images, self.alphas_cumprod, eps=eps, guide=lambda e, scale: e["cond"], copy=copy,
                             copy_optimizer=None if copy is None else ctx.vsd.optimizer)
        return sds.distillation_grad(ctx.distillation, model, guidance_scale=guidance_scale, t_range=t_range,
                                     generator=generator)


class GaussianCopy(nn.Module):
    """VSD's copy of a GaussianPrior: data ~ N(mean, exp(log_var) I) with both trainable (C*H*W + 1 parameters)."""

    def __init__(self, mean: Tensor, std: float):
        super().__init__()
        self.mean = nn.Parameter(mean.detach().clone())
        self.log_var = nn.Parameter(torch.tensor(2.0 * math.log(std), device=mean.device))


class GaussianPrior(_Analytic):
    name = "gaussian"
    resolution = 16
    distillations = sds.DISTILLATIONS

    def __init__(self, mean: Tensor | None = None, std: float = 0.1, device="cpu"):
        super().__init__(device)
        if mean is None:  # a smooth colour ramp: easy to recognise in a picture
            r = self.resolution
            yy, xx = torch.meshgrid(torch.linspace(0, 1, r), torch.linspace(0, 1, r), indexing="ij")
            mean = torch.stack([xx, yy, 1.0 - xx * yy], 0) * 0.8 + 0.1
        self.mean, self.std = mean.to(self.device), float(std)

    def _at(self, mean: Tensor, size) -> Tensor:
        return F.interpolate(mean[None], size=size, mode="bilinear", align_corners=False)

    def sds_grad(self, images, emb, ctx, *, guidance_scale, t_range, generator):
        mu = self._at(self.mean, images.shape[-2:])
        copy = None
        if ctx.distillation == "vsd":
            def copy(z, t):
                m = ctx.vsd.delta
                return gaussian_eps(z, self.alphas_cumprod[t], self._at(m.mean, z.shape[-2:]), m.log_var.exp())
        return self._grad(images, ctx, lambda z, t: gaussian_eps(z, self.alphas_cumprod[t], mu, self.std ** 2),
                          guidance_scale, t_range, generator, copy)

    def vsd_copy(self) -> TrainableCopy:
        return TrainableCopy(GaussianCopy(self.mean, self.std), lr=VSD_LR)


class AnalyticField(Field):
    """A solid of engine.world as a field: density sigma_max * sigmoid(-sdf / eps), constant albedo."""

    def __init__(self, solid: str, color, sigma_max: float = 200.0, eps: float = 0.01):
        super().__init__()
        self.cfg = FieldConfig()
        self.solid, self.sigma_max, self.eps = solid, sigma_max, eps
        world.solid_sdf(solid, torch.zeros(1, 3))  # raises for unknown solids
        self.register_buffer("color", torch.tensor(color, dtype=torch.float32))

    def sdf(self, x: Tensor) -> Tensor:
        return world.solid_sdf(self.solid, x)

    def prepare(self, occupancy=None) -> FieldQuery:
        def density_of(sdf: Tensor) -> Tensor:
            return self.sigma_max * torch.sigmoid(-sdf / self.eps)

        def samples(x: Tensor) -> FieldSamples:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                d = self.sdf(xg)
                (g,) = torch.autograd.grad(d.sum(), xg)
            sigma = density_of(d.detach())
            normal = normalize(g)  # -grad(sigma) is along +grad(sdf)
            return FieldSamples(sigma, self.color.to(x).expand(x.shape[0], 3), normal)

        def density(x: Tensor) -> Tensor:
            return density_of(self.sdf(x))

        return FieldQuery(samples, density)

    def inside(self, x: Tensor) -> Tensor:
        return self.sdf(x) < 0


def prompt_color(prompt: str, default=(0.8, 0.8, 0.8)):
    for word in prompt.lower().replace(",", " ").split():
        if word in world.COLORS:
            return world.COLORS[word]
    return default


class OraclePrior(_Analytic):
    """Knows the true render of `solid` (coloured by the prompt's colour word) for each sampled view."""

    resolution = 32

    def __init__(self, solid: str = "sphere", device="cpu", num_samples: int = 48):
        # 48 samples per ray, as the engine's own renders: 12 % faster steps at 64² than 64 samples, and
        # every solid still reaches IoU 0.9 (in fewer steps, BENCHMARKS.md)
        super().__init__(device)
        world.solid_sdf(solid, torch.zeros(1, 3))
        self.solid = solid
        self.name = f"oracle:{solid}"
        self.render_cfg = RenderConfig(num_samples=num_samples, occupancy=False)
        self.background = Background(BackgroundConfig(kind="solid", color=(1.0, 1.0, 1.0))).to(self.device)
        self._fields: dict = {}
        self._occupancy = None

    def field_for(self, prompt: str) -> AnalyticField:
        color = prompt_color(prompt)
        if color not in self._fields:
            self._fields[color] = AnalyticField(self.solid, color).to(self.device)
        return self._fields[color]

    def occupancy(self):
        """An occupancy grid of the static solid, made once, so target renders skip empty space."""
        if self._occupancy is None:
            from engine.render import OccupancyGrid

            field = self.field_for("")
            occ = OccupancyGrid(field.cfg.radius, 64, self.device)
            inflate = 2.0 / 64 * 1.8  # keep cells within ~one cell diagonal of the surface
            with torch.random.fork_rng(devices=[]):  # nerfacc jitters with the global RNG: keep it fixed
                torch.manual_seed(0)
                occ.estimator.update_every_n_steps(0, occ_eval_fn=lambda x: (field.sdf(x) < inflate).float(),
                                                   occ_thre=0.5, n=1, warmup_steps=1)
            self._occupancy = occ
        return self._occupancy

    def target(self, ctx: SDSContext, prompt: str, size: tuple[int, int]) -> Tensor:
        """The true render x0* [B, 3, H, W] for the step's cameras, light and shading."""
        from engine.render import render

        with torch.no_grad():
            out = render(self.field_for(prompt), self.background, ctx.cameras.to(self.device), size[0], size[1],
                         shading=ctx.shading, light=ctx.light.to(self.device), cfg=self.render_cfg,
                         occupancy=self.occupancy())
        return out.rgb

    def sds_grad(self, images, emb, ctx, *, guidance_scale, t_range, generator):
        if ctx.cameras is None or ctx.light is None:
            raise ValueError("the oracle prior needs the step's cameras and light in its SDSContext")
        check_distillation(self, ctx.distillation)
        x0 = self.target(ctx, emb.prompt, images.shape[-2:]).to(images)

        def eps_cond(z, t):  # the data are x0 alone: eps = (z - sqrt(abar) x0) / sigma
            a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            return (z - a.sqrt() * x0) / (1 - a).sqrt()
        return self._grad(images, ctx, eps_cond, guidance_scale, t_range, generator)

    def vsd_copy(self):
        raise ValueError("the oracle prior cannot run vsd: its data change with every camera, and a copy without "
                         "camera conditioning cannot follow them; use sds, csd, nfsd or ism")


@torch.no_grad()
def field_iou(field: Field, solid: str, threshold: float, resolution: int = 64) -> float:
    """IoU between {sigma > threshold} of a field and the inside of an analytic solid, on a lattice.

    Use the level renders put the surface at (`engine.mesh.auto_threshold`), as mesh export does.
    """
    lin = torch.linspace(-0.95, 0.95, resolution)
    x = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).view(-1, 3)
    dev = next(field.parameters()).device
    pred = torch.cat([field.query_density(c.to(dev)).cpu() for c in x.split(65536)]) > threshold
    truth = world.solid_sdf(solid, x) < 0
    return float((pred & truth).sum() / (pred | truth).sum().clamp(min=1))
