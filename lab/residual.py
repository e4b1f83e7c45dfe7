"""Does the prior prefer the prompted solid to what SDS made of it? (issue 3's boxy failures)

For a saved run, renders the run's field and the world's own solid from the same training-distribution
cameras and lights, on the run's backdrop colour, and prints the prior's denoising residual on each:
mean ||eps_c(z_t) - eps||^2 over t ~ U(t_min, t_max) and several noise draws (guidance 1: the conditional
score alone, before any SDS weighting). The lower residual is the image the prior finds more likely
for the prompt; when the solid's is lower, SDS stopped in a worse optimum than the prior's picture.

    python -m lab.residual runs/protocol/a_blue_cube
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from engine import world
from engine.cameras import make_light, sample_cameras
from engine.checkpoint import restore
from engine.config import CameraConfig, LiveParams
from engine.evaluate import parse_prompt
from engine.priors import load_prior
from engine.priors.base import SDSContext


def residuals(run_dir: str | Path, views: int = 32, draws: int = 6, t_range=(0.02, 0.5), seed: int = 1) -> dict:
    prior = load_prior("embedded")
    trainer, live = restore(run_dir, prior=prior)
    color, shape = parse_prompt(live.prompt)
    if color is None or shape is None:
        raise SystemExit(f"the run's prompt {live.prompt!r} names no colour and solid of the world")
    g = torch.Generator().manual_seed(seed)
    cams = sample_cameras(CameraConfig(), views, g)
    light = make_light(cams, LiveParams(), CameraConfig(), g)
    emb = trainer.embedding(live.prompt, "")
    res = trainer.resolution
    out = {"run": str(run_dir), "prompt": live.prompt, "views": views, "draws": draws, "t_range": list(t_range)}
    for shading in ("lambertian", "textureless"):
        mine = trainer.render_views(cams, res, res, shading, light=light).rgb
        backdrop = mine[:, :, 0, 0].mean(0).expand(views, 3)  # the run's background, read at a corner
        rgb = torch.tensor(world.COLORS[color]).expand(views, 3)
        solid, _ = world.render([shape] * views, rgb, cams, light, shading, size=res, supersample=2, background=backdrop)
        for name, img in (("solid", solid), ("run", mine)):
            r = []
            for d in range(draws):
                ctx = SDSContext(view_weights=cams.view_weights(), shading=shading)
                # eps_err: mean (eps_hat - eps)^2 at the prior's resolution, before any weighting w(t)
                _, info = prior.sds_grad(img, emb, ctx, guidance_scale=1.0, t_range=t_range,
                                         generator=torch.Generator().manual_seed(100 + d))
                r.append(info["eps_err"])
            out[f"{shading}_{name}"] = round(sum(r) / len(r), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (checkpoint.json + checkpoint.safetensors)")
    ap.add_argument("--views", type=int, default=32)
    ap.add_argument("--draws", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for run in args.runs:
        print(json.dumps(residuals(run, args.views, args.draws)))


if __name__ == "__main__":
    main()
