"""Configuration of the engine: one dataclass per component, composed into `Config`.

Two kinds of values live here. Frozen hyper-parameters (`Config` and its parts) are fixed for a run.
`LiveParams` holds what a user may change mid-run; it is frozen too, replaced whole with
`dataclasses.replace`, and read once at the top of every training step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from dataclasses import field as _field

log = logging.getLogger(__name__)
SHADING_MODES = ("random", "albedo", "lambertian", "textureless", "normal")
LIGHT_MODES = ("random", "camera", "fixed")
DISTILLATIONS = ("sds", "csd", "nfsd", "ism", "vsd")  # engine.sds.distillation_grad; what each is for: docs/priors.md


def quoted(value, limit: int = 80) -> str:
    """repr(value) for an error message, cut to about `limit` characters: a 10 kB prompt or a huge list is
    named by its start and its size, never echoed whole."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} items" if isinstance(value, (list, tuple, dict, set)) else f"{len(text)} characters"
    return f"{text[:limit - 1]}… ({size})"


@dataclass(frozen=True)
class LiveParams:
    """Values the UI may change while a run goes on; the trainer reads them once per step."""

    prompt: str = "a red cube"  # text the prior is conditioned on
    negative_prompt: str = ""  # text for the unconditional branch of classifier-free guidance
    guidance_scale: float = 10.0  # CFG scale s in eps_u + s * (eps_c - eps_u) (diffusers' convention: s = 1 + omega)
    shading: str = "random"  # one of SHADING_MODES; "random" mixes modes as the paper does
    light_mode: str = "random"  # "random": sampled around the camera; "camera": at the camera; "fixed": the angles below
    light_azimuth: float = 45.0  # degrees, used when light_mode == "fixed"
    light_elevation: float = 45.0  # degrees, used when light_mode == "fixed"
    light_distance: float = 3.0  # distance of the point light from the origin, scene units, "fixed" mode
    light_color: tuple[float, float, float] = (0.9, 0.9, 0.9)  # l_rho, the light's RGB intensity
    ambient: float = 0.1  # l_a, ambient light intensity
    learning_rate: float = 1e-2  # learning rate of the field; other groups scale with it
    steps: int = 1500  # length of the run: it trains until this step (raise it to go on; nothing in a step reads it)
    distillation: str = "sds"  # the loss: one of DISTILLATIONS (sds, csd, nfsd, ism, vsd); switching keeps the field

    def validated(self) -> LiveParams:
        """Return self if every value is usable, else raise ValueError naming the bad one."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        if len(self.prompt) > 2000:
            raise ValueError(f"prompt is {len(self.prompt)} characters; the limit is 2000")
        if not isinstance(self.negative_prompt, str) or len(self.negative_prompt) > 2000:
            raise ValueError("negative_prompt must be a string of at most 2000 characters")
        _finite_in("guidance_scale", self.guidance_scale, 0.0, 200.0)
        if self.shading not in SHADING_MODES:
            raise ValueError(f"shading must be one of {', '.join(SHADING_MODES)}; got {quoted(self.shading)}")
        if self.light_mode not in LIGHT_MODES:
            raise ValueError(f"light_mode must be one of {', '.join(LIGHT_MODES)}; got {quoted(self.light_mode)}")
        _finite_in("light_azimuth", self.light_azimuth, -360.0, 360.0)
        _finite_in("light_elevation", self.light_elevation, -90.0, 90.0)
        _finite_in("light_distance", self.light_distance, 0.5, 100.0)
        if len(self.light_color) != 3:
            raise ValueError("light_color must have three components")
        for c in self.light_color:
            _finite_in("light_color", c, 0.0, 10.0)
        _finite_in("ambient", self.ambient, 0.0, 1.0)
        _finite_in("learning_rate", self.learning_rate, 1e-6, 1.0)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or not 1 <= self.steps <= 10**7:
            raise ValueError(f"steps must be an integer in [1, 10^7]; got {quoted(self.steps)}")
        _choice("distillation", self.distillation, DISTILLATIONS)
        return self

    def replace(self, **changes) -> LiveParams:
        """A validated copy with `changes` applied; unknown names raise ValueError."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown live parameter(s): {', '.join(sorted(unknown))}")
        if "light_color" in changes:
            changes["light_color"] = tuple(float(c) for c in changes["light_color"])
        return dataclasses.replace(self, **changes).validated()


def checked_util(value) -> float:
    """A training share (the playground's `train_util`) as a float in [0.05, 1], else ValueError naming it."""
    _finite_in("train_util", value, 0.05, 1.0)
    return float(value)


def _finite_in(name: str, value, lo: float, hi: float) -> None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number; got {quoted(value)}") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"{name} must be a finite number in [{lo:g}, {hi:g}]; got {quoted(value)}")


def _choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {quoted(value)}")


BACKBONES = ("grid", "hash", "gaussians")
BACKGROUNDS = ("mlp", "solid")


@dataclass(frozen=True)
class FieldConfig:
    """The neural field: density and albedo inside the bounding sphere."""

    # "grid": an MLP generates a dense grid (fast on CPU); "hash": Instant-NGP hash grid (GPU); "gaussians": 3D
    # Gaussian splats, rasterized instead of ray-marched (engine.splats; their settings are the `splats` section)
    backbone: str = "grid"
    radius: float = 1.0  # bounding sphere; the field is zero outside it. Cameras are placed in its units
    grid_resolution: int = 32  # lattice of the generated grid: 32^3 resolves the prior's 32-64 px renders
    fourier_bands: int = 6  # octaves of the generator MLP's input: finer than 6 aliases on a 32^3 lattice
    hidden: int = 64  # width of the MLPs: the prototype's 64-64 trains at 12 it/s on one core
    hash_levels: int = 16  # hash backbone: Instant-NGP's levels ...
    hash_log2_size: int = 16  # ... table size 2^16 per level (fits GPU caches; collisions stay rare at 64^2)
    hash_base_resolution: int = 16  # ... coarsest level
    hash_max_resolution: int = 512  # ... finest level: sub-pixel detail at 512^2 viewer frames
    # a lasting bias on the raw density, blob_density * (1 - r / blob_radius) (Magic3D's init, 10 and 0.5):
    # positive inside blob_radius so the object starts as a centred blob, negative beyond so floaters fade
    blob_density: float = 10.0
    blob_radius: float = 0.5

    def __post_init__(self):
        _choice("field.backbone", self.backbone, BACKBONES)


@dataclass(frozen=True)
class SplatConfig:
    """The Gaussian-splat field (`field.backbone = "gaussians"`): its start and its densification schedule
    (`engine.splats.densify`; gsplat's default strategy and DreamGaussian's, in steps sized for short CPU runs)."""

    init_count: int = 1024  # Gaussians at step 0, centres drawn uniformly in a ball (the NeRF's centre blob)
    init_radius: float = 0.5  # radius of that ball (the NeRF's blob_radius)
    init_opacity: float = 0.1  # starting opacity (3DGS's): transparent enough to let SDS move them
    max_count: int = 8192  # densification never grows the field beyond this many Gaussians
    densify_from: int = 50  # first step that clones, splits and prunes (the shape must settle first)
    densify_until: int = 2000  # last one: afterwards the set is fixed and only refined
    densify_every: int = 50  # steps between densifications; gradients are averaged over them
    grad_threshold: float = 0.05  # mean view-space positional gradient (NDC units) above which a Gaussian grows:
    # SDS sums its gradient over pixels, so this is larger than gsplat's 2e-4 for a mean photometric loss
    split_scale: float = 0.05  # larger than this (largest axis, in units of field.radius): split; else clone
    prune_opacity: float = 0.01  # Gaussians fainter than this are removed
    prune_scale: float = 0.3  # ... and those whose largest axis exceeds this (units of field.radius)
    tile: int = 8  # pixels per side of a rasterizer tile: 8 evaluates ~3x fewer pairs than 16 at 32-64 px

    def __post_init__(self):
        for name in ("init_count", "max_count", "densify_every", "tile"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"splats.{name} must be a positive integer; got {quoted(value)}")


@dataclass(frozen=True)
class BackgroundConfig:
    """What rays that leave the sphere see."""

    kind: str = "mlp"  # "mlp": learned colour per ray direction (the paper's); "solid": the fixed colour below
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)  # colour of the "solid" background

    def __post_init__(self):
        _choice("background.kind", self.kind, BACKGROUNDS)


@dataclass(frozen=True)
class RenderConfig:
    """Volume rendering."""

    resolution: int = 32  # training render size (square); 0: the prior's own resolution
    num_samples: int = 48  # stratified samples per ray on the torch path: ~1.5 per lattice cell across the sphere
    occupancy: bool = True  # skip empty space with an occupancy grid: most of the sphere is empty once shaped
    occupancy_resolution: int = 32  # cells per side of the occupancy grid, matched to the field's lattice
    occupancy_threshold: float = 0.01  # alpha over one cell below which the cell counts as empty (nerfacc's)
    occupancy_every: int = 16  # steps between occupancy-grid updates (nerfacc's default)
    occupancy_warmup: int = 64  # steps before the grid is used: the blob must settle first
    render_step_size: float = 0.01  # marching step of nerfacc's CUDA sampler: ~200 steps across the sphere
    chunk: int = 16384  # rays per chunk of renders without gradients: bounds the memory of large frames
    shade_threshold: float = 1e-4  # renders without gradients shade only samples of larger weight


@dataclass(frozen=True)
class CameraConfig:
    """The random cameras of training (the paper's values, distances scaled to the scene)."""

    elevation_range: tuple[float, float] = (-10.0, 90.0)  # degrees
    azimuth_range: tuple[float, float] = (0.0, 360.0)  # degrees; 0 looks at the front (camera on +x)
    distance_range: tuple[float, float] = (1.0, 1.5)  # in units of `distance_scale`
    distance_scale: float = 2.0  # the paper's (1, 1.5) is for a unit-radius scene seen whole: scale 2 frames it
    focal_range: tuple[float, float] = (0.7, 1.35)  # focal length as a multiple of the image width
    center_jitter: float = 0.05  # std of the look-at point's jitter, scene units
    up_jitter: float = 0.02  # std of the up vector's jitter
    light_distance_range: tuple[float, float] = (0.8, 1.5)  # point light distance, multiple of the camera's
    light_jitter: float = 1.0  # std of the light direction's jitter around the camera direction (threestudio's)
    batch_size: int = 2  # views per step (the paper's 4 at its scale; the presets pick 1 or 2)


@dataclass(frozen=True)
class ShadingConfig:
    """How each step picks its shading when the live mode is "random"."""

    albedo_only_steps: int = 100  # albedo only at first (threestudio's warm-up): colour before geometry
    p_albedo: float = 0.2  # probability of albedo shading afterwards
    p_lambertian: float = 0.4  # probability of lambertian shading
    p_textureless: float = 0.4  # probability of textureless shading: geometry must read without colour


@dataclass(frozen=True)
class SDSConfig:
    """Score distillation."""

    t_min: float = 0.02  # t ~ U(t_min, t_max), as a fraction of the prior's timesteps (the paper's 0.02)
    t_max: float = 0.98  # upper end at step 0 (the paper's 0.98)
    t_max_end: float = 0.98  # upper end after annealing; equal to t_max: no annealing
    anneal_steps: int = 1000  # steps over which t_max goes linearly to t_max_end
    view_dependent: bool = True  # add "front/side/back/overhead view" to the prompt by camera (paper 3.2)
    good_state_every: int = 50  # good steps between copies of the trainable state (0: never)
    rollback_after: int = 5  # consecutive non-finite steps that restore the last good copy (0: never)


@dataclass(frozen=True)
class RegularizerConfig:
    """Losses besides SDS."""

    opacity: float = 0.0  # weight of the mean pixel opacity (Dream Fields' sparsity); entropy does its job here
    entropy: float = 0.05  # weight of the binary entropy of pixel opacity: rays end empty or opaque, no fog
    orientation: float = 0.01  # final weight of the orientation loss (Ref-NeRF): normals face the camera
    orientation_ramp_steps: int = 500  # the weight ramps up from zero (threestudio ramps it too): shape first


@dataclass(frozen=True)
class Config:
    """Everything fixed for a run."""

    field: FieldConfig = _field(default_factory=FieldConfig)
    splats: SplatConfig = _field(default_factory=SplatConfig)
    background: BackgroundConfig = _field(default_factory=BackgroundConfig)
    render: RenderConfig = _field(default_factory=RenderConfig)
    camera: CameraConfig = _field(default_factory=CameraConfig)
    shading: ShadingConfig = _field(default_factory=ShadingConfig)
    sds: SDSConfig = _field(default_factory=SDSConfig)
    reg: RegularizerConfig = _field(default_factory=RegularizerConfig)
    prior: str = "embedded"  # prior spec: "embedded", "oracle:<solid>", "gaussian", "sd[:<id or folder>]", "if[:<id or folder>]"
    seed: int = 0  # seed of the run's generator and of the networks' initialisation

    def validated(self) -> Config:
        """Self if the prior and the seed are usable (the sections check themselves when built), else ValueError."""
        from engine.priors import check_prior_spec

        check_prior_spec(self.prior)
        if self.splats.init_count > self.splats.max_count:
            raise ValueError(f"splats.init_count ({self.splats.init_count}) exceeds splats.max_count ({self.splats.max_count})")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2^63); got {quoted(self.seed)}")
        return self

    def with_settings(self, settings: dict) -> Config:
        """A copy with {"section.field" or "seed" / "prior": value} applied; ValueError names a bad key or value."""
        cfg = self
        for key, value in settings.items():
            cfg = _with_setting(cfg, key, value)
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """Inverse of to_dict; unknown keys and bad choices raise ValueError. Keys of levers that were removed
        (in checkpoints written before) are dropped with a warning."""
        d = {k: v for k, v in d.items() if k not in RETIRED_TOP}
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(sorted(unknown))}")
        kw = {name: _build(SECTIONS[name], name, v) if name in SECTIONS else v for name, v in d.items()}
        return cls(**kw)


SECTIONS = {"field": FieldConfig, "splats": SplatConfig, "background": BackgroundConfig, "render": RenderConfig,
            "camera": CameraConfig, "shading": ShadingConfig, "sds": SDSConfig, "reg": RegularizerConfig}
# top-level keys of older checkpoints: "optim" was removed, "steps" moved to LiveParams (engine.checkpoint reads it)
RETIRED_TOP = {"optim", "steps"}
# config keys of checkpoints from before these levers were removed (they were off in every shipped preset)
RETIRED = {"field": {"band_anneal_steps", "density_activation"},
           "background": {"grey_prob", "grey_range", "hidden", "fourier_bands"},  # the last two: now constants
           "render": {"early_stop", "early_stop_min_pruned", "early_stop_probe_every"},
           "sds": {"view_blend", "weighting", "skip_nonfinite"}, "reg": {"normal_smoothness", "density_tv"}}


def _build(cls, section: str, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    retired = set(d) & RETIRED.get(section, set())
    if retired:
        log.warning("ignoring removed config key(s) %s", ", ".join(f"{section}.{k}" for k in sorted(retired)))
    unknown = set(d) - names - retired
    if unknown:
        raise ValueError(f"unknown {section} key(s): {', '.join(sorted(unknown))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def _with_setting(cfg: Config, key: str, value) -> Config:
    section, dot, name = key.rpartition(".")
    target = getattr(cfg, section, None) if dot and section in SECTIONS else (None if dot else cfg)
    if target is None or name not in {f.name for f in dataclasses.fields(target)} or (not dot and name in SECTIONS):
        raise ValueError(f"unknown setting {quoted(key)}: use section.field of the config, live.<name>, prior or seed")
    value = tuple(value) if isinstance(value, list) else value
    try:
        if not dot:
            return dataclasses.replace(cfg, **{name: value})
        return dataclasses.replace(cfg, **{section: dataclasses.replace(target, **{name: value})})
    except TypeError as err:  # a value a section's check cannot even compare
        raise ValueError(f"{key}: {err}") from None


def apply_settings(cfg: Config, live: LiveParams, settings: dict) -> tuple[Config, LiveParams]:
    """New copies of `cfg` with {"section.field", "seed" or "prior": value} and of `live` with {"live.name": value}
    applied ("steps" is accepted for "live.steps"); ValueError names a bad key or value."""
    live_changes, cfg_changes = {}, {}
    for key, value in settings.items():
        if key.startswith("live.") or key == "steps":
            live_changes[key.removeprefix("live.")] = value
        else:
            cfg_changes[key] = value
    return cfg.with_settings(cfg_changes).validated(), live.replace(**live_changes)
