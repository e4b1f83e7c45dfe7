"""The DreamFusion loop: one `Trainer.step(live)` samples cameras, light and shading, renders, asks the
prior for the SDS gradient, adds the regularisers and takes one Adam step.

All randomness comes from one CPU `torch.Generator` seeded by the config, so a seeded run is
bit-for-bit repeatable on CPU and resumes exactly from a checkpoint (its state is saved).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from engine import accel
from engine import cameras as cam
from engine.config import Config, LiveParams
from engine.field import Background, make_field
from engine.priors.base import Prior, PromptEmbedding, SDSContext
from engine.render import OccupancyGrid, RenderOutput, render
from engine.sds import sds_loss, view_labels
from engine.shading import pick_shading

# Adam as Instant-NGP sets it for hash grids (beta2 0.99, tiny eps); the grid backbone trains well with it too
ADAM_BETAS, ADAM_EPS = (0.9, 0.99), 1e-15


def t_max_at(cfg, step: int) -> float:
    """Upper end of the t range at `step`: linear from t_max to t_max_end over anneal_steps."""
    frac = min(1.0, step / max(cfg.anneal_steps, 1))
    return cfg.t_max + (cfg.t_max_end - cfg.t_max) * frac


def orientation_weight(cfg, step: int) -> float:
    """Orientation loss weight: ramps linearly from 0 to its final value (threestudio ramps it too)."""
    return cfg.orientation * min(1.0, step / max(cfg.orientation_ramp_steps, 1))


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-5, 1 - 1e-5)
    return -(p * p.log() + (1 - p) * (1 - p).log())


@dataclass
class StepResult:
    """What one step did; `metrics` is JSON-ready."""

    metrics: dict
    cameras: cam.Cameras
    image: torch.Tensor  # [B, 3, H, W] the render the prior saw (detached)


class Trainer:
    """Owns the field, background, optimizer, occupancy grid and generator of one run."""

    def __init__(self, cfg: Config, prior: Prior, device="cpu", live: LiveParams | None = None):
        self.cfg, self.prior, self.device = cfg.validated(), prior, torch.device(device)
        live = live or LiveParams()
        torch.manual_seed(cfg.seed)  # network initialisation
        self.field = make_field(cfg.field, self.device, splats=cfg.splats)
        self.background = Background(cfg.background).to(self.device)
        self.optimizer = torch.optim.Adam(
            [*self.field.param_groups(live.learning_rate),
             {"params": list(self.background.parameters()), "lr": live.learning_rate, "name": "background"}],
            betas=ADAM_BETAS, eps=ADAM_EPS)
        self.occupancy = (OccupancyGrid(cfg.field.radius, cfg.render.occupancy_resolution, self.device)
                          if cfg.render.occupancy and not self.field.rasterized else None)
        # CUDA kernels only when already built (never built here: `engine.accel`): gsplat's rasterizer for
        # splats, nerfacc's sampler for the NeRFs
        cuda = self.device.type == "cuda"
        self.packed = cuda and (accel.load_gsplat() if self.field.rasterized
                                else self.occupancy is not None and accel.load_kernels())
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step_count = 0
        self.skipped_steps = 0
        self.rollbacks = 0  # times repeated non-finite steps restored the last good state
        self._nonfinite_run = 0  # consecutive skipped steps
        self._good: dict | None = None  # last good state (see _keep_good_state), taken after a good step
        self._good_age = 0  # good steps since it was taken
        self._embeddings: dict[tuple[str, str], PromptEmbedding] = {}
        self.vsd = None  # engine.priors.vsd.TrainableCopy, made on the first "vsd" step and kept when switching away

    # -- prompts -------------------------------------------------------------------------------------
    def embedding(self, prompt: str, negative_prompt: str = "") -> PromptEmbedding:
        """The prior's encoding of a prompt, computed once per (prompt, negative prompt)."""
        key = (prompt, negative_prompt)
        if key not in self._embeddings:
            if len(self._embeddings) > 16:
                self._embeddings.clear()
            self._embeddings[key] = self.prior.encode_prompt(prompt, negative_prompt)
        return self._embeddings[key]

    @property
    def resolution(self) -> int:
        return self.cfg.render.resolution or self.prior.resolution

    @property
    def grid_in_use(self) -> bool:
        """Whether renders skip empty space: the occupancy grid is used once its warm-up is over."""
        return self.occupancy is not None and self.step_count >= self.cfg.render.occupancy_warmup

    # -- one step --------------------------------------------------------------------------------------
    def step(self, live: LiveParams) -> StepResult:
        """One optimisation step with the live parameters `live` (validated by the caller)."""
        cfg, g, res = self.cfg, self.generator, self.resolution
        t0 = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = live.learning_rate * group.get("lr_scale", 1.0)
        emb = self.embedding(live.prompt, live.negative_prompt)
        # 1. sample the views, the light and the shading of this step
        cams = cam.sample_cameras(cfg.camera, cfg.camera.batch_size, g, self.device)
        light = cam.make_light(cams, live, cfg.camera, g)
        shading = pick_shading(live.shading, cfg.shading, self.step_count, g)
        # 2. render (the occupancy grid's update draws its seed from the run's generator)
        if self.occupancy is not None:
            seed = int(torch.randint(0, 2**62, (), generator=g))
            self.occupancy.update(self.step_count, self.field, cfg.render, seed)
        self.field.train()
        out = render(self.field, self.background, cams, res, res, shading=shading, light=light, cfg=cfg.render,
                     occupancy=self.occupancy if self.grid_in_use else None, generator=g, packed=self.packed)
        t1 = time.perf_counter()
        # 3. the prior's gradient of the live distillation (SDS by default) in image space (no backprop through it)
        if live.distillation == "vsd" and self.vsd is None:
            self.vsd = self.prior.vsd_copy()  # VSD's trainable copy of the prior, the run's own (it fits the renders)
        ctx = SDSContext(view_weights=cams.view_weights(), cameras=cams, light=light, shading=shading,
                         view_dependent=cfg.sds.view_dependent, step=self.step_count,
                         distillation=live.distillation, vsd=self.vsd)
        t_range = (cfg.sds.t_min, t_max_at(cfg.sds, self.step_count))
        grad, info = self.prior.sds_grad(out.rgb.detach(), emb, ctx, guidance_scale=live.guidance_scale,
                                         t_range=t_range, generator=g)
        t2 = time.perf_counter()
        # 4. losses, backward, optimizer step; a non-finite step is skipped (and repeated ones roll back)
        losses = self._losses(out, grad.to(out.rgb))
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(total)) and bool(torch.isfinite(grad).all())
        if finite:
            total.backward()
            finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self._params())
        field_metrics = {}
        if finite:
            self.optimizer.step()
            field_metrics = self.field.after_step(self.step_count, self.optimizer, out, g)  # splats densify here
            self._keep_good_state()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self._nonfinite_run += 1
            if 0 < cfg.sds.rollback_after <= self._nonfinite_run:
                self._roll_back()
        t3 = time.perf_counter()
        metrics = {"step": self.step_count, "loss": float(total.detach()) if finite else float("nan"),
                   **{f"loss_{k}": float(v.detach()) for k, v in losses.items()},
                   "t": info.get("t", []), "t_max": t_range[1], "guidance_scale": live.guidance_scale,
                   "distillation": live.distillation,
                   "shading": shading, "views": view_labels(ctx.view_weights), "skipped": not finite,
                   "skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks, "samples": out.samples,
                   "ms_render": 1e3 * (t1 - t0), "ms_prior": 1e3 * (t2 - t1), "ms_backward": 1e3 * (t3 - t2),
                   **field_metrics}
        self.step_count += 1
        return StepResult(metrics, cams, out.rgb.detach())

    # -- recovery from non-finite steps ------------------------------------------------------------------
    def _keep_good_state(self) -> None:
        """After a good step: copy the trainable state every `good_state_every` good steps.

        Only tensors are copied (no RNG draw), so seeded runs stay bit-identical with or without it.
        """
        self._nonfinite_run = 0
        every = self.cfg.sds.good_state_every
        if every <= 0 or self.cfg.sds.rollback_after <= 0:
            return
        self._good_age += 1
        if self._good is None or self._good_age >= every:
            self._good = {"field": copy.deepcopy(self.field.state_dict()),
                          "background": copy.deepcopy(self.background.state_dict()),
                          "optimizer": copy.deepcopy(self.optimizer.state_dict())}
            self._good_age = 0

    def _roll_back(self) -> None:
        """Restore the last good state after `rollback_after` consecutive skipped steps."""
        self._nonfinite_run = 0
        if self._good is None:  # no good step yet: the initial state has not been changed
            return
        self.field.load_state_dict(self._good["field"])
        self.background.load_state_dict(self._good["background"])
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(copy.deepcopy(self._good["optimizer"]))
        for group, lr in zip(self.optimizer.param_groups, lrs):  # the live learning rate stays
            group["lr"] = lr
        self.rollbacks += 1

    def _params(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _losses(self, out: RenderOutput, grad: torch.Tensor) -> dict:
        reg = self.cfg.reg
        losses = {"sds": sds_loss(out.rgb, grad)}
        if reg.opacity > 0:
            losses["opacity"] = reg.opacity * out.opacity.mean()
        if reg.entropy > 0:
            losses["entropy"] = reg.entropy * binary_entropy(out.opacity).mean()
        w = orientation_weight(reg, self.step_count)
        if w > 0:
            losses["orientation"] = w * out.orientation.mean()
        return losses

    # -- rendering for people ----------------------------------------------------------------------------
    @torch.no_grad()
    def render_views(self, cams: cam.Cameras, height: int, width: int, shading: str = "lambertian", *,
                     live: LiveParams | None = None, light: cam.Light | None = None) -> RenderOutput:
        """Deterministic render of the current field, as every view for people is made (`RenderSource`)."""
        from engine.source import RenderSource

        return RenderSource.of(self).render(cams, height, width, shading, live=live, light=light)
