"""Training data from the procedural world (engine.world): random scenes from DreamFusion's camera
distribution and their captions, for the embedded prior (lab.train_prior) and the classifier (lab.classifier)."""

from __future__ import annotations

import torch
from torch import Tensor

from engine.world import COLORS, SHAPES, render


def caption(shape: str, color: str | None = None, view: str | None = None) -> str:
    """ "a red cube, side view"; color None leaves the colour out, view None the view."""
    text = f"a {color} {shape}" if color else f"a {shape}"
    return f"{text}, {view} view" if view else text


CONTRAST_GREY = (0.25, 0.65)  # backdrop range for white and textureless objects under contrast=True


def sample_scenes(n: int, generator: torch.Generator, *, camera_cfg=None, shading_probs=(0.3, 0.45, 0.25),
                  shape_weights: dict[str, float] | None = None, contrast: bool = False) -> dict:
    """n random scenes from DreamFusion's camera distribution: shape, colour, camera, light, shading, background.

    shading_probs: probabilities of albedo, lambertian, textureless. Backgrounds are white half of the
    time, else a random grey, so a prior learns the object apart from a plain backdrop of any brightness.
    contrast: white objects and textureless renders (white albedo) get a grey in CONTRAST_GREY instead, never
    white: on a white backdrop they vanish, and a prior trained on them learns that "a white house" may be
    an empty image (SDS then dissolves the object). Off by default: the shipped classifier's data.
    """
    from engine.cameras import make_light, sample_cameras
    from engine.config import CameraConfig, LiveParams

    g = generator
    cfg = camera_cfg or CameraConfig()
    w = torch.tensor([(shape_weights or {}).get(s, 1.0) for s in SHAPES])
    shape_idx = torch.multinomial(w / w.sum(), n, replacement=True, generator=g)
    color_idx = torch.randint(len(COLORS), (n,), generator=g)
    cams = sample_cameras(cfg, n, g)
    light = make_light(cams, LiveParams(), cfg, g)
    modes = torch.multinomial(torch.tensor(shading_probs), n, replacement=True, generator=g)
    grey = 0.25 + 0.75 * torch.rand(n, generator=g)
    bg = torch.where(torch.rand(n, generator=g) < 0.5, torch.ones(n), grey)
    names = list(COLORS)
    if contrast:
        lo, hi = CONTRAST_GREY
        pale = (color_idx == names.index("white")) | (modes == 2)
        bg = torch.where(pale, lo + (hi - lo) * torch.rand(n, generator=g), bg)
    bg = bg[:, None].expand(n, 3).clone()
    return {
        "shapes": [SHAPES[i] for i in shape_idx.tolist()],
        "colors": [names[i] for i in color_idx.tolist()],
        "rgb": torch.tensor([COLORS[names[i]] for i in color_idx.tolist()]),
        "cameras": cams,
        "light": light,
        "shading": [("albedo", "lambertian", "textureless")[i] for i in modes.tolist()],
        "background": bg,
    }


def render_scenes(sc: dict, *, size: int = 32, supersample: int = 2) -> tuple[Tensor, Tensor]:
    """Render the output of sample_scenes: rgb [B, 3, size, size], opacity [B, 1, size, size]."""
    return render(sc["shapes"], sc["rgb"], sc["cameras"], sc["light"], sc["shading"], size=size,
                  supersample=supersample, background=sc["background"])
