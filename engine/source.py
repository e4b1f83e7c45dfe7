"""The one way to render the field for people: viewer frames, previews, exports, evaluation and the
trainer's fixed views all go through `RenderSource.render`.

The rule it holds: deterministic samples, the light at the camera unless the live light is fixed, the
run's background, and the occupancy grid once its warm-up is over. A source is either a frozen copy
(`from_trainer`, a few milliseconds under the session lock; then rendered anywhere while training goes
on, its field prepared once for all its frames) or a view of the trainer's own modules (`of`).
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from engine.cameras import Cameras, Light, make_light
from engine.config import Config, LiveParams
from engine.field import FieldQuery
from engine.render import OccupancyGrid, RenderOutput, render

MODES = ("lambertian", "albedo", "textureless", "normal", "depth", "opacity")


@dataclass
class _Prepared:
    """A frozen copy's field prepared once (the grid backbone generates its grid once per copy, not per
    frame): shared by the copy's variants, filled once under its lock."""

    query: FieldQuery | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class RenderSource:
    field: torch.nn.Module
    background: torch.nn.Module
    occupancy: OccupancyGrid | None
    cfg: Config
    step: int
    device: torch.device = torch.device("cpu")
    prepared: _Prepared | None = None  # set on frozen copies only: the trainer's own field changes every step

    @classmethod
    def of(cls, trainer) -> RenderSource:
        """The trainer's own modules (no copy): for renders on the training thread."""
        return cls(trainer.field, trainer.background, trainer.occupancy, trainer.cfg, trainer.step_count, trainer.device)

    @classmethod
    def from_trainer(cls, trainer) -> RenderSource:
        """A frozen deep copy; call it under the session lock, then release the lock and render."""
        return cls(*(_frozen_copy(m) for m in (trainer.field, trainer.background, trainer.occupancy)),
                   cfg=copy.deepcopy(trainer.cfg), step=int(trainer.step_count), device=trainer.device,
                   prepared=_Prepared())

    @classmethod
    def from_checkpoint(cls, run_dir: str | Path, device="cpu") -> RenderSource:
        """The field of a saved run, without building its prior (exports need none)."""
        from engine.checkpoint import read_checkpoint, section
        from engine.field import Background, make_field

        meta, tensors = read_checkpoint(run_dir)
        cfg = Config.from_dict(meta["config"])
        with torch.random.fork_rng(devices=[]):  # fresh modules are overwritten; keep the global RNG as it was
            fld, background = make_field(cfg.field, device, splats=cfg.splats), Background(cfg.background).to(device)
            occ = (OccupancyGrid(cfg.field.radius, cfg.render.occupancy_resolution, device)
                   if cfg.render.occupancy and not fld.rasterized else None)
        fld.load_state_dict(section(tensors, "field."))
        background.load_state_dict(section(tensors, "background."))
        if occ is not None and section(tensors, "occupancy."):
            occ.estimator.load_state_dict(section(tensors, "occupancy."))
        return cls(*(_frozen_copy(m) for m in (fld, background, occ)), cfg=cfg, step=int(meta["step"]),
                   device=torch.device(device), prepared=_Prepared())

    def with_samples(self, samples: int | None) -> RenderSource:
        """The same field rendered with `samples` per ray (the viewer trades samples for frame rate)."""
        if not samples or samples == self.cfg.render.num_samples:
            return self
        cfg = dataclasses.replace(self.cfg, render=dataclasses.replace(self.cfg.render, num_samples=int(samples)))
        return dataclasses.replace(self, cfg=cfg)

    @property
    def grid_in_use(self) -> bool:
        return self.occupancy is not None and self.step >= self.cfg.render.occupancy_warmup

    def _query(self) -> FieldQuery | None:
        if self.prepared is None:
            return None  # the renderer prepares the live field itself
        with self.prepared.lock:
            if self.prepared.query is None:
                with torch.no_grad():
                    self.prepared.query = self.field.prepare(self.occupancy if self.grid_in_use else None)
            return self.prepared.query

    @torch.no_grad()
    def render(self, cams: Cameras, height: int, width: int, shading: str = "lambertian", *,
               live: LiveParams | None = None, light: Light | None = None) -> RenderOutput:
        """Deterministic render: `light`, else the live light when fixed, else a light at the camera."""
        live = live or LiveParams()
        cams = cams.to(self.device)
        if light is None:
            if live.light_mode != "fixed":
                live = LiveParams(light_mode="camera", light_color=live.light_color, ambient=live.ambient)
            light = make_light(cams, live, self.cfg.camera, None)
        return render(self.field, self.background, cams, height, width, shading=shading, light=light.to(self.device),
                      cfg=self.cfg.render, occupancy=self.occupancy if self.grid_in_use else None, query=self._query())

    def image(self, cams: Cameras, height: int, width: int, mode: str = "lambertian",
              live: LiveParams | None = None) -> Tensor:
        """[B, 3, H, W] in [0, 1] in any of MODES."""
        if mode not in MODES:
            raise ValueError(f"unknown render mode {mode!r}; choose from {', '.join(MODES)}")
        shading = mode if mode in ("lambertian", "albedo", "textureless") else "albedo"
        out = self.render(cams, height, width, shading=shading, live=live)
        return mode_images(out, cams.to(out.rgb.device), mode, self.cfg.field.radius)


def _frozen_copy(module):
    if module is None:
        return None
    out = copy.deepcopy(module)
    if isinstance(out, torch.nn.Module):
        for p in out.parameters():
            p.requires_grad_(False)
            p.grad = None
        out.eval()
    return out


def mode_images(out: RenderOutput, cams: Cameras, mode: str, radius: float) -> Tensor:
    """One render mode's image [B, 3, H, W] in [0, 1] from a RenderOutput.

    "normal" is derived from the accumulated normals, so one lambertian render also yields the normals
    and the depth of a side-by-side frame. Depth is grey with a fixed range per camera (near = bright,
    empty = black), so frames of a video do not flicker as the visible depth range changes.
    """
    if mode in ("lambertian", "albedo", "textureless"):
        img = out.rgb
    elif mode == "normal":  # sum_i w_i (n_i + 1) / 2 over a white background
        img = (out.normal + out.opacity) * 0.5 + (1.0 - out.opacity)
    elif mode == "opacity":
        img = out.opacity.expand(-1, 3, -1, -1)
    elif mode == "depth":
        dist = cams.distance.to(out.depth).view(-1, 1, 1, 1)
        near = (dist - radius).clamp(min=0)
        surface = out.depth / out.opacity.clamp(min=1e-6)
        img = ((1.0 - (surface - near) / (2 * radius)).clamp(0, 1) * out.opacity).expand(-1, 3, -1, -1)
    else:
        raise ValueError(f"unknown render mode {mode!r}; choose from {', '.join(MODES)}")
    return img.clamp(0, 1)  # accumulation round-off can overshoot 1 by an ulp
