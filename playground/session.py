"""A training session: the engine's trainer driven by one background thread, for the UI and the API.

The session thread is the only writer of the trainer and of `state` ("idle" | "running" | "paused" |
"done" | "error"). UI handlers call `start`, `pause`, `reset`, `set_params`...: those only put a
command on a queue and return; the thread applies it between steps. One `threading.Lock` guards the
field and optimizer: a step holds it for one step; a viewer takes a frozen copy of the field under it
(`render_source`) and renders that copy outside the lock, so frames never stall training.
Exports and previews run on a worker thread: they copy what they need under the lock, then work.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from pathlib import Path

import torch

from engine.cameras import preview_cameras
from engine.config import Config, LiveParams, live_defaults, preset
from engine.priors import check_prior_spec, load_prior
from engine.source import RenderSource
from engine.trainer import Trainer
from playground.snapshot import Snapshot

log = logging.getLogger(__name__)

STATES = ("idle", "running", "paused", "done", "error")
EXPORTS = ("checkpoint", "snapshot", "video", "mesh")
EXPORT_DEFAULTS = {"video": {"frames": 60, "size": 128}, "mesh": {"resolution": 96}}  # sized for a CPU


class PriorUnavailable(RuntimeError):
    """A prior could not be loaded; the session keeps its current run."""


def live_dict(live: LiveParams) -> dict:
    d = dataclasses.asdict(live)
    d["light_color"] = list(d["light_color"])
    return d


def prior_kind(spec: str) -> str:
    return spec.partition(":")[0].lower()


# live parameters whose good values depend on the prior: a switch to another kind of prior takes its own
PRIOR_LIVE = ("guidance_scale", "learning_rate")
LARGE_PRIORS = ("sd", "if")  # gigabytes each: only one stays loaded


class Session:
    """Owns one run: its trainer, thread, lock, state, history and the live parameters.

    `cfg` and `live` are the launch prior's settings. `overrides` (dotted config names, e.g.
    {"render.resolution": 24}) and `user_live` (names of live parameters) are what the user set explicitly:
    when a run starts with another kind of prior, its preset and live defaults apply (`preset`,
    `live_defaults`) and only these stay, except the prior-specific live values (guidance, learning rate).
    """

    def __init__(self, cfg: Config | None = None, live: LiveParams | None = None, *, device="cpu",
                 out_root: str | Path = "outputs", prior_loader=load_prior, preview_size: int = 64,
                 overrides: dict | None = None, user_live: tuple[str, ...] = (), prior_options=None):
        self.cfg = cfg or Config()
        self.device = device
        self.out_root = Path(out_root)
        self.preview_size = preview_size
        self.overrides = dict(overrides or {})
        self.user_live = set(user_live)
        self.prior_options = prior_options
        self.lock = threading.Lock()  # held for one training step, or while copying the field
        self.live = (live or LiveParams(seed=self.cfg.seed)).validated()  # what the next step uses
        self.used = self.live  # what the last step used
        self.max_steps = self.cfg.steps
        self.prior_spec = self.cfg.prior
        self.state, self.message, self.error = "idle", "press Start to train", None
        self.trainer: Trainer | None = None
        self.warnings: list[str] = []
        self.settings_note = ""  # what a prior switch applied and what it kept
        self.history: list[tuple[int, float]] = []  # (step, loss), thinned when long
        self.last_metrics: dict = {}
        self.recent_cameras: tuple | None = None  # (c2w [B, 4, 4], focal [B]) of the last step, for the viewer
        self.run_dir: Path | None = None
        self.exports: list[str] = []  # one line per finished export: what was written, or why not
        self._saved: tuple | None = None  # (id(trainer), step) of the last checkpoint written
        self._load_prior = prior_loader
        self._priors: dict = {}  # spec -> loaded prior; large ones are evicted on a switch
        self._commands: queue.Queue = queue.Queue()  # (method, argument), applied by the session thread
        self._times: list[float] = []
        # the viewer's hand-off: the latest frozen copy of the field, and a request for a fresher one that
        # the session thread fulfils right after its next step
        self._snap: Snapshot | None = None
        self._snap_wanted = threading.Event()
        self._preview: tuple[tuple, object] | None = None  # (snapshot key, image [H, 4W, 3] uint8)
        self._preview_busy = False
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="session-work")
        self._thread = threading.Thread(target=self._loop, name="session", daemon=True)
        self._thread.start()

    # -- commands (any thread; they queue work for the session thread and return at once) -------------
    def start(self, prior: str | None = None) -> None:
        """Train: from idle/done/error builds a run if needed; from paused resumes.

        An unknown prior kind raises ValueError here; one that fails to load leaves the current run as it was.
        """
        self._commands.put((self._do_start, check_prior_spec(prior) if prior else None))

    def pause(self) -> None:
        self._commands.put((self._do_pause, None))

    def resume(self) -> None:
        self._commands.put((self._do_resume, None))

    def reset(self, prior: str | None = None) -> None:
        """A new field with the same settings (seed from the live parameters); keeps running if it was.
        With another kind of prior, that prior's settings apply (see the class docstring)."""
        self._commands.put((self._do_reset, check_prior_spec(prior) if prior else None))

    def stop(self, timeout: float = 10.0) -> None:
        """End the session thread and the worker; the session cannot be restarted."""
        self._commands.put((None, None))
        self._thread.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)  # a running preview or export ends first

    def save_if_dirty(self) -> Path | None:
        """After `stop`: checkpoint the run if it has steps no checkpoint holds yet; the run folder, or None."""
        from engine import export
        from engine.checkpoint import save_checkpoint

        tr = self.trainer
        if tr is None or tr.step_count == 0 or self._saved == (id(tr), tr.step_count):
            return None
        if self.run_dir is None:
            self.run_dir = Path(export.run_folder(self.out_root, self.used.prompt))
        with self.lock:
            save_checkpoint(tr, self.run_dir, self.used)
        self._saved = (id(tr), tr.step_count)
        return self.run_dir

    def set_params(self, **changes) -> LiveParams:
        """Validate changes to the live parameters (ValueError names a bad one) and queue them.

        Returns the parameters the next step will use. "steps" (the run's length) is accepted too.
        """
        steps = changes.pop("steps", None)
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 10**7):
            raise ValueError(f"steps must be an integer in [1, 10^7]; got {steps!r}")
        new = self.live.replace(**changes)  # raises ValueError with a clear message
        self._commands.put((self._do_params, (changes, steps)))
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
        changes, steps = arg
        self.live = self.live.replace(**changes)
        self.user_live |= set(changes)
        if steps is not None:
            self.max_steps = steps
            self.overrides["steps"] = steps
            if self.state == "done" and self.trainer is not None and self.trainer.step_count < steps:
                self.state, self.message = "paused", f"run extended to {steps} steps; press Start"

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

    def _do_start(self, prior: str | None) -> None:
        if self.state in ("running", "paused"):
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

    def _do_reset(self, prior: str | None) -> None:
        if prior:
            self.prior_spec = prior
        was_running = self.state == "running"
        self._new_trainer()
        self.state = "running" if was_running else "idle"
        self.message = "training" if was_running else "new field; press Start"

    def _prior_name(self) -> str:
        prior = self._priors.get(self.prior_spec)
        return prior.name if prior is not None else f"<not loaded: {self.prior_spec}>"

    def _settings_for(self, spec: str) -> tuple[Config, LiveParams, str]:
        """The config and live parameters of a new run with `spec`, and a note of what changed: the same kind
        of prior keeps the current settings; another kind gets its own, but for what the user set."""
        if prior_kind(spec) == prior_kind(self.cfg.prior):
            return dataclasses.replace(self.cfg, prior=spec), self.live, ""
        cfg = preset(spec, self.device)
        for name, value in self.overrides.items():
            section, _, key = name.rpartition(".")
            setattr(getattr(cfg, section) if section else cfg, key, value)
        kept = sorted(k for k in self.user_live if k not in PRIOR_LIVE)
        live = live_defaults(spec, **{k: getattr(self.live, k) for k in kept})
        changed = [f"{k} {getattr(live, k):g}" for k in PRIOR_LIVE if getattr(live, k) != getattr(self.live, k)]
        note = (f"{prior_kind(spec)} settings: {cfg.render.resolution or 'its own'} px, {cfg.field.backbone} field, "
                f"{cfg.steps} steps" + (", " + ", ".join(changed) if changed else "")
                + (f"; kept what you set: {', '.join(kept + sorted(self.overrides))}" if kept or self.overrides else ""))
        return cfg, live, note

    def _load(self, spec: str):
        """The prior of `spec`, loaded once; before a large prior loads, priors no run uses are freed."""
        if spec in self._priors:
            return self._priors[spec]
        current = self.trainer.prior if self.trainer is not None else None
        if prior_kind(spec) in LARGE_PRIORS:
            self._priors = {k: p for k, p in self._priors.items() if p is current}
        self.message = f"loading prior {spec}..."
        kwargs = {"options": self.prior_options} if self.prior_options is not None else {}
        try:
            prior = self._load_prior(spec, device=self.device, **kwargs)
        except (FileNotFoundError, ImportError, OSError, ValueError, RuntimeError) as err:
            raise PriorUnavailable(f"prior {spec!r} is not available ({err}). Pick another prior "
                                   "(e.g. oracle:cube) and press Reset.") from None
        self._priors[spec] = prior
        return prior

    def _new_trainer(self) -> None:
        spec = self.prior_spec
        prior = self._load(spec)  # loaded before the current run is dropped: a failure keeps it
        cfg, live, note = self._settings_for(spec)
        if "steps" in self.overrides:
            cfg.steps = self.overrides["steps"]
        cfg = dataclasses.replace(cfg, seed=live.seed)
        trainer = Trainer(cfg, prior, self.device, live)
        self.trainer, self._snap, self._preview, self.run_dir = None, None, None, None
        self.history, self._times, self.last_metrics, self.warnings, self.error = [], [], {}, [], None
        with self.lock:
            self.trainer = trainer
        self.cfg, self.live, self.max_steps, self.settings_note = cfg, live, cfg.steps, note or self.settings_note
        self._priors = {k: p for k, p in self._priors.items() if p is prior or prior_kind(k) not in LARGE_PRIORS}
        if self.device != "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()  # an evicted prior's memory goes back to the card
        self._encode(self.live)
        self.used = self.live

    def _encode(self, live: LiveParams) -> None:
        emb = self.trainer.embedding(live.prompt, live.negative_prompt)  # cached per prompt pair
        self.warnings = list(emb.warnings)

    def _train_one(self) -> None:
        tr, live = self.trainer, self.live  # read once: the whole step uses this one LiveParams
        if tr is None:
            self.state = "idle"
            return
        if tr.step_count >= self.max_steps:
            self.state, self.message = "done", f"finished {tr.step_count} steps"
            return
        try:
            if (live.prompt, live.negative_prompt) != (self.used.prompt, self.used.negative_prompt):
                self.message = "encoding the new prompt..."
                self._encode(live)
            with self.lock:
                result = tr.step(live)
                if self._snap_wanted.is_set():  # a viewer asked for a fresher copy of the field
                    self._snap_wanted.clear()
                    self._snap = Snapshot.of(tr)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.state = "paused"
            self.message = (f"out of GPU memory at step {tr.step_count}: lower the resolution, batch size or samples "
                            "per ray (or use CPU offload of the prior), then press Start")
            self.warnings.append(self.message)
            log.warning(self.message)
            return
        except Exception as err:
            log.exception("training step failed")
            self._fail(f"step {tr.step_count} failed: {type(err).__name__}: {err}")
            return
        self.used, self.last_metrics, self.message = live, result.metrics, "training"
        self.recent_cameras = (result.cameras.c2w.detach().cpu(), result.cameras.focal.detach().cpu())
        loss = result.metrics.get("loss", float("nan"))
        self.history.append((result.metrics["step"], loss))
        if len(self.history) > 4000:
            self.history = self.history[::2]
        self._times = self._times[-19:] + [time.perf_counter()]

    def _fail(self, message: str) -> None:
        self.state, self.error, self.message = "error", message, message

    # -- reading (any thread) ------------------------------------------------------------------------
    @property
    def step(self) -> int:
        tr = self.trainer
        return tr.step_count if tr is not None else 0

    def its_per_s(self) -> float:
        t = self._times
        if self.state != "running" or len(t) < 2 or time.perf_counter() - t[-1] > 5.0:
            return 0.0
        return (len(t) - 1) / max(t[-1] - t[0], 1e-9)

    def status(self) -> dict:
        """JSON-ready: state, step, its_per_s, loss, skipped steps and rollbacks, and the live parameters the
        last step used."""
        loss, tr = self.last_metrics.get("loss"), self.trainer
        return {"state": self.state, "step": self.step, "steps": self.max_steps,
                "skipped_steps": tr.skipped_steps if tr is not None else 0,  # non-finite steps skipped
                "rollbacks": tr.rollbacks if tr is not None else 0,  # restores of the last good state
                "its_per_s": round(self.its_per_s(), 3), "loss": loss, "message": self.message,
                "error": self.error, "prior": self.prior_spec, "warnings": list(self.warnings),
                "shading_used": self.last_metrics.get("shading"), **live_dict(self.used),
                "next": live_dict(self.live), "exports": self.exports[-5:],
                "run_dir": str(self.run_dir) if self.run_dir else None, "settings": self.settings(),
                "settings_note": self.settings_note,
                "prior_options": dataclasses.asdict(self.prior_options) if self.prior_options is not None else None}

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
    def render_source(self) -> Snapshot | None:
        """A frozen copy of the field at a recent step, to render without holding the lock.

        While training runs, the session thread makes a fresher copy right after its next step when asked
        (no waiting on the lock here); otherwise the copy is taken now under the lock.
        """
        tr, snap = self.trainer, self._snap
        if tr is None:
            return None
        if snap is not None and snap.key == (id(tr), tr.step_count):
            return snap
        if self.state == "running" and snap is not None and snap.key[0] == id(tr):
            self._snap_wanted.set()
            return snap
        with self.lock:
            if self.trainer is None:
                return None
            self._snap = Snapshot.of(self.trainer)
            return self._snap

    def preview(self):
        """(step, [H, 4W, 3] uint8) of the fixed preview views, or None. Refreshes on the worker thread."""
        snap, cached = self.render_source(), self._preview
        if snap is None:
            return None
        if (cached is None or cached[0] != snap.key) and not self._preview_busy:
            self._preview_busy = True
            self._pool.submit(self._render_preview, snap)
        return (cached[0][1], cached[1]) if cached is not None else None

    def _render_preview(self, snap: Snapshot) -> None:
        try:
            from engine.export import tile

            with torch.no_grad():
                img = snap.render(preview_cameras(), self.preview_size, self.preview_size, "lambertian", live=self.used)
            self._preview = (snap.key, tile(img))
        except Exception:
            log.exception("preview render failed")
        finally:
            self._preview_busy = False

    # -- exports (worker thread: copy under the lock, then work) -------------------------------------
    def export(self, kind: str, **kwargs) -> concurrent.futures.Future:
        """Submit an export: "checkpoint", "snapshot", "video" or "mesh". The future gives {name: path}."""
        if kind not in EXPORTS:
            raise ValueError(f"export must be one of {', '.join(EXPORTS)}; got {kind!r}")
        if self.trainer is None:
            raise ValueError("nothing to export yet: start a run first")
        future = self._pool.submit(self._export, kind, {**EXPORT_DEFAULTS.get(kind, {}), **kwargs})
        def done(f: concurrent.futures.Future) -> None:
            self.exports.append(f"{kind} failed: {f.exception()}" if f.exception() else
                                f"{kind}: " + ", ".join(str(p) for p in f.result().values()))
            del self.exports[:-50]  # a long session keeps the last 50 lines, not all of them

        future.add_done_callback(done)
        return future

    def _export(self, kind: str, kwargs: dict) -> dict:
        from engine import export
        from engine.checkpoint import save_checkpoint

        live = self.used
        if self.run_dir is None:
            self.run_dir = Path(export.run_folder(self.out_root, live.prompt))
        run_dir = self.run_dir
        with self.lock:  # copy what the export needs; the slow part runs after the lock is released
            if kind == "checkpoint":
                save_checkpoint(self.trainer, run_dir, live)
                self._saved = (id(self.trainer), self.trainer.step_count)
                return {"checkpoint": str(run_dir)}
            source = RenderSource.from_trainer(self.trainer)
        if kind == "snapshot":
            paths = export.snapshot(source, live, run_dir, **kwargs)
            return {k: str(v) for k, v in paths.items()}
        if kind == "video":
            return {"video": str(export.write_orbit_video(source, run_dir / "orbit.mp4", live=live, **kwargs))}
        return {"mesh": str(export.export_mesh(source, run_dir / "mesh.glb", **kwargs))}
