"""Evaluation on the procedural world: the toy R-Precision and a multi-view silhouette score.

The paper scores results with CLIP R-Precision. Here an independent classifier (a small CNN trained on
world renders, never on the prior's outputs) names the colour and the shape of a render:

- colour R-Precision: the colour head's top-1 on lambertian renders lit from the camera;
- geometry R-Precision: the shape head's top-1 on textureless renders (no colour to lean on);
- shape score: per view, the IoU of the result's silhouette with the prompted solid's silhouette (the
  world renders it for the same camera), and its margin over the best other solid (IoU alone is weak:
  sphere vs cube is 0.73).

The caller supplies `render_fn(cameras, light, shading) -> (rgb [B, 3, H, W] in [0, 1], opacity [B, 1, H, W])`.

    python -m engine.evaluate train-classifier          # writes assets/classifier.safetensors
    python -m engine.evaluate prior-samples --n 4       # the shipped prior's samples, classified
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from engine import world
from engine.cameras import Cameras, Light, make_light, sample_cameras
from engine.config import CameraConfig, LiveParams

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CLASSIFIER = ASSETS / "classifier.safetensors"
COLOR_NAMES, SHAPE_NAMES = list(world.COLORS), list(world.SHAPES)
EVAL_CAMERAS = CameraConfig(elevation_range=(0.0, 60.0))  # views where colour and shape are both readable
RenderFn = Callable[[Cameras, Light, str], tuple[Tensor, Tensor]]


def save_grid(images: Tensor, path: str | Path, nrow: int = 8, scale: int = 3) -> None:
    """Save images [B, 3, H, W] in [0, 1] as one PNG grid (grey 2-pixel gutters), upscaled for viewing."""
    x = (images.detach().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    b, h, w, _ = x.shape
    rows = (b + nrow - 1) // nrow
    grid = np.full((rows * (h + 2), nrow * (w + 2), 3), 128, np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[r * (h + 2): r * (h + 2) + h, c * (w + 2): c * (w + 2) + w] = x[i]
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


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
        raise FileNotFoundError(f"{path} not found; train it with: python -m engine.evaluate train-classifier")
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model = Classifier(width=state["features.0.weight"].shape[0])
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def _augment(x: Tensor, g: torch.Generator, strong: bool = False) -> Tensor:
    """Flips, small shifts, blur and noise: the classifier must also read soft, noisy volume renders.

    `strong` adds what a NeRF's renders have and the world's do not: blotchy shading (a smooth random
    gain field, as from uneven normals), per-image brightness and contrast."""
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
    x = torch.roll(x, (dy, dx), (2, 3))
    if torch.rand((), generator=g) < 0.3:
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    if strong:
        B, _, H, W = x.shape
        r = int(torch.randint(4, 17, (), generator=g))  # the gain field's resolution: 4x4 (smooth) .. 16x16
        gain = 1 + 0.25 * torch.rand(B, 1, 1, 1, generator=g) * torch.randn(B, 1, r, r, generator=g)
        x = x * F.interpolate(gain, size=(H, W), mode="bilinear", align_corners=False)
        mean = x.mean((1, 2, 3), keepdim=True)
        contrast = 0.7 + 0.6 * torch.rand(B, 1, 1, 1, generator=g)
        x = (x - mean) * contrast + mean + 0.1 * (torch.rand(B, 1, 1, 1, generator=g) - 0.5)
    return (x + 0.03 * torch.rand((), generator=g) * torch.randn(x.shape, generator=g)).clamp(0, 1)


def classifier_data(n_images: int, seed: int, cache: Path | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """World renders for the classifier: images [N, 3, 32, 32], colour, shape, has-colour; cached if asked."""
    if cache is not None and Path(cache).exists():
        d = torch.load(cache)
        if len(d["colors"]) == n_images and d["seed"] == seed:
            return d["imgs"].float() / 255, d["colors"], d["shapes"], d["has_color"]
    g = torch.Generator().manual_seed(seed)
    chunks = [world.sample_scenes(min(512, n_images - i), g) for i in range(0, n_images, 512)]
    imgs = torch.cat([world.render_scenes(sc)[0] for sc in chunks])
    colors = torch.tensor([COLOR_NAMES.index(c) for sc in chunks for c in sc["colors"]])
    shapes = torch.tensor([SHAPE_NAMES.index(s) for sc in chunks for s in sc["shapes"]])
    has_color = torch.tensor([m != "textureless" for sc in chunks for m in sc["shading"]])
    if cache is not None:
        torch.save({"imgs": (imgs * 255).round().byte(), "colors": colors, "shapes": shapes, "has_color": has_color,
                    "seed": seed}, cache)
    return imgs, colors, shapes, has_color


def train_classifier(n_images: int = 8192, epochs: int = 6, seed: int = 1, out: Path | None = CLASSIFIER,
                     batch: int = 64, cache: Path | None = None, width: int = 32,
                     strong_aug: bool = False) -> tuple[Classifier, dict]:
    """Train on fresh world renders (seed differs from the prior's); returns the model and held-out accuracy."""
    imgs, colors, shapes, has_color = classifier_data(n_images, seed, cache)
    g = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed)
    n_val = max(1, n_images // 10)
    model = Classifier(width)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    steps = epochs * (n_images - n_val) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=max(1, steps))
    for _ in range(steps):
        idx = torch.randint(n_val, n_images, (batch,), generator=g)
        lc, ls = model(_augment(imgs[idx], g, strong_aug))
        loss = F.cross_entropy(ls, shapes[idx])
        loss = loss + (F.cross_entropy(lc, colors[idx], reduction="none") * has_color[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        lc, ls = model(imgs[:n_val])
    m = has_color[:n_val]
    right = ls.argmax(1) == shapes[:n_val]
    acc = {"shape": right.float().mean().item(), "shape_textureless": right[~m].float().mean().item(),
           "color": (lc.argmax(1) == colors[:n_val])[m].float().mean().item()}
    if out is not None:
        save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(out))
    return model, acc


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
    out = {"prompt": prompt, "n_views": n_views, "seed": seed, "translucent_share": translucent_share(opacity)}
    if color is not None:
        out["colour_r_precision"] = (color_logits.argmax(1) == COLOR_NAMES.index(color)).float().mean().item()
    if shape is not None:
        out["geometry_r_precision"] = (shape_logits.argmax(1) == SHAPE_NAMES.index(shape)).float().mean().item()
        # what the views were taken for: tells a failure's look (a cube read as a house, a cylinder, ...)
        out["shape_votes"] = votes(shape_logits, SHAPE_NAMES)
        size = opacity.shape[-1]
        ious = {}
        for s in SHAPE_NAMES:  # ground-truth silhouettes of every solid from the same cameras
            _, mask = world.render([s] * n_views, torch.ones(n_views, 3), cams, light, "albedo", size, 1)
            ious[s] = _iou(opacity.float().cpu(), mask).mean().item()
        best_other = max(v for k, v in ious.items() if k != shape)
        out["shape_score"] = ious[shape]  # mean multi-view silhouette IoU with the prompted solid
        out["shape_margin"] = ious[shape] - best_other  # > 0: closer to the prompted solid than to any other
        out["silhouette_iou"] = {k: round(v, 3) for k, v in ious.items()}
    return out


@torch.no_grad()
def geometry_by_view(render_fn: RenderFn, shape: str, n_views: int = 512, seed: int = 1000,
                     classifier: Classifier | None = None) -> dict[str, dict]:
    """Geometry R-Precision split by the view label of each camera (`engine.sds.view_weights`' argmax), the
    side views also by which side (azimuth > 0 or < 0). Same cameras and shading as `evaluate`.

    On the world's own solids (`world_render_fn`) this shows which views of a shape are ambiguous even when
    the shape is perfect, e.g. a mug seen from behind its handle. Returns {view: {"right", "n", "share"}}."""
    from engine.sds import VIEWS, view_weights

    clf = classifier or load_classifier()
    cams = sample_cameras(EVAL_CAMERAS, n_views, torch.Generator().manual_seed(seed))
    light = make_light(cams, LiveParams(light_mode="camera"), EVAL_CAMERAS, None)
    plain, _ = render_fn(cams, light, "textureless")
    right = clf(plain.float().cpu())[1].argmax(1) == SHAPE_NAMES.index(shape)
    label = view_weights(cams.azimuth, cams.elevation).argmax(-1).cpu()
    az = torch.remainder(cams.azimuth.cpu() + 180.0, 360.0) - 180.0
    groups = {v: label == i for i, v in enumerate(VIEWS)}
    groups["side (azimuth > 0)"] = groups["side"] & (az > 0)
    groups["side (azimuth < 0)"] = groups["side"] & (az < 0)
    groups["all"] = torch.ones_like(right)
    out = {}
    for name, m in groups.items():
        k, n = int((right & m).sum()), int(m.sum())
        out[name] = {"right": k, "n": n, "share": round(k / n, 3) if n else None}
    return out


def world_render_fn(shape: str, color: str, size: int = 32) -> RenderFn:
    """render_fn of a perfect result: the world's own solid (the evaluation's upper bound, used in tests)."""
    def fn(cams: Cameras, light: Light, shading: str) -> tuple[Tensor, Tensor]:
        rgb = torch.tensor(world.COLORS[color]).expand(len(cams), 3)
        return world.render([shape] * len(cams), rgb, cams, light, shading, size)
    return fn


def trainer_render_fn(trainer, size: int = 32) -> RenderFn:
    """render_fn of a run: engine.trainer.Trainer.render_views at size x size (what `engine eval` scores)."""
    def fn(cams: Cameras, light: Light, shading: str) -> tuple[Tensor, Tensor]:
        out = trainer.render_views(cams, size, size, shading, light=light.to(trainer.device))
        return out.rgb.cpu(), out.opacity.cpu()
    return fn


def evaluate_run(run_dir: str | Path, n_views: int = 16, seed: int = 0, prompt: str | None = None,
                 size: int = 32, classifier: str | Path | None = None) -> dict:
    """evaluate() of the run saved in run_dir (prompt: the run's own unless given); what `engine eval` prints."""
    from engine.checkpoint import restore
    from engine.priors.analytic import GaussianPrior

    trainer, live = restore(run_dir, prior=GaussianPrior())  # rendering needs no prior: skip loading the run's
    clf = load_classifier(classifier) if classifier else None
    return evaluate(trainer_render_fn(trainer, size), prompt or live.prompt, n_views, seed, clf)


@torch.no_grad()
def prior_sample_accuracy(model, n_per_caption: int = 2, guidance_scale: float = 2.0, steps: int = 25,
                          seed: int = 0, classifier: Classifier | None = None, grid: Path | None = None) -> dict:
    """Sample the prior for every "a <colour> <shape>" and classify the samples (colour and shape both right)."""
    from engine.priors.embedded import sample

    clf = classifier or load_classifier()
    pairs = [(c, s) for s in SHAPE_NAMES for c in COLOR_NAMES] * n_per_caption
    imgs = sample(model, [world.caption(s, c) for c, s in pairs], guidance_scale, steps,
                  torch.Generator().manual_seed(seed))
    lc, ls = clf(imgs)
    ok_c = lc.argmax(1) == torch.tensor([COLOR_NAMES.index(c) for c, _ in pairs])
    ok_s = ls.argmax(1) == torch.tensor([SHAPE_NAMES.index(s) for _, s in pairs])
    if grid is not None:
        save_grid(imgs[: len(COLOR_NAMES) * len(SHAPE_NAMES)], grid, nrow=len(COLOR_NAMES))
    per_shape = {s: ok_s[[i for i, (_, s2) in enumerate(pairs) if s2 == s]].float().mean().item() for s in SHAPE_NAMES}
    return {"n": len(pairs), "guidance_scale": guidance_scale, "colour": ok_c.float().mean().item(),
            "shape": ok_s.float().mean().item(), "both": (ok_c & ok_s).float().mean().item(), "per_shape": per_shape}


@torch.no_grad()
def caption_votes(model, captions: list[str], n: int = 12, guidance_scale: float = 3.0, steps: int = 25,
                  seed: int = 0, classifier: Classifier | None = None) -> dict[str, dict]:
    """Sample the prior n times for each caption (any text, view words too) and count what the classifier
    takes the samples for: {caption: {"shape_votes": {shape: count}, "colour_votes": {colour: count}}}."""
    from engine.priors.embedded import sample

    clf = classifier or load_classifier()
    out = {}
    for cap in captions:
        lc, ls = clf(sample(model, [cap] * n, guidance_scale, steps, torch.Generator().manual_seed(seed)))
        out[cap] = {"shape_votes": votes(ls, SHAPE_NAMES), "colour_votes": votes(lc, COLOR_NAMES)}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Train the evaluation classifier or score the embedded prior")
    ap.add_argument("command", choices=["train-classifier", "prior-samples"])
    ap.add_argument("--n", type=int, default=2, help="prior-samples: samples per caption")
    ap.add_argument("--cfg", type=float, default=2.0, help="prior-samples: guidance scale")
    ap.add_argument("--steps", type=int, default=25, help="prior-samples: DDIM steps")
    ap.add_argument("--weights", default=None, help="prior-samples: embedded prior weights (default: shipped)")
    ap.add_argument("--grid", default=None, help="prior-samples: write a sample grid PNG here")
    ap.add_argument("--captions", nargs="+", default=None,
                    help="prior-samples: instead of the vocabulary's captions, these (e.g. 'a red cube, front view'); "
                         "prints what the classifier takes each caption's --n samples for")
    # the defaults reproduce the shipped classifier
    ap.add_argument("--images", type=int, default=6144, help="train-classifier: renders to train on")
    ap.add_argument("--epochs", type=int, default=20, help="train-classifier: passes over the renders")
    ap.add_argument("--width", type=int, default=32, help="train-classifier: channels of the first conv stage")
    ap.add_argument("--strong-aug", action=argparse.BooleanOptionalAction, default=False,
                    help="train-classifier: also augment with blotchy shading, contrast and brightness")
    ap.add_argument("--cache", default=None, help="train-classifier: keep the renders in this .pt file")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.command == "train-classifier":
        _, res = train_classifier(args.images, args.epochs, cache=Path(args.cache) if args.cache else None,
                                  width=args.width, strong_aug=args.strong_aug)
    else:
        from engine.priors.embedded import EmbeddedPrior

        prior = EmbeddedPrior.load(args.weights)
        grid = Path(args.grid) if args.grid else None
        if args.captions:
            res = {"n": args.n, "guidance_scale": args.cfg,
                   "captions": caption_votes(prior.model, args.captions, args.n, args.cfg, args.steps)}
        else:
            res = prior_sample_accuracy(prior.model, args.n, args.cfg, args.steps, grid=grid)
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
