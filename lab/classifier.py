"""Train the evaluation classifier (`engine.evaluate.Classifier`) on fresh renders of the procedural world.

It is trained on the world's own renders (seed 1, never the prior's data nor its outputs), so that it judges
SDS results independently of the prior. The defaults reproduce the shipped assets/classifier.safetensors:

    python -m lab.classifier --images 6144 --epochs 20 --cache runs/classifier_data.pt

`--cache` keeps the renders (the slow part) for the next call; `--out` writes somewhere else than assets/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from engine.evaluate import CLASSIFIER, COLOR_NAMES, SHAPE_NAMES, Classifier
from lab.world_data import render_scenes, sample_scenes


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
    chunks = [sample_scenes(min(512, n_images - i), g) for i in range(0, n_images, 512)]
    imgs = torch.cat([render_scenes(sc)[0] for sc in chunks])
    colors = torch.tensor([COLOR_NAMES.index(c) for sc in chunks for c in sc["colors"]])
    shapes = torch.tensor([SHAPE_NAMES.index(s) for sc in chunks for s in sc["shapes"]])
    has_color = torch.tensor([m != "textureless" for sc in chunks for m in sc["shading"]])
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # the defaults reproduce the shipped classifier
    ap.add_argument("--images", type=int, default=6144, help="renders to train on (a tenth is held out)")
    ap.add_argument("--epochs", type=int, default=20, help="passes over the renders")
    ap.add_argument("--width", type=int, default=32, help="channels of the first conv stage")
    ap.add_argument("--strong-aug", action=argparse.BooleanOptionalAction, default=False,
                    help="also augment with blotchy shading, contrast and brightness")
    ap.add_argument("--cache", default=None, help="keep the renders in this .pt file")
    ap.add_argument("--out", default=str(CLASSIFIER), help="where the weights go (fp16 safetensors)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    _, res = train_classifier(args.images, args.epochs, out=Path(args.out), width=args.width,
                              cache=Path(args.cache) if args.cache else None, strong_aug=args.strong_aug)
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
