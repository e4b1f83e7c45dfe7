import sys, torch
torch.set_num_threads(2)
from engine import world
from engine.cameras import make_light, sample_cameras
from engine.config import CameraConfig, LiveParams
from engine.priors import load_prior
from engine.priors.base import SDSContext
prior = load_prior(sys.argv[1]); cfgv=float(sys.argv[2]); import os; TR=tuple(map(float, os.environ["TR"].split(",")))
g = torch.Generator().manual_seed(1); V=32
cams = sample_cameras(CameraConfig(), V, g); light = make_light(cams, LiveParams(), CameraConfig(), g)
for prompt in sys.argv[3:]:
    col, shape = prompt.split()[1], prompt.split()[2]
    emb = prior.encode_prompt(prompt, "")
    bg = torch.full((V,3), 0.5)
    row=[]
    for shading in ("albedo","lambertian","textureless"):
        solid, alpha = world.render([shape]*V, torch.tensor(world.COLORS[col]).expand(V,3), cams, light, shading, 32, 2, background=bg)
        flat = bg[:,:,None,None].expand_as(solid)
        d = (flat - solid) * (alpha > 0.5)  # erase direction on object pixels
        acc=0
        for k in range(8):
            ctx = SDSContext(view_weights=cams.view_weights(), shading=shading)
            grad,_ = prior.sds_grad(solid, emb, ctx, guidance_scale=cfgv, t_range=TR, weighting="sigma2", generator=torch.Generator().manual_seed(100+k))
            step = -grad  # descent direction on the image
            acc += ((step*d).sum((1,2,3)) / (d.square().sum((1,2,3)).sqrt()+1e-8) / (step.square().sum((1,2,3)).sqrt()+1e-8)).mean().item()
        row.append(f"{shading} {acc/8:+.3f}")
    print(prompt, *row, flush=True)
