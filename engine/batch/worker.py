"""The Ray actor of a batch: one slot (a GPU, or `cpus_per_run` CPU threads) that loads each prior once and
advances one run `checkpoint_every` steps per call, returning its checkpoint as safetensors bytes (and, after
its last step, its evaluation and exports): no shared filesystem is needed."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from engine.batch.spec import EXPORTS, SCORE_KEYS, RunOutputs, RunSpec, run_config
from engine.checkpoint import checkpoint_state, load_into
from engine.config import LiveParams


@dataclass
class _Job:
    """The run a worker is advancing."""

    spec: RunSpec
    trainer: object
    live: LiveParams
    train_s: float = 0.0  # training time so far, across resumes (for `RunSpec.seconds`)
    scores: dict = dataclasses.field(default_factory=dict)  # step (str) -> scores taken on the way (`score_at`)


class Worker:
    """One slot of a batch, run as a Ray actor: keeps the priors it has loaded and the run it is advancing."""

    def __init__(self, device: str = "cpu", threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.device = device
        self.priors: dict[str, object] = {}  # spec -> loaded prior, shared by this worker's runs
        self.job: _Job | None = None

    def ready(self) -> dict:
        return {"pid": os.getpid(), "node": socket.gethostname()}

    def advance(self, spec: RunSpec, resume: tuple[dict, bytes] | None, every: int, outputs: RunOutputs) -> dict:
        """Train `spec` up to `every` more steps (from `resume`, a checkpoint's meta and safetensors bytes, when
        given) and return its checkpoint; after its last step also its evaluation and exports."""
        if resume is not None or self.job is None or self.job.spec.run_id != spec.run_id:
            self.job = None  # free the last run before building the next
            self.job = self._start(spec, resume)
        job, trainer, t0 = self.job, self.job.trainer, time.perf_counter()
        start, stop, budget = trainer.step_count, min(job.live.steps, trainer.step_count + every), spec.seconds
        scoring = 0.0  # seconds spent scoring on the way: not training time
        while trainer.step_count < stop and job.train_s + time.perf_counter() - t0 - scoring < (budget or math.inf):
            trainer.step(job.live)
            if trainer.step_count in outputs.score_at:
                t1 = time.perf_counter()
                job.scores[str(trainer.step_count)] = self._score(job, outputs)
                scoring += time.perf_counter() - t1
        job.train_s += time.perf_counter() - t0 - scoring
        meta, tensors = checkpoint_state(trainer, job.live, {"train_s": job.train_s})
        reply = {"step": trainer.step_count, "meta": meta, "weights": save_tensors(tensors), "train_s": job.train_s,
                 "its_per_s": (trainer.step_count - start) / max(time.perf_counter() - t0 - scoring, 1e-9),
                 "scores": dict(job.scores), **self.ready()}
        if trainer.step_count >= job.live.steps or job.train_s >= (budget or math.inf):
            reply.update(self._finish(job, outputs), done=True)
            self.job = None
        return reply

    def _start(self, spec: RunSpec, resume) -> _Job:
        from engine.priors import load_prior
        from engine.trainer import Trainer

        cfg, live = run_config(spec, self.device)
        if cfg.prior not in self.priors:
            self.priors[cfg.prior] = load_prior(cfg.prior, device=self.device)
        job = _Job(spec, Trainer(cfg, self.priors[cfg.prior], self.device, live), live)
        if resume is not None:
            load_into(job.trainer, resume[0], load_tensors(resume[1]))
            job.train_s = float(resume[0].get("train_s", 0.0))
        return job

    def _finish(self, job: _Job, outputs: RunOutputs) -> dict:
        """Evaluation (toy R-Precision where the prompt is in the world's vocabulary; the translucent share,
        CLIP-free, always) and exports as {kind: bytes}."""
        t0 = time.perf_counter()
        ev = self._score(job, outputs)
        t1 = time.perf_counter()
        files, errors = _export(job.trainer, job.live, outputs)
        return {"evaluation": ev, "files": files,
                "export_errors": errors, "eval_s": round(t1 - t0, 2), "export_s": round(time.perf_counter() - t1, 2),
                "skipped_steps": job.trainer.skipped_steps}

    @staticmethod
    def _score(job: _Job, outputs: RunOutputs) -> dict:
        """The run's evaluation now (its own generator: the run's training is not touched)."""
        from engine.evaluate import evaluate, trainer_render_fn

        ev = evaluate(trainer_render_fn(job.trainer), job.live.prompt, outputs.eval_views, seed=job.spec.seed + 1000)
        return {k: ev[k] for k in (*SCORE_KEYS, "shape_votes", "n_views") if k in ev}


def _export(trainer, live: LiveParams, outputs: RunOutputs) -> tuple[dict[str, bytes], dict[str, str]]:
    """The asked exports, made in a temp folder of the worker's machine, as bytes; one that cannot be made
    (a mesh of an empty field) is reported, not raised."""
    from engine.cameras import preview_cameras
    from engine.export import RenderSource, export_textured_mesh, save_png, snapshot, tile, write_orbit_video

    source, files, errors = RenderSource.from_trainer(trainer), {}, {}
    kinds = dict.fromkeys((*outputs.exports, "preview"))  # every run folder holds a preview.png, as `engine run`'s
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            path = Path(tmp) / EXPORTS[kind]
            try:
                if kind in ("gif", "mp4"):
                    write_orbit_video(source, path, frames=outputs.frames, size=outputs.size, fps=16, live=live)
                elif kind == "mesh":  # UV-textured .glb (engine/texture.py)
                    export_textured_mesh(source, path, faces=outputs.mesh_faces, texture=outputs.mesh_texture,
                                         resolution=outputs.mesh_resolution)
                elif kind == "snapshot":
                    os.replace(snapshot(source, live, tmp, size=outputs.size)["png"], path)
                else:  # preview: the preview cameras at 128 px, shaded over textureless (what the gallery shows)
                    rows = [source.image(preview_cameras(), 128, 128, s, live) for s in ("lambertian", "textureless")]
                    save_png(tile(torch.cat(rows)), path)
                files[kind] = path.read_bytes()
            except ValueError as err:
                errors[kind] = str(err)
    return files, errors
