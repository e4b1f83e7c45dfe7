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
from engine.config import Config, LiveParams
from engine.priors import check_prior_spec, load_prior
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


class Session:
    """Owns one run: its trainer, thread, lock, state, history and the live parameters."""

    def __init__(self, cfg: Config | None = None, live: LiveParams | None = None, device="cpu",
                 out_root: str | Path = "outputs", prior_loader=load_prior, preview_size: int = 64):
        self.cfg = cfg or Config()
        self.device = device
        self.out_root = Path(out_root)
        self.preview_size = preview_size
        self.lock = threading.Lock()  # held for one training step, or while copying the field
        self.live = (live or LiveParams(seed=self.cfg.seed)).validated()  # what the next step uses
        self.used = self.live  # what the last step used
        self.max_steps = self.cfg.steps
        self.prior_spec = self.cfg.prior
        self.state, self.message, self.error = "idle", "press Start to train", None
        self.trainer: Trainer | None = None
        self.warnings: list[str] = []
        self.history: list[tuple[int, float]] = []  # (step, loss), thinned when long
        self.last_metrics: dict = {}
        self.recent_cameras: tuple | None = None  # (c2w [B, 4, 4], focal [B]) of the last step, for the viewer
        self.run_dir: Path | None = None
        self.exports: list[str] = []  # one line per finished export: what was written, or why not
        self._saved: tuple | None = None  # (id(trainer), step) of the last checkpoint written
        self._load_prior = prior_loader
        self._priors: dict = {}
        self._commands: queue.Queue = queue.Queue()
        self._times: list[float] = []
        self._snap: Snapshot | None = None
        self._want_snap = False
        self._preview: tuple[tuple, object] | None = None  # (snapshot key, image [H, 4W, 3] uint8)
        self._preview_busy = False
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="session-work")
        self._thread = threading.Thread(target=self._loop, name="session", daemon=True)
        self._thread.start()

    # -- commands (any thread; they return at once) --------------------------------------------------
    def start(self, prior: str | None = None) -> None:
        """Train: from idle/done/error builds a run if needed; from paused resumes.

        An unknown prior kind raises ValueError here; one that fails to load leaves the current run as it was.
        """
        self._commands.put(("start", check_prior_spec(prior) if prior else None))

    def pause(self) -> None:
        self._commands.put(("pause", None))

    def resume(self) -> None:
        self._commands.put(("resume", None))

    def reset(self, prior: str | None = None) -> None:
        """A new field with the same settings (seed from the live parameters); keeps running if it was."""
        self._commands.put(("reset", check_prior_spec(prior) if prior else None))

    def stop(self, timeout: float = 10.0) -> None:
        """End the session thread and the worker; the session cannot be restarted."""
        self._commands.put(("stop", None))
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
        self._commands.put(("params", (changes, steps)))
        return new

    def wait_idle_queue(self, timeout: float = 10.0) -> None:
        """Block until every queued command has been applied (for tests and scripts)."""
        done = threading.Event()
        self._commands.put(("call", done.set))
        done.wait(timeout)

    # -- the session thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:  # block for a command unless training; then just drain what is queued
                cmd, arg = self._commands.get(block=self.state != "running")
            except queue.Empty:
                cmd, arg = None, None
            if cmd == "stop":
                return
            if cmd is not None:
                self._apply(cmd, arg)
                continue
            if self.state == "running":
                self._train_one()

    def _apply(self, cmd: str, arg) -> None:
        spec = self.prior_spec
        try:
            if cmd == "params":
                changes, steps = arg
                self.live = self.live.replace(**changes)
                if steps is not None:
                    self.max_steps = steps
                    if self.state == "done" and self.trainer is not None and self.trainer.step_count < steps:
                        self.state, self.message = "paused", f"run extended to {steps} steps; press Start"
            elif cmd == "call":
                arg()
            elif cmd == "pause" and self.state == "running":
                self.state, self.message = "paused", "paused"
            elif cmd in ("resume", "start") and self.state == "paused":
                self.state, self.message = "running", "training"
            elif cmd == "start" and self.state in ("idle", "done", "error"):
                if arg:
                    self.prior_spec = arg
                fresh = self.trainer is None or self.state in ("done", "error") or \
                    self.trainer.prior.name != self._prior_name(self.prior_spec)
                if fresh:
                    self._new_trainer()
                self.state, self.message = "running", "training"
            elif cmd == "reset":
                if arg:
                    self.prior_spec = arg
                was_running = self.state == "running"
                self._new_trainer()
                self.state = "running" if was_running else "idle"
                self.message = "training" if was_running else "new field; press Start"
        except PriorUnavailable as err:  # the current run, if any, is untouched: it goes on
            log.warning("session command %s: %s", cmd, err)
            self.prior_spec, self.message = spec, f"{cmd} failed: {err}"
            self.warnings.append(self.message)  # kept in /status: the next step overwrites `message`
            if self.trainer is None:
                self._fail(self.message)
        except Exception as err:  # a failed build: shown in the pane, the app stays up
            log.exception("session command %s failed", cmd)
            self._fail(f"{cmd} failed: {err}")

    def _prior_name(self, spec: str) -> str:
        prior = self._priors.get(spec)
        return prior.name if prior is not None else f"<not loaded: {spec}>"

    def _new_trainer(self) -> None:
        spec = self.prior_spec
        if spec not in self._priors:  # loaded before the current run is dropped: a failure keeps it
            self.message = f"loading prior {spec}..."
            try:
                self._priors[spec] = self._load_prior(spec, device=self.device)
            except (FileNotFoundError, ImportError, OSError, ValueError) as err:
                raise PriorUnavailable(f"prior {spec!r} is not available ({err}). Pick another prior "
                                       "(e.g. oracle:cube) and press Reset.") from None
        self.trainer, self._snap, self._preview, self.run_dir = None, None, None, None
        self.history, self._times, self.last_metrics, self.warnings, self.error = [], [], {}, [], None
        cfg = dataclasses.replace(self.cfg, prior=spec, seed=self.live.seed, steps=self.max_steps)
        trainer = Trainer(cfg, self._priors[spec], self.device, self.live)
        with self.lock:
            self.trainer = trainer
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
                if self._want_snap:
                    self._snap, self._want_snap = Snapshot(tr), False
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
                "run_dir": str(self.run_dir) if self.run_dir else None}

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

        While training runs, the copy is refreshed by the session thread after its next step (no waiting
        on the lock here); otherwise it is taken now under the lock.
        """
        tr, snap = self.trainer, self._snap
        if tr is None:
            return None
        if snap is not None and snap.key == (id(tr), tr.step_count):
            return snap
        if self.state == "running" and snap is not None and snap.key[0] == id(tr):
            self._want_snap = True
            return snap
        with self.lock:
            if self.trainer is None:
                return None
            self._snap = Snapshot(self.trainer)
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
                img = snap.render(preview_cameras(), self.preview_size, self.preview_size, "lambertian", self.used)
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
            source = export.RenderSource.from_trainer(self.trainer)
        if kind == "snapshot":
            paths = export.snapshot(source, live, run_dir, **kwargs)
            return {k: str(v) for k, v in paths.items()}
        if kind == "video":
            return {"video": str(export.write_orbit_video(source, run_dir / "orbit.mp4", live=live, **kwargs))}
        return {"mesh": str(export.export_mesh(source, run_dir / "mesh.glb", **kwargs))}
