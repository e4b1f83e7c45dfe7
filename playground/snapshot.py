"""A frozen copy of a trainer's field for rendering outside the training lock (viewer frames, previews).

It wraps the engine's `RenderSource` (copied in milliseconds under the lock) and renders with the
engine's `render_mode_image`, so the viewer's modes look exactly like the exports'. One difference:
the grid backbone generates its dense grid once per copy (`prepare()` is cached), not once per frame,
which is what makes the viewer's low-resolution frames cheap.
"""

from __future__ import annotations

import copy
import dataclasses
import threading

import torch
from torch import Tensor

from engine.cameras import Cameras
from engine.config import LiveParams
from engine.export import MODES, RenderSource, render_mode_image

RENDER_MODES = MODES  # lambertian, albedo, textureless, normal, depth, opacity


class _PreparedField:
    """Duck-types engine.field.Field for the renderer, with `prepare()` computed once for this frozen copy."""

    def __init__(self, field):
        self.cfg = field.cfg
        self._field = field
        self._queries: dict[bool, object] = {}
        self._mu = threading.Lock()  # two viewer threads may ask at once: prepare only once

    def prepare(self, occupied_fn=None):
        """The field's query, computed once. The copy's occupancy grid never changes, so a query prepared
        with one `occupied_fn` serves every later render of this copy."""
        key = occupied_fn is not None
        with self._mu:
            if key not in self._queries:
                with torch.no_grad():
                    self._queries[key] = self._field.prepare(occupied_fn)
            return self._queries[key]

    def query_density(self, x: Tensor) -> Tensor:
        inside = x.norm(dim=-1) <= self.cfg.radius
        return self.prepare()(x).density * inside


class Snapshot:
    """The field of a trainer at one step. Build it under the session lock; render it anywhere."""

    def __init__(self, trainer):
        self.key = (id(trainer), trainer.step_count)  # identifies run and step: a new copy when either changes
        self.source = RenderSource.from_trainer(trainer)
        self.source.field = _PreparedField(self.source.field)
        self.step = self.source.step
        self._variants: dict[int, RenderSource] = {}
        self._mu = threading.Lock()

    def with_samples(self, samples: int | None) -> RenderSource:
        """The source rendering `samples` per ray (the viewer trades samples for frame rate); same field."""
        if not samples or samples == self.source.cfg.render.num_samples:
            return self.source
        with self._mu:
            if samples not in self._variants:
                cfg = copy.deepcopy(self.source.cfg)
                cfg.render.num_samples = int(samples)
                self._variants[samples] = dataclasses.replace(self.source, cfg=cfg)
            return self._variants[samples]

    @torch.no_grad()
    def render(self, cams: Cameras, height: int, width: int, mode: str = "lambertian",
               live: LiveParams | None = None, samples: int | None = None) -> Tensor:
        """[B, 3, H, W] in [0, 1] in one of RENDER_MODES; the light is the live one when fixed, else at the camera.
        `samples` per ray defaults to the training's."""
        return render_mode_image(self.with_samples(samples), cams, height, width, mode, live)
