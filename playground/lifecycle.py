"""How the session's runs begin and end: a new run's settings checked before it is queued, its prior loaded, its
trainer built and swapped in, its prompt encoded; run B forked from run A; a failed step handled. Functions of the
session, called from its thread, but for `checked` (any thread: it only reads)."""

from __future__ import annotations

import logging

import torch

from engine.config import LiveParams, quoted
from engine.presets import new_run
from engine.priors import check_prior_spec
from engine.trainer import Trainer
from playground.runs import Run, differences

log = logging.getLogger(__name__)


def checked(session, prior: str | None, settings: dict | None) -> tuple[str | None, dict]:
    """(prior, settings) if a new run could be built with them (`engine.presets.new_run`), else ValueError naming
    the bad one: a refusal reaches the caller before anything is queued."""
    prior, settings = check_prior_spec(prior) if prior else None, dict(settings or {})
    new_run(prior or session.prior_spec, device=session.device, current=(session.cfg, session.a.live),
            overrides=session.overrides, changes={**session.pending, **settings})
    return prior, settings


def new_trainer(session) -> None:
    """A new field for run A (run B is closed), swapped in under the lock at once with everything shown of the old
    one, so an export or a frame never sees half a switch. The prior loads first: a failure keeps the current run."""
    spec, a = session.prior_spec, session.a
    if spec not in session.priors.loaded:
        session.message = f"loading prior {quoted(spec)}..."
    prior = session.priors.get(spec, in_use=[r.trainer.prior for r in session.runs if r.trainer is not None])
    run = new_run(spec, device=session.device, current=(session.cfg, a.live), overrides=session.overrides,
                  changes=session.pending)
    trainer = Trainer(run.cfg, prior, session.device, run.live)
    with session.lock:
        a.restart(trainer, run.live)
        session.runs = [a]
    session.worker.latest_preview, session.warnings, session.error, session.turn = None, [], None, 0
    session.prior_failed = None
    session.cfg, session.pending, session.settings_note = run.cfg, {}, run.note or session.settings_note
    session.priors.keep_large(prior)
    encode(session, a, run.live)


def encode(session, run: Run, live: LiveParams) -> None:
    """Encode a run's prompt (cached per prompt pair by its trainer); its unknown words become its warnings."""
    run.warnings = list(run.trainer.embedding(live.prompt, live.negative_prompt).warnings)
    if run is session.a:
        session.warnings = list(run.warnings)


def fork(session, changes: dict) -> None:
    """Run B as a copy of run A (field, optimizer, step, generator) with `changes`; B takes the next step."""
    a, b = session.a, session.a.forked(changes)
    with session.lock:
        session.runs = [a, b]
    encode(session, b, b.live)
    session.turn = 1
    if session.state == "done" and b.step < b.live.steps:
        session.state = "paused"
    diff = ", ".join(f"{k} {v[1]}" for k, v in differences(a.live, b.live).items())
    session.message = f"forked run B from run A at step {b.step}" + (f" with {diff}" if diff else " (no changes)")


def step_failed(session, run: Run, err: Exception) -> None:
    """Out of memory pauses; a failing run B is closed (A goes on); a failing run A is an error."""
    label, step = (f"run {run.name} " if len(session.runs) > 1 else ""), run.step
    if isinstance(err, torch.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        session.state, session.message = "paused", (
            f"out of GPU memory at {label}step {step}: lower the resolution, batch size or samples per ray "
            "(or use CPU offload of the prior, or close run B), then press Start")
        log.warning(session.message)
    elif run is not session.a:
        log.exception("run B's step failed", exc_info=err)
        with session.lock:
            session.runs = [session.a]
        session.message = f"run B closed: its step {step} failed: {type(err).__name__}: {err}"
    else:
        log.exception("training step failed", exc_info=err)
        session.state, session.error = "error", f"{label}step {step} failed: {type(err).__name__}: {err}"
        session.message = session.error
        return
    session.warnings.append(session.message)
