"""What the viewer and the previews render: a frozen copy of the field at one step of one run.

The copy is the engine's `RenderSource.from_trainer` (milliseconds under the session lock); it renders
exactly as exports do, outside the lock, with its field prepared once for all its frames.
`render_source(session, run)` and `render_sources(session)` are the session's (`Session.render_source`...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.cameras import Cameras
from engine.config import LiveParams
from engine.source import MODES, RenderSource

RENDER_MODES = MODES  # lambertian, albedo, textureless, normal, depth, opacity


@dataclass(frozen=True)
class Snapshot:
    """The field of a trainer at one step. Build it under the session lock; render it anywhere."""

    key: tuple  # (id(trainer), step): a new copy when either changes
    source: RenderSource

    @classmethod
    def of(cls, trainer) -> Snapshot:
        return cls((id(trainer), trainer.step_count), RenderSource.from_trainer(trainer))

    @property
    def step(self) -> int:
        return self.source.step

    @property
    def rasterized(self) -> bool:
        """A field of Gaussian splats (the viewer lets the browser draw it)."""
        return bool(getattr(self.source.field, "rasterized", False))

    def with_samples(self, samples: int | None) -> RenderSource:
        return self.source.with_samples(samples)

    @torch.no_grad()
    def render(self, cams: Cameras, height: int, width: int, mode: str = "lambertian", *,
               live: LiveParams | None = None, samples: int | None = None) -> Tensor:
        """[B, 3, H, W] in [0, 1] in one of RENDER_MODES; `samples` per ray defaults to the training's."""
        return self.with_samples(samples).image(cams, height, width, mode, live)


def render_source(session, run: str = "A") -> Snapshot | None:
    """A frozen copy of a run's field at a recent step (`Run.snapshot`), or None (no such run, or no field yet)."""
    r = next((r for r in session.runs if r.name == run), None)
    return r.snapshot(session.lock, running=session.state == "running") if r is not None else None


def render_sources(session) -> list[tuple[str, Snapshot, LiveParams]]:
    """(name, frozen copy, live parameters of its last step) of each run: one, or A and B while forked."""
    running = session.state == "running"
    snaps = [(r, r.snapshot(session.lock, running=running)) for r in session.runs]
    return [(r.name, snap, r.used) for r, snap in snaps if snap is not None]
