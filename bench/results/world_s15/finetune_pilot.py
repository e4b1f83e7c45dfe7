"""Pilot (session 15, rule 6): fine-tune a prior for N steps with or without empty backdrops, then probe it.
usage (from the hip-roof worktree): PYTHONPATH=. python bench/results/world_s15/finetune_pilot.py WEIGHTS OUT_DIR P_EMPTY STEPS"""
import copy
import sys
import time
from pathlib import Path

import torch

from engine.priors.embedded import EmbeddedModel
from engine.priors.train_embedded import _replace, ema_update, render_batch, train_step

src, out, p_empty, steps = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(2)
torch.manual_seed(0)
model = EmbeddedModel.from_file(src).float().train().requires_grad_(True)
ema = copy.deepcopy(model).requires_grad_(False)
opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, weight_decay=0.0)  # the recipe's end-of-decay LR
g = torch.Generator().manual_seed(7)
pool = render_batch(2048, g, None, p_empty)
alphas = model.scheduler().alphas_cumprod
t0 = time.time()
for step in range(steps):
    at = torch.randint(2048, (4,), generator=g).tolist()
    _replace(pool, render_batch(4, g, None, p_empty), at)
    loss = train_step(model, opt, pool, 32, g, alphas, 5.0)
    ema_update(ema, model, 10_000)  # decay 0.999 from the start: the EMA starts at the source weights
    if step % 100 == 0:
        print(step, round(loss, 4), round(time.time() - t0), flush=True)
out.mkdir(parents=True, exist_ok=True)
ema.save(out / "embedded_prior.safetensors", {"finetune_of": src, "empty": p_empty, "steps": steps})
print("done", round(time.time() - t0), flush=True)
