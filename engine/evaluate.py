"""Evaluation on the procedural world: the toy R-Precision and a multi-view silhouette score.

The paper scores results with CLIP R-Precision. Here an independent classifier (a small CNN trained on
world renders, never on the prior's outputs) names the colour and the shape of a render:

- colour R-Precision: the colour head's top-1 on lambertian renders lit from the camera;
- geometry R-Precision: the shape head's top-1 on textureless renders (no colour to lean on);
- shape score: per view, the IoU of the result's silhouette with the prompted solid's silhouette (the
  world renders it for the same camera), and its margin over the best other solid (IoU alone is weak:
  sphere vs cube is 0.73).

The caller supplies `render_fn(cameras, light, shading) -> (rgb [B, 3, H, W] in [0, 1], opacity [B, 1, H, W])`.
`python -m engine eval --run DIR` scores a saved run. The classifier is trained by `python -m lab.classifier`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from engine import world
from engine.cameras import Cameras, Light, make_light, sample_cameras
from engine.config import CameraConfig, LiveParams

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CLASSIFIER = ASSETS / "classifier.safetensors"
COLOR_NAMES, SHAPE_NAMES = list(world.COLORS), list(world.SHAPES)
EVAL_CAMERAS = CameraConfig(elevation_range=(0.0, 60.0))  # views where colour and shape are both readable
RenderFn = Callable[[Cameras, Light, str], tuple[Tensor, Tensor]]


class Classifier(nn.Module):
    """Three conv stages (32x32 -> 4x4), global average pool, a colour head and a shape head."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for c in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1),
                       nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.color = nn.Linear(c_in, len(COLOR_NAMES))
        self.shape = nn.Linear(c_in, len(SHAPE_NAMES))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, 3, H, W] in [0, 1] (resized to 32) -> colour logits [B, 8], shape logits [B, 8]."""
        if images.shape[-1] != 32:
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        h = self.features(images * 2 - 1).mean((2, 3))
        return self.color(h), self.shape(h)


def load_classifier(path: str | Path = CLASSIFIER) -> Classifier:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} not found; train it with: python -m lab.classifier")
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model = Classifier(width=state["features.0.weight"].shape[0])
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def parse_prompt(prompt: str) -> tuple[str | None, str | None]:
    """The colour and shape a prompt names in the world's vocabulary (None when it names none)."""
    words = [world.SYNONYMS.get(w, w) for w in prompt.lower().replace(",", " ").split()]
    color = next((w for w in words if w in world.COLORS), None)
    shape = next((w for w in words if w in world.SHAPES), None)
    return color, shape


def _iou(a: Tensor, b: Tensor) -> Tensor:
    """Per-image IoU of soft masks [B, 1, H, W] thresholded at 0.5."""
    a, b = a > 0.5, b > 0.5
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float().clamp(min=1)
    return inter / union


def translucent_share(opacity: Tensor, lo: float = 0.05, hi: float = 0.9) -> float:
    """Share of the foreground pixels (opacity > lo) that are not opaque (< hi). A solid scores its
    anti-aliased rim only (about 0.2 at 32x32); a translucent cloud of density, the boxy SDS failure, ~1."""
    fg = opacity[opacity > lo]
    return round((fg < hi).float().mean().item(), 3) if fg.numel() else 0.0


def foreground_share(opacity: Tensor, level: float = 0.5) -> float:
    """Share of the pixels the result covers (opacity > level): about 0 for an empty field, where nothing formed
    (a world solid covers 0.1-0.3 of the evaluation's views)."""
    return round((opacity > level).float().mean().item(), 4)


def votes(logits: Tensor, names: list[str] | tuple[str, ...]) -> dict[str, int]:
    """How many rows of logits [N, len(names)] pick each name (names never picked left out)."""
    return {names[i]: int(k) for i, k in enumerate(logits.argmax(1).bincount(minlength=len(names))) if k > 0}


@torch.no_grad()
def evaluate(render_fn: RenderFn, prompt: str, n_views: int = 16, seed: int = 0,
             classifier: Classifier | None = None) -> dict:
    """Toy R-Precision and silhouette score of a result over n_views random views (light at the camera)."""
    color, shape = parse_prompt(prompt)
    clf = classifier or load_classifier()
    cams = sample_cameras(EVAL_CAMERAS, n_views, torch.Generator().manual_seed(seed))
    light = make_light(cams, LiveParams(light_mode="camera"), EVAL_CAMERAS, None)
    rgb, opacity = render_fn(cams, light, "lambertian")
    plain, _ = render_fn(cams, light, "textureless")
    color_logits, _ = clf(rgb.float().cpu())
    _, shape_logits = clf(plain.float().cpu())
    out = {"prompt": prompt, "n_views": n_views, "seed": seed, "translucent_share": translucent_share(opacity),
           "foreground_share": foreground_share(opacity)}
    if color is not None:
        out["colour_r_precision"] = (color_logits.argmax(1) == COLOR_NAMES.index(color)).float().mean().item()
    if shape is not None:
        out["geometry_r_precision"] = (shape_logits.argmax(1) == SHAPE_NAMES.index(shape)).float().mean().item()
        # what the views were taken for: tells a failure's look (a cube read as a house, a cylinder, ...)
        out["shape_votes"] = votes(shape_logits, SHAPE_NAMES)
        size = opacity.shape[-1]
        ious = {}
        for s in SHAPE_NAMES:  # ground-truth silhouettes of every solid from the same cameras
            _, mask = world.render([s] * n_views, torch.ones(n_views, 3), cams, light, "albedo", size=size, supersample=1)
            ious[s] = _iou(opacity.float().cpu(), mask).mean().item()
        best_other = max(v for k, v in ious.items() if k != shape)
        out["shape_score"] = ious[shape]  # mean multi-view silhouette IoU with the prompted solid
        out["shape_margin"] = ious[shape] - best_other  # > 0: closer to the prompted solid than to any other
        out["silhouette_iou"] = {k: round(v, 3) for k, v in ious.items()}
    return out


def world_render_fn(shape: str, color: str, size: int = 32) -> RenderFn:
    """render_fn of a perfect result: the world's own solid (the evaluation's upper bound, used in tests)."""
    def fn(cams: Cameras, light: Light, shading: str) -> tuple[Tensor, Tensor]:
        rgb = torch.tensor(world.COLORS[color]).expand(len(cams), 3)
        return world.render([shape] * len(cams), rgb, cams, light, shading, size=size)
    return fn


def trainer_render_fn(trainer, size: int = 32) -> RenderFn:
    """render_fn of a run: engine.trainer.Trainer.render_views at size x size (what `engine eval` scores)."""
    def fn(cams: Cameras, light: Light, shading: str) -> tuple[Tensor, Tensor]:
        out = trainer.render_views(cams, size, size, shading, light=light.to(trainer.device))
        return out.rgb.cpu(), out.opacity.cpu()
    return fn


def evaluate_run(run_dir: str | Path, *, n_views: int = 16, seed: int = 0, prompt: str | None = None,
                 size: int = 32, classifier: str | Path | None = None) -> dict:
    """evaluate() of the run saved in run_dir (prompt: the run's own unless given); what `engine eval` prints."""
    from engine.checkpoint import restore
    from engine.priors.analytic import GaussianPrior

    trainer, live = restore(run_dir, prior=GaussianPrior())  # rendering needs no prior: skip loading the run's
    clf = load_classifier(classifier) if classifier else None
    return evaluate(trainer_render_fn(trainer, size), prompt or live.prompt, n_views, seed, clf)
