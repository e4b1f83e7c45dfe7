"""What the pane and the API show of a session: `status(session)` builds the JSON, and is the only builder.

These are functions of the session (`Session.status` is `status`, `Session.settings` is `settings`...).

It reads the session from any thread without the lock: each value is one attribute read (the runs list is
replaced whole, never mutated), so a status may mix two consecutive steps but never shows half a run.
"""

from __future__ import annotations

import dataclasses

from engine.config import Config
from engine.trainer import Trainer
from playground.plots import smoothed_loss
from playground.runs import live_dict


def settings(session) -> dict:
    """Run A's fixed settings that its prior brought (its preset, after what the user set)."""
    return run_settings(session.cfg, session.a.trainer)


def run_settings(cfg: Config, trainer: Trainer | None) -> dict:
    return {"resolution": trainer.resolution if trainer is not None else cfg.render.resolution,
            "backbone": cfg.field.backbone, "batch_size": cfg.camera.batch_size,
            "samples": cfg.render.num_samples, "t_max_end": cfg.sds.t_max_end, "entropy": cfg.reg.entropy,
            "renderer": "nerfacc CUDA" if trainer is not None and trainer.packed else "torch"}


def status(session) -> dict:
    """JSON-ready: state, step, its_per_s, loss, score, skipped steps and rollbacks, and the live parameters
    the last step used, all of run A; `runs` summarises every run and `fork` is run B's summary (or None)."""
    runs, state = session.runs, session.state
    a = runs[0]
    tr, options = a.trainer, session.priors.options
    summaries = [r.summary(state=state, max_steps=r.live.steps, reference=None if r is a else a.used) for r in runs]
    return {"state": state, "step": a.step, "steps": a.live.steps, "seed": session.cfg.seed,
            "train_util": session.train_util,  # the share of time spent training
            "pending": dict(session.pending),  # what the user set for the next new run (Start / Reset)
            "skipped_steps": tr.skipped_steps if tr is not None else 0,  # non-finite steps skipped
            "rollbacks": tr.rollbacks if tr is not None else 0,  # restores of the last good state
            "its_per_s": round(its_per_s(session), 3), "loss": a.last_metrics.get("loss"),
            "loss_smoothed": smoothed_loss(a.history),  # the EMA the loss curve draws: the raw loss jumps 100x
            "score": a.score, "message": session.message, "error": session.error, "prior": session.prior_spec,
            "prior_failed": session.prior_failed,  # {"prior", "message"} of a switch that failed, else None
            "warnings": list(session.warnings), "shading_used": a.last_metrics.get("shading"), **live_dict(a.used),
            "next": live_dict(a.live), "exports": session.exports[-5:],
            "files": session.worker.files(),  # every file this session exported: {"what", "path"}
            "run_dir": str(a.run_dir) if a.run_dir else None, "settings": run_settings(session.cfg, tr),
            "settings_note": session.settings_note,
            "prior_options": dataclasses.asdict(options) if options is not None else None,
            "runs": summaries, "fork": summaries[1] if len(summaries) > 1 else None}


def its_per_s(session) -> float:
    """Run A's steps per second (while forked, each run gets about half the steps)."""
    return session.a.its_per_s(session.state == "running")


def vocabulary(session) -> list[str] | None:
    """The prior's vocabulary, if it has a fixed one (the embedded prior)."""
    return session.priors.vocabulary(session.prior_spec)
