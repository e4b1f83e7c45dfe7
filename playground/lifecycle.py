"""How the session's runs begin and end: a new run's settings checked before it is queued, its prior loaded, its
trainer built and swapped in, its prompt encoded; run B forked from run A; a failed step handled. Functions of the
session, called from its thread, but for `checked` (any thread: it only reads)."""

from __future__ import annotations

import logging

import torch

from engine.config import BACKBONES, Config, LiveParams, quoted
from engine.presets import new_run, preset_settings, prior_kind
from engine.priors import check_prior_spec
from engine.trainer import Trainer
from playground.runs import Run, differences

FIELDS = {"nerf": "NeRF", "gaussians": "Gaussian splats"}  # the pane's choice of field for a new run
NERFS = tuple(b for b in BACKBONES if b != "gaussians")  # the NeRF backbones ("grid", "hash")

log = logging.getLogger(__name__)


def checked(session, prior: str | None, settings: dict | None) -> tuple[str | None, dict]:
    """(prior, settings) if a new run could be built with them (`engine.presets.new_run`), else ValueError naming
    the bad one: a refusal reaches the caller before anything is queued."""
    prior, settings = check_prior_spec(prior) if prior else None, dict(settings or {})
    if "field.backbone" in settings:
        settings["field.backbone"] = field_choice(settings["field.backbone"])
    spec = prior or session.prior_spec
    new_run(spec, device=session.device, current=(session.cfg, session.a.live), overrides=session.overrides,
            changes=resolved(session, spec, {**session.pending, **settings}))
    return prior, settings


def field_choice(value) -> str:
    """A field for a new run: "nerf", "gaussians" (also "splats"), or a NeRF backbone by name ("grid", "hash")."""
    v = str(value).strip().lower() if isinstance(value, str) else value
    v = {"splats": "gaussians", "gaussian splats": "gaussians"}.get(v, v)
    if v not in (*FIELDS, *NERFS):
        raise ValueError(f"field must be 'nerf' or 'gaussians' (or a NeRF backbone: {', '.join(NERFS)}); "
                         f"got {quoted(value)}")
    return v


def field_of(backbone: str) -> str:
    """"gaussians" or "nerf": what the pane calls a backbone."""
    return "gaussians" if backbone == "gaussians" else "nerf"


def nerf_backbone(session, prior: str) -> str:
    """The NeRF backbone a new run with `prior` gets: the current run's when it is a NeRF of the same kind of prior,
    else the command line's, else the prior's preset on this device (grid on a CPU; hash for SD and IF on CUDA)."""
    current = session.cfg.field.backbone
    if current != "gaussians" and prior_kind(prior) == prior_kind(session.cfg.prior):
        return current
    if session.overrides.get("field.backbone") in NERFS:
        return session.overrides["field.backbone"]
    return preset_settings(prior, session.device).get("field.backbone", Config().field.backbone)


def resolved(session, prior: str, changes: dict) -> dict:
    """`changes` with a field of "nerf" turned into the NeRF backbone `prior` gets (`nerf_backbone`)."""
    if changes.get("field.backbone") != "nerf":
        return changes
    return {**changes, "field.backbone": nerf_backbone(session, prior)}


def new_field_wanted(session) -> bool:
    """Whether the next run's field, set since this run was built, differs from this run's (Start builds it then)."""
    wanted = session.pending.get("field.backbone")
    return wanted is not None and resolved(session, session.prior_spec, {"field.backbone": wanted})[
        "field.backbone"] != session.cfg.field.backbone


def new_trainer(session) -> None:
    """A new field for run A (run B is closed), swapped in under the lock at once with everything shown of the old
    one, so an export or a frame never sees half a switch. The prior loads first: a failure keeps the current run."""
    spec, a = session.prior_spec, session.a
    if spec not in session.priors.loaded:
        session.message = f"loading prior {quoted(spec)}..."
    prior = session.priors.get(spec, in_use=[r.trainer.prior for r in session.runs if r.trainer is not None])
    run = new_run(spec, device=session.device, current=(session.cfg, a.live), overrides=session.overrides,
                  changes=resolved(session, spec, session.pending))
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


def fork_field(session, backbone) -> str | None:
    """None (run B is a copy of run A's field) or "gaussians" (B is splats drawn from A's NeRF); ValueError
    for a fork that cannot be made."""
    if backbone is None or backbone == "":
        return None
    choice, a = field_of(field_choice(backbone)), session.a.trainer.cfg.field.backbone
    if choice == "nerf" and a == "gaussians":
        raise ValueError("run A is Gaussian splats: its fork is splats too (a NeRF cannot be drawn from splats)")
    return "gaussians" if choice != field_of(a) else None


def fork(session, arg: tuple[dict, str | None]) -> None:
    """Run B as a copy of run A (field, optimizer, step, generator) with `changes`, or as splats drawn from A's
    NeRF (`Run.forked`); B takes the next step. Splats that cannot be drawn leave run A alone, with a message."""
    changes, backbone = arg
    a = session.a
    try:
        b = a.forked(changes, backbone=backbone)
    except ValueError as err:  # an empty field has nothing to draw Gaussians from
        session.message = f"fork{' as splats' if backbone else ''} failed: {err}"
        session.warnings.append(session.message)
        return
    with session.lock:
        session.runs = [a, b]
    encode(session, b, b.live)
    session.turn = 1
    if session.state == "done" and b.step < b.live.steps:
        session.state = "paused"
    diff = ", ".join(f"{k} {v[1]}" for k, v in differences(a.live, b.live).items())
    drawn = b.trainer.field.rasterized and not a.trainer.field.rasterized
    how = f" as {len(b.trainer.field)} Gaussian splats drawn from its NeRF" if drawn else ""
    session.message = (f"forked run B from run A at step {b.step}{how}"
                       + (f" with {diff}" if diff else "" if how else " (no changes)"))


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
