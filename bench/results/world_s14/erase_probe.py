"""Erase probe (session 14): does one SDS step keep the world's own solid, or fade it into its backdrop?

Renders the world's solid for each prompt on a grey backdrop (0.5 unless --backdrop) from 32 cameras of the
training distribution and takes the prior's SDS step in each shading mode (the descent direction on the image;
CFG as given, sigma2 weighting, t ~ U(t_lo, t_hi), 8 noise draws). It prints that step's mean cosine with the
"fade into the backdrop" direction on the object's pixels: + erases, - keeps.
Run from a checkout (the hip-roof world for session 13's prior):

    PYTHONPATH=. python bench/results/world_s14/erase_probe.py --prior embedded --cfg 10 --t 0.3 0.6 \
        'a white house' 'a red house'
"""

from __future__ import annotations

import argparse

import torch

from engine import world
from engine.cameras import make_light, sample_cameras
from engine.config import CameraConfig, LiveParams
from engine.evaluate import parse_prompt
from engine.priors import load_prior
from engine.priors.base import SDSContext


def erase_cosines(prior, prompt: str, cfg: float, t_range: tuple[float, float], views: int = 32,
                  draws: int = 8, backdrop: float = 0.5) -> dict[str, float]:
    color, shape = parse_prompt(prompt)
    g = torch.Generator().manual_seed(1)
    cams = sample_cameras(CameraConfig(), views, g)
    light = make_light(cams, LiveParams(), CameraConfig(), g)
    emb = prior.encode_prompt(prompt, "")
    bg = torch.full((views, 3), backdrop)
    rgb = torch.tensor(world.COLORS[color]).expand(views, 3)
    out = {}
    for shading in ("albedo", "lambertian", "textureless"):
        solid, alpha = world.render([shape] * views, rgb, cams, light, shading, 32, 2, background=bg)
        fade = (bg[:, :, None, None] - solid) * (alpha > 0.5)
        total = 0.0
        for k in range(draws):
            ctx = SDSContext(view_weights=cams.view_weights(), shading=shading)
            grad, _ = prior.sds_grad(solid, emb, ctx, guidance_scale=cfg, t_range=t_range, weighting="sigma2",
                                     generator=torch.Generator().manual_seed(100 + k))
            cos = torch.nn.functional.cosine_similarity((-grad).flatten(1), fade.flatten(1), dim=1, eps=1e-8)
            total += cos.mean().item()
        out[shading] = round(total / draws, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prompts", nargs="+")
    ap.add_argument("--prior", default="embedded")
    ap.add_argument("--cfg", type=float, default=10.0)
    ap.add_argument("--t", type=float, nargs=2, default=(0.3, 0.6))
    ap.add_argument("--backdrop", type=float, default=0.5, help="grey level behind the solid")
    args = ap.parse_args()
    torch.set_num_threads(2)
    prior = load_prior(args.prior)
    for p in args.prompts:
        print(p, erase_cosines(prior, p, args.cfg, tuple(args.t), backdrop=args.backdrop), flush=True)


if __name__ == "__main__":
    main()
