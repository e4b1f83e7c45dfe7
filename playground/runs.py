"""The runs of a session: run A always, run B while a fork is open.

A `Run` is one trainer and what the pane and the API show of it: the live parameters of its next step and
of its last one, its loss history, its scores, its export folder and the viewer's copy of its field.
`fork_trainer` makes run B: a new trainer of the same prior loaded with a deep copy of A's state (field,
background, optimizer moments, occupancy grid, step, generator, VSD's copy of the prior), so B goes on exactly as A would have
with the same live parameters, and differs only by what the fork changed. Any live parameter can differ:
the fork takes `LiveParams` whole. `splat_trainer` makes run B as Gaussian splats instead ("fork as splats"):
Gaussians drawn from A's NeRF (`engine.splats.splats_from_field`), its own optimizer, A's step and background.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.checkpoint import checkpoint_state, load_into
from engine.config import LiveParams, quoted
from engine.splats import splats_from_field
from engine.trainer import StepResult, Trainer
from playground.plots import smoothed_loss
from playground.snapshot import Snapshot

RUN_NAMES = ("A", "B")
HISTORY_MAX = 4000  # loss points kept per run; halved (every other point) when exceeded
# fork as splats: points drawn on a 32^3 lattice (the grid NeRF's own), each Gaussian a third of a cell wide. On
# the oracle cube after 80 steps, 1024 of them cover 13.5 % of two views at the fork (the NeRF: 21 %); drawn on
# 64^3 (the engine's default) they are half as wide and cover 8 %, at the same cost per step
DRAW_LATTICE = 32


def live_dict(live: LiveParams) -> dict:
    d = dataclasses.asdict(live)
    d["light_color"] = list(d["light_color"])
    return d


def differences(a: LiveParams, b: LiveParams) -> dict:
    """{name: [A's value, B's value]} for every live parameter that differs (JSON-ready)."""
    da, db = live_dict(a), live_dict(b)
    return {k: [da[k], db[k]] for k in da if da[k] != db[k]}


def find_run(runs: list[Run], name: str) -> Run | None:
    """The run called `name` in `runs`, or None (B while no fork is open)."""
    return next((r for r in runs if r.name == name), None)


def named_run(runs: list[Run], name: str) -> Run:
    """The run called `name`; ValueError says why there is none."""
    if name not in RUN_NAMES:
        raise ValueError(f"run must be one of {', '.join(RUN_NAMES)}; got {quoted(name)}")
    if (run := find_run(runs, name)) is None:
        raise ValueError(f"there is no run {name}: fork run A first")
    return run


def fork_trainer(trainer: Trainer, live: LiveParams) -> Trainer:
    """A new trainer continuing `trainer`'s state (a deep copy: nothing is shared but the frozen prior).

    Call it on the session thread (the only writer of `trainer`), so the state copied is one step's.
    """
    meta, tensors = checkpoint_state(trainer, live)  # cloned tensors, VSD's copy included: B never aliases A
    twin = Trainer(trainer.cfg, trainer.prior, trainer.device, live)
    load_into(twin, meta, tensors)
    twin.rollbacks = trainer.rollbacks
    return twin


def splat_trainer(trainer: Trainer, live: LiveParams) -> Trainer:
    """A new trainer of Gaussian splats drawn from `trainer`'s NeRF (`splats.init_count` of them, GaussianDreamer's
    start from a 3D shape), with its own optimizer (fresh moments); the step, the background and the generator's
    state carry on, so B's schedules (t annealing, shading) go on from A's step. ValueError if A's field is empty.

    Call it on the session thread: it reads a copy of A's field and seeds no global RNG that A could see, so A's
    next steps are what they would have been without the fork.
    """
    cfg = trainer.cfg.with_settings({"field.backbone": "gaussians"}).validated()
    nerf = copy.deepcopy(trainer.field).eval()  # A's own modules are only read through this copy
    cuda = [trainer.device] if trainer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # Trainer() seeds the global RNG for its (replaced) blob
        twin = Trainer(cfg, trainer.prior, trainer.device, live)
    draw = torch.Generator().manual_seed(cfg.seed)  # the draw's own generator: A's is left as it is
    drawn = splats_from_field(nerf, cfg.field, cfg.splats, cfg.splats.init_count, draw, resolution=DRAW_LATTICE)
    twin.field.load_state_dict(drawn.state_dict())  # resizes in place: the optimizer keeps its parameters
    twin.background.load_state_dict(copy.deepcopy(trainer.background.state_dict()))
    twin.generator.set_state(trainer.generator.get_state().clone())
    twin.step_count = trainer.step_count
    return twin


@dataclass(eq=False)
class Run:
    """One run: its trainer and what is shown of it. Written by the session thread; `add_score` by the
    scorer, which only appends to the run whose trainer it scored."""

    name: str  # "A" or "B": how the pane, the viewer, the API and exports name it
    live: LiveParams  # what its next step uses
    trainer: Trainer | None = None
    used: LiveParams | None = None  # what its last step used (`live` until it steps)
    history: list = field(default_factory=list)  # (step, loss)
    scores: list = field(default_factory=list)  # {"step", "color_r_precision", "geometry_r_precision"}
    last_metrics: dict = field(default_factory=dict)
    recent_cameras: tuple | None = None  # (c2w [B, 4, 4], focal [B]) of the last step, for the viewer
    run_dir: Path | None = None  # its export folder, made on the first export
    saved: tuple | None = None  # (id(trainer), step) of the last checkpoint written
    warnings: list = field(default_factory=list)  # prompt words its prior does not know
    snap: Snapshot | None = None  # the viewer's latest frozen copy of its field
    snap_wanted: threading.Event = field(default_factory=threading.Event)  # a viewer asked for a fresher copy
    times: list = field(default_factory=list)  # perf_counter of its last steps

    def __post_init__(self):
        self.used = self.used or self.live

    @property
    def step(self) -> int:
        tr = self.trainer
        return tr.step_count if tr is not None else 0

    @property
    def score(self) -> dict | None:
        scores = self.scores
        return scores[-1] if scores else None

    def restart(self, trainer: Trainer, live: LiveParams) -> None:
        """A new field: everything shown of the old one goes (the caller holds the session lock)."""
        self.trainer, self.live, self.used, self.run_dir, self.saved, self.snap = trainer, live, live, None, None, None
        self.history, self.scores, self.last_metrics, self.times, self.recent_cameras = [], [], {}, [], None

    def forked(self, changes: dict, backbone: str | None = None) -> Run:
        """Run B: a copy of this run's state with `changes` to its live parameters, or with `backbone`
        "gaussians" splats drawn from this run's NeRF (`splat_trainer`). Call it on the session thread, this
        trainer's only writer, so that the state copied is one step's."""
        live = self.live.replace(**changes)
        b = Run("B", live=live)
        as_splats = backbone == "gaussians" and not self.trainer.field.rasterized
        b.restart((splat_trainer if as_splats else fork_trainer)(self.trainer, live), live)
        return b

    @property
    def backbone(self) -> str | None:
        """Its field's backbone ("grid", "hash", "gaussians"), None before it has one."""
        return self.trainer.cfg.field.backbone if self.trainer is not None else None

    def train(self, live: LiveParams, lock: threading.Lock) -> None:
        """One step with `live` under `lock` (the session lock), a fresh copy of the field if a viewer asked for
        one, then `record`."""
        with lock:
            result = self.trainer.step(live)
            if self.snap_wanted.is_set():
                self.snap_wanted.clear()
                self.snap = Snapshot.of(self.trainer)
        self.record(result, live)

    def record(self, result: StepResult, live: LiveParams) -> None:
        """What a step did: the live values it used, its loss and cameras, and the time (for its/s)."""
        self.used, self.last_metrics = live, result.metrics
        self.recent_cameras = (result.cameras.c2w.detach().cpu(), result.cameras.focal.detach().cpu())
        self.history.append((result.metrics["step"], result.metrics.get("loss", float("nan"))))
        if len(self.history) > HISTORY_MAX:
            self.history = self.history[::2]
        self.times = self.times[-19:] + [time.perf_counter()]

    def add_score(self, trainer: Trainer, score: dict) -> bool:
        """Keep a score of `trainer`'s field if it is still this run's (a reset may have replaced it)."""
        if trainer is not self.trainer:
            return False
        self.scores = self.scores[-(HISTORY_MAX - 1):] + [score]
        return True

    def its_per_s(self, running: bool) -> float:
        t = self.times
        if not running or len(t) < 2 or time.perf_counter() - t[-1] > 5.0:
            return 0.0
        return (len(t) - 1) / max(t[-1] - t[0], 1e-9)

    def snapshot(self, lock: threading.Lock, *, running: bool) -> Snapshot | None:
        """A frozen copy of its field at a recent step, to render without holding the lock.

        While training runs, the session thread makes a fresher copy right after this run's next step when asked
        (no waiting on the lock here); otherwise the copy is taken now under `lock` (the session lock).
        """
        tr, snap = self.trainer, self.snap
        if tr is None:
            return None
        if snap is not None and snap.key == (id(tr), tr.step_count):
            return snap
        if running and snap is not None and snap.key[0] == id(tr):
            self.snap_wanted.set()
            return snap
        with lock:
            if self.trainer is None:
                return None
            self.snap = Snapshot.of(self.trainer)
            return self.snap

    def folder(self, out_root: Path, make, *, named: bool) -> Path:
        """Its export folder: `make(out_root, prompt)` once, then the same; ending in "-A" / "-B" when `named`
        (while a fork is open), so the exports of the two runs say which is which."""
        if self.run_dir is None:
            base = Path(make(out_root, self.used.prompt))
            self.run_dir = base.with_name(f"{base.name}-{self.name}") if named else base
        return self.run_dir

    def summary(self, *, state: str, max_steps: int, reference: LiveParams | None = None) -> dict:
        """JSON-ready: name, state, step, loss, its/s, score, live values, and how they differ from `reference`."""
        tr = self.trainer
        done = tr is not None and tr.step_count >= max_steps
        return {"name": self.name, "state": "done" if done and state in ("running", "paused") else state,
                "step": self.step, "loss": self.last_metrics.get("loss"), "loss_smoothed": smoothed_loss(self.history),
                "its_per_s": round(self.its_per_s(state == "running"), 3), "score": self.score,
                "skipped_steps": tr.skipped_steps if tr is not None else 0,
                "shading_used": self.last_metrics.get("shading"), "live": live_dict(self.used),
                "next": live_dict(self.live), "warnings": list(self.warnings),
                "differs": differences(reference, self.used) if reference is not None else {},
                "run_dir": str(self.run_dir) if self.run_dir else None, "backbone": self.backbone,
                "gaussians": len(tr.field) if tr is not None and tr.field.rasterized else None}
