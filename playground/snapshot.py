"""A frozen copy of a trainer's field for rendering outside the training lock (viewer frames, previews).

Copying the small field, background and occupancy grid takes milliseconds under the lock; rendering
then runs on the caller's thread while training goes on. The grid backbone generates its dense grid
once per copy (`prepare()`), not once per frame, which is what makes low-resolution frames cheap.
"""

from __future__ import annotations

import copy
import threading

import torch
from torch import Tensor

from engine.cameras import Cameras, Light, make_light
from engine.config import LiveParams
from engine.render import render

RENDER_MODES = ("lambertian", "albedo", "textureless", "normal", "depth", "opacity")


class _FrozenField:
    """Duck-types engine.field.Field for engine.render.render, with the prepared query computed once."""

    def __init__(self, field):
        self.cfg = field.cfg
        self._field = field
        self._query = None
        self._mu = threading.Lock()  # two viewer threads may ask at once: prepare only once

    def prepare(self):
        with self._mu:
            if self._query is None:
                with torch.no_grad():
                    self._query = self._field.prepare()
            return self._query


class Snapshot:
    """Field, background and occupancy grid of a trainer at one step. Build it under the session lock."""

    def __init__(self, trainer):
        self.key = (id(trainer), trainer.step_count)
        self.step = trainer.step_count
        self.cfg, self.device = trainer.cfg, trainer.device
        field = copy.deepcopy(trainer.field).eval()
        for p in field.parameters():
            p.requires_grad_(False)
        self.field = _FrozenField(field)
        self.background = copy.deepcopy(trainer.background).eval()
        use_grid = trainer.estimator is not None and trainer.step_count >= trainer.cfg.render.occupancy_warmup
        self.estimator = copy.deepcopy(trainer.estimator) if use_grid else None

    def light_for(self, cams: Cameras, live: LiveParams) -> Light:
        """The live light when fixed; otherwise a light at each camera (a viewer has no random light)."""
        if live.light_mode != "fixed":
            live = LiveParams(light_mode="camera", light_color=live.light_color, ambient=live.ambient)
        return make_light(cams, live, self.cfg.camera, None)

    @torch.no_grad()
    def render(self, cams: Cameras, height: int, width: int, mode: str = "lambertian",
               live: LiveParams | None = None, light: Light | None = None) -> Tensor:
        """[B, 3, H, W] in [0, 1] in one of RENDER_MODES."""
        if mode not in RENDER_MODES:
            raise ValueError(f"render mode must be one of {', '.join(RENDER_MODES)}; got {mode!r}")
        live = live or LiveParams()
        cams = cams.to(self.device)
        light = (light or self.light_for(cams, live)).to(self.device)
        shading = mode if mode in ("lambertian", "albedo", "textureless", "normal") else "albedo"
        bg = (torch.tensor(self.cfg.background.color, device=self.device)
              if self.cfg.background.kind == "random" else None)
        out = render(self.field, self.background, cams, height, width, shading=shading, light=light,
                     cfg=self.cfg.render, estimator=self.estimator, bg_color=bg)
        if mode == "opacity":
            return out.opacity.expand(-1, 3, -1, -1).clamp(0, 1)
        if mode == "depth":  # near surfaces bright, far dark, empty black
            r = self.cfg.field.radius
            dist = cams.distance.view(-1, 1, 1, 1)
            d = out.depth / out.opacity.clamp(min=1e-4)
            v = (1.0 - (d - (dist - r)) / (2 * r)).clamp(0, 1) * (out.opacity > 0.05)
            return v.expand(-1, 3, -1, -1)
        return out.rgb.clamp(0, 1)
