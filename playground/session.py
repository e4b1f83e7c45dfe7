"""A training session: one thread drives the runs' trainers (A, and B while forked), for the UI and the API.

The session thread is the only writer of the trainers and of `state` ("idle" | "running" | "paused" | "done" |
"error"). UI handlers (`start`, `pause`, `reset`, `fork`, `set_params`...) check their input, queue a command and
return; the thread applies it between steps. `lock` is held for one step, or while a field is copied. Other rooms:
`priors` (priors.py), `worker` (exports and previews, exports.py), `scorer` (score.py) are objects it holds;
lifecycle.py builds, forks and fails runs; status.py builds the status JSON."""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

from engine.config import Config, LiveParams, checked_util
from engine.priors import load_prior
from engine.priors.base import check_distillation
from playground import exports, lifecycle, snapshot
from playground import status as status_room
from playground.exports import EXPORTS, ExportRefused, Worker
from playground.priors import PriorCache, PriorUnavailable
from playground.runs import Run, find_run, named_run
from playground.score import Scorer

__all__ = ["EXPORTS", "STATES", "ExportRefused", "PriorUnavailable", "Session"]

log = logging.getLogger(__name__)
STATES = ("idle", "running", "paused", "done", "error")


class Session:
    """`cfg`, `live`: the launch prior's settings; `overrides`: dotted settings the command line set for the session.
    A new run's settings are `engine.presets.new_run` of those, the current run's and what the user set since
    (`pending`). `score_every_s`: seconds between live scores of each run (0: no live score). `train_util`: the
    share of time spent training, u in [0.05, 1] (nerfstudio's "train util"; live in `set_params`): after a step
    of t s the thread rests t (1 - u) / u, serving commands, so the viewer and the machine stay responsive."""

    def __init__(self, cfg: Config | None = None, live: LiveParams | None = None, *, device="cpu",
                 out_root: str | Path = "outputs", prior_loader=load_prior, preview_size: int = 128,
                 overrides: dict | None = None, prior_options=None, score_every_s: float = 5.0,
                 train_util: float = 1.0):
        self.cfg, self.device, self.out_root, self.overrides = cfg or Config(), device, Path(out_root), dict(overrides or {})
        self.pending: dict = {}  # dotted settings the user set for the next new run (`start`, `reset`)
        self.lock = threading.Lock()  # held for one training step, or while copying a field
        # run A always; run B while a fork is open. The list is replaced whole (under the lock), never mutated
        self.runs: list[Run] = [Run("A", live=(live or LiveParams()).validated())]
        self.prior_spec = self.cfg.prior
        self.state, self.message, self.error = "idle", "press Start to train", None
        self.warnings: list[str] = []  # run A's unknown prompt words, and what failed
        self.settings_note = ""  # what a prior switch applied and what it kept
        self.prior_failed: dict | None = None  # {"prior", "message"} of the last switch that failed, until a new run
        self.prior_failures = 0  # how many switches failed (the pane puts its dropdown back on each)
        self.priors = PriorCache(prior_loader, device=device, options=prior_options)
        self.worker = Worker(lock=self.lock, runs=lambda: self.runs, out_root=self.out_root, preview_size=preview_size)
        self.exports = self.worker.reports  # one line per finished export (the worker's list, appended there)
        self.scorer = Scorer(runs=lambda: self.runs, lock=self.lock, every_s=score_every_s) if score_every_s else None
        self._commands: queue.Queue = queue.Queue()  # (method, argument), applied by the session thread
        self.turn = 0  # which run trains next while forked: A and B take turns
        self.train_util = checked_util(train_util)  # share of the time spent training; the rest, resting
        self._thread = threading.Thread(target=self._loop, name="session", daemon=True)
        self._thread.start()

    @property
    def a(self) -> Run:
        return self.runs[0]

    @property
    def fork_run(self) -> Run | None:
        return find_run(self.runs, "B")

    @property
    def step(self) -> int:
        return self.runs[0].step

    # -- commands (any thread: they check their input, queue work for the session thread and return) --
    def start(self, prior: str | None = None, settings: dict | None = None) -> None:
        """Train: from idle/done/error builds a run if needed; from paused resumes. `settings`: dotted settings
        ("live.guidance_scale", "seed", "render.resolution"...) for the next new run, over its prior's preset; the
        live ones apply at once to a run that goes on. A prior that fails to load leaves the current run as it was."""
        self._commands.put((self._do_start, lifecycle.checked(self, prior, settings)))

    def pause(self) -> None:
        self._commands.put((self._do_move, ("running", "paused")))

    def resume(self) -> None:
        self._commands.put((self._do_move, ("paused", "running")))

    def reset(self, prior: str | None = None, settings: dict | None = None) -> None:
        """A new field with the current settings and `settings` (as in `start`), or `prior`'s preset for another
        kind of prior; keeps running if it was. Closes run B."""
        self._commands.put((self._do_reset, lifecycle.checked(self, prior, settings)))

    def fork(self, backbone: str | None = None, **changes) -> LiveParams:
        """Start run B as a copy of run A (field, optimizer, step, generator) with `changes` to A's live parameters;
        A and B then train in turns. `backbone="gaussians"`: B is Gaussian splats drawn from A's NeRF instead
        ("fork as splats"). An open fork is replaced. Returns B's live parameters."""
        if self.a.trainer is None:
            raise ValueError("nothing to fork yet: start a run first")
        new = self.a.live.replace(**changes)  # ValueError names a bad change
        self._commands.put((self._do_fork, (changes, lifecycle.fork_field(self, backbone))))
        return new

    def close_fork(self) -> None:
        """Close run B (its exports stay on disk); run A goes on alone."""
        self._commands.put((self._do_close_fork, None))

    def set_params(self, run: str = "A", **changes) -> LiveParams:
        """Check changes to a run's live parameters (ValueError names a bad one) and queue them; the parameters of
        the run's next step. "steps" (the run's length) applies to every run; "seed" to the next new run;
        "train_util" to the session."""
        target = named_run(self.runs, run)
        util = checked_util(changes.pop("train_util")) if "train_util" in changes else None  # the session's
        if "seed" in changes:  # the seed is fixed for a run: it is kept for the next new one
            self._commands.put((self._do_pending, lifecycle.checked(self, None, {"seed": changes.pop("seed")})[1]))
        new = target.live.replace(**changes)
        if "distillation" in changes and target.trainer is not None:  # a loss this prior cannot run: refused now
            check_distillation(target.trainer.prior, new.distillation)
        self.train_util = self.train_util if util is None else util
        self._commands.put((self._do_params, (run, changes)))
        return new

    def next_run(self, settings: dict) -> None:
        """Dotted settings for the next new run (Start from idle, done or error, or Reset), checked now (ValueError
        names a bad one); "field.backbone" takes "nerf" (the prior's NeRF backbone) or "gaussians" too."""
        self._commands.put((self._do_pending, lifecycle.checked(self, None, settings)[1]))

    def set_prior_options(self, options) -> None:
        """How SD / IF load and guide (engine.priors.PriorOptions), from the next Start or Reset that loads one."""
        self._commands.put((self._do_prior_options, options))

    def stop(self, timeout: float = 10.0) -> None:
        """End the session thread, the scorer and the worker; the session cannot be restarted."""
        self._commands.put((None, None))
        self._thread.join(timeout)
        if self.scorer is not None:
            self.scorer.stop(timeout)
        self.worker.shutdown()

    def set_view(self, cameras, height: int, width: int) -> None:
        """The viewer's last view at rest (engine Cameras of one view, its frame's H and W): what a snapshot shows."""
        self.worker.view = (cameras, height, width)

    def wait_idle_queue(self, timeout: float = 10.0) -> None:
        """Block until every queued command has been applied (for tests and scripts)."""
        done = threading.Event()
        self._commands.put((lambda _: done.set(), None))
        done.wait(timeout)

    # -- the session thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        rest_until = 0.0  # training rests until then (`train_util` below 1); commands are served meanwhile
        while True:
            rest = rest_until - time.monotonic() if self.state == "running" else None
            try:  # block for a command unless training; then just drain what is queued
                command, arg = self._commands.get(block=rest is None or rest > 0, timeout=rest)
            except queue.Empty:
                began = time.monotonic()
                self._train_one()
                ended = time.monotonic()
                rest_until = ended + (ended - began) * (1.0 - self.train_util) / self.train_util
                continue
            if command is None:  # stop
                return
            spec, name = self.prior_spec, getattr(command, "__name__", "command").removeprefix("_do_")
            try:
                command(arg)
            except PriorUnavailable as err:  # the current run, if any, is untouched: it goes on
                log.warning("session %s: %s", name, err)
                self.prior_failed = {"prior": self.prior_spec, "message": f"{name} failed: {err}"}
                self.prior_failures += 1
                self.prior_spec, self.message = spec, self.prior_failed["message"]
                self.warnings.append(self.message)  # kept in /status: the next step overwrites `message`
                if self.a.trainer is None:
                    self._fail(self.message)
            except Exception as err:  # a failed build: shown in the pane, the app stays up
                log.exception("session %s failed", name)
                self._fail(f"{name} failed: {err}")

    def _do_move(self, arg: tuple[str, str]) -> None:  # pause and resume
        if self.state == arg[0]:
            self.state, self.message = arg[1], {"paused": "paused", "running": "training"}[arg[1]]

    def _do_params(self, arg: tuple[str, dict]) -> None:
        name, changes = arg
        if (run := find_run(self.runs, name)) is None:
            self.message = f"run {name} was closed: its change was not applied"
            return
        run.live = run.live.replace(**changes)
        if run is self.a:  # what the user set since the last run: a new run keeps it over its prior's preset
            self.pending.update({f"live.{k}": v for k, v in changes.items()})
        if "steps" in changes:
            for other in self.runs:
                other.live = other.live.replace(steps=changes["steps"])
            if self.state == "done" and any(r.trainer is not None and r.step < r.live.steps for r in self.runs):
                self.state, self.message = "paused", f"run extended to {changes['steps']} steps; press Start"

    def _do_pending(self, settings: dict) -> None:
        self.pending.update(settings)
        self.message = f"{', '.join(f'{k} {v}' for k, v in settings.items())}: applies to the next new run (Reset)"

    def _do_prior_options(self, options) -> None:
        if self.priors.set_options(options):
            self.message = "prior options set: they apply when Start or Reset next loads sd or if"

    def _do_fork(self, arg: tuple[dict, str | None]) -> None:
        lifecycle.fork(self, arg)

    def _do_close_fork(self, _) -> None:
        if self.fork_run is not None:
            with self.lock:
                self.runs = [self.a]
            self.message = "closed run B; run A goes on"

    def _do_start(self, arg: tuple[str | None, dict]) -> None:
        prior, settings = arg
        self.pending.update(settings)
        if self.state in ("running", "paused"):  # the run goes on: live settings apply to it now
            if live := {k.removeprefix("live."): v for k, v in settings.items() if k.startswith("live.")}:
                self._do_params(("A", live))
            if fixed := {k: v for k, v in settings.items() if not k.startswith("live.")}:
                self._do_pending(fixed)  # says that they wait for the next new run
            if prior and prior != self.prior_spec:
                self.message = (f"already training with {self.prior_spec}; the prior {prior} was not used "
                                "(press Reset with it to switch)")
                self.warnings.append(self.message)
            self._do_move(("paused", "running"))
            return
        self.prior_spec = prior or self.prior_spec
        tr = self.a.trainer
        if (tr is None or self.state in ("done", "error") or tr.prior.name != self.priors.name(self.prior_spec)
                or lifecycle.new_field_wanted(self)):  # another field picked since this one was built
            lifecycle.new_trainer(self)
        self.state, self.message = "running", "training"

    def _do_reset(self, arg: tuple[str | None, dict]) -> None:
        prior, settings = arg
        self.pending.update(settings)
        self.prior_spec = prior or self.prior_spec
        was_running, forked = self.state == "running", self.fork_run is not None
        lifecycle.new_trainer(self)
        self.state = "running" if was_running else "idle"
        self.message = ("training" if was_running else "new field; press Start") + ("; run B closed" if forked else "")

    def _train_one(self) -> None:
        """One step of one run: A, or while forked A and B in turns (a finished run sits out)."""
        ready = [r for r in self.runs if r.trainer is not None and r.step < r.live.steps]
        if not ready:  # no field yet, or every run has all its steps
            done = self.a.trainer is not None
            self.state, self.message = ("done", f"finished {self.a.step} steps") if done else ("idle", self.message)
            return
        run = ready[self.turn % len(ready)]
        self.turn = (self.turn + 1) % len(self.runs)
        live = run.live  # read once: the whole step uses this one LiveParams
        try:
            if (live.prompt, live.negative_prompt) != (run.used.prompt, run.used.negative_prompt):
                self.message = "encoding the new prompt..."
                lifecycle.encode(self, run, live)
            run.train(live, self.lock)
        except Exception as err:
            return lifecycle.step_failed(self, run, err)
        self.message = "training"

    def _fail(self, message: str) -> None:
        self.state, self.error, self.message = "error", message, message
    # -- reading, rendering and exports (any thread): functions of the session, each defined in its room --------
    status = status_room.status  # the JSON the pane and the API show
    settings = status_room.settings  # the settings the run's prior brought
    vocabulary = status_room.vocabulary  # the prior's fixed vocabulary (the embedded prior's), or None
    its_per_s = status_room.its_per_s  # run A's steps per second
    render_source = snapshot.render_source  # (run="A"): a frozen copy of a run's field, to render without the lock
    render_sources = snapshot.render_sources  # [(name, frozen copy, live of its last step)] of each run
    preview = exports.preview  # (token, [2S, 2S x runs, 3] uint8) of the preview views, or None
    export = exports.export  # (kind, run="A", **kwargs) -> Future of {name: path}, or ExportRefused
    save_if_dirty = exports.save_if_dirty  # after `stop`: checkpoint the runs with unsaved steps
