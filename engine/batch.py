"""Batch generation on Ray: prompts x seeds x settings grids, on one machine or a cluster (issue 28).

    python -m engine batch prompts.txt --seeds 0-3 --grid live.guidance_scale=10,20 --out runs/b1

The driver starts one `Worker` actor per slot (a GPU, or `cpus_per_run` CPU threads). A worker loads each
prior once and advances one run `checkpoint_every` steps per call; each call returns the run's checkpoint as
safetensors bytes, the last also its evaluation and exports, so no shared filesystem is needed: the driver
writes everything atomically under DIR/<run-id>/ and keeps DIR/manifest.json, .csv and index.html current.
When a worker dies another resumes its run from the last checkpoint, bit-identical on CPU to an unbroken run.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import re
import shlex
import socket
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from engine.checkpoint import META, atomic_write, checkpoint_state, load_into, read_checkpoint, write_checkpoint
from engine.config import Config, LiveParams
from engine.export import slugify
from engine.gallery import write_gallery
from engine.presets import preset_run

ROOT = Path(__file__).resolve().parents[1]
EXPORTS = {"gif": "orbit.gif", "mp4": "orbit.mp4", "mesh": "mesh.glb", "snapshot": "snapshot.png",
           "preview": "preview.png"}
SCORE_KEYS = ("colour_r_precision", "geometry_r_precision", "shape_score", "shape_margin", "translucent_share")
CSV_COLUMNS = ("run_id", "prompt", "seed", "prior", "settings", "status", "message", "steps", "step", "wall_s",
               "its_per_s", "attempts", "resumed_from", "steps_redone", *SCORE_KEYS, "files")


@dataclass(frozen=True)
class RunSpec:
    """One run of a batch."""

    prompt: str
    seed: int = 0
    prior: str = "embedded"
    steps: int | None = None  # None: the prior preset's
    settings: tuple = ()  # (("live.guidance_scale", 20), ("sds.t_max_end", 0.5), ...), applied in order
    seconds: float | None = None  # also stop after this much training time (the lab's budget; not reproducible)
    error: str | None = None  # why the line asking for this run is unusable: it fails without starting

    @property
    def run_id(self) -> str:
        key = json.dumps([self.prompt, self.seed, self.prior, self.steps, self.settings, self.seconds])
        return f"{slugify(self.prompt, 40)}-s{self.seed}-{hashlib.sha1(key.encode()).hexdigest()[:6]}"


@dataclass(frozen=True)
class RunOutputs:
    """What a finished run sends back besides its checkpoint (bigger exports later from its folder, with
    `python -m engine export --run DIR/<run-id>`)."""

    exports: tuple[str, ...] = ()  # keys of EXPORTS
    size: int = 128  # side of video frames and snapshots, pixels
    frames: int = 48  # frames of a full turn (gif, mp4)
    mesh_resolution: int = 96  # marching-cubes lattice
    eval_views: int = 16  # random views the evaluation scores (seeded by the run's seed + 1000)
    score_at: tuple[int, ...] = ()  # steps at which the run is also scored on the way (row["scores"][step])


# -- what to run -------------------------------------------------------------------------------------------
def parse_value(raw: str):
    """JSON when it parses (numbers, booleans, lists), else the string itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_seeds(text: str) -> list[int]:
    """"0-3" -> [0, 1, 2, 3]; "0,5,7-8" -> [0, 5, 7, 8]."""
    seeds = []
    for part in str(text).split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
        except ValueError:
            raise ValueError(f"--seeds {text!r}: use a range such as 0-3 or a list such as 0,2,5") from None
    if not seeds:
        raise ValueError(f"--seeds {text!r} names no seed")
    return list(dict.fromkeys(seeds))


def parse_grid(items: list[str]) -> list[tuple]:
    """--grid KEY=V1,V2 items -> every combination, [(("KEY", v1), ...), ...] ([()] for none). KEY is
    "<section>.<field>" of the config, "live.<name>", "prior" or "steps"."""
    axes = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise ValueError(f"--grid {item!r} is not KEY=V1,V2,... (e.g. live.guidance_scale=10,20)")
        values = re.split(r",(?![^\[]*\])", raw)  # commas outside brackets: "1,[0,30]" -> "1", "[0,30]"
        axes.append([(key.strip(), parse_value(v.strip())) for v in values])
    return list(itertools.product(*axes))


def parse_line(line: str) -> tuple[str, dict, str | None]:
    """A prompts-file line "PROMPT" or "PROMPT | KEY=VALUE ..." -> (prompt, its settings, error or None)."""
    prompt, _, rest = line.partition("|")
    try:
        pairs = [item.partition("=") for item in shlex.split(rest)]
        if any(not sep or not key for key, sep, _ in pairs):
            raise ValueError("settings after '|' are KEY=VALUE")
        return prompt.strip(), {k: parse_value(v) for k, _, v in pairs}, None
    except ValueError as err:
        return prompt.strip(), {}, f"bad line {line.strip()!r}: {err}"


def expand(lines: list[str], seeds: list[int], grid: list[tuple] = ((),), prior: str = "embedded",
           steps: int | None = None) -> list[RunSpec]:
    """Every line x grid combination x seed; a line's own settings win over the grid's (the runs this makes
    alike count once)."""
    runs = []
    for line in lines:
        prompt, own, error = parse_line(line)
        for combo in grid:
            settings = {**dict(combo), **own}
            p, st = settings.pop("prior", prior), settings.pop("steps", steps)
            runs += [RunSpec(prompt, seed, p, st, tuple(settings.items()), error=error) for seed in seeds]
    return list({r.run_id: r for r in runs}.values())


def run_config(spec: RunSpec, device: str = "cpu") -> tuple[Config, LiveParams]:
    """A run's config and live parameters: its prior's preset, then its seed, steps and settings."""
    from engine.priors import check_prior_spec

    if spec.error:
        raise ValueError(spec.error)
    if spec.steps is not None and (not isinstance(spec.steps, int) or isinstance(spec.steps, bool) or spec.steps < 1):
        raise ValueError(f"steps must be a positive integer; got {spec.steps!r}")
    given = {"seed": spec.seed, "live.prompt": spec.prompt, **({"live.steps": spec.steps} if spec.steps else {})}
    return preset_run(check_prior_spec(spec.prior), device, {**given, **dict(spec.settings)})


# -- the worker --------------------------------------------------------------------------------------------
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
    from engine.export import RenderSource, export_mesh, save_png, snapshot, tile, write_orbit_video

    source, files, errors = RenderSource.from_trainer(trainer), {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in outputs.exports:
            path = Path(tmp) / EXPORTS[kind]
            try:
                if kind in ("gif", "mp4"):
                    write_orbit_video(source, path, frames=outputs.frames, size=outputs.size, fps=16, live=live)
                elif kind == "mesh":
                    export_mesh(source, path, resolution=outputs.mesh_resolution)
                elif kind == "snapshot":
                    os.replace(snapshot(source, live, tmp, size=outputs.size)["png"], path)
                else:  # preview: the preview cameras, shaded over textureless
                    rows = [trainer.render_views(preview_cameras(trainer.device), 64, 64, s).rgb
                            for s in ("lambertian", "textureless")]
                    save_png(tile(torch.cat(rows)), path)
                files[kind] = path.read_bytes()
            except ValueError as err:
                errors[kind] = str(err)
    return files, errors


# -- Ray ---------------------------------------------------------------------------------------------------
def connect(address: str = ""):
    """(ray, started): a new local Ray when `address` is empty (unless this process already runs one), else the
    cluster at `address` ("auto", "host:port", "ray://host:port"). One-line RuntimeError, in seconds, when Ray
    is not installed or nothing answers at the address (Ray itself retries for 30 to 80 s)."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("Ray is not installed: pip install 'ray[client]==2.60.0' (see requirements.txt)") from None
    hostport = address.removeprefix("ray://")
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address  # where `ray start` left its address

        try:
            hostport = canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError) as err:
            raise RuntimeError(f"--address auto: no Ray cluster runs here ({_first_line(err)})") from None
    if address:
        host, _, port = hostport.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
        except (OSError, ValueError) as err:
            raise RuntimeError(f"no Ray cluster answers at {address} ({err}); start one with `ray start --head`") \
                from None
    if ray.is_initialized():
        return ray, False
    quiet = {"log_to_driver": False, "logging_level": "ERROR"}
    if address:  # ship engine/ and assets/ to the cluster's workers (.gitignore'd paths stay behind)
        ray.init(address=address, runtime_env={"working_dir": str(ROOT), "excludes": [".git"]}, **quiet)
    else:
        ray.init(address="local", include_dashboard=False, **quiet)  # a new instance, even where `ray start` ran
    return ray, True


def _slots(ray, cpus_per_run: float, gpus_per_run: float | None, workers: int | None, n_runs: int) -> tuple[float, int]:
    """(GPUs per run, workers) that the cluster's resources allow; RuntimeError if no run fits."""
    have = ray.cluster_resources()
    gpus = (1 if have.get("GPU", 0) >= 1 else 0) if gpus_per_run is None else gpus_per_run
    fit = int(have.get("CPU", 0) // cpus_per_run) if cpus_per_run else n_runs
    fit = min(fit, int(have.get("GPU", 0) // gpus)) if gpus else fit
    if fit < 1:
        raise RuntimeError(f"--gpus-per-run {gpus:g} --cpus-per-run {cpus_per_run:g}: no run fits the Ray cluster "
                           f"({have.get('GPU', 0):g} GPUs, {have.get('CPU', 0):g} CPUs)")
    return gpus, min(fit, workers or fit, n_runs)


# -- the batch folder ----------------------------------------------------------------------------------------
def batch_key(runs: list[RunSpec], outputs: RunOutputs) -> str:
    """What makes a batch the same batch: its runs and what they export."""
    return hashlib.sha1(json.dumps([sorted(r.run_id for r in runs), dataclasses.asdict(outputs)]).encode()).hexdigest()[:12]


def open_folder(out: Path, key: str, runs: list[RunSpec]) -> dict[str, dict]:
    """Run id -> manifest row (new rows for new runs); RuntimeError for a folder of another batch."""
    rows = {}
    if (out / "manifest.json").exists():
        try:
            old = json.loads((out / "manifest.json").read_text())
            rows, same = {r["run_id"]: r for r in old["runs"]}, old["batch"] == key
        except (ValueError, KeyError, TypeError) as err:
            raise RuntimeError(f"{out}/manifest.json is unreadable ({err}); use another --out") from None
        if not same:
            raise RuntimeError(f"{out} holds another batch ({len(rows)} runs, manifest.json); use another --out")
    elif out.exists() and any(out.iterdir()):
        raise RuntimeError(f"{out} holds files but no manifest.json (not a batch folder); use another --out")
    for r in rows.values():  # a done run whose checkpoint went missing runs again
        r["status"] = "pending" if r["status"] == "done" and not (out / r["run_id"] / META).exists() else r["status"]
    return {r.run_id: rows.get(r.run_id) or {
        "run_id": r.run_id, "prompt": r.prompt, "seed": r.seed, "prior": r.prior, "settings": dict(r.settings),
        "status": "pending", "message": "", "steps": r.steps, "step": 0, "wall_s": 0.0, "its_per_s": None,
        "attempts": 0, "resumed_from": [], "steps_redone": 0, "files": {}} for r in runs}


def write_manifest(out: Path, key: str, rows: list[dict]) -> None:
    """DIR/manifest.json, DIR/manifest.csv and DIR/index.html, each written atomically."""
    doc = {"batch": key, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": rows}
    atomic_write(out / "manifest.json", lambda p: Path(p).write_text(json.dumps(doc, indent=1)))
    text = io.StringIO()
    table = csv.DictWriter(text, CSV_COLUMNS, extrasaction="ignore")
    table.writeheader()
    table.writerows({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in r.items()} for r in rows)
    atomic_write(out / "manifest.csv", lambda p: Path(p).write_text(text.getvalue()))
    write_gallery(out, rows, title=f"Batch {out.name}")


def _first_line(err) -> str:
    return (str(err).strip().splitlines() or [""])[0]


# -- the driver --------------------------------------------------------------------------------------------
class _Driver:
    """Hands runs to workers one segment of `every` steps at a time and writes what comes back."""

    def __init__(self, ray, out: Path, key: str, rows: dict, bar, *, every: int, outputs: RunOutputs,
                 max_retries: int, on_event, actor_options: dict, worker_args: tuple):
        self.ray, self.out, self.key, self.rows, self.bar = ray, out, key, rows, bar
        self.every, self.outputs, self.max_retries, self.on_event = every, outputs, max_retries, on_event
        self.actor_options, self.worker_args = actor_options, worker_args
        self.waiting: dict = {}  # ObjectRef -> (actor, spec, or None for a worker's `ready`; time sent)
        self.idle, self.actors, self.pending = [], [], deque()
        self.ckpt: dict[str, tuple[dict, bytes]] = {}  # run id -> its last checkpoint (meta, safetensors bytes)

    def run(self, todo: list[RunSpec], n_workers: int) -> None:
        self.pending.extend(todo)
        for _ in range(n_workers):
            self._new_worker()
        try:
            while self.pending or any(spec for _, spec, _ in self.waiting.values()):
                ready, _ = self.ray.wait(list(self.waiting), num_returns=1, timeout=5.0)
                for ref in ready:
                    self._receive(ref, *self.waiting.pop(ref))
                while self.idle and self.pending:
                    spec = self.pending.popleft()
                    self._send(self.idle.pop(), spec, self.ckpt.get(spec.run_id) or self._disk_checkpoint(spec))
        finally:  # also on Ctrl-C: stop the workers; what did not finish is pending again
            for actor in self.actors:
                try:
                    self.ray.kill(actor)
                except Exception:  # noqa: BLE001 - after Ctrl-C Ray may be going down with us
                    pass
            for row in self.rows.values():
                row["status"] = "pending" if row["status"] == "running" else row["status"]
            write_manifest(self.out, self.key, list(self.rows.values()))

    def _new_worker(self) -> None:
        actor = self.ray.remote(Worker).options(**self.actor_options).remote(*self.worker_args)
        self.actors.append(actor)
        self.waiting[actor.ready.remote()] = (actor, None, time.monotonic())

    def _send(self, actor, spec: RunSpec, resume=None) -> None:
        self.rows[spec.run_id]["status"] = "running"
        if resume is not None:
            self.rows[spec.run_id]["resumed_from"].append(resume[0]["step"])
        self.waiting[actor.advance.remote(spec, resume, self.every, self.outputs)] = (actor, spec, time.monotonic())

    def _receive(self, ref, actor, spec: RunSpec | None, sent: float) -> None:
        from ray.exceptions import RayError, RayTaskError

        try:
            reply = self.ray.get(ref)
        except RayError as err:
            if spec is None:  # e.g. the engine does not import on a node: every worker would fail alike
                raise RuntimeError(f"a worker could not start: {_first_line(err)}") from None
            if isinstance(err, RayTaskError):  # the run failed (a bad value, a prior that will not load)
                self._end(spec, "failed", f"{type(err.cause).__name__}: {_first_line(err.cause)}")
                self.idle.append(actor)
            else:  # the worker or its node died
                self._lost(actor, spec, err, time.monotonic() - sent)
            return
        if spec is not None and not reply.get("done"):  # keep the worker busy; then write what came back
            self.waiting[actor.advance.remote(spec, None, self.every, self.outputs)] = (actor, spec, time.monotonic())
        if spec is not None:
            self._checkpoint(spec, reply)
        if spec is None or reply.get("done"):
            self.idle.append(actor)

    def _checkpoint(self, spec: RunSpec, reply: dict) -> None:
        row, folder = self.rows[spec.run_id], self.out / spec.run_id
        self.ckpt[spec.run_id] = (reply["meta"], reply["weights"])
        write_checkpoint(folder, reply["meta"], load_tensors(reply["weights"]))
        row.update(step=reply["step"], steps=reply["meta"]["live"]["steps"], wall_s=round(reply["train_s"], 2),
                   its_per_s=round(reply["its_per_s"], 2), node=reply["node"])
        if reply["scores"]:
            row["scores"] = {**row.get("scores", {}), **reply["scores"]}
        self.on_event({"kind": "checkpoint", "run_id": spec.run_id, "step": reply["step"], "pid": reply["pid"],
                       "its_per_s": reply["its_per_s"]})
        if reply.get("done"):
            for kind, data in reply["files"].items():
                atomic_write(folder / EXPORTS[kind], lambda p, d=data: Path(p).write_bytes(d))
            row.update(reply["evaluation"], files={k: f"{spec.run_id}/{EXPORTS[k]}" for k in reply["files"]},
                       eval_s=reply["eval_s"], export_s=reply["export_s"], skipped_steps=reply["skipped_steps"])
            errors = "; ".join(f"{k}: {v}" for k, v in reply["export_errors"].items())
            self._end(spec, "done", f"export failed: {errors}" if errors else "")
        self._progress()

    def _lost(self, actor, spec: RunSpec, err, lost_s: float) -> None:
        """A worker died: a new one takes its place and the run goes back to the queue's front (resent with its
        last checkpoint), unless it has died `max_retries` times already."""
        self.actors.remove(actor)
        self._new_worker()
        row = self.rows[spec.run_id]
        row["attempts"] += 1
        row["steps_redone"] += min(self.every, round(lost_s * (row["its_per_s"] or 0)))  # estimated from its speed
        self.on_event({"kind": "lost", "run_id": spec.run_id, "step": row["step"], "pid": None})
        if row["attempts"] > self.max_retries:
            self._end(spec, "failed", f"its worker died {row['attempts']} times; last: {_first_line(err)}")
        else:
            self.pending.appendleft(spec)

    def _end(self, spec: RunSpec, status: str, message: str = "") -> None:
        self.rows[spec.run_id].update(status=status, message=message)
        self.ckpt.pop(spec.run_id, None)  # the driver keeps checkpoints of unfinished runs only
        self.bar.update(1)
        write_manifest(self.out, self.key, list(self.rows.values()))  # before the event: its hearers may read it
        self.on_event({"kind": status, "run_id": spec.run_id, "step": self.rows[spec.run_id]["step"], "pid": None})

    def _progress(self) -> None:
        count = Counter(r["status"] for r in self.rows.values())
        speeds = ", ".join(f"{r['run_id'][:18]} {r['its_per_s'] or 0:.0f} it/s" for r in self.rows.values()
                           if r["status"] == "running")
        self.bar.set_postfix_str(f"failed {count['failed']}, running {count['running']} | {speeds}")

    def _disk_checkpoint(self, spec: RunSpec) -> tuple[dict, bytes] | None:
        """The checkpoint an earlier, interrupted invocation left in DIR/<run-id>/, as (meta, bytes)."""
        if not (self.out / spec.run_id / META).exists():
            return None
        meta, tensors = read_checkpoint(self.out / spec.run_id)
        return meta, save_tensors(tensors)


def run_batch(runs: list[RunSpec], out: str | Path, *, outputs: RunOutputs = RunOutputs(), address: str = "",
              workers: int | None = None, cpus_per_run: float = 1, gpus_per_run: float | None = None,
              max_retries: int = 2, checkpoint_every: int = 200, progress: bool = True, on_event=None) -> list[dict]:
    """Run `runs` on Ray; their manifest rows, in the order of `runs`.

    Runs done in `out` are skipped; an interrupted one resumes from the checkpoint in its folder. Refusals
    (RuntimeError, ValueError; one line) come before anything starts. A run with a bad line or value fails
    alone, its message in the manifest. Ctrl-C stops the workers, keeps every finished run and checkpoint and
    raises KeyboardInterrupt again. `on_event(dict)` hears of each checkpoint, lost worker and end of a run."""
    from tqdm import tqdm

    out = Path(out)
    if len({r.run_id for r in runs}) < len(runs):
        raise ValueError("the batch asks for the same run (prompt, seed, prior, steps, settings) twice")
    if set(outputs.exports) - set(EXPORTS):
        raise ValueError(f"--export {','.join(outputs.exports)}: choose from {', '.join(EXPORTS)}")
    if gpus_per_run and not address and not torch.cuda.is_available():
        raise RuntimeError(f"--gpus-per-run {gpus_per_run:g}: this machine has no CUDA GPU (use --gpus-per-run 0)")
    key = batch_key(runs, outputs)
    rows = open_folder(out, key, runs)
    todo = []
    for spec in (r for r in runs if rows[r.run_id]["status"] != "done"):
        try:  # a bad line or value fails its run here, before Ray starts
            rows[spec.run_id]["steps"] = run_config(spec)[1].steps
            todo.append(spec)
        except (ValueError, TypeError) as err:
            rows[spec.run_id].update(status="failed", message=str(err))
    ray, started = connect(address) if todo else (None, False)
    try:
        gpus, n = _slots(ray, cpus_per_run, gpus_per_run, workers, len(todo)) if todo else (0, 0)
        options = {"num_cpus": cpus_per_run, "num_gpus": gpus, "max_restarts": 0}
        if not address and Path.cwd().resolve() != ROOT:  # Ray's local workers see the driver's folder, not ROOT
            options["runtime_env"] = {"env_vars": {"PYTHONPATH": str(ROOT)}}
        out.mkdir(parents=True, exist_ok=True)
        with tqdm(total=len(runs), initial=len(runs) - len(todo), unit="run", disable=not progress) as bar:
            _Driver(ray, out, key, rows, bar, every=checkpoint_every, outputs=outputs, max_retries=max_retries,
                    on_event=on_event or (lambda event: None), actor_options=options,
                    worker_args=("cuda" if gpus else "cpu", max(1, int(cpus_per_run)))).run(todo, n)
    finally:
        if started:
            ray.shutdown()
    return [rows[r.run_id] for r in runs]


# -- the command line --------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    """The `batch` subcommand of `python -m engine` (`sub`: argparse subparsers)."""
    from engine.priors import PRIOR_HELP

    b = sub.add_parser("batch", help="many runs on Ray: prompts x seeds x settings, with a manifest and a gallery")
    b.add_argument("prompts_file", nargs="?", help="prompts, one a line; 'PROMPT | KEY=VALUE ...' sets values for "
                   "that line; blank lines and # comments are skipped")
    b.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    b.add_argument("--seeds", default="0", help="seeds of each prompt: 0-3, or 0,2,5")
    b.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="values to sweep: section.field, live.<name>, prior or steps; several grids multiply")
    b.add_argument("--steps", type=int, default=None, help="training steps (default: the prior preset's)")
    b.add_argument("--prior", default="embedded", help=f"prior: {PRIOR_HELP}")
    b.add_argument("--export", default="", help=f"exports of each run, comma-separated: {','.join(EXPORTS)}")
    b.add_argument("--score-at", default="", metavar="STEPS", help="also score each run on the way at these steps, "
                   "e.g. 500,1000 (manifest rows' \"scores\")")
    b.add_argument("--out", default="outputs/batch", help="batch folder: DIR/<run-id>/, manifest, index.html")
    b.add_argument("--address", default="", help="empty: a Ray of its own on this machine; auto, host:port or "
                   "ray://host:10001: a running cluster")
    b.add_argument("--gpus-per-run", type=float, default=None, help="default: 1 where there are GPUs, else 0")
    b.add_argument("--cpus-per-run", type=float, default=1, help="CPUs (torch threads) per run")
    b.add_argument("--workers", type=int, default=None, help="runs at once (default: as many as fit)")
    b.add_argument("--max-retries", type=int, default=2, help="times a run whose worker died is resumed")
    b.add_argument("--checkpoint-every", type=int, default=200, help="steps between the checkpoints sent back")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(fn=cmd_batch)


def cmd_batch(args) -> int:
    import sys

    lines = [ln for ln in Path(args.prompts_file).read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")] if args.prompts_file else []
    if not lines + args.prompt:
        raise ValueError("no prompts: give a prompts file and/or --prompt")
    runs = expand(lines + args.prompt, parse_seeds(args.seeds), parse_grid(args.grid), args.prior, args.steps)
    outputs = RunOutputs(exports=tuple(e.strip() for e in args.export.split(",") if e.strip()),
                         score_at=tuple(parse_seeds(args.score_at)) if args.score_at else ())
    manifest = Path(args.out) / "manifest.json"
    try:
        rows = run_batch(runs, args.out, outputs=outputs, address=args.address, workers=args.workers,
                         cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run, max_retries=args.max_retries,
                         checkpoint_every=args.checkpoint_every, progress=not args.quiet)
    except KeyboardInterrupt:
        done = Counter(r["status"] for r in json.loads(manifest.read_text())["runs"])["done"] if manifest.exists() else 0
        print(f"interrupted: {done} of {len(runs)} runs done, checkpoints kept in {args.out}; the same command "
              "again finishes the rest", file=sys.stderr)
        return 130
    count = Counter(r["status"] for r in rows)
    print(json.dumps({"out": str(args.out), "runs": len(rows), **count, "gallery": str(manifest.parent / "index.html")}))
    return 1 if count["failed"] else 0
