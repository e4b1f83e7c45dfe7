"""What the embedded prior draws by itself: its samples, named by the independent classifier.

Sampling the prior for every "a <colour> <shape>" caption and classifying the samples tells whether the prior
knows the world before SDS is asked to lift it to 3D (assets/MODEL_CARD.md, "Measured").

    python -m lab.prior_samples --n 4 --steps 25 --cfg 2 --threads 2           # the shipped prior, 256 samples
    python -m lab.prior_samples --weights runs/embedded --grid runs/samples.png   # other weights, and a grid
    python -m lab.prior_samples --n 12 --cfg 3 --captions 'a red cube, front view' 'a red cube, back view'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from engine.evaluate import COLOR_NAMES, SHAPE_NAMES, Classifier, load_classifier, votes
from engine.priors.embedded import EmbeddedPrior, sample
from lab.world_data import caption


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


@torch.no_grad()
def prior_sample_accuracy(model, n_per_caption: int = 2, guidance_scale: float = 2.0, steps: int = 25,
                          seed: int = 0, classifier: Classifier | None = None, grid: Path | None = None) -> dict:
    """Sample the prior for every "a <colour> <shape>" and classify the samples (colour and shape both right)."""
    clf = classifier or load_classifier()
    pairs = [(c, s) for s in SHAPE_NAMES for c in COLOR_NAMES] * n_per_caption
    imgs = sample(model, [caption(s, c) for c, s in pairs], guidance_scale, steps,
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
    clf = classifier or load_classifier()
    out = {}
    for cap in captions:
        lc, ls = clf(sample(model, [cap] * n, guidance_scale, steps, torch.Generator().manual_seed(seed)))
        out[cap] = {"shape_votes": votes(ls, SHAPE_NAMES), "colour_votes": votes(lc, COLOR_NAMES)}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2, help="samples per caption")
    ap.add_argument("--cfg", type=float, default=2.0, help="guidance scale")
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps")
    ap.add_argument("--weights", default=None, help="embedded prior weights (default: the shipped ones)")
    ap.add_argument("--grid", default=None, help="write a sample grid PNG here (one draw per caption)")
    ap.add_argument("--captions", nargs="+", default=None,
                    help="instead of the vocabulary's captions, these (e.g. 'a red cube, front view'); prints what "
                         "the classifier takes each caption's --n samples for")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = EmbeddedPrior.load(args.weights).model
    if args.captions:
        res = {"n": args.n, "guidance_scale": args.cfg,
               "captions": caption_votes(model, args.captions, args.n, args.cfg, args.steps)}
    else:
        res = prior_sample_accuracy(model, args.n, args.cfg, args.steps, grid=Path(args.grid) if args.grid else None)
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
