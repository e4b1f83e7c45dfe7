"""What a batch runs: `RunSpec` (one run), `RunOutputs` (what each run sends back), and the parsing of prompt
lines, seeds and grids into runs (`expand`), and a run's config (`run_config`)."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shlex
from dataclasses import dataclass

from engine.config import Config, LiveParams
from engine.export import slugify
from engine.presets import preset_run

EXPORTS = {"gif": "orbit.gif", "mp4": "orbit.mp4", "mesh": "mesh.glb", "snapshot": "snapshot.png",
           "preview": "preview.png"}
SCORE_KEYS = ("colour_r_precision", "geometry_r_precision", "shape_score", "shape_margin", "translucent_share",
              "foreground_share")


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
    mesh_resolution: int = 128  # marching-cubes lattice of the textured mesh
    mesh_faces: int = 20_000  # its face budget
    mesh_texture: int = 1024  # its base-colour texture's side, texels
    eval_views: int = 16  # random views the evaluation scores (seeded by the run's seed + 1000)
    score_at: tuple[int, ...] = ()  # steps at which the run is also scored on the way (row["scores"][step])


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
