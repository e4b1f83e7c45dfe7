"""Presets: the settings each kind of prior runs with, and the settings a new run gets.

A preset is a dict of dotted settings ("sds.t_max_end", "live.guidance_scale", "live.steps") applied to a fresh
`Config()` and `LiveParams()` (`engine.config.apply_settings`), so a run's config is built once and never
changed under it. `new_run` is the one rule for "which settings does a new run with this prior get", used by
the session (the pane's Start and Reset), the CLI and the batch runner.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import Config, LiveParams, apply_settings

# The embedded prior's settings, each chosen on the SDS protocol (`python bench/bench_sds_prompts.py`,
# docs/findings.md): guidance 10 (5 and 20 did worse; its samples break above ~7.5 CFG, SDS wants a little more);
# one view per step for twice the steps (as the peers do) beat two views per step in the same wall time; t_max
# annealed 0.98 -> 0.5 refines detail once the shape stands; opacity entropy 0.2 turns boxy clouds into solids;
# a denser centre blob (20) keeps density out of the corners.
# Splats: SDS gradients are noisy and summed over pixels, so the view-space gradient of almost every Gaussian passes
# the default growth threshold and the count nears splats.max_count by step 200; with the embedded prior the mean
# gradient's 90th percentile is 0.2-0.6 at the first densifications (the median 0.1-0.3), so 0.5 grows about the
# steepest tenth, as DreamGaussian raises 3DGS's threshold for SDS. The growth then stays ~400 a densification, so
# it stops at step 500, a quarter of the run (gsplat stops at half of its 30k): ~4.8k Gaussians at most (BENCHMARKS.md)
EMBEDDED_SPLATS = {"splats.grad_threshold": 0.5, "splats.densify_until": 500}
EMBEDDED = {"sds.t_min": 0.02, "sds.t_max": 0.98, "sds.t_max_end": 0.5, "sds.anneal_steps": 1000, "reg.entropy": 0.2,
            "field.blob_density": 20.0, "render.resolution": 32, "camera.batch_size": 1,
            "live.guidance_scale": 10.0, "live.learning_rate": 0.01, "live.steps": 2000, **EMBEDDED_SPLATS}
# Stable Diffusion and IF render 64x64 like the peers; their guidance is the peers' (SD 100, IF 20)
LARGE = {"render.resolution": 64, "camera.batch_size": 1, "live.steps": 10000}
PRESETS = {
    "embedded": EMBEDDED,
    "sd": {**LARGE, "live.guidance_scale": 100.0},
    "if": {**LARGE, "live.guidance_scale": 20.0},
    "oracle": {"live.learning_rate": 0.03},  # reconstruction: a larger learning rate is safe
    "gaussian": {},
}
# on CUDA the hash-grid backbone is affordable for the large priors
CUDA_PRESETS = {"sd": {"field.backbone": "hash", "render.num_samples": 64},
                "if": {"field.backbone": "hash", "render.num_samples": 64}}


def prior_kind(spec: str | None) -> str:
    """"embedded", "oracle", "gaussian", "sd" or "if" of a prior spec such as "sd:/models/x"."""
    return (spec or "embedded").partition(":")[0].lower()


def preset_settings(prior: str = "embedded", device: str = "cpu") -> dict:
    """The dotted settings of a prior's preset on a device (config sections and "live.*")."""
    kind = prior_kind(prior)
    cuda = CUDA_PRESETS.get(kind, {}) if str(device).startswith("cuda") else {}
    return {**PRESETS.get(kind, {}), **cuda}


def preset_run(prior: str = "embedded", device: str = "cpu", settings: dict | None = None) -> tuple[Config, LiveParams]:
    """A fresh config and live parameters for `prior`: its preset, then `settings` (dotted; they win)."""
    prior = prior or "embedded"
    return apply_settings(Config(prior=prior), LiveParams(), {**preset_settings(prior, device), **(settings or {})})


def preset(prior: str = "embedded", device: str = "cpu") -> Config:
    """The run configuration tuned for a prior (its spec, e.g. "embedded", "oracle:cube", "sd:/models/x")."""
    return preset_run(prior, device)[0]


def live_defaults(prior: str = "embedded", **overrides) -> LiveParams:
    """Starting live parameters for a prior (its guidance scale, learning rate and steps), then `overrides`."""
    return preset_run(prior, "cpu", {f"live.{k}": v for k, v in overrides.items()})[1]


@dataclass(frozen=True)
class NewRun:
    """What `new_run` decided: the run's config and live parameters, and a note for the user."""

    cfg: Config
    live: LiveParams
    note: str


def new_run(prior: str, *, device: str = "cpu", current: tuple[Config, LiveParams] | None = None,
            overrides: dict | None = None, changes: dict | None = None) -> NewRun:
    """The settings of a new run with `prior`.

    1. the same kind of prior as the current run: the current config and live parameters go on;
    2. another kind (or no current run): the prior's preset, then `overrides` (what the command line set for the
       whole session), keeping the prompt and negative prompt (what the user is making, not how);
    3. then `changes`: what the user set since the last run (dotted settings, "live.*" for live parameters,
       "seed" for the run's seed); they win over the preset.
    ValueError names a bad setting.
    """
    overrides, changes = dict(overrides or {}), dict(changes or {})
    if current is not None and prior_kind(prior) == prior_kind(current[0].prior):
        cfg, live = apply_settings(current[0], current[1], {"prior": prior, **changes})
        return NewRun(cfg, live, "")
    keep = {f"live.{k}": getattr(current[1], k) for k in ("prompt", "negative_prompt")} if current else {}
    cfg, live = preset_run(prior, device, {**overrides, **keep, **changes})
    typed = sorted(k.removeprefix("live.") for k in {**overrides, **changes})
    note = (f"{prior_kind(prior)} settings: {cfg.render.resolution or 'its own'} px, {cfg.field.backbone} field, "
            f"{live.steps} steps, guidance {live.guidance_scale:g}, learning rate {live.learning_rate:g}"
            + (f"; kept what you set: {', '.join(typed)}" if typed else ""))
    return NewRun(cfg, live, note)
