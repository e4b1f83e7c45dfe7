"""Train the embedded prior from scratch on the procedural world; resumable, reproducible from a seed.

    python -m lab.train_prior --out runs/embedded --steps 7200 --minutes 106 --seed 0 --threads 2 --export assets

That command made the shipped assets/embedded_prior.safetensors (assets/MODEL_CARD.md) and redoes it step
for step.

Rendering costs about as much as a training step on this CPU, so images live in a pool that is
refreshed a few renders per step (every image is seen ~10 times, each time with fresh noise, a fresh
timestep and a freshly drawn caption). A checkpoint (model, EMA, optimizer, pool, generators) is written
every few minutes; running the same command again resumes from it. `--export DIR` writes the EMA weights
as DIR/embedded_prior.safetensors (+ .json) and a sample grid when training ends (`--steps 0` exports
the current checkpoint only).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from engine import world
from engine.priors.embedded import EmbeddedModel, sample
from engine.sds import view_labels
from lab.prior_samples import save_grid
from lab.world_data import caption, render_scenes, sample_scenes

SHAPE_WEIGHTS = {"cube": 1.5, "house": 1.2, "mug": 1.5}  # boxy shapes came out lumpy, mugs lost their handle: show more of them


def render_batch(n: int, g: torch.Generator) -> dict:
    """n fresh world renders with what their captions are drawn from (uint8 images keep the pool small)."""
    sc = sample_scenes(n, g, shape_weights=SHAPE_WEIGHTS, contrast=True)
    img, _ = render_scenes(sc, size=32)
    return {"img": (img * 255).round().to(torch.uint8), "shape": list(sc["shapes"]), "color": sc["colors"],
            "view": view_labels(sc["cameras"].view_weights()), "shading": sc["shading"]}


def draw_captions(pool: dict, idx: list[int], g: torch.Generator, p_drop: float = 0.1) -> list[str]:
    """Captions for pool entries: colour left out of textureless renders (they carry none) and 10 % of the
    others; view left out 30 %; the whole caption dropped p_drop (the unconditional model for CFG)."""
    u = torch.rand(len(idx), 3, generator=g).tolist()
    out = []
    for (u_all, u_col, u_view), i in zip(u, idx, strict=True):
        if u_all < p_drop:
            out.append("")
            continue
        color = None if pool["shading"][i] == "textureless" or u_col < 0.1 else pool["color"][i]
        out.append(caption(pool["shape"][i], color, pool["view"][i] if u_view >= 0.3 else None))
    return out


def _replace(pool: dict, new: dict, at: list[int]) -> None:
    pool["img"][at] = new["img"]
    for k in ("shape", "color", "view", "shading"):
        for j, i in enumerate(at):
            pool[k][i] = new[k][j]


def min_snr_weight(abar: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023): min(SNR, gamma) / SNR.

    Nearly-clean timesteps (huge SNR) teach little about shape and colour yet dominate the plain MSE's
    gradient; capping their weight made training converge several times faster in that paper. gamma <= 0:
    plain MSE."""
    if gamma <= 0:
        return torch.ones_like(abar)
    snr = abar / (1 - abar)
    return snr.clamp(max=gamma) / snr


def lr_at(step: int, base: float, total: int, warmup: int = 200, floor: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then a cosine decay to floor * base at step `total`."""
    import math

    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def train_step(model, opt, pool: dict, batch: int, g: torch.Generator, alphas: torch.Tensor,
               snr_gamma: float = 0.0) -> float:
    idx = torch.randint(len(pool["shape"]), (batch,), generator=g).tolist()
    x0 = pool["img"][idx].float() / 127.5 - 1.0
    caps = draw_captions(pool, idx, g)
    t = torch.randint(0, len(alphas), (batch,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    a = alphas[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    states, pooled = model.encode(caps)
    per_image = F.mse_loss(model(xt, t, states, pooled), noise, reduction="none").mean((1, 2, 3))
    loss = (min_snr_weight(alphas[t], snr_gamma) * per_image).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


@torch.no_grad()
def ema_update(ema, model, step: int, decay: float = 0.999) -> None:
    d = min(decay, (1 + step) / (10 + step))  # short warm-up so early checkpoints are usable
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm, 1 - d)


def export(ema: EmbeddedModel, out_dir: Path, meta: dict, grid_steps: int = 25, grid_seed: int = 0) -> None:
    """EMA weights (fp16) + json to out_dir/embedded_prior.*, and a grid of samples (one row per shape)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ema.save(out_dir / "embedded_prior.safetensors", meta)
    if grid_steps <= 0:
        return
    model = EmbeddedModel.from_file(out_dir / "embedded_prior.safetensors")
    caps = [caption(s, c) for s in world.SHAPES for c in world.COLORS]
    imgs = sample(model, caps, steps=grid_steps, generator=torch.Generator().manual_seed(grid_seed))
    save_grid(imgs, out_dir / "embedded_samples.png", nrow=len(world.COLORS))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/embedded", help="checkpoint folder (resumed if it holds one)")
    ap.add_argument("--minutes", type=float, default=75.0, help="wall-clock budget of this invocation")
    ap.add_argument("--steps", type=int, default=7200, help="stop at this total step count")
    ap.add_argument("--lr-steps", type=int, default=None,
                    help="length of the cosine learning-rate decay (default: --steps); set it to re-run a run that "
                         "--minutes stopped early, step for step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (200-step warm-up, cosine to 10 %%)")
    ap.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR-gamma loss weighting; 0: plain MSE")
    ap.add_argument("--pool", type=int, default=4096, help="images held in memory")
    ap.add_argument("--refresh", type=int, default=4, help="images re-rendered per step")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads: 2 on an idle 2-core CPU (0.65 s/step vs 0.94 with 1); use 1 when other jobs "
                         "share the cores (OpenMP then was 5-10x slower here)")
    ap.add_argument("--ckpt-minutes", type=float, default=4.0)
    ap.add_argument("--export", default=None, help="write the EMA model to this folder at the end")
    ap.add_argument("--grid-steps", type=int, default=25, help="DDIM steps of the exported sample grid; 0: none")
    ap.add_argument("--config", default=None, help="JSON overrides of the model config (tests use tiny ones)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    run(parse_args(argv))


def run(args) -> dict:
    import json

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    torch.manual_seed(args.seed)
    model = EmbeddedModel(json.loads(args.config) if args.config else None)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"]), ema.load_state_dict(ck["ema"]), opt.load_state_dict(ck["opt"])
        g.set_state(ck["gen"])
        pool, step, elapsed = ck["pool"], ck["step"], ck["elapsed"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min trained)", flush=True)
    else:
        t0 = time.time()
        pool, step = render_batch(args.pool, g), 0
        elapsed = time.time() - t0  # the first pool's renders count towards the training time
    alphas = model.scheduler().alphas_cumprod

    def save():
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "gen": g.get_state(),
                    "pool": pool, "step": step, "elapsed": elapsed, "args": vars(args)}, str(ckpt_path) + ".tmp")
        Path(str(ckpt_path) + ".tmp").replace(ckpt_path)

    t_start, t_ckpt, losses = time.time(), time.time(), []
    while step < args.steps and time.time() - t_start < args.minutes * 60:
        t0 = time.time()
        if args.refresh:  # fresh renders replace random pool entries
            at = torch.randint(args.pool, (args.refresh,), generator=g).tolist()
            _replace(pool, render_batch(args.refresh, g), at)
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, args.lr, args.lr_steps or args.steps)
        losses.append(train_step(model, opt, pool, args.batch, g, alphas, args.snr_gamma))
        ema_update(ema, model, step)
        step += 1
        elapsed += time.time() - t0
        if step % 50 == 0:
            print(f"step {step} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                  f"{elapsed / step:.2f} s/step {elapsed / 60:.1f} min", flush=True)
        if time.time() - t_ckpt > args.ckpt_minutes * 60:
            save()
            t_ckpt = time.time()
    if losses:  # an export-only call (--steps at or below the checkpoint's) leaves the checkpoint alone
        save()
    meta = {"steps": step, "batch": args.batch, "train_minutes": round(elapsed / 60, 1), "seed": args.seed,
            "threads": args.threads, "pool": args.pool, "refresh": args.refresh, "lr": args.lr,
            "lr_schedule": f"warm-up 200, cosine to 10 % at step {args.lr_steps or args.steps}", "snr_gamma": args.snr_gamma,
            "shape_weights": SHAPE_WEIGHTS}
    if args.export:
        export(ema, Path(args.export), meta, args.grid_steps)
    print(f"done: step {step}, {elapsed / 60:.1f} min", flush=True)
    return {"losses": losses, "model": model, "ema": ema, "step": step}


if __name__ == "__main__":
    main()
