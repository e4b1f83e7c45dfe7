"""Splats against the NeRF: training its/s at 32² and 64² for the gaussians backbone and the grid NeRF, on the
same prior (oracle:cube and the embedded prior), and the Gaussian count over the run.

    python bench/bench_splats.py               # 200 steps per run
    python bench/bench_splats.py --steps 50    # smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from engine.config import Config, LiveParams  # noqa: E402
from engine.priors import load_prior  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

PRIORS = {"oracle:cube": ("a red cube", 0.03), "embedded": ("a red cube", 1e-2)}


def run(prior: str, backbone: str, res: int, steps: int) -> dict:
    """its/s over `steps` steps (after 5 warm-up steps) and the Gaussian count every 50 steps."""
    cfg = Config(prior=prior).with_settings({"field.backbone": backbone, "render.resolution": res})
    prompt, lr = PRIORS[prior]
    trainer, live = Trainer(cfg, load_prior(prior)), LiveParams(prompt=prompt, learning_rate=lr)
    for _ in range(5):
        trainer.step(live)
    counts, t0 = [], time.perf_counter()
    for i in range(steps):
        m = trainer.step(live).metrics
        if "gaussians" in m and (i + 1) % 50 == 0:
            counts.append(m["gaussians"])
    return {"its": steps / (time.perf_counter() - t0), "counts": counts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.1f}; {args.threads} thread(s); {args.steps} steps per run")
    print("| prior | res | NeRF (grid) its/s | splats its/s | Gaussians every 50 steps |")
    print("|---|---|---|---|---|")
    for prior in PRIORS:
        for res in (32, 64):
            nerf, splats = run(prior, "grid", res, args.steps), run(prior, "gaussians", res, args.steps)
            counts = " → ".join(str(c) for c in splats["counts"])
            print(f"| {prior} | {res}² | {nerf['its']:.2f} | {splats['its']:.2f} | {counts} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
