"""The SDS protocol of the embedded prior and the paper's Fig. 6 ablation, on the procedural world.

One protocol run = a fresh field trained by SDS from a prompt under a step and a wall-clock budget, then
scored by `engine.evaluate.evaluate` (toy R-Precision: colour on shaded renders, geometry on textureless
ones, and the multi-view silhouette score). `bench/bench_sds_prompts.py` runs it over PROMPTS;
`python -m lab.ablation` runs it under each of ABLATION's configurations. `run_protocol` runs the jobs through
the batch runner (`engine.batch.run_batch`, on Ray); the paired statistics (`paired_steps`, `pairs_to_resolve`)
compare configurations.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from engine.batch import SCORE_KEYS, RunOutputs, RunSpec, parse_value, run_batch
from engine.batch.manifest import checkpoint_step, read_manifest
from engine.checkpoint import META, atomic_write
from engine.config import Config, LiveParams, apply_settings
from engine.presets import live_defaults, preset

# Ten prompts spanning the vocabulary: every colour and every shape, cubes and the front-facing objects twice
PROMPTS = ("a red cube", "a blue sphere", "a green cone", "a yellow cylinder", "a purple torus", "an orange mug",
           "a white house", "a pink snowman", "a blue cube", "a red house")


# The Fig. 6 ablation: each row adds one component, as dotted settings over the prior's preset
_CAMERA = Config().camera
_BASE = {  # (i) base: albedo only, the plain prompt, a narrow band of cameras (eye level, fixed distance and focal)
    "camera.elevation_range": (0.0, 30.0), "camera.distance_range": (1.25, 1.25), "camera.focal_range": (1.0, 1.0),
    "sds.view_dependent": False, "shading.albedo_only_steps": 10**9}
# (ii) + view augmentation: the paper's camera distribution (elevation -10..90, distance, focal)
_VIEW_AUG = {**_BASE, "camera.elevation_range": _CAMERA.elevation_range,
             "camera.distance_range": _CAMERA.distance_range, "camera.focal_range": _CAMERA.focal_range}
_VIEW_DEP = {**_VIEW_AUG, "sds.view_dependent": True}  # (iii) + view-dependent prompts ("..., front view")
# (iv) + lighting: albedo and lambertian shading with a random point light after the product's warm-up, no textureless
_LIGHTING = {**_VIEW_DEP, "shading.albedo_only_steps": Config().shading.albedo_only_steps,
             "shading.p_albedo": 0.3, "shading.p_lambertian": 0.7, "shading.p_textureless": 0.0}
ABLATION: dict[str, dict] = {
    "base": _BASE, "+view aug": _VIEW_AUG, "+view-dependent prompts": _VIEW_DEP, "+lighting": _LIGHTING,
    "+textureless": {},  # (v) + textureless shading: the full method (the defaults)
}


def run_prompt(prompt: str, prior=None, *, cfg: Config | None = None, live: LiveParams | None = None,
               max_steps: int = 2000, max_seconds: float = 300.0, seed: int = 0, n_views: int = 16,
               device="cpu", log: Callable[[str], None] | None = None) -> dict:
    """Train a fresh field on `prompt` with SDS from the prior's defaults until max_steps or max_seconds,
    then score it. prior: a loaded prior (default: the embedded one). Returns the evaluation plus
    steps, wall_s and its_per_s."""
    from engine.evaluate import evaluate, trainer_render_fn
    from engine.priors import load_prior
    from engine.trainer import Trainer

    prior = prior or load_prior("embedded", device=device)
    cfg = (cfg or preset(prior.name, str(device))).with_settings({"seed": seed})
    live = live or live_defaults(cfg.prior, prompt=prompt)
    trainer = Trainer(cfg, prior, device, live)
    t0 = time.perf_counter()
    while trainer.step_count < max_steps and time.perf_counter() - t0 < max_seconds:
        trainer.step(live)
        if log and trainer.step_count % 250 == 0:
            log(f"{prompt}: step {trainer.step_count} {time.perf_counter() - t0:.0f} s")
    wall = time.perf_counter() - t0
    result = evaluate(trainer_render_fn(trainer), prompt, n_views=n_views, seed=seed + 1000)
    result.update(steps=trainer.step_count, wall_s=round(wall, 1), its_per_s=round(trainer.step_count / wall, 2),
                  skipped_steps=trainer.skipped_steps)
    result["trainer"] = trainer  # callers that save previews pop it
    return result


def summarize(rows: list[dict]) -> dict:
    """Means over runs (prompts, seeds) of the colour and geometry R-Precision and of the silhouette score,
    and the standard error of the geometry mean (how far apart two rows must be to mean something)."""
    def mean(key):
        vals = [r[key] for r in rows if key in r]
        return round(statistics.fmean(vals), 3) if vals else None

    geo = [r["geometry_r_precision"] for r in rows if "geometry_r_precision" in r]
    se = statistics.stdev(geo) / len(geo) ** 0.5 if len(geo) > 1 else None  # standard error of the mean
    return {"prompts": len(rows), "colour_r_precision": mean("colour_r_precision"),
            "geometry_r_precision": mean("geometry_r_precision"),
            "geometry_se": None if se is None else round(se, 3), "shape_score": mean("shape_score"),
            "shape_margin": mean("shape_margin"), "its_per_s": mean("its_per_s"), "wall_s": mean("wall_s")}


def paired_steps(rows: list[dict], order: list[str], key: str = "geometry_r_precision") -> dict[str, dict]:
    """For each row of `order` after the first: the mean change of `key` from the row before over the runs
    both share (same prompt and seed), with its standard error. Pairing removes what prompts and seeds
    add to both rows alike, so a step is judged by its own noise rather than by two rows' spreads."""
    by = {(r["row"], r["prompt"], r.get("seed", 0)): r[key] for r in rows if key in r}
    out = {}
    for prev, row in zip(order, order[1:]):
        diffs = [by[(row, p, s)] - v for (rw, p, s), v in by.items() if rw == prev and (row, p, s) in by]
        if diffs:
            sd = statistics.stdev(diffs) if len(diffs) > 1 else None
            out[row] = {"mean": round(statistics.fmean(diffs), 3),
                        "se": None if sd is None else round(sd / len(diffs) ** 0.5, 3),
                        "n": len(diffs), "sd": None if sd is None else round(sd, 3)}
    return out


def pairs_to_resolve(mean: float, sd: float | None, z: float = 2.0) -> int | None:
    """How many paired runs a step of this mean and pair-to-pair spread needs before its sign stands clear of
    its noise (|mean| >= z standard errors, z = 2 by default): ceil((z * sd / |mean|)^2). None when the
    spread is unknown or the mean is 0 (no finite number of runs resolves a zero step's sign)."""
    if sd is None or mean == 0:
        return None
    return max(1, math.ceil((z * sd / abs(mean)) ** 2))


def apply_overrides(cfg: Config, live: LiveParams, overrides: list[str]) -> tuple[Config, LiveParams]:
    """Apply "section.field=value" overrides (e.g. "sds.t_max_end=0.5", "live.guidance_scale=20"); values are
    parsed as JSON when they parse (numbers, booleans, lists), else kept as strings."""
    return apply_settings(cfg, live, overrides_dict(overrides))


def overrides_dict(overrides: list[str]) -> dict:
    """["section.field=value", ...] -> {"section.field": value} (ValueError for an item without "=")."""
    pairs = [item.partition("=") for item in overrides]
    if any(not sep for _, sep, _ in pairs):
        raise ValueError(f"override {next(i for i in overrides if '=' not in i)!r} is not section.field=value")
    return {key.strip(): parse_value(raw) for key, _, raw in pairs}


def add_run_args(ap, prompts, steps: int, seconds: float) -> None:
    """The command-line options the protocol's bench scripts share (argparse parser `ap`)."""
    ap.add_argument("--prompts", nargs="+", default=list(prompts))
    ap.add_argument("--steps", type=int, default=steps, help="step budget per run")
    ap.add_argument("--seconds", type=float, default=seconds, help="wall-clock budget per run")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (Ray workers, one torch thread each)")
    ap.add_argument("--batch", default=None, metavar="DIR", help="batch folder: each run's checkpoint and preview, "
                    "manifest, index.html; the same DIR again skips the runs done (default: runs/batch-<time>)")
    ap.add_argument("--prior", default=None, help="prior spec (default: the shipped embedded prior)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--views", type=int, default=16, help="random views each run is scored on")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                    help="config / live overrides, e.g. sds.t_max_end=0.5 reg.entropy=0.1 live.guidance_scale=20")


def job_of(args, prompt: str, **extra) -> dict:
    """A protocol job (for `run_protocol`) for one prompt from the options `add_run_args` defines (`args`); `extra` adds to it or
    overrides it (e.g. row=..., seed=..., preview=PATH, save=DIR)."""
    return {"prompt": prompt, "steps": args.steps, "seconds": args.seconds, "seed": args.seed, "prior": args.prior,
            "set": args.set, "views": args.views, **extra}


def ablation_settings(row: str | None, prior: str = "embedded") -> dict:
    """An ablation row as settings of the batch runner: the config fields it changes in the prior's preset (in the
    config's order, so a run's id stays that of the same run before)."""
    if not row:
        return {}
    base = preset(prior).to_dict()
    cfg = preset(prior).with_settings(ABLATION[row]).to_dict()
    return {f"{section}.{k}": v for section, fields in cfg.items() if isinstance(fields, dict)
            for k, v in fields.items() if base[section][k] != v}


def spec_of(job: dict) -> RunSpec:
    """The batch runner's run for a protocol job (prompt, row, steps, seconds, seed, prior, set)."""
    prior = job.get("prior") or "embedded"
    settings = {**ablation_settings(job.get("row"), prior), **overrides_dict(job.get("set", []))}
    return RunSpec(job["prompt"], job.get("seed", 0), prior, job["steps"], tuple(settings.items()),
                   seconds=job.get("seconds"))


def run_protocol(jobs: list[dict], out: str | Path | None = None, workers: int = 2, progress: bool = True,
                 on_event=None, score_at: tuple[int, ...] = ()) -> list[dict]:
    """Run protocol jobs through the batch runner (`engine.batch.run_batch`: Ray, one torch thread per run) in
    the batch folder `out` (default: runs/batch-<time>); results in job order: each run's evaluation, steps,
    wall_s, its_per_s, row and seed. A job's "preview" (PNG path) and "save" (folder) get copies of its run's
    preview and checkpoint. `on_event` hears the batch runner's events (`engine.batch.run_batch`); `score_at`:
    steps at which each run is also scored on the way, with the training seconds it took to reach them
    (rows' "scores", see `scored_row`)."""
    views = {j.get("views", 16) for j in jobs}
    if len(views) > 1:
        raise ValueError(f"one batch scores every run on the same number of views; got {sorted(views)}")
    out = Path(out or f"runs/batch-{time.strftime('%Y%m%d-%H%M%S')}")
    score_at = tuple(sorted(set(score_at)))
    # a run's last step is scored by its final evaluation: the worker scores only the steps before it
    on_the_way = tuple(k for k in score_at if k < max(j["steps"] for j in jobs)) if jobs else ()
    outputs = RunOutputs(exports=("preview",), eval_views=views.pop() if views else 16, score_at=on_the_way)
    _redo_unscored(out, score_at)
    # a checkpoint at each scoring step: its meta holds the training seconds (train_s) to that step
    every = math.gcd(*score_at) if score_at else 200

    def heard(event: dict) -> None:
        if event["kind"] == "checkpoint" and event["step"] in score_at:
            _note_seconds(out / event["run_id"], event["step"])
        if on_event:
            on_event(event)

    rows = run_batch([spec_of(j) for j in jobs], out, outputs=outputs, workers=workers, progress=progress,
                     on_event=heard, checkpoint_every=every)
    for job, r in zip(jobs, rows):
        if r["status"] != "done":
            print(f"{r['prompt']!r} ({job.get('row') or 'protocol'}): {r['status']} {r['message']}")
        if job.get("preview") and "preview" in r["files"]:
            shutil.copyfile(out / r["files"]["preview"], job["preview"])
        if job.get("save") and r["status"] == "done":
            shutil.copytree(out / r["run_id"], job["save"], dirs_exist_ok=True)
    return [{**scored_row(r, out, score_at), "steps": r["step"], "row": job.get("row"), "seed": job.get("seed", 0)}
            for job, r in zip(jobs, rows)]


SECONDS_AT = "seconds_at.json"  # in a run's folder: {step: training seconds to that step}, one per scoring step


def _seconds(folder: Path) -> dict[str, float]:
    """A run folder's SECONDS_AT ({} where there is none)."""
    return json.loads((folder / SECONDS_AT).read_text()) if (folder / SECONDS_AT).exists() else {}


def _note_seconds(folder: Path, step: int) -> None:
    """Keep the training seconds of the checkpoint just written in `folder` (at `step`) in its SECONDS_AT file,
    beside the checkpoint, so that they outlive a resume as the checkpoint does."""
    seconds = _seconds(folder)
    seconds[str(step)] = round(json.loads((folder / META).read_text())["train_s"], 2)
    atomic_write(folder / SECONDS_AT, lambda p: Path(p).write_text(json.dumps(seconds)))


def scored_row(row: dict, out: Path, score_at: tuple[int, ...]) -> dict:
    """A batch's manifest row with, under "scores", each step of `score_at` it reached: the scores taken there and
    "wall_s", the training seconds to that step (as the row's own wall_s: time in `Trainer.step` only, not
    the evaluations, checkpoints, start-up or the prior's loading). A run that ends at a scoring step has its
    final evaluation there."""
    if not score_at:
        return row
    seconds = _seconds(out / row["run_id"])
    scores = {k: {**v, "wall_s": seconds[k]} for k, v in row.get("scores", {}).items() if k in seconds}
    if row["status"] == "done" and row["step"] in score_at:
        scores[str(row["step"])] = {**{k: row[k] for k in SCORE_KEYS if k in row}, "wall_s": row["wall_s"]}
    return {**row, "scores": scores}


def _redo_unscored(out: Path, score_at: tuple[int, ...]) -> None:
    """An unfinished run in `out` resumes from its checkpoint when its scores and seconds at the scoring steps
    before it survived (a batch stopped by SIGINT/SIGTERM writes them); else (a batch killed hard) its folder
    goes, and the run is redone from step 0."""
    doc = read_manifest(out) if score_at else None
    for r in doc["runs"] if doc else ():
        folder = out / r["run_id"]
        seconds = _seconds(folder)
        passed = {str(k) for k in score_at if k <= (checkpoint_step(folder) or 0)}
        if r["status"] != "done" and not passed <= set(r.get("scores", {})) & set(seconds):
            shutil.rmtree(folder, ignore_errors=True)
