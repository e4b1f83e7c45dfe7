"""A training session: the engine's trainer driven by one background thread, for the UI and the API.

The session thread is the only writer of the trainer and of `state` ("idle" | "running" | "paused" |
"done" | "error"). UI handlers call `start`, `pause`, `reset`, `set_params`...: those only put a
command on a queue and return; the thread applies it between steps. One `threading.Lock` guards the
field and optimizer: a step holds it for one step; a viewer takes a frozen copy of the field under it
(`render_source`) and renders that copy outside the lock, so frames never stall training.
Exports and previews run on a worker thread: they copy what they need under the lock, then work.

A fork (`fork`) adds run B, a deep copy of run A with some live parameters changed; the thread then trains
A and B in turns, one step each, until `close_fork`. The live score (playground/score.py) runs on its own
thread from copies of the fields.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
from pathlib import Path

import torch

from engine.cameras import preview_cameras
from engine.config import Config, LiveParams, quoted
from engine.presets import new_run, prior_kind
from engine.priors import check_prior_spec, load_prior
from engine.priors.base import check_distillation
from engine.source import RenderSource
from engine.trainer import Trainer
from playground.runs import RUN_NAMES, Run, differences, fork_trainer, live_dict
from playground.score import Scorer
from playground.snapshot import Snapshot

log = logging.getLogger(__name__)

STATES = ("idle", "running", "paused", "done", "error")
EXPORTS = ("checkpoint", "snapshot", "video", "mesh")
EXPORT_DEFAULTS = {"video": {"frames": 60, "size": 128}, "mesh": {"resolution": 96}}  # sized for a CPU


class PriorUnavailable(RuntimeError):
    """A prior could not be loaded; the session keeps its current run."""


class ExportRefused(RuntimeError):
    """An export whose run was reset, switched or closed before it started: nothing was written."""



LARGE_PRIORS = ("sd", "if")  # gigabytes each: only one stays loaded


class Session:
    """Owns the runs (A, and B while forked): their trainers, the thread, the lock, the state and history.

    `cfg` and `live` are the launch prior's settings. `overrides` (dotted settings, e.g. {"render.resolution": 24})
    are what the command line set for the whole session. Which settings a new run gets is
    `engine.presets.new_run`: the same kind of prior goes on with the current settings, another kind gets its
    preset; `overrides` and what the user set since the last run (`start(settings=...)`) win over both.
    `score_every_s`: seconds between live scores of each run (0: no live score).
    """

    def __init__(self, cfg: Config | None = None, live: LiveParams | None = None, *, device="cpu",
                 out_root: str | Path = "outputs", prior_loader=load_prior, preview_size: int = 64,
                 overrides: dict | None = None, prior_options=None,
                 score_every_s: float = 5.0):
        self.cfg = cfg or Config()
        self.device = device
        self.out_root = Path(out_root)
        self.preview_size = preview_size
        self.overrides = dict(overrides or {})
        self.pending: dict = {}  # dotted settings the user set for the next new run (`start`, `reset`)
        self.prior_options = prior_options
        self.lock = threading.Lock()  # held for one training step, or while copying a field
        # run A always; run B while a fork is open. The list is replaced whole (under the lock), never mutated
        self.runs: list[Run] = [Run("A", live=(live or LiveParams()).validated())]
        self.prior_spec = self.cfg.prior
        self.state, self.message, self.error = "idle", "press Start to train", None
        self.warnings: list[str] = []  # run A's unknown prompt words, and what failed
        self.settings_note = ""  # what a prior switch applied and what it kept
        self.exports: list[str] = []  # one line per finished export: what was written, or why not
        self._load_prior = prior_loader
        self._priors: dict = {}  # spec -> loaded prior; large ones are evicted on a switch
        self._commands: queue.Queue = queue.Queue()  # (method, argument), applied by the session thread
        self._turn = 0  # which run trains next while forked: A and B take turns
        self._preview: tuple[int, object] | None = None  # (token of the snapshots, image [H, 4W, 3] uint8)
        self._preview_busy = False
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="session-work")
        self.scorer = Scorer(runs=lambda: self.runs, lock=self.lock, every_s=score_every_s) if score_every_s else None
        self._thread = threading.Thread(target=self._loop, name="session", daemon=True)
        self._thread.start()

    # -- run A, as the single-run API has always named it ------------------------------------------------
    @property
    def a(self) -> Run:
        return self.runs[0]

    @property
    def fork_run(self) -> Run | None:
        runs = self.runs
        return runs[1] if len(runs) > 1 else None

    @property
    def max_steps(self) -> int:
        """Run A's length (a fork has the same unless changed)."""
        return self.runs[0].live.steps

    @property
    def trainer(self) -> Trainer | None:
        return self.runs[0].trainer

    @property
    def live(self) -> LiveParams:
        """What run A's next step uses."""
        return self.runs[0].live

    @property
    def used(self) -> LiveParams:
        """What run A's last step used."""
        return self.runs[0].used

    @property
    def history(self) -> list[tuple[int, float]]:
        return self.runs[0].history

    @property
    def last_metrics(self) -> dict:
        return self.runs[0].last_metrics

    @property
    def recent_cameras(self) -> tuple | None:
        return self.runs[0].recent_cameras

    @property
    def run_dir(self) -> Path | None:
        return self.runs[0].run_dir

    def run(self, name: str = "A") -> Run | None:
        """The run called `name` ("A" or "B"), or None (B while no fork is open)."""
        return next((r for r in self.runs if r.name == name), None)

    def _named(self, name) -> Run:
        if name not in RUN_NAMES:
            raise ValueError(f"run must be one of {', '.join(RUN_NAMES)}; got {quoted(name)}")
        run = self.run(name)
        if run is None:
            raise ValueError(f"there is no run {name}: fork run A first")
        return run

    # -- commands (any thread; they queue work for the session thread and return at once) -------------
    def start(self, prior: str | None = None, settings: dict | None = None) -> None:
        """Train: from idle/done/error builds a run if needed; from paused resumes.

        `settings`: dotted settings the user set since the last run ("live.guidance_scale", "seed",
        "render.resolution"...): they apply to the next new run, over its prior's preset; live ones apply at
        once to a run that goes on. An unknown prior kind or a bad setting raises ValueError here; a prior that
        fails to load leaves the current run as it was.
        """
        self._commands.put((self._do_start, self._checked(prior, settings)))

    def pause(self) -> None:
        self._commands.put((self._do_pause, None))

    def resume(self) -> None:
        self._commands.put((self._do_resume, None))

    def reset(self, prior: str | None = None, settings: dict | None = None) -> None:
        """A new field with the same settings and `settings` (as in `start`); keeps running if it was.
        With another kind of prior, that prior's settings apply (see the class docstring). Closes run B."""
        self._commands.put((self._do_reset, self._checked(prior, settings)))

    def _checked(self, prior: str | None, settings: dict | None) -> tuple[str | None, dict]:
        """(prior, settings) if a new run could be built with them, else ValueError naming the bad one."""
        prior = check_prior_spec(prior) if prior else None
        settings = dict(settings or {})
        new_run(prior or self.prior_spec, device=self.device, current=(self.cfg, self.live),
                overrides=self.overrides, changes={**self.pending, **settings})
        return prior, settings

    def fork(self, **changes) -> LiveParams:
        """Start run B as a copy of run A (field, optimizer, step, generator) with `changes` to A's live
        parameters (any of them; ValueError names a bad one). A and B then train in turns. An open fork is
        replaced. Returns B's live parameters."""
        if self.trainer is None:
            raise ValueError("nothing to fork yet: start a run first")
        new = self.live.replace(**changes)
        self._commands.put((self._do_fork, changes))
        return new

    def close_fork(self) -> None:
        """Close run B (its exports stay on disk); run A goes on alone."""
        self._commands.put((self._do_close_fork, None))

    def stop(self, timeout: float = 10.0) -> None:
        """End the session thread, the scorer and the worker; the session cannot be restarted."""
        self._commands.put((None, None))
        self._thread.join(timeout)
        if self.scorer is not None:
            self.scorer.stop(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)  # a running preview or export ends first

    def save_if_dirty(self) -> Path | None:
        """After `stop`: checkpoint each run with steps no checkpoint holds yet; run A's folder (else B's), or None."""
        from engine import export
        from engine.checkpoint import save_checkpoint

        saved = []
        for run in self.runs:
            tr = run.trainer
            if tr is None or tr.step_count == 0 or run.saved == (id(tr), tr.step_count):
                continue
            folder = run.folder(self.out_root, export.run_folder, named=len(self.runs) > 1)
            with self.lock:
                save_checkpoint(tr, folder, run.used)
            run.saved = (id(tr), tr.step_count)
            saved.append(folder)
        return saved[0] if saved else None

    def set_params(self, run: str = "A", **changes) -> LiveParams:
        """Validate changes to a run's live parameters (ValueError names a bad one) and queue them.

        Returns the parameters the run's next step will use. "steps" (the run's length) applies to every run.
        """
        target = self._named(run)
        if "seed" in changes:  # the seed is fixed for a run: it is kept for the next new one
            self._commands.put((self._do_pending, self._checked(None, {"seed": changes.pop("seed")})[1]))
        new = target.live.replace(**changes)  # raises ValueError with a clear message
        if "distillation" in changes and target.trainer is not None:  # a loss this prior cannot run: refused now
            check_distillation(target.trainer.prior, new.distillation)
        self._commands.put((self._do_params, (run, changes)))
        return new

    def set_prior_options(self, options) -> None:
        """How SD / IF load and guide (engine.priors.PriorOptions): used from the next Start or Reset that loads
        one; an SD / IF prior loaded with other options is reloaded then."""
        self._commands.put((self._do_prior_options, options))

    def wait_idle_queue(self, timeout: float = 10.0) -> None:
        """Block until every queued command has been applied (for tests and scripts)."""
        done = threading.Event()
        self._commands.put((lambda _: done.set(), None))
        done.wait(timeout)

    # -- the session thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:  # block for a command unless training; then just drain what is queued
                command, arg = self._commands.get(block=self.state != "running")
            except queue.Empty:
                self._train_one()
                continue
            if command is None:  # stop
                return
            spec, name = self.prior_spec, getattr(command, "__name__", "command").removeprefix("_do_")
            try:
                command(arg)
            except PriorUnavailable as err:  # the current run, if any, is untouched: it goes on
                log.warning("session %s: %s", name, err)
                self.prior_spec, self.message = spec, f"{name} failed: {err}"
                self.warnings.append(self.message)  # kept in /status: the next step overwrites `message`
                if self.trainer is None:
                    self._fail(self.message)
            except Exception as err:  # a failed build: shown in the pane, the app stays up
                log.exception("session %s failed", name)
                self._fail(f"{name} failed: {err}")

    def _do_params(self, arg) -> None:
        name, changes = arg
        run = self.run(name)
        if run is None:
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

    def _do_fork(self, changes: dict) -> None:
        a = self.a
        if a.trainer is None:
            self.message = "nothing to fork yet: start a run first"
            return
        live = a.live.replace(**changes)
        b = Run("B", live=live)
        b.restart(fork_trainer(a.trainer, live), live)  # this thread is A's only writer: one step's state
        with self.lock:
            self.runs = [a, b]
        self._encode(b, live)
        self._turn = 1  # B takes the next step
        if self.state == "done" and b.step < live.steps:
            self.state = "paused"
        diff = ", ".join(f"{k} {v[1]}" for k, v in differences(a.live, live).items())
        self.message = f"forked run B from run A at step {b.step}" + (f" with {diff}" if diff else " (no changes)")

    def _do_close_fork(self, _) -> None:
        if self.fork_run is None:
            return
        with self.lock:
            self.runs = [self.a]
        self.message = "closed run B; run A goes on"

    def _do_prior_options(self, options) -> None:
        if options == self.prior_options:
            return
        self.prior_options = options
        self._priors = {k: p for k, p in self._priors.items() if prior_kind(k) not in LARGE_PRIORS}
        self.message = "prior options set: they apply when Start or Reset next loads sd or if"

    def _do_pause(self, _) -> None:
        if self.state == "running":
            self.state, self.message = "paused", "paused"

    def _do_resume(self, _) -> None:
        if self.state == "paused":
            self.state, self.message = "running", "training"

    def _do_start(self, arg: tuple[str | None, dict]) -> None:
        prior, settings = arg
        self.pending.update(settings)
        if self.state in ("running", "paused"):
            live = {k.removeprefix("live."): v for k, v in settings.items() if k.startswith("live.")}
            if live:
                self._do_params(("A", live))
            if prior and prior != self.prior_spec:
                self.message = (f"already training with {self.prior_spec}; the prior {prior} was not used "
                                "(press Reset with it to switch)")
                self.warnings.append(self.message)
            self._do_resume(None)
            return
        if prior:
            self.prior_spec = prior
        if self.trainer is None or self.state in ("done", "error") or self.trainer.prior.name != self._prior_name():
            self._new_trainer()
        self.state, self.message = "running", "training"

    def _do_reset(self, arg: tuple[str | None, dict]) -> None:
        prior, settings = arg
        self.pending.update(settings)
        if prior:
            self.prior_spec = prior
        was_running, forked = self.state == "running", self.fork_run is not None
        self._new_trainer()
        self.state = "running" if was_running else "idle"
        self.message = ("training" if was_running else "new field; press Start") + ("; run B closed" if forked else "")

    def _prior_name(self) -> str:
        prior = self._priors.get(self.prior_spec)
        return prior.name if prior is not None else f"<not loaded: {self.prior_spec}>"

    def _load(self, spec: str):
        """The prior of `spec`, loaded once; before a large prior loads, priors no run uses are freed."""
        if spec in self._priors:
            return self._priors[spec]
        current = self.trainer.prior if self.trainer is not None else None
        if prior_kind(spec) in LARGE_PRIORS:
            self._priors = {k: p for k, p in self._priors.items() if p is current}
        self.message = f"loading prior {quoted(spec)}..."
        kwargs = {"options": self.prior_options} if self.prior_options is not None else {}
        try:
            prior = self._load_prior(spec, device=self.device, **kwargs)
        except (FileNotFoundError, ImportError, OSError, ValueError, RuntimeError) as err:
            raise PriorUnavailable(f"prior {quoted(spec)} is not available ({quoted(str(err), 300)[1:-1]}). "
                                   "Pick another prior (e.g. oracle:cube) and press Reset.") from None
        self._priors[spec] = prior
        return prior

    def _new_trainer(self) -> None:
        """A new field for run A (run B is closed): the trainer and everything shown of the old one are
        swapped under the lock at once, so an export or a frame never sees half a switch."""
        spec = self.prior_spec
        prior = self._load(spec)  # loaded before the current run is dropped: a failure keeps it
        run = new_run(spec, device=self.device, current=(self.cfg, self.live), overrides=self.overrides,
                      changes=self.pending)
        cfg, live, note = run.cfg, run.live, run.note
        trainer = Trainer(cfg, prior, self.device, live)
        a = self.a
        with self.lock:
            a.restart(trainer, live)
            self.runs = [a]
        self._preview, self.warnings, self.error, self._turn = None, [], None, 0
        self.cfg, self.pending, self.settings_note = cfg, {}, note or self.settings_note
        self._priors = {k: p for k, p in self._priors.items() if p is prior or prior_kind(k) not in LARGE_PRIORS}
        if self.device != "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()  # an evicted prior's memory goes back to the card
        self._encode(a, live)

    def _encode(self, run: Run, live: LiveParams) -> None:
        emb = run.trainer.embedding(live.prompt, live.negative_prompt)  # cached per prompt pair
        run.warnings = list(emb.warnings)
        if run is self.a:
            self.warnings = list(emb.warnings)

    def _train_one(self) -> None:
        """One step of one run: A, or while forked A and B in turns (a finished run sits out)."""
        if self.trainer is None:
            self.state = "idle"
            return
        ready = [r for r in self.runs if r.trainer is not None and r.step < r.live.steps]
        if not ready:
            self.state, self.message = "done", f"finished {self.trainer.step_count} steps"
            return
        run = ready[self._turn % len(ready)]
        self._turn = (self._turn + 1) % max(len(self.runs), 1)
        tr, live = run.trainer, run.live  # read once: the whole step uses this one LiveParams
        label = f"run {run.name} " if len(self.runs) > 1 else ""
        try:
            if (live.prompt, live.negative_prompt) != (run.used.prompt, run.used.negative_prompt):
                self.message = "encoding the new prompt..."
                self._encode(run, live)
            with self.lock:
                result = tr.step(live)
                if run.snap_wanted.is_set():  # a viewer asked for a fresher copy of the field
                    run.snap_wanted.clear()
                    run.snap = Snapshot.of(tr)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.state = "paused"
            self.message = (f"out of GPU memory at {label}step {tr.step_count}: lower the resolution, batch size or "
                            "samples per ray (or use CPU offload of the prior, or close run B), then press Start")
            self.warnings.append(self.message)
            log.warning(self.message)
            return
        except Exception as err:
            log.exception("training step failed")
            if run is not self.a:  # a failing fork is closed; run A goes on
                with self.lock:
                    self.runs = [self.a]
                self.message = f"run B closed: its step {tr.step_count} failed: {type(err).__name__}: {err}"
                self.warnings.append(self.message)
                return
            self._fail(f"{label}step {tr.step_count} failed: {type(err).__name__}: {err}")
            return
        run.record(result, live)
        self.message = "training"

    def _fail(self, message: str) -> None:
        self.state, self.error, self.message = "error", message, message

    # -- reading (any thread) ------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.runs[0].step

    def its_per_s(self) -> float:
        """Run A's steps per second (while forked, each run gets about half the steps)."""
        return self.runs[0].its_per_s(self.state == "running")

    def status(self) -> dict:
        """JSON-ready: state, step, its_per_s, loss, score, skipped steps and rollbacks, and the live parameters
        the last step used, all of run A; `runs` summarises every run and `fork` is run B's summary (or None)."""
        runs, a = self.runs, self.runs[0]
        tr = a.trainer
        summaries = [r.summary(state=self.state, max_steps=r.live.steps, reference=None if r is a else a.used)
                     for r in runs]
        return {"state": self.state, "step": a.step, "steps": self.max_steps,
                "skipped_steps": tr.skipped_steps if tr is not None else 0,  # non-finite steps skipped
                "rollbacks": tr.rollbacks if tr is not None else 0,  # restores of the last good state
                "its_per_s": round(self.its_per_s(), 3), "loss": a.last_metrics.get("loss"), "score": a.score,
                "message": self.message, "error": self.error, "prior": self.prior_spec,
                "warnings": list(self.warnings), "shading_used": a.last_metrics.get("shading"), **live_dict(a.used),
                "next": live_dict(a.live), "exports": self.exports[-5:],
                "run_dir": str(a.run_dir) if a.run_dir else None, "settings": self.settings(),
                "settings_note": self.settings_note,
                "prior_options": dataclasses.asdict(self.prior_options) if self.prior_options is not None else None,
                "runs": summaries, "fork": summaries[1] if len(summaries) > 1 else None}

    def settings(self) -> dict:
        """The run's fixed settings that a prior brings (its preset, after what the user set)."""
        cfg, tr = self.cfg, self.trainer
        return {"resolution": tr.resolution if tr is not None else cfg.render.resolution,
                "backbone": cfg.field.backbone, "batch_size": cfg.camera.batch_size,
                "samples": cfg.render.num_samples, "t_max_end": cfg.sds.t_max_end, "entropy": cfg.reg.entropy,
                "renderer": "nerfacc CUDA" if tr is not None and tr.packed else "torch"}

    def vocabulary(self) -> list[str] | None:
        """The loaded prior's vocabulary, if it has a fixed one (the embedded prior)."""
        prior = self._priors.get(self.prior_spec)
        tokenizer = getattr(getattr(prior, "model", None), "tokenizer", None)
        vocab = getattr(prior, "vocabulary", None) or getattr(tokenizer, "vocab", None)
        if vocab is None and self.prior_spec.split(":")[0] == "embedded":  # not loaded yet: the shipped list
            from engine.priors.embedded import vocabulary

            vocab = vocabulary()
        return list(vocab) if vocab else None

    # -- rendering for people ------------------------------------------------------------------------
    def render_source(self, run: str = "A") -> Snapshot | None:
        """A frozen copy of a run's field at a recent step, to render without holding the lock.

        While training runs, the session thread makes a fresher copy right after the run's next step when
        asked (no waiting on the lock here); otherwise the copy is taken now under the lock.
        """
        r = self.run(run)
        if r is None:
            return None
        tr, snap = r.trainer, r.snap
        if tr is None:
            return None
        if snap is not None and snap.key == (id(tr), tr.step_count):
            return snap
        if self.state == "running" and snap is not None and snap.key[0] == id(tr):
            r.snap_wanted.set()
            return snap
        with self.lock:
            if r.trainer is None:
                return None
            r.snap = Snapshot.of(r.trainer)
            return r.snap

    def render_sources(self) -> list[tuple[str, Snapshot, LiveParams]]:
        """(name, frozen copy, live parameters of its last step) of each run: one, or A and B while forked."""
        out = []
        for r in self.runs:
            snap = self.render_source(r.name)
            if snap is not None:
                out.append((r.name, snap, r.used))
        return out

    def preview(self):
        """(token, [H, 4W, 3] uint8) of the fixed preview views (A above B while forked), or None. The token
        changes when the image does. Refreshes on the worker thread."""
        sources, cached = self.render_sources(), self._preview
        if not sources:
            return None
        token = hash(tuple(snap.key for _, snap, _ in sources))
        if (cached is None or cached[0] != token) and not self._preview_busy:
            self._preview_busy = True
            self._pool.submit(self._render_preview, sources, token)
        return cached

    def _render_preview(self, sources: list, token: int) -> None:
        try:
            import numpy as np

            from engine.export import tile

            rows = []
            for _, snap, live in sources:
                with torch.no_grad():
                    img = snap.render(preview_cameras(), self.preview_size, self.preview_size, "lambertian", live=live)
                rows.append(tile(img))
            self._preview = (token, np.concatenate(rows, axis=0))
        except Exception:
            log.exception("preview render failed")
        finally:
            self._preview_busy = False

    # -- exports (worker thread: copy under the lock, then work) -------------------------------------
    def export(self, kind: str, run: str = "A", **kwargs) -> concurrent.futures.Future:
        """Submit an export of a run: "checkpoint", "snapshot", "video" or "mesh". The future gives {name: path},
        or raises ExportRefused when the run was reset, switched or closed before the export began."""
        if kind not in EXPORTS:
            raise ValueError(f"export must be one of {', '.join(EXPORTS)}; got {quoted(kind)}")
        target = self._named(run)
        trainer = target.trainer  # the field asked for: the export is of this trainer or of nothing
        if trainer is None:
            raise ValueError("nothing to export yet: start a run first")
        label = kind if len(self.runs) == 1 else f"{kind} of run {target.name}"
        future = self._pool.submit(self._export, target, trainer, kind, {**EXPORT_DEFAULTS.get(kind, {}), **kwargs})

        def done(f: concurrent.futures.Future) -> None:
            self.exports.append(f"{label} failed: {f.exception()}" if f.exception() else
                                f"{label}: " + ", ".join(str(p) for p in f.result().values()))
            del self.exports[:-50]  # a long session keeps the last 50 lines, not all of them

        future.add_done_callback(done)
        return future

    def _export(self, run: Run, trainer: Trainer, kind: str, kwargs: dict) -> dict:
        from engine import export
        from engine.checkpoint import checkpoint_state, write_checkpoint

        with self.lock:  # copy what the export needs; the slow part runs after the lock is released
            if run.trainer is not trainer or run not in self.runs:
                what = "closed" if run not in self.runs else "reset or switched to another prior"
                raise ExportRefused(f"nothing was written: run {run.name} was {what} before the {kind} began; "
                                    "press Export again for the current field")
            live = run.used
            run_dir = run.folder(self.out_root, export.run_folder, named=len(self.runs) > 1)
            if kind == "checkpoint":
                state = checkpoint_state(trainer, live)
                key = (id(trainer), trainer.step_count)
            else:
                source = RenderSource.from_trainer(trainer)
        if kind == "checkpoint":
            write_checkpoint(run_dir, *state)
            run.saved = key
            return {"checkpoint": str(run_dir)}
        if kind == "snapshot":
            paths = export.snapshot(source, live, run_dir, **kwargs)
            return {k: str(v) for k, v in paths.items()}
        if kind == "video":
            return {"video": str(export.write_orbit_video(source, run_dir / "orbit.mp4", live=live, **kwargs))}
        return {"mesh": str(export.export_mesh(source, run_dir / "mesh.glb", **kwargs))}
