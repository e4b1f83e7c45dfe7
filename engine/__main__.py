"""Headless command line: `python -m engine run|eval|export ...`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import torch


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    return name


def default_run_dir(root: str | Path, prompt: str) -> Path:
    from engine.export import slugify

    return Path(root) / f"{datetime.now():%Y%m%d-%H%M%S}-{slugify(prompt)}"


def cmd_run(args) -> int:
    from engine.checkpoint import live_from_meta, load_into, read_checkpoint, save_checkpoint
    from engine.config import Config, LiveParams
    from engine.export import save_png, tile
    from engine.priors import load_prior
    from engine.trainer import Trainer
    from engine.cameras import preview_cameras
    from tqdm import tqdm

    device = _device(args.device)
    if args.resume:
        meta, tensors = read_checkpoint(args.resume)
        cfg = Config.from_dict(meta["config"])
        live = live_from_meta(meta)
        if args.steps is not None:
            cfg.steps = args.steps
        out = Path(args.out or args.resume)
    else:
        cfg = Config(prior=args.prior or "embedded", seed=args.seed)
        if args.steps is not None:
            cfg.steps = args.steps
        if args.backbone:
            cfg.field.backbone = args.backbone
        if args.resolution:
            cfg.render.resolution = args.resolution
        live = LiveParams(prompt=args.prompt, negative_prompt=args.negative_prompt,
                          guidance_scale=args.guidance_scale if args.guidance_scale is not None else
                          LiveParams.guidance_scale, seed=args.seed).validated()
        out = Path(args.out) if args.out else default_run_dir(args.out_root, args.prompt)
    if cfg.steps < 1:
        raise ValueError(f"--steps must be a positive integer; got {cfg.steps}")
    prior = load_prior(cfg.prior, device=device)
    trainer = Trainer(cfg, prior, device, live)
    if args.resume:
        load_into(trainer, meta, tensors)
    for w in trainer.embedding(live.prompt, live.negative_prompt).warnings:
        print(f"warning: {w}", file=sys.stderr)
    start, t0 = trainer.step_count, time.perf_counter()
    last = {}
    for _ in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="SDS", disable=args.quiet):
        last = trainer.step(live).metrics
    wall = time.perf_counter() - t0
    done = cfg.steps - start
    save_checkpoint(trainer, out, live)
    views = trainer.render_views(preview_cameras(device), 128, 128, "lambertian", live)
    save_png(tile(views.rgb), out / "preview.png")
    metrics = {"steps": trainer.step_count, "steps_this_run": done, "its_per_s": done / wall if wall else 0.0,
               "wall_s": wall, "skipped_steps": trainer.skipped_steps, "final": last, "prior": prior.name,
               "device": str(device), "live": dataclasses.asdict(live), "config": cfg.to_dict()}
    from engine.checkpoint import atomic_write

    atomic_write(out / "metrics.json", lambda p: Path(p).write_text(json.dumps(metrics, indent=2)))
    print(json.dumps({"run": str(out), "steps": trainer.step_count, "its_per_s": round(metrics["its_per_s"], 2),
                      "wall_s": round(wall, 1), "loss": last.get("loss")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from engine.priors import PRIOR_HELP

    p = argparse.ArgumentParser(prog="python -m engine", description="DreamFusion engine, headless.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="optimise a field for a prompt")
    r.add_argument("--prompt", default="a red cube", help="text prompt")
    r.add_argument("--negative-prompt", default="", help="negative prompt")
    r.add_argument("--prior", default=None, help=f"prior: {PRIOR_HELP}")
    r.add_argument("--steps", type=int, default=None, help="total training steps (default: the config's)")
    r.add_argument("--seed", type=int, default=0, help="seed of the run")
    r.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    r.add_argument("--backbone", choices=("grid", "hash"), default=None, help="field backbone")
    r.add_argument("--resolution", type=int, default=None, help="training render size (default: the prior's)")
    r.add_argument("--out", default=None, help="run folder (default: OUT_ROOT/<date>-<prompt>)")
    r.add_argument("--out-root", default="outputs", help="root of default run folders")
    r.add_argument("--resume", default=None, metavar="DIR", help="continue the run saved in DIR")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(fn=cmd_run)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
