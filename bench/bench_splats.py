"""Splats against the NeRF: training its/s at 32² and 64² for the gaussians backbone and the grid NeRF, on the
same prior (oracle:cube and the embedded prior), and the Gaussian count over the run.

Each run starts from the prior's preset (engine.presets: its learning rate, and for the embedded prior its
densification bound), at the resolution asked.

    python bench/bench_splats.py               # 600 steps per run
    python bench/bench_splats.py --steps 100   # smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from engine.presets import live_defaults, preset  # noqa: E402
from engine.priors import load_prior  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

PRIORS = ("oracle:cube", "embedded")
EVERY = 100  # steps between two Gaussian counts


def run(prior: str, backbone: str, res: int, steps: int) -> dict:
    """its/s over `steps` steps (after 5 warm-up steps) and the Gaussian count every EVERY steps."""
    cfg = preset(prior).with_settings({"field.backbone": backbone, "render.resolution": res})
    trainer, live = Trainer(cfg, load_prior(prior)), live_defaults(prior, prompt="a red cube")
    for _ in range(5):
        trainer.step(live)
    counts, t0 = [], time.perf_counter()
    for i in range(steps):
        m = trainer.step(live).metrics
        if "gaussians" in m and (i + 1) % EVERY == 0:
            counts.append(m["gaussians"])
    return {"its": steps / (time.perf_counter() - t0), "counts": counts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.1f}; {args.threads} thread(s); {args.steps} steps per run")
    print(f"| prior | res | NeRF (grid) its/s | splats its/s | Gaussians every {EVERY} steps |")
    print("|---|---|---|---|---|")
    for prior in PRIORS:
        for res in (32, 64):
            nerf, splats = run(prior, "grid", res, args.steps), run(prior, "gaussians", res, args.steps)
            counts = " → ".join(str(c) for c in splats["counts"])
            print(f"| {prior} | {res}² | {nerf['its']:.2f} | {splats['its']:.2f} | {counts} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
