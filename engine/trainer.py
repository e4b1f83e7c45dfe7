"""The DreamFusion loop: one `Trainer.step(live)` samples cameras, light and shading, renders, asks the
prior for the SDS gradient, adds the regularisers and takes one Adam step.

All randomness comes from one CPU `torch.Generator` seeded by the config, so a seeded run is
bit-for-bit repeatable on CPU and resumes exactly from a checkpoint (its state is saved).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

from engine import cameras as cam
from engine.config import Config, LiveParams
from engine.field import Background, make_field
from engine.ops import norm
from engine.priors.base import Prior, PromptEmbedding, SDSContext
from engine.render import RenderOutput, make_occupancy, render
from engine.sds import sds_loss, view_labels
from engine.shading import pick_shading


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


def grid_tv(density: torch.Tensor, cell: float) -> torch.Tensor:
    """Total variation of a density grid [D, H, W], on cell opacity 1 - exp(-sigma * cell) so that it is
    bounded and scale-free: isotropic forward differences, summed over lattice points and divided by the
    points' count. A solid with flat faces pays about its surface area; ribs, waffles and floaters pay more
    (Plenoxels and DVGO regularise their grids with a TV term too)."""
    a = 1.0 - torch.exp(-density.clamp(min=0.0) * cell)
    dx = a[:-1, :-1, 1:] - a[:-1, :-1, :-1]
    dy = a[:-1, 1:, :-1] - a[:-1, :-1, :-1]
    dz = a[1:, :-1, :-1] - a[:-1, :-1, :-1]
    return (dx.square() + dy.square() + dz.square() + 1e-8).sqrt().sum() / density.numel()


def normal_smoothness(normal: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between neighbouring pixels of a rendered normal map [B, 3, H, W] (the
    opacity-weighted normals, so the background is zero): penalises ribbed or bumpy surfaces, as
    threestudio's 2D normal smoothness does."""
    return ((normal[..., 1:, :] - normal[..., :-1, :]).square().mean()
            + (normal[..., :, 1:] - normal[..., :, :-1]).square().mean())


@dataclass
class StepResult:
    """What one step did; `metrics` is JSON-ready."""

    metrics: dict
    cameras: cam.Cameras
    image: torch.Tensor  # [B, 3, H, W] the render the prior saw (detached)


class Trainer:
    """Owns the field, background, optimizer, occupancy grid and generator of one run."""

    def __init__(self, cfg: Config, prior: Prior, device="cpu", live: LiveParams | None = None):
        self.cfg, self.prior, self.device = cfg, prior, torch.device(device)
        if cfg.sds.view_blend not in ("interpolate", "nearest"):
            raise ValueError(f"unknown sds.view_blend {cfg.sds.view_blend!r}; choose 'interpolate' or 'nearest'")
        live = live or LiveParams(seed=cfg.seed)
        torch.manual_seed(cfg.seed)  # network initialisation
        self.field = make_field(cfg.field, self.device)
        self.background = Background(cfg.background).to(self.device)
        self.optimizer = torch.optim.Adam(
            [{"params": list(self.field.parameters()), "lr": live.learning_rate, "name": "field", "lr_scale": 1.0},
             {"params": list(self.background.parameters()), "name": "background",
              "lr": live.learning_rate * cfg.optim.background_lr_scale, "lr_scale": cfg.optim.background_lr_scale}],
            betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        self.estimator = (make_occupancy(cfg.field.radius, cfg.render.occupancy_resolution, self.device)
                          if cfg.render.occupancy else None)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step_count = 0
        self.skipped_steps = 0
        self.rollbacks = 0  # times repeated non-finite steps restored the last good state
        self.early_stop_on = False  # whether training renders stop rays early (see _early_stop)
        self._nonfinite_run = 0  # consecutive skipped steps
        self._good: dict | None = None  # last good state (see _keep_good_state), taken after a good step
        self._good_age = 0  # good steps since it was taken
        self._embeddings: dict[tuple[str, str], PromptEmbedding] = {}

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

    # -- one step --------------------------------------------------------------------------------------
    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]

    def _update_occupancy(self) -> None:
        rc = self.cfg.render
        if self.estimator is None:
            return
        cell = 2.0 * self.cfg.field.radius / rc.occupancy_resolution
        query = None

        def occ_eval(x):
            nonlocal query
            query = query or self.field.prepare()
            inside = norm(x) <= self.cfg.field.radius
            return query(x).density * inside * cell * math.sqrt(3)

        # nerfacc samples cells and jitters points with the global RNG; seeding a forked global RNG from the
        # run's generator keeps every draw in `self.generator`, so a resumed run stays bit-identical.
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        devices = [self.device] if self.device.type == "cuda" else []
        # It also writes cells with duplicate indices (a race under several threads): update on one thread.
        threads = torch.get_num_threads()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            torch.set_num_threads(1)
            try:
                self.estimator.update_every_n_steps(self.step_count, occ_eval_fn=occ_eval, occ_thre=rc.occupancy_threshold,
                                                    n=rc.occupancy_every, warmup_steps=rc.occupancy_warmup)
            finally:
                torch.set_num_threads(threads)

    def _step_background(self) -> torch.Tensor | None:
        """This step's solid background colour, or None for the configured background.

        With probability `grey_prob` a random grey in `grey_range` stands in: an object that matches the
        usual backdrop (a white house on white) cannot then pass for one by fading into it, and a translucent
        one changes colour with the backdrop, which the prior sees. threestudio's backgrounds have the same
        switch (`random_aug`, `random_aug_prob`), with random colours."""
        bc, g = self.cfg.background, self.generator
        if bc.grey_prob > 0 and float(torch.rand((), generator=g)) < bc.grey_prob:
            lo, hi = bc.grey_range
            return (lo + (hi - lo) * torch.rand((), generator=g)).expand(3).to(self.device)
        if bc.kind == "random":
            return torch.rand(3, generator=g).to(self.device)
        return None

    def step(self, live: LiveParams) -> StepResult:
        """One optimisation step with the live parameters `live` (validated by the caller)."""
        cfg, g, res = self.cfg, self.generator, self.resolution
        timings = {}
        t0 = time.perf_counter()
        self._set_lr(live.learning_rate)
        emb = self.embedding(live.prompt, live.negative_prompt)
        # 1. sample the views, the light and the shading of this step
        cams = cam.sample_cameras(cfg.camera, cfg.camera.batch_size, g, self.device)
        light = cam.make_light(cams, live, cfg.camera, g)
        shading = pick_shading(live.shading, cfg.shading, self.step_count, g)
        bg_color = self._step_background()
        # 2. render
        self._update_occupancy()
        use_grid = self.estimator is not None and self.step_count >= cfg.render.occupancy_warmup
        self.field.train()
        self.field.progress = self.step_count
        early_stop = self._early_stop(use_grid)
        try:
            out = render(self.field, self.background, cams, res, res, shading=shading, light=light, cfg=cfg.render,
                         estimator=self.estimator if use_grid else None, generator=g, bg_color=bg_color,
                         early_stop=early_stop)
        finally:  # the grid this render generated (grid backbone), for `grid_tv`; never left on the field
            grid = self.field.__dict__.pop("last_grid", None)
        if early_stop:  # keep stopping early while it drops enough samples to pay for its density pass
            self.early_stop_on = out.samples <= (1.0 - cfg.render.early_stop_min_pruned) * out.occupied_samples
        t1 = time.perf_counter()
        # 3. the prior's SDS gradient in image space (no backprop through the prior)
        ctx = SDSContext(view_weights=self._view_weights(cams), cameras=cams, light=light, shading=shading,
                         view_dependent=cfg.sds.view_dependent,
                         step=self.step_count)
        t_range = (cfg.sds.t_min, t_max_at(cfg.sds, self.step_count))
        grad, info = self.prior.sds_grad(out.rgb.detach(), emb, ctx, guidance_scale=live.guidance_scale,
                                         t_range=t_range, weighting=cfg.sds.weighting, generator=g)
        t2 = time.perf_counter()
        # 4. losses, backward, optimizer step
        losses = self._losses(out, grad.to(out.rgb), grid)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(total)) and bool(torch.isfinite(grad).all())
        if finite:
            total.backward()
            finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self._params())
        if finite or not cfg.sds.skip_nonfinite:
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self._params(), cfg.optim.grad_clip)
            self.optimizer.step()
            self._keep_good_state()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self._nonfinite_run += 1
            if 0 < cfg.sds.rollback_after <= self._nonfinite_run:
                self._roll_back()
        t3 = time.perf_counter()
        timings = {"ms_render": 1e3 * (t1 - t0), "ms_prior": 1e3 * (t2 - t1), "ms_backward": 1e3 * (t3 - t2)}
        metrics = {"step": self.step_count, "loss": float(total.detach()) if finite else float("nan"),
                   **{f"loss_{k}": float(v.detach()) for k, v in losses.items()},
                   "t": info.get("t", []), "t_max": t_range[1], "guidance_scale": live.guidance_scale,
                   "shading": shading, "views": view_labels(ctx.view_weights), "skipped": not finite,
                   "skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks, "samples": out.samples,
                   "occupied_samples": out.occupied_samples, "early_stop": bool(early_stop), **timings}
        self.step_count += 1
        return StepResult(metrics, cams, out.rgb.detach())

    def _view_weights(self, cams: cam.Cameras) -> torch.Tensor:
        """The cameras' weights over the view prompts: interpolated, or one-hot on the nearest view
        (`sds.view_blend`), as the prior was trained: a blend of two view prompts is a text it never saw."""
        w = cams.view_weights()
        if self.cfg.sds.view_blend == "nearest":
            w = torch.nn.functional.one_hot(w.argmax(-1), w.shape[-1]).to(w.dtype)
        return w

    def _early_stop(self, use_grid: bool) -> float:
        """The transmittance below which this step's render stops rays (0: not at all).

        Early termination costs a density pass over the occupied samples and pays only once the object is
        opaque (a formed solid: ~40 % of the samples dropped, the engine ~25 % faster at 64²); SDS fields
        that are still translucent lose a few percent to it. So it stays on while it drops at least
        `early_stop_min_pruned` of the samples and is tried again every `early_stop_probe_every` steps;
        the flag is part of the checkpoint, so resumed runs decide the same way.
        """
        rc = self.cfg.render
        if not use_grid or rc.early_stop <= 0:
            return 0.0
        probe = self.step_count % max(rc.early_stop_probe_every, 1) == 0
        return rc.early_stop if self.early_stop_on or probe else 0.0

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

    def _losses(self, out: RenderOutput, grad: torch.Tensor, grid: torch.Tensor | None = None) -> dict:
        reg = self.cfg.reg
        losses = {"sds": sds_loss(out.rgb, grad)}
        if reg.opacity > 0:
            losses["opacity"] = reg.opacity * out.opacity.mean()
        if reg.entropy > 0:
            losses["entropy"] = reg.entropy * binary_entropy(out.opacity).mean()
        w = orientation_weight(reg, self.step_count)
        if w > 0:
            losses["orientation"] = w * out.orientation.mean()
        if reg.normal_smoothness > 0:
            losses["normal_smoothness"] = reg.normal_smoothness * normal_smoothness(out.normal)
        if reg.density_tv > 0 and grid is not None:
            cell = 2.0 * self.cfg.field.radius / (self.cfg.field.grid_resolution - 1)
            losses["density_tv"] = reg.density_tv * grid_tv(grid[0, 0], cell)
        return losses

    # -- rendering for people ----------------------------------------------------------------------------
    @torch.no_grad()
    def render_views(self, cams: cam.Cameras, height: int, width: int, shading: str = "lambertian",
                     live: LiveParams | None = None, light: cam.Light | None = None) -> RenderOutput:
        """Deterministic render of the current field (light at the camera unless given)."""
        live = live or LiveParams()
        cams = cams.to(self.device)
        light = light or cam.make_light(cams, live if live.light_mode == "fixed" else
                                        LiveParams(light_mode="camera", light_color=live.light_color,
                                                   ambient=live.ambient), self.cfg.camera, None)
        bg = torch.tensor(self.cfg.background.color, device=self.device) if self.cfg.background.kind == "random" else None
        use_grid = self.estimator is not None and self.step_count >= self.cfg.render.occupancy_warmup
        was = self.field.training
        self.field.eval()
        self.field.progress = self.step_count
        try:
            return render(self.field, self.background, cams, height, width, shading=shading, light=light,
                          cfg=self.cfg.render, estimator=self.estimator if use_grid else None, bg_color=bg)
        finally:
            self.field.train(was)
